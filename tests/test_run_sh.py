"""run.sh: argument handling, GPU detection, set-up steps and the torchrun command, without a GPU.

Each test runs a copy of run.sh in a temporary repository, with fake `nvidia-smi`, `torchrun` and
python (PYTHON=...) on PATH that record how they were called, so nothing is installed or launched."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

RUN_SH = Path(__file__).resolve().parents[1] / "run.sh"
LAUNCH_ENV = ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
              "FINEWEB_TRAIN_SHARDS", "RUN_SH_DRY_RUN", "PYTHON")

FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$CALLS"
if [[ "$1" == -c ]]; then [[ -e "$INSTALLED" ]]; exit; fi
if [[ "$1 $2" == "-m pip" ]]; then touch "$INSTALLED"; fi
"""


STUB_TRAIN_GPT = "# checks its flags and exits when TRAIN_GPT_CHECK_ONLY=1\n"  # what run.sh looks for before it asks


def _executable(path, text):
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def repo(tmp_path):
    """A repository (repo.root) with run.sh and stub scripts; repo.run(...) runs run.sh, repo.calls() lists
    the fake tools' invocations."""
    root = tmp_path / "repo"
    (root / "data").mkdir(parents=True)
    shutil.copy(RUN_SH, root / "run.sh")
    for name in ("oocl.py", "requirements.txt", "data/cached_fineweb10B.py"):
        (root / name).write_text("")
    (root / "train_gpt.py").write_text(STUB_TRAIN_GPT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "torchrun", '#!/usr/bin/env bash\necho "torchrun $*" >> "$CALLS"\n')
    _executable(bin_dir / "fake-python", FAKE_PYTHON)
    calls = tmp_path / "calls.txt"
    # PATH without any real nvidia-smi, so the tests behave the same on a GPU machine: a folder holding one (there
    # /usr/bin, with bash and grep in it) is replaced by a folder of links to everything else in it.
    system_path = []
    for index, folder in enumerate(os.environ["PATH"].split(os.pathsep)):
        if (Path(folder) / "nvidia-smi").exists():
            shadow = tmp_path / f"path_{index}"
            shadow.mkdir()
            for entry in Path(folder).iterdir():
                if entry.name != "nvidia-smi":
                    (shadow / entry.name).symlink_to(entry)
            folder = str(shadow)
        system_path.append(folder)

    def run(*args, gpus=4, dry_run=True, cwd=root, **env):
        if gpus is not None:
            lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d})"\n' for i in range(gpus))
            _executable(bin_dir / "nvidia-smi", f"#!/usr/bin/env bash\n[[ $1 == -L ]] || exit 9\n{lines}")
        elif (bin_dir / "nvidia-smi").exists():
            (bin_dir / "nvidia-smi").unlink()
        full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
        full_env.update(PATH=os.pathsep.join([str(bin_dir)] + system_path), CALLS=str(calls),
                        INSTALLED=str(tmp_path / "installed"), PYTHON=str(bin_dir / "fake-python"),
                        RUN_SH_DRY_RUN="1" if dry_run else "0")
        full_env.update(env)
        return subprocess.run([str(root / "run.sh"), *args], cwd=cwd, env=full_env, capture_output=True,
                              text=True, timeout=30)

    return SimpleNamespace(root=root, run=run,
                           calls=lambda: calls.read_text().splitlines() if calls.exists() else [])


def torchrun_args(result):
    """The launch command a dry run prints (its last line), split like the shell would."""
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert command[0] == "torchrun"
    return command[1:]


# ---- No GPU ----

