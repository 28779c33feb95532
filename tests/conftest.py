import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def shared_folder(repo_root, name):
    """A folder of the project's shared files (tiktoken's GPT-2 cache, which cannot be downloaded without a network;
    the ICoT papers' files), beside the checkout (../shared) or copied into it (shared/, as on the GPU machine, which
    gets only the checkout); None where neither holds a file."""
    for folder in (repo_root.parent / "shared" / name, repo_root / "shared" / name):
        if folder.is_dir() and any(folder.iterdir()):
            return folder
    return None


_cache = shared_folder(REPO_ROOT, "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and _cache:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)


@pytest.fixture(autouse=True)
def cpu_path_outside_tests_gpu(request, monkeypatch):
    """Tests outside tests/gpu specify the CPU path, also on a GPU machine: without this the scripts pick CUDA
    there and compile (slow, and bf16 instead of the fp32 the tests' numbers assume). CUDA is hidden from this
    process (torch.cuda.is_available, train_icot's DEVICE chosen at import) and from the subprocesses it starts."""
    if REPO_ROOT / "tests" / "gpu" in Path(str(request.fspath)).parents:
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if "train_icot" in sys.modules:
        monkeypatch.setattr(sys.modules["train_icot"], "DEVICE", torch.device("cpu"))


@pytest.fixture(autouse=True)
def wall_time_of_gpu_tests(request):
    """Each CUDA test prints its wall time as it ends (the GPU check's tests part runs pytest with -s): a part
    stopped at its time limit never prints pytest's --durations table, and the next lease needs to know where
    the time went."""
    start = time.monotonic()
    yield
    if torch.cuda.is_available() and REPO_ROOT / "tests" / "gpu" in Path(str(request.fspath)).parents:
        print(f"\n[{request.node.nodeid}: {time.monotonic() - start:.1f} s]", flush=True)


def interrupt_when(command, marker, cwd, env=None, sig=signal.SIGINT):
    """Runs command, sends it `sig` (SIGINT: Ctrl-C; SIGTERM: `timeout`, `kill`) once `marker` appears in its stdout;
    returns (exit code, stderr)."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    for line in process.stdout:
        if marker in line:
            process.send_signal(sig)
            break
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # a run the signal did not stop must not outlive the test
        process.kill()
        _, stderr = process.communicate()
        pytest.fail(f"the run was still going 120 s after {signal.Signals(sig).name}; its stderr:\n{stderr[-2000:]}")
    return process.returncode, stderr


def run_with_closed_console(command, cwd):
    """Runs command with a stdout nobody reads (`| head` after its lines, or `| tee` stopped by the same Ctrl-C): its
    first print meets a broken pipe. Returns (exit code, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    process = subprocess.Popen(command, stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=cwd,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(write_end)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr
