"""bench/compare_public.py: train_gpt.py's model and Muon step against the public record's. The comparison itself
needs the record's log (not in the repository: records/gpu/README.md says where it comes from) and skips
without it; the errors for a missing or wrong log run everywhere."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "bench" / "compare_public.py"
RECORD_LOG = Path(os.environ.get("RECORD_LOG", ROOT / "bench" / "public" / "000_592014ec-6781-4f59-b274-c4af68ccfe75.txt"))


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_a_missing_or_wrong_log_is_one_clear_error(tmp_path):
    result = run_tool(tmp_path / "nope.txt")
    assert result.returncode == 2 and "no file" in result.stderr and "records/gpu/README.md" in result.stderr
    wrong = tmp_path / "log.txt"
    wrong.write_text("print('another script')\n" + "=" * 100 + "\nstep:1/10\n")
    result = run_tool(wrong)
    assert result.returncode == 1 and "does not start with the record script" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "binary.txt").write_bytes(b"\x80\xff not UTF-8")
    result = run_tool(tmp_path / "binary.txt")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == (f"compare_public.py: error: {tmp_path}/binary.txt is not a text log (invalid start byte at "
                             "byte 0): pass the GPT-2 Medium record's log (records/gpu/README.md)\n")


@pytest.mark.skipif(not RECORD_LOG.is_file(), reason="the public record's log is not in bench/public/")
def test_our_model_and_muon_are_the_record_s_and_a_change_is_caught(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TOOL.parent))
    import compare_public
    import train_gpt

    args = [str(RECORD_LOG), "--seq_len", "256", "--windows", "1"]  # a minute or two each on 2 cores
    assert compare_public.main(args + ["--train_steps", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "same as the record" and out[-2].startswith("training, 4 steps") and out[-2].endswith(" ok")
    # RMS norm with another epsilon: 1e-3 in the loss, and the comparison says so
    monkeypatch.setattr(train_gpt, "norm", lambda x: F.rms_norm(x, (x.size(-1),), eps=1e-3))
    assert compare_public.main(args + ["--train_steps", "0"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out.splitlines()[0] and out.splitlines()[-1] == "DIFFERENT from the record"


# ---- Each check can fail, and any failed check fails the comparison ----

@pytest.fixture
def compare_public(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOL.parent))
    import compare_public
    return compare_public


CHECKS = ["check_forward", "check_data", "check_gradients", "check_schedules", "check_muon", "check_training"]


@pytest.mark.parametrize("failing", CHECKS)
def test_one_failed_check_makes_the_verdict_different(compare_public, monkeypatch, capsys, tmp_path, failing):
    log = tmp_path / "record.txt"
    log.write_text("print('the record')\n")
    monkeypatch.setattr(compare_public, "load_public", lambda record_log: None)
    monkeypatch.setattr(compare_public, "same_weights", lambda public, seq_len: (None, None))
    for name in CHECKS:
        monkeypatch.setattr(compare_public, name, lambda *args, passes=name != failing: passes)
    assert compare_public.main([str(log), "--seq_len", "128", "--train_steps", "1"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "DIFFERENT from the record"
    monkeypatch.setattr(compare_public, failing, lambda *args: True)
    assert compare_public.main([str(log), "--seq_len", "128", "--train_steps", "1"]) == 0


def test_flags_take_both_spellings_once_and_no_abbreviation(compare_public, monkeypatch, capsys, tmp_path):
    log = tmp_path / "record.txt"
    log.write_text("print('the record')\n")
    for argv, message in [(["--seq_len", "128", "--seq_len", "256"], "argument --seq_len: given twice"),
                          (["--seq_len", "128", "--seq-len", "256"], "argument --seq_len: given twice"),
                          (["--seq", "128"], "unrecognized arguments: --seq 128"),
                          (["--train_st", "1"], "unrecognized arguments: --train_st")]:
        with pytest.raises(SystemExit) as info:
            compare_public.main([str(log), *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err, err
    seen = []
    monkeypatch.setattr(compare_public, "load_public", lambda record_log: seen.append("loaded"))
    monkeypatch.setattr(compare_public, "same_weights", lambda public, seq_len: seen.append(seq_len) or (None, None))
    for name in CHECKS:
        monkeypatch.setattr(compare_public, name, lambda *args: seen.append("checked") or True)
    assert compare_public.main([str(log), "--seq-len", "256", "--train-steps", "0"]) == 0
    assert seen[:2] == ["loaded", 256] and seen.count("checked") == len(CHECKS) - 1  # no training steps


def test_training_apart_by_more_than_the_records_own_noise_differs(compare_public, monkeypatch):
    monkeypatch.setattr(compare_public, "same_training", lambda log, steps, seq_len=1024: (0.05, 1e-4, [10.8, 9.0]))
    assert compare_public.check_training("record.txt", 4) is False
    monkeypatch.setattr(compare_public, "same_training", lambda log, steps, seq_len=1024: (2e-4, 1e-4, [10.8, 9.0]))
    assert compare_public.check_training("record.txt", 4) is True


def test_a_gradient_apart_by_1e_3_differs(compare_public, monkeypatch):
    ones = torch.ones(4, 4)
    monkeypatch.setattr(compare_public, "gradient_pairs", lambda ours, theirs: [("blocks.0.w", ones * 1.001, ones)])
    loss = lambda *args: torch.ones((), requires_grad=True) * 1.0  # noqa: E731  (anything with a backward)
    assert compare_public.check_gradients(loss, loss, torch.zeros(4), torch.zeros(4), 1) is False
    monkeypatch.setattr(compare_public, "gradient_pairs", lambda ours, theirs: [("blocks.0.w", ones * (1 + 1e-6), ones)])
    assert compare_public.check_gradients(loss, loss, torch.zeros(4), torch.zeros(4), 1) is True


def test_block_masks_are_compared_by_their_full_blocks_too(compare_public):
    def mask(full_block):
        return SimpleNamespace(kv_num_blocks=torch.tensor([[[1, 1]]]), kv_indices=torch.tensor([[[[0, 0], [1, 0]]]]),
                               full_kv_num_blocks=torch.tensor([[[0, 1]]]),
                               full_kv_indices=torch.tensor([[[[0, 0], [full_block, 0]]]]))
    assert compare_public.kv_blocks(mask(0)) == compare_public.kv_blocks(mask(0))
    assert compare_public.kv_blocks(mask(0)) != compare_public.kv_blocks(mask(1))


@pytest.fixture(scope="module")
def public():
    if not RECORD_LOG.is_file():
        pytest.skip("the public record's log is not in bench/public/")
    sys.path.insert(0, str(TOOL.parent))
    import compare_public
    return compare_public, compare_public.load_public(str(RECORD_LOG))


def test_a_schedule_off_late_in_the_run_differs(public, monkeypatch):
    compare_public, record = public
    assert compare_public.check_schedules(record) is True
    real = compare_public.tg.lr_factor
    monkeypatch.setattr(compare_public.tg, "lr_factor", lambda step, hp: real(step, hp) * (1.01 if step > 5000 else 1))
    assert compare_public.check_schedules(record) is False


def test_validation_tokens_one_place_off_differ(public, monkeypatch):
    compare_public, record = public
    assert compare_public.check_data(record) is True
    real = compare_public.tg.load_val_tokens
    monkeypatch.setattr(compare_public.tg, "load_val_tokens", lambda *args: np.roll(real(*args), 1))
    assert compare_public.check_data(record) is False