@pytest.mark.parametrize("gpus, env, reason", [
    (None, {}, "nvidia-smi is not installed"),
    (0, {}, "nvidia-smi -L lists none"),
    (2, {"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES='' hides the 2 GPU(s) nvidia-smi lists"),
    (2, {"CUDA_VISIBLE_DEVICES": "-1"}, "CUDA_VISIBLE_DEVICES='-1' hides the 2 GPU(s) nvidia-smi lists"),
])
def test_no_gpu_stops_with_cpu_smoke_commands(repo, gpus, env, reason):
    result = repo.run(gpus=gpus, dry_run=False, **env)
    assert result.returncode != 0 and result.stdout == ""
    assert f"no NVIDIA GPU is visible ({reason})" in result.stderr
    for command in ("python train_gpt.py --preset tiny", "python train_icot.py all --preset tiny",
                    "python oocl.py --preset tiny"):
        assert command in result.stderr
    assert repo.calls() == []  # nothing installed, downloaded or launched
    assert "copied script" not in result.stderr
    copy = "records/gpt2-medium/2026-11-22_idea/train_gpt.py"
    result = repo.run(copy, "--seed=1", gpus=gpus, dry_run=False, **env)
    assert result.returncode != 0 and f"from the repository root: python {copy} --preset tiny\n" in result.stderr


@pytest.mark.parametrize("gpus, env", [(None, {}), (0, {}), (2, {"CUDA_VISIBLE_DEVICES": ""})])
def test_dry_run_without_gpu_shows_the_launch(repo, gpus, env):
    # A dry run on a machine without a GPU (a laptop, CI) prints what an 8-GPU node would run, with a note.
    result = repo.run(gpus=gpus, **env)
    assert "no NVIDIA GPU is visible here" in result.stderr and "NPROC=8" in result.stderr
    assert torchrun_args(result) == ["--standalone", "--nproc_per_node=8", str(repo.root / "train_gpt.py")]
    assert "data/cached_fineweb10B.py 30\n" in result.stdout
    result = repo.run("oocl.py", "sweep", gpus=gpus, NPROC="2", **env)
    assert torchrun_args(result) == ["--standalone", "--nproc_per_node=2", str(repo.root / "oocl.py"), "sweep"]
    # a dry run installs, downloads and launches nothing; it checks train_gpt.py's flags where torch imports
    assert len(repo.calls()) == 1 and repo.calls()[0].startswith("python -c import importlib.util")


# ---- GPU count and NPROC ----

def test_default_script_on_all_visible_gpus(repo):
    result = repo.run(gpus=8)
    assert torchrun_args(result) == ["--standalone", "--nproc_per_node=8", str(repo.root / "train_gpt.py")]
    # train_gpt.py gets its FineWeb shards: 30 train shards unless FINEWEB_TRAIN_SHARDS says otherwise.
    assert f"data/cached_fineweb10B.py 30\n" in result.stdout
    assert "cached_fineweb10B.py 5\n" in repo.run(FINEWEB_TRAIN_SHARDS="5").stdout


@pytest.mark.parametrize("env, nproc", [({"NPROC": "2"}, 2), ({"CUDA_VISIBLE_DEVICES": "1,3"}, 2),
                                        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"}, 4),
                                        ({"CUDA_VISIBLE_DEVICES": "2,-1,3"}, 1)])
def test_nproc_override_and_visible_devices(repo, env, nproc):
    assert torchrun_args(repo.run(**env))[1] == f"--nproc_per_node={nproc}"


@pytest.mark.parametrize("value, message", [
    ("0", "NPROC must be a positive integer"), ("two", "NPROC must be a positive integer"),
    ("1.5", "NPROC must be a positive integer"), ("8", "NPROC=8 but only 4 GPU(s) are visible"),
])
def test_bad_nproc_is_a_clear_error(repo, value, message):
    result = repo.run(NPROC=value)
    assert result.returncode != 0 and message in result.stderr and result.stdout == ""


# ---- Script and arguments ----

def test_arguments_pass_through_unchanged(repo):
    args = ["--num_iterations=100", "--note", "two words", "it's"]
    assert torchrun_args(repo.run("train_gpt.py", *args))[2:] == [str(repo.root / "train_gpt.py"), *args]
    # Without a script name the arguments go to the default script.
    assert torchrun_args(repo.run("--preset", "tiny"))[2:] == [str(repo.root / "train_gpt.py"), "--preset", "tiny"]


@pytest.mark.parametrize("args, reason", [
    (["--preset", "tiny"], "--preset tiny"), (["--seed=2", "--preset=tiny"], "--preset tiny"),
    (["--train_files=mine/*.bin", "--val-files", "mine/val.bin"], "the run names its own train and val shards"),
])
def test_no_fineweb_fetch_for_runs_that_do_not_read_it(repo, args, reason):
    result = repo.run(*args)
    assert "cached_fineweb10B" not in result.stdout and f"run.sh: not fetching FineWeb: {reason}\n" in result.stdout
    assert torchrun_args(result)[2:] == [str(repo.root / "train_gpt.py"), *args]
    for reads_fineweb in (["--preset", "full"], ["--train_files=mine/*.bin"], ["--val_files=mine/val.bin"],
                          ["--run_name", "tiny"]):  # "tiny" as another flag's value is no --preset tiny
        assert "cached_fineweb10B.py 30\n" in repo.run(*reads_fineweb).stdout


def test_copied_script_from_any_directory(repo, tmp_path):
    attempt = repo.root / "records" / "gpt2-medium" / "2026-11-22_idea"
    attempt.mkdir(parents=True)
    (attempt / "train_gpt.py").write_text("")
    relative = "records/gpt2-medium/2026-11-22_idea/train_gpt.py"
    for cwd, script in ((repo.root, relative), (tmp_path, str(attempt / "train_gpt.py")), (tmp_path, relative)):
        result = repo.run(script, "--seed=3", cwd=cwd)
        assert torchrun_args(result)[2:] == [str(attempt / "train_gpt.py"), "--seed=3"]
        assert f"(cd {repo.root})" in result.stdout  # data/ and logs/ resolve in the repository root
        assert "cached_fineweb10B.py 30" in result.stdout  # a copied train_gpt.py needs the data too
    result = repo.run("oocl.py", cwd=tmp_path)
    assert torchrun_args(result)[2:] == [str(repo.root / "oocl.py")] and "cached_fineweb10B" not in result.stdout


def test_missing_script_is_a_clear_error(repo, tmp_path):
    result = repo.run("records/nope/train_gpt.py", cwd=tmp_path)
    assert result.returncode != 0 and result.stderr.endswith(
        f"training script 'records/nope/train_gpt.py' not found (looked in {tmp_path} and {repo.root})\n")
    result = repo.run("nope.py")  # from the repository root: one folder, named once
    assert result.returncode != 0 and result.stderr.endswith(f"training script 'nope.py' not found (looked in {repo.root})\n")
    result = repo.run(str(tmp_path / "nope.py"))
    assert result.returncode != 0 and result.stderr.endswith(f"training script '{tmp_path}/nope.py' not found\n")


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["records/x/train_gpt.py", "--seed=1", "--help"]])
def test_help_prints_the_usage_and_sets_up_nothing(repo, args):
    for gpus, dry_run in ((None, False), (8, False), (8, True)):
        result = repo.run(*args, gpus=gpus, dry_run=dry_run)
        assert result.returncode == 0 and result.stderr == ""
        assert result.stdout.startswith("Launch a training script on every GPU")
        assert "NPROC=N" in result.stdout and "cached_fineweb10B" not in result.stdout
        assert "set -euo" not in result.stdout and "train_gpt.py --help" in result.stdout
    assert repo.calls() == []


