"""records/icot's helper scripts (mixture_usage.py, probe_states.py, sweep_tiny/table.py): --help, and bad input as
one error line with exit code 2 before any work (their results on good input: tests/test_icot.py)."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

import train_icot as icot

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "records" / "icot"


def run(script, *args, capsys):
    """The script as `python SCRIPT ARGS` runs it, in this process (no second import of torch): (exit code, stdout,
    stderr). The scripts set torch's threads to 1 and extend sys.path: both restored after."""
    threads, argv, path = torch.get_num_threads(), sys.argv, list(sys.path)
    sys.argv = [str(SCRIPTS / script), *map(str, args)]
    try:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        sys.argv, sys.path[:] = argv, path
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(done, script, message):
    """Exit code 2, no traceback, nothing on stdout, and the error (after argparse's usage line) names the problem."""
    code, out, err = done
    assert code == 2 and "Traceback" not in err and out == "", err
    error = err.strip().splitlines()[-1]
    assert error.startswith(f"{script}: error: ") and message in error, err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A 2x2 teacher and an emulator trained against it (untrained weights: the scripts' checks read only the
    checkpoints' kind and task), a 2x2 and a 4x4 data file, and data folders of both tasks."""
    folder = tmp_path_factory.mktemp("icot")
    hp = icot.Hyperparameters(**{**icot.PRESETS["tiny"], "n_layer": 3, "ckpt_dir": str(folder)})
    lines = {size: [icot.format_line([pair], size, size) for pair in pairs]
             for size, pairs in ((2, [(12, 34), (56, 78)]), (4, [(1234, 5678)]))}
    for size, text in lines.items():
        (folder / f"{size}x{size}.txt").write_text("\n".join(text) + "\n")
        (folder / f"dir{size}").mkdir()
        for split in ("train", "valid"):
            (folder / f"dir{size}" / f"{split}.txt").write_text("\n".join(text) + "\n")
    layout = icot.load_dataset(str(folder / "2x2.txt")).layout
    torch.manual_seed(0)
    icot.save_checkpoint(str(folder / "teacher.pt"), icot.IcotModel("teacher", hp, layout))
    icot.save_checkpoint(str(folder / "emulator.pt"), icot.build_stage_model("emulator", hp, layout),
                         str(folder / "teacher.pt"))
    return folder


@pytest.mark.parametrize("script", ["mixture_usage.py", "probe_states.py", "sweep_tiny/table.py"])
def test_help_shows_the_usage(script, capsys):
    code, out, err = run(script, "--help", capsys=capsys)
    assert code == 0 and out.startswith("usage: ") and err == "", err


@pytest.mark.parametrize("script, args, message", [
    ("mixture_usage.py", "{d}/teacher.pt {d}/2x2.txt", "teacher.pt is a teacher checkpoint, but an emulator or couple "
                                                       "checkpoint is needed here"),
    ("mixture_usage.py", "{d}/emulator.pt {d}/4x4.txt", "4x4.txt: 4x4 with 1 per line, but the model was trained "
                                                        "on 2x2"),
    ("mixture_usage.py", "{d}/missing.pt {d}/2x2.txt", "missing.pt: checkpoint not found"),  # was a silent exit 2
    ("probe_states.py", "{d}/emulator.pt {d}/dir2 sum", "emulator.pt is an emulator checkpoint, but a teacher"),
    ("probe_states.py", "{d}/teacher.pt {d}/dir4 sum", "dir4/train.txt: 4x4 with 1 per line, but the model was "
                                                      "trained on 2x2"),
    ("probe_states.py", "{d}/teacher.pt {d}/dir2 sum 4", "teacher.pt has 3 layers, not 4"),
])
def test_a_checkpoint_of_another_stage_or_data_of_another_task_is_one_error(checkpoints, script, args, message,
                                                                           capsys):
    assert_one_error(run(script, *args.format(d=checkpoints).split(), capsys=capsys), script, message)


def test_the_sweep_table_refuses_a_folder_without_logs(tmp_path, capsys):
    table = lambda folder: run("sweep_tiny/table.py", folder, capsys=capsys)
    assert_one_error(table(tmp_path / "missing"), "table.py", "missing: no such folder; give the folder of a sweep")
    (tmp_path / "logs" / "nocot_lr1e-3_emb1_wd0").mkdir(parents=True)
    assert_one_error(table(tmp_path), "table.py", f"{tmp_path} holds no logs/<stage>_lr<lr>")
    (tmp_path / "logs" / "other").mkdir()
    (tmp_path / "logs" / "other" / "run.txt").write_text("stage nocot done\n")
    assert_one_error(table(tmp_path), "table.py", "its folder other is not named <stage>_lr")
