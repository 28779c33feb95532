"""bench/compare_public.py: train_gpt.py's model and Muon step against the public record's. The comparison itself
needs the record's log (not in the repository: records/gpu/README.md says where it comes from) and skips
without it; the errors for a missing or wrong log run everywhere."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
