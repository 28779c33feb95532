"""bench/gpu_check.sh without a GPU: part selection, the commands each part runs, the summary table, and the
extraction of the public record script, with fake `nvidia-smi` and python that record how they were called."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"

# The fake python logs its arguments; as a torchrun launch of record_script.py it keeps a copy of the script
# it was given and prints the steps the public script would print.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$CALLS"
echo "${TIKTOKEN_CACHE_DIR:-unset}" >> "$CALLS.tiktoken"
[[ "$*" == *train_gpt.py* ]] && echo "TORCH_LOGS=${TORCH_LOGS:-unset}" >> "$CALLS.torch_logs"
if [[ "$*" == *get_encoding* && -n "${FAKE_NO_ENCODING:-}" ]]; then echo "requests.exceptions.ConnectionError: no network" >&2; exit 1; fi
if [[ -n "${FAKE_FAIL_ON:-}" && "$*" == *"$FAKE_FAIL_ON"* ]]; then echo "RuntimeError: 1 failed on purpose"; exit 5; fi
if [[ "$*" == *record_script.py* ]]; then
    cp record_script.py "$CALLS.record_script.py"
    ls -l data/fineweb10B > "$CALLS.record_data"
    mkdir -p logs; printf 'print("the script")\n%s\nWarmup step 1/10\n' "$(printf '=%.0s' {1..100})" > logs/run.txt
    if [[ -n "${FAKE_PUBLIC_FAIL:-}" ]]; then echo "AssertionError: Torch not compiled with CUDA enabled"; exit 1; fi
    if [[ -n "${FAKE_WARMUP_SECONDS:-}" ]]; then
        sleep "$FAKE_WARMUP_SECONDS"; echo "Warmup step 2/10" >> logs/run.txt; sleep "$FAKE_WARMUP_SECONDS"
    fi
    for i in 1 2 3 4 5; do echo "step:$i/5690 train_time:${i}00ms step_avg:100.00ms"; done
    exit 0
fi
if [[ "$*" == *train_gpt.py* && -n "${FAKE_SLEEP:-}" ]]; then echo "compiling"; sleep "$FAKE_SLEEP"; fi
if [[ "$*" == *train_gpt.py* ]]; then
    steps="$(echo "$*" | sed -E 's/.*--stop_after_steps ([0-9]+).*/\\1/')"
    echo "warm-up (10 steps, compilation included): 95.0s"
    echo "step:$steps/5690 train_time:$((steps * 1900))ms step_avg:1900.00ms"; echo "tokens_per_s:275941 ms_per_step:1900.00 mfu:45.00%"
    echo "peak memory allocated: 61000 MiB reserved: 62000 MiB"
fi
if [[ "$*" == *synthetic.py* && -n "${FAKE_SHARD_SECONDS:-}" ]]; then sleep "$FAKE_SHARD_SECONDS"; fi
if [[ "$*" == *synthetic.py* ]]; then mkdir -p data/synthetic_gpu; touch data/synthetic_gpu/synthetic_train_000001.bin data/synthetic_gpu/synthetic_val_000000.bin; fi
exit "${FAKE_EXIT:-0}"
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def check(tmp_path):
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    shutil.copy(GPU_CHECK, root / "bench" / "gpu_check.sh")
    (root / "tests" / "gpu").mkdir(parents=True)
    for name in ("test_gpu_icot.py", "test_gpu_oocl.py", "test_gpu_train_gpt.py"):
        (root / "tests" / "gpu" / name).write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "python", FAKE_PYTHON)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "out"

    def run(*parts, gpu=True, **env):
        smi = bin_dir / "nvidia-smi"
        # The fake comes first in PATH and shadows a real nvidia-smi (on a GPU machine it sits in /usr/bin,
        # beside bash and grep, so the directory cannot be dropped from PATH); without a GPU it finds none.
        if gpu:
            _executable(smi, '#!/usr/bin/env bash\nif [[ $1 == -L ]]; then echo "GPU 0: NVIDIA H100 80GB HBM3 '
                             '(UUID: x)"; elif [[ $1 == --query-compute-apps* ]]; then echo -n "$GPU_PROCESSES"; '
                             'else echo "NVIDIA H100 80GB HBM3"; fi\n')
        else:
            _executable(smi, '#!/usr/bin/env bash\necho "No devices were found"; exit 6\n')
        full_env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}  # CI sets it; the check must
        full_env.update(PATH=os.pathsep.join([str(bin_dir), os.environ["PATH"]]), CALLS=str(calls),
                        PYTHON=str(bin_dir / "python"), GPU_CHECK_DIR=str(out), **env)
        return subprocess.run([str(root / "bench" / "gpu_check.sh"), *parts], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=60)

    def shared(folder):
        """The papers' files and tiktoken's cache, in `folder` (beside the checkout or inside it)."""
        for name in ("icot", "tiktoken_cache"):
            (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / "tiktoken_cache" / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee").write_text("vocab.bpe")

    return SimpleNamespace(root=root, out=out, calls=calls, run=run, shared=shared,
                           lines=lambda: calls.read_text().splitlines() if calls.exists() else [])


def test_parts_are_checked_before_anything_runs(check):
    result = check.run("gpt", "speed")
    assert result.returncode == 1 and "unknown part 'speed'" in result.stderr
    assert "env tests suite gpt record public icot oocl" in result.stderr
    assert "name the parts to run" in check.run().stderr
    result = check.run("gpt", gpu=False)
    assert result.returncode == 1 and "no NVIDIA GPU is visible" in result.stderr
    assert check.lines() == []


def test_gpt_part_writes_shards_once_runs_the_full_config_and_a_summary_row(check):
    result = check.run("gpt", GPT_STEPS="7")
    assert result.returncode == 0, result.stderr
    launches = [line for line in check.lines() if "train_gpt.py" in line]
    assert len(launches) == 1
    assert ("-m torch.distributed.run --standalone --nproc_per_node=1 train_gpt.py --train_files "
            "data/synthetic_gpu/synthetic_train_*.bin --val_files data/synthetic_gpu/synthetic_val_*.bin "
            f"--stop_after_steps 7 --log_dir {check.out}") in launches[0]
    assert "--micro_batches_per_step" not in launches[0]  # the full configuration: 8 micro-steps
    assert Path(str(check.calls) + ".torch_logs").read_text() == "TORCH_LOGS=recompiles\n"  # in its log
    assert sum("data/synthetic.py" in line for line in check.lines()) == 1
    summary = (check.out / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| part | command | exit | wall s |")
    assert summary[2].startswith("| gpt | ") and "| 0 |" in summary[2] and "step_avg" not in summary[2]
    for result_line in ("warm-up (10 steps, compilation included): 95.0s", "ms_per_step:1900.00 mfu:45.00%",
                        "peak memory allocated: 61000 MiB reserved: 62000 MiB"):  # every result of the run
        assert result_line in summary[2], result_line
    assert "ms_per_step:1900.00" in (check.out / "gpt.log").read_text()
    assert "H100" in (check.out / "env.txt").read_text()
    # A second run finds the shards and appends its row; a failing command is recorded and fails the check.
    result = check.run("gpt", FAKE_EXIT="3")
    assert result.returncode == 1
    assert sum("data/synthetic.py" in line for line in check.lines()) == 1
    assert "| gpt | " in (check.out / "summary.md").read_text().splitlines()[3]
    assert "| 3 |" in (check.out / "summary.md").read_text().splitlines()[3]


def test_record_and_public_parts_run_both_sides_on_the_same_shards_and_give_the_ratio(check, tmp_path):
    result = check.run("record", "public")
    assert result.returncode == 1 and "the public part needs RECORD_LOG=" in result.stderr
    assert check.lines() == []  # refused before anything ran
    result = check.run("record", RECORD_STEPS="3")  # our side alone needs no public log
    assert result.returncode == 0, result.stderr
    ours = [line for line in check.lines() if "train_gpt.py" in line]
    assert len(ours) == 1 and "--micro_batches_per_step 1 --stop_after_steps 3" in ours[0]
    assert "| record | " in (check.out / "summary.md").read_text()
    assert Path(str(check.calls) + ".torch_logs").read_text() == "TORCH_LOGS=recompiles\n"
    log = tmp_path / "record_log.txt"
    log.write_text("import os\nworld_size = 1\nassert world_size == 8 # this code is designed for 8xH100\n"
                   "print('training')\n" + "=" * 100 + "\nRunning Python 3.10\nstep:1/5690 val_loss:10.8\n")
    result = check.run("public", RECORD_LOG=str(log), RECORD_STEPS="3")
    assert result.returncode == 0, result.stderr
    assert len([line for line in check.lines() if "train_gpt.py" in line]) == 1  # the public part runs only theirs
    script = Path(str(check.calls) + ".record_script.py").read_text()
    assert script == "import os\nworld_size = 1\npass  # one GPU here\nprint('training')\n"
    data = Path(str(check.calls) + ".record_data").read_text()
    assert "fineweb_train_000001.bin -> " in data and "synthetic_gpu/synthetic_train_000001.bin" in data
    assert "fineweb_val_000000.bin -> " in data
    record_log = (check.out / "public.log").read_text()
    assert "step:3/5690" in record_log and "step:4/5690" not in record_log  # stopped after RECORD_STEPS
    assert (check.out / "public_own_log.txt").read_text() == "Warmup step 1/10\n"  # its log, not its text
    # Ours 1900 ms, theirs 100 ms at step 3: the summary gets both and the ratio.
    ratio = "step_avg at step 3: ours 1900.00 ms, public record 100.00 ms, ours/public 19.000"
    assert f"side by side: {ratio}" in result.stdout
    assert f"| side_by_side | record vs public | 0 | 0 | {ratio} |" in (check.out / "summary.md").read_text()
    # Without our side's log at that step there is no ratio, and the check says why.
    result = check.run("public", RECORD_LOG=str(log), RECORD_STEPS="4")
    assert "side by side: no ratio (step 4 logged by ours: no, by the public script: 100.00)" in result.stdout


def test_gpt_args_reach_train_gpt_in_the_gpt_and_record_parts(check):
    result = check.run("gpt", "record", GPT_ARGS="--no_coordinate_descent_tuning --seed 3")
    assert result.returncode == 0, result.stderr
    launches = [line for line in check.lines() if "train_gpt.py" in line]
    assert len(launches) == 2
    assert all(line.endswith(f"--log_dir {check.out} --no_coordinate_descent_tuning --seed 3") for line in launches)


def test_a_public_script_that_fails_or_ends_before_its_step_fails_the_part(check, tmp_path):
    """The public part's pipeline ends in the awk that stops the script at step RECORD_STEPS, whose exit code was
    the part's: a script that crashed (on a CPU: no CUDA) read as exit 0. Its row and the check's exit code now say
    that it failed; stopped at its step, it succeeded."""
    log = tmp_path / "record_log.txt"
    log.write_text("assert world_size == 8\n" + "=" * 100 + "\n")

    def public_row():
        rows = (check.out / "summary.md").read_text().splitlines()
        return [line for line in rows if line.startswith("| public |")][-1]

    result = check.run("public", RECORD_LOG=str(log), RECORD_STEPS="3", FAKE_PUBLIC_FAIL="1")
    assert result.returncode == 1 and public_row().split(" | ")[-3] == "1", public_row()  # the script's exit code
    result = check.run("public", RECORD_LOG=str(log), RECORD_STEPS="9")  # ends (exit 0) at step 5, before step 9
    assert result.returncode == 1 and public_row().split(" | ")[-3] == "1", public_row()
    result = check.run("public", RECORD_LOG=str(log), RECORD_STEPS="3")  # stopped at its step: a success
    assert result.returncode == 0 and public_row().split(" | ")[-3] == "0", public_row()
    # Its command holds a pipe, escaped in the row: the table keeps its five columns.
    assert len(re.split(r"(?<!\\)\|", public_row())) == 7 and "2>&1 \\| " in public_row(), public_row()


def test_public_part_notes_when_each_line_of_its_own_log_appears(check, tmp_path):
    # The record script's warm-up lines carry no time; the check notes when each appears.
    log = tmp_path / "record_log.txt"
    log.write_text("assert world_size == 8\n" + "=" * 100 + "\n")
    result = check.run("public", RECORD_LOG=str(log), RECORD_STEPS="3", FAKE_WARMUP_SECONDS="1.5",
                       PROGRESS_SECONDS="0.2")
    assert result.returncode == 0, result.stderr
    progress = (check.out / "public_progress.txt").read_text().splitlines()
    assert [line.split(" s: ")[1] for line in progress] == ["Warmup step 1/10", "Warmup step 2/10"]
    first, second = (int(line.split(" s: ")[0]) for line in progress)
    assert second - first >= 1
    assert (check.out / "public_own_log.txt").read_text() == "Warmup step 1/10\nWarmup step 2/10\n"


@pytest.mark.parametrize("part, command", [("tests", "pytest"), ("suite", "pytest"), ("gpt", "train_gpt.py"),
                                           ("record", "train_gpt.py"), ("icot", "train_icot.py"), ("oocl", "oocl.py")])
def test_a_failing_part_fails_the_check_and_shows_its_exit_code(check, part, command):
    """A session that reads only the call's exit code must not take failed GPU tests or a crashed run for a pass."""
    check.shared(check.root / "shared")
    result = check.run(part, FAKE_FAIL_ON=command)
    assert result.returncode == 1, result.stderr
    row = (check.out / "summary.md").read_text().splitlines()[-1]
    assert row.startswith(f"| {part} | ") and "| 5 |" in row and "RuntimeError: 1 failed on purpose" in row