@pytest.mark.parametrize("env, args, message", [
    ({"NPROC": "3"}, [], "world size 3 does not divide micro_batches_per_step=8"),
    ({"NPROC": "1", "NNODES": "3", "NODE_RANK": "0", "MASTER_ADDR": "h"}, [], "world size 3 does not divide"),
    ({"NPROC": "2"}, ["--num_iteration=5"], "unrecognized arguments: --num_iteration=5"),
])
def test_train_gpt_flags_are_checked_before_the_download(repo, env, args, message):
    """train_gpt.py's own check of its flags and process count runs first: a mistake costs no 6 GB download."""
    for name in ("train_gpt.py", "requirements.txt"):
        shutil.copy(RUN_SH.parent / name, repo.root / name)
    result = repo.run(*args, PYTHON=sys.executable, **env)  # a real run checks at the same place (the fresh node test)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert "run.sh: error: train_gpt.py refuses these flags for 3 processes" in result.stderr \
        or "refuses these flags for 2 processes" in result.stderr
    assert "nothing was fetched or launched" in result.stderr
    assert "cached_fineweb10B" not in result.stdout and "torchrun" not in result.stdout


def test_train_gpt_flags_that_pass_the_check_are_launched(repo):
    for name in ("train_gpt.py", "requirements.txt"):
        shutil.copy(RUN_SH.parent / name, repo.root / name)
    result = repo.run("--preset", "tiny", PYTHON=sys.executable, NPROC="2")
    assert torchrun_args(result)[1:] == ["--nproc_per_node=2", str(repo.root / "train_gpt.py"), "--preset", "tiny"]