def test_a_part_and_every_documented_call_fit_one_device_command():
    """A device command is stopped at 600 s, before its tar: all it measured is lost. So a part at its default limit,
    and each call the READMEs show, fit inside it with each part's 15 s kill grace and the packing of the results."""
    default = int(re.search(r'PART_SECONDS="\$\{PART_SECONDS:-(\d+)\}"', GPU_CHECK.read_text()).group(1))
    assert default + 15 <= 585
    calls = []
    for doc in ("README.md", "records/gpu/README.md"):
        text = (GPU_CHECK.parents[1] / doc).read_text()
        calls += re.findall(r"((?:[A-Z_]+=\S+ +)*)bench/gpu_check\.sh((?: +[a-z]+\b(?![/.]))+)", text)
    assert len(calls) >= 10, calls
    for assignments, parts in calls:
        seconds = int(dict(a.split("=", 1) for a in assignments.split()).get("PART_SECONDS", default))
        assert len(parts.split()) * (seconds + 15) <= 585, f"{assignments}bench/gpu_check.sh{parts}"


def test_icot_and_oocl_parts_run_their_scripts_at_gpu_size_with_overrides(check):
    check.shared(check.root.parent / "shared")
    result = check.run("icot", "oocl")
    assert result.returncode == 0, result.stderr
    icot = [line for line in check.lines() if "train_icot.py" in line]
    oocl = [line for line in check.lines() if "oocl.py" in line]
    assert len(icot) == 1 and "train_icot.py all --stages teacher --task=4x4 --per_line=1 --stage_minutes=2" in icot[0]
    assert "--paper_dir=../shared/icot" in icot[0]
    assert f"--log_dir={check.out}/icot" in icot[0]
    assert len(oocl) == 1 and "oocl.py sweep --p 113 --model_dim 128" in oocl[0] and f"--out_dir {check.out}/oocl" in oocl[0]
    summary = (check.out / "summary.md").read_text()
    assert "| icot | " in summary and "| oocl | " in summary
    check.run("icot", ICOT_ARGS="teacher --task=5x5")
    assert check.lines()[-1].endswith("train_icot.py teacher --task=5x5")


def test_papers_files_and_tiktoken_cache_come_from_beside_or_inside_the_checkout(check):
    """The device machine gets only the checkout: a copy in its shared/ stands in for ../shared; without either,
    the parts that need them stop before anything runs, and the parts that do not still run."""
    for parts in (["icot"], ["gpt", "tests"]):
        result = check.run(*parts)
        assert result.returncode == 1 and "found neither in ../shared nor in shared/" in result.stderr
        assert "cp -r ../shared/icot ../shared/tiktoken_cache shared/" in result.stderr
    assert check.lines() == []
    assert check.run("gpt").returncode == 0
    (check.root.parent / "shared" / "icot").mkdir(parents=True)  # beside: the papers' files, an empty cache
    (check.root.parent / "shared" / "tiktoken_cache").mkdir()
    assert "found neither in ../shared nor in shared/" in check.run("tests").stderr
    check.shared(check.root / "shared")  # inside: both
    assert check.run("icot", "tests").returncode == 0
    assert "--paper_dir=shared/icot" in [line for line in check.lines() if "train_icot.py" in line][0]
    assert any(line.endswith("-m pytest -v -s -rfEs --tb=short --durations=0 tests/gpu/test_gpu_train_gpt.py "
                             "tests/gpu/test_gpu_icot.py tests/gpu/test_gpu_oocl.py") for line in check.lines())
    assert check.run("suite").returncode == 0
    assert check.lines()[-1].endswith("-m pytest -v -rfEs --tb=short tests")
    cache = Path(str(check.calls) + ".tiktoken").read_text().splitlines()
    assert cache[-2:] == [str(check.root / "shared" / "tiktoken_cache")] * 2
    assert check.run("icot", TIKTOKEN_CACHE_DIR="/elsewhere").returncode == 0  # a cache the user set wins
    assert Path(str(check.calls) + ".tiktoken").read_text().splitlines()[-1] == "/elsewhere"
    assert "tiktoken cache: /elsewhere" in (check.out / "env.txt").read_text()
    # A cache without the encoding stops those parts before anything runs, with the error and the fix.
    before = len(check.lines())
    result = check.run("tests", FAKE_NO_ENCODING="1")
    assert result.returncode == 1 and "tiktoken cannot load the GPT-2 encoding with TIKTOKEN_CACHE_DIR=" in result.stderr
    assert "(requests.exceptions.ConnectionError: no network)" in result.stderr
    assert "point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's gpt2 cache files" in result.stderr
    assert [line for line in check.lines()[before:] if "pytest" in line] == []