# ---- Multi-node ----

def test_multi_node_rendezvous(repo):
    args = torchrun_args(repo.run(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29600"))
    assert args[:5] == ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.7", "--master_port=29600",
                        "--nproc_per_node=4"] and "--standalone" not in args
    args = torchrun_args(repo.run(NNODES="2", NODE_RANK="0", MASTER_ADDR="head"))
    assert "--master_port=29500" in args


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "need NNODES, NODE_RANK and MASTER_ADDR all set"),
    ({"MASTER_ADDR": "10.0.0.7"}, "need NNODES, NODE_RANK and MASTER_ADDR all set"),  # not a one-node run instead
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, "MASTER_PORT must be a port number"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK must be an integer in [0, NNODES=2)"),
    ({"NNODES": "x", "NODE_RANK": "0", "MASTER_ADDR": "h"}, "NNODES must be a positive integer"),
])
def test_bad_multi_node_settings(repo, env, message):
    result = repo.run(**env)
    assert result.returncode != 0 and message in result.stderr


# ---- Real (not dry) run with fake tools ----

def test_fresh_node_installs_fetches_and_launches(repo):
    result = repo.run("train_gpt.py", "--seed=1", dry_run=False, NPROC="2", FINEWEB_TRAIN_SHARDS="3")
    assert result.returncode == 0, result.stderr
    assert repo.calls() == [
        "python -c import torch, numpy, tiktoken, triton, huggingface_hub",
        f"python -m pip install -r {repo.root}/requirements.txt",
        "python -c import torch, numpy, tiktoken, triton, huggingface_hub",
        f"python {repo.root}/train_gpt.py --seed=1",  # its check of the flags, before the download
        f"python {repo.root}/data/cached_fineweb10B.py 3",
        f"torchrun --standalone --nproc_per_node=2 {repo.root}/train_gpt.py --seed=1",
    ]
    # Second run: the imports work now, so nothing is installed.
    repo.run("oocl.py", dry_run=False)
    assert repo.calls()[6:] == ["python -c import torch, numpy, tiktoken, triton, huggingface_hub",
                                f"torchrun --standalone --nproc_per_node=4 {repo.root}/oocl.py"]
    # A copy made before the check existed would train in it (one process, no torchrun): it is launched unchecked.
    (repo.root / "train_gpt.py").write_text("")
    repo.run("--seed=2", dry_run=False, NPROC="2", FINEWEB_TRAIN_SHARDS="3")
    assert repo.calls()[8:] == ["python -c import torch, numpy, tiktoken, triton, huggingface_hub",
                                f"python {repo.root}/data/cached_fineweb10B.py 3",
                                f"torchrun --standalone --nproc_per_node=2 {repo.root}/train_gpt.py --seed=2"]


def test_the_launch_runs_in_the_repository_root(repo, tmp_path):
    """Started from anywhere, the script runs in the repository root: its data/ and logs/ resolve there."""
    _executable(tmp_path / "bin" / "torchrun", '#!/usr/bin/env bash\necho "torchrun in $PWD" >> "$CALLS"\n')
    assert repo.run("oocl.py", dry_run=False, cwd=tmp_path).returncode == 0
    assert repo.calls()[-1] == f"torchrun in {repo.root}"