def test_synthetic_shards_hold_what_the_gpt_and_record_parts_read():
    """Validation reads val_tokens inputs and the target after the last one; the gpt part trains GPT_STEPS steps
    of the full configuration, the record part RECORD_STEPS steps of one micro-batch (train_gpt.py checks both
    before it starts: the first GPU run stopped there twice)."""
    import train_gpt
    text = GPU_CHECK.read_text()
    number = lambda pattern: int(re.search(pattern, text).group(1))
    config = train_gpt.Hyperparameters()
    assert number(r"--val_tokens (\d+)") >= config.val_tokens + 1
    gpt_steps = number(r'GPT_STEPS="\$\{GPT_STEPS:-(\d+)\}"')
    record_steps = number(r'RECORD_STEPS="\$\{RECORD_STEPS:-(\d+)\}"')
    needed = max(gpt_steps * config.step_tokens, record_steps * config.micro_batch_tokens) + 1
    assert number(r"--train_tokens (\d+)") >= needed


def test_a_busy_gpu_stops_the_check_before_a_timed_part(check):
    result = check.run("gpt", GPU_PROCESSES="4242, python3, 57650 MiB\n", GPU_IDLE_WAIT="1")
    assert result.returncode == 1 and "another process is using the GPU" in result.stderr and "4242" in result.stderr
    assert [line for line in check.lines() if "train_gpt.py" in line] == []


def test_a_public_part_refused_on_a_busy_gpu_leaves_no_progress_watcher(check, tmp_path):
    log = tmp_path / "record_log.txt"
    log.write_text("assert world_size == 8\n" + "=" * 100 + "\n")
    result = check.run("public", RECORD_LOG=str(log), GPU_PROCESSES="4242, python3, 57650 MiB\n", GPU_IDLE_WAIT="1",
                       PROGRESS_SECONDS="0.2")
    assert result.returncode == 1 and "another process is using the GPU" in result.stderr
    time.sleep(1)  # a few of its periods
    still = subprocess.run(["pgrep", "-f", str(check.root / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert still.stdout == "", "the progress watcher outlived the check"


def test_a_part_past_its_time_limit_is_stopped_with_its_processes(check):
    start = time.monotonic()
    result = check.run("gpt", PART_SECONDS="2", FAKE_SLEEP="40")
    assert time.monotonic() - start < 25  # the sleeping child was stopped too (tee waits for every writer)
    assert result.returncode == 1
    assert "| gpt | " in (check.out / "summary.md").read_text() and "| 124 |" in (check.out / "summary.md").read_text()
    assert "gpt stopped at the part's limit, PART_SECONDS=2 s" in (check.out / "gpt.log").read_text()


def test_a_parts_limit_counts_the_writing_of_its_shards(check):
    """The first gpt call writes 200M tokens of shards before its run: that time comes out of the part's limit,
    or a part run to its limit ends after the device command was stopped, and its results never come back."""
    start = time.monotonic()
    result = check.run("gpt", PART_SECONDS="6", FAKE_SHARD_SECONDS="4", FAKE_SLEEP="40")
    assert time.monotonic() - start < 8.5  # 4 s of shards, then 2 of the run, not 4 + 6
    assert result.returncode == 1 and "| 124 |" in (check.out / "summary.md").read_text()
    assert "== gpt (at most 2 s): " in result.stdout


def test_a_record_log_without_the_script_is_refused_before_anything_runs(check, tmp_path):
    """A `git show ... > file` that failed leaves an empty file: found on the GPU, it would cost a call."""
    log = tmp_path / "record_log.txt"
    for text in ("", "step:1/5690 val_loss:10.8\n", "=" * 100 + "\nRunning Python 3.10\n"):
        log.write_text(text)
        result = check.run("public", RECORD_LOG=str(log))
        assert result.returncode == 1 and f"RECORD_LOG={log} holds no record script" in result.stderr, text
    assert check.lines() == []
