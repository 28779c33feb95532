#!/usr/bin/env bash
# GPU acceptance check on ONE GPU: each part fits one 10-minute command and writes its logs and a row of
# the summary table to the check's folder.
#
#   bench/gpu_check.sh PART [PART ...]      parts, in the order given:
#     env      GPU, driver, CUDA, torch and triton versions (every part also records them once)
#     tests    the GPU tests (tests/gpu/; the rest of the suite is CI's, and hides CUDA anyway), their prints
#              (the XXT tile timings), one line per test as it ends (-v: a part stopped at its limit still says which
#              passed) and a short traceback of each failure in the log
#     suite    the whole pytest suite as a researcher on a GPU node runs it (tests/gpu with CUDA, the rest on the
#              CPU path): it must pass there too
#     gpt      train_gpt.py, full configuration (8 micro-steps of 64K tokens per step) on synthetic shards,
#              GPT_STEPS timed steps: ms per 524,288-token step, tokens/s, MFU, peak memory, warm-up time
#     record   train_gpt.py with one 64K micro-batch per step (what each of the record's 8 GPUs does in a step),
#              RECORD_STEPS steps on the synthetic shards: our side of the side-by-side
#     public   the other side: the public record script (needs RECORD_LOG, see below) on the same shards and GPU,
#              RECORD_STEPS steps, its own log (which shows its warm-up) kept; then a summary row with both step
#              times and their ratio (a part of its own: on the first H100 lease it ran 9 minutes without a step)
#     icot     train_icot.py at GPU size (ICOT_ARGS): 4x4 data (808k lines), the teacher for 2 minutes of
#              training at the default size, its results table on the papers' test sets
#     oocl     a timed oocl.py sweep at GPU size (OOCL_ARGS): p = 113, 12 runs (4 arms x 3 seeds) of 1000 steps
#
# Environment:
#   GPU_CHECK_DIR   where results go (default records/gpu/<date>_<gpu name>; on the device machine a scratch
#                   folder, packed into $OUT with tar: records/gpu/README.md)
#   GPT_STEPS=30    timed steps of the gpt part          RECORD_STEPS=60   steps of each record run
#   RECORD_LOG      a public record log (e.g. the GPT-2 Medium record's 000_592014ec-...txt): its first part is
#                   the record script's text, which the public part extracts and runs unchanged except for its
#                   8-GPU assert (it runs on one GPU here, one micro-batch per step, as the record part runs
#                   train_gpt.py)
#   GPT_ARGS        more train_gpt.py arguments for the gpt and record parts (e.g. --no_coordinate_descent_tuning
#                   when its compilation does not fit a call even with Inductor's cache from the last one)
#   ICOT_ARGS, OOCL_ARGS   override the arguments of those parts
#   PART_SECONDS=570 each part is stopped (with every process it started) after this long, counted from its
#                   start (writing the synthetic shards and waiting for an idle GPU included): exit 124 in its row,
#                   and the next part still runs inside the device tool's 10-minute command
#   PYTHON=python3
#
# The tests, suite and icot parts need the papers' files and tiktoken's GPT-2 cache: ../shared/{icot,tiktoken_cache}
# beside the checkout, or a copy in the checkout's shared/ (ignored by git). The device machine gets only the
# checkout, so copy them there first: mkdir -p shared && cp -r ../shared/icot ../shared/tiktoken_cache shared/
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python3}"
GPT_STEPS="${GPT_STEPS:-30}"
RECORD_STEPS="${RECORD_STEPS:-60}"
PART_SECONDS="${PART_SECONDS:-570}"
SYNTHETIC_DIR="data/synthetic_gpu"

die() {
    echo "gpu_check.sh: error: $*" >&2
    exit 1
}

[[ $# -gt 0 ]] || die "name the parts to run: env tests suite gpt record public icot oocl (see the header of $0)"
for part in "$@"; do
    case "$part" in
        env|tests|suite|gpt|record|public|icot|oocl) ;;
        *) die "unknown part '$part'; the parts are: env tests suite gpt record public icot oocl" ;;
    esac
done
if [[ " $* " == *" public "* ]]; then
    [[ -n "${RECORD_LOG:-}" && -f "${RECORD_LOG:-}" ]] \
        || die "the public part needs RECORD_LOG=<a public record log whose first part is the script>, e.g." \
            "bench/public/000_592014ec-6781-4f59-b274-c4af68ccfe75.txt (records/gpu/README.md says where it comes from)"
    # An empty file (a failed `git show ... > file` leaves one) would be found out only on the GPU, a call lost.
    awk '/^=+$/ && length($0) >= 20 {found = NR > 1; exit} END {exit !found}' "$RECORD_LOG" \
        || die "RECORD_LOG=$RECORD_LOG holds no record script (the log's text up to its first line of '='" \
            "characters): it is empty or not a record log; write it again (records/gpu/README.md)"
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU ' \
    || die "no NVIDIA GPU is visible (nvidia-smi -L lists none); this check needs one GPU"

SHARED=""
if [[ " $* " == *" tests "* || " $* " == *" suite "* || " $* " == *" icot "* ]]; then
    for dir in ../shared shared; do
        # (an empty tiktoken_cache folder is passed over: it holds no encoding)
        if [[ -d "$dir/icot" && -n "$(ls -A "$dir/tiktoken_cache" 2>/dev/null)" ]]; then SHARED="$dir"; break; fi
    done
    [[ -n "$SHARED" ]] || die "the tests, suite and icot parts need the papers' files and tiktoken's cache," \
        "found neither in ../shared nor in shared/: copy them into the checkout before sending it to the GPU machine" \
        "(mkdir -p shared && cp -r ../shared/icot ../shared/tiktoken_cache shared/)"
    export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$REPO_ROOT/$SHARED/tiktoken_cache}"
    # The machine has no network: without a cache that holds the encoding, the tokenisation tests fail one by one.
    tiktoken_error="$("$PYTHON" -c "import tiktoken; tiktoken.get_encoding('gpt2')" 2>&1 >/dev/null)" \
        || die "tiktoken cannot load the GPT-2 encoding with TIKTOKEN_CACHE_DIR=$TIKTOKEN_CACHE_DIR" \
            "($(echo "$tiktoken_error" | tail -n 1)): point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's gpt2" \
            "cache files (../shared/tiktoken_cache holds them)"
fi

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)"
GPU_SLUG="$(echo "$GPU_NAME" | tr -cs 'A-Za-z0-9' '_' | sed 's/^_*//; s/_*$//')"
CHECK_DIR="${GPU_CHECK_DIR:-records/gpu/$(date -u +%Y-%m-%d)_$GPU_SLUG}"
mkdir -p "$CHECK_DIR" || die "cannot create $CHECK_DIR"
CHECK_DIR="$(cd "$CHECK_DIR" && pwd)"
SUMMARY="$CHECK_DIR/summary.md"
if [[ ! -f "$SUMMARY" ]]; then
    printf '| part | command | exit | wall s | result lines |\n|---|---|---|---|---|\n' > "$SUMMARY"
fi
export PYTHONUNBUFFERED=1

write_env() {
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
        "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
        "$PYTHON" -c "import triton; print('triton', triton.__version__)"
        echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -c . ) changed files"
        echo "tiktoken cache: ${TIKTOKEN_CACHE_DIR:-unset}"
    } > "$CHECK_DIR/env.txt" 2>&1
    cat "$CHECK_DIR/env.txt"
}

# A timing taken while another process computes on the GPU is wrong (on the device tool's machine a detached
# job from an earlier call may still run): refuse to start a part then.
gpu_idle() {
    local busy
    for _ in $(seq 0 "${GPU_IDLE_WAIT:-30}"); do  # a part just stopped may take a few seconds to go
        busy="$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null)"
        [[ -n "$busy" ]] || return 0
        sleep 1
    done
    die "another process is using the GPU, so its timings would be wrong: $(echo "$busy" | tr '\n' ';')" \
        "wait for it to end or stop it (kill PID), then run the part again"
}

# Run one timed command (stopped after PART_SECONDS, with its whole process group); its output goes to the
# console and to $CHECK_DIR/<name>.log; a summary row records the exit code (124: stopped), the wall time and
# the result lines that match the pattern.
timed() {
    local name="$1" pattern="$2"
    shift 2
    local log="$CHECK_DIR/$name.log" start end status limit
    gpu_idle
    # What the part did before (shards, the idle wait) counts: PART_SECONDS bounds the whole part.
    limit=$((PART_SECONDS - (SECONDS - PART_START)))
    ((limit >= 1)) || limit=1
    echo "== $name (at most $limit s): $*"
    start=$(date +%s)
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    [[ "$status" != 124 ]] \
        || echo "gpu_check.sh: $name stopped at the part's limit, PART_SECONDS=$PART_SECONDS s" | tee -a "$log"
    end=$(date +%s)
    local lines command="$*"
    lines="$(grep -E "$pattern" "$log" | tail -n 8 | tr '\n' ';' | sed 's/|/\\|/g')"
    # a | in the command (the public part's pipeline) is escaped too, or it would split the table's cell
    command="${command//|/\\|}"
    printf '| %s | `%s` | %s | %s | %s |\n' "$name" "$command" "$status" "$((end - start))" "$lines" >> "$SUMMARY"
    return "$status"
}

synthetic_shards() {
    # data/synthetic.py writes the val shard last: its presence means the set is complete.
    if [[ ! -f "$SYNTHETIC_DIR/synthetic_val_000000.bin" ]]; then
        rm -rf "$SYNTHETIC_DIR"
        # val: 10485760 tokens are read, plus the target of the last one
        timeout "$PART_SECONDS" "$PYTHON" data/synthetic.py --out "$SYNTHETIC_DIR" --train_tokens 200000000 \
            --val_tokens 10551296 || die "writing synthetic shards into $SYNTHETIC_DIR failed (or took more than" \
                "PART_SECONDS=$PART_SECONDS s)"
    fi
}

GPT_DATA=(--train_files "$SYNTHETIC_DIR/synthetic_train_*.bin" --val_files "$SYNTHETIC_DIR/synthetic_val_*.bin")
GPT_RESULT='tokens_per_s|peak memory|warm-up|Error|error'
# torch.compile's recompilations go to the log: after the warm-up only the first evaluation's should show (a CPU
# test checks the same), and one in the timed steps would be timed as training.
GPT_LOGS=(env "TORCH_LOGS=${TORCH_LOGS:-recompiles}")

part_gpt() {
    synthetic_shards
    # shellcheck disable=SC2086
    timed gpt "$GPT_RESULT" "${GPT_LOGS[@]}" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
        train_gpt.py "${GPT_DATA[@]}" --stop_after_steps "$GPT_STEPS" --log_dir "$CHECK_DIR" ${GPT_ARGS:-}
}

part_record() {
    synthetic_shards
    # shellcheck disable=SC2086
    timed record "$GPT_RESULT" "${GPT_LOGS[@]}" "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 \
        train_gpt.py "${GPT_DATA[@]}" --micro_batches_per_step 1 --stop_after_steps "$RECORD_STEPS" \
        --log_dir "$CHECK_DIR" ${GPT_ARGS:-}
}

part_public() {
    synthetic_shards
    # The public script reads data/fineweb10B/ relative to its working directory: give it a directory whose
    # data/fineweb10B/ holds links to the synthetic shards under FineWeb's names.
    local work
    work="$(mktemp -d)"
    mkdir -p "$work/data/fineweb10B"
    local i=1
    for shard in "$REPO_ROOT/$SYNTHETIC_DIR"/synthetic_train_*.bin; do
        ln -s "$shard" "$work/data/fineweb10B/$(printf 'fineweb_train_%06d.bin' "$i")"
        i=$((i + 1))
    done
    ln -s "$REPO_ROOT/$SYNTHETIC_DIR/synthetic_val_000000.bin" "$work/data/fineweb10B/fineweb_val_000000.bin"
    # The script is the log's text up to the first line of '=' characters.
    awk '/^=+$/ && length($0) >= 20 {exit} {print}' "$RECORD_LOG" | sed 's/^assert world_size == 8.*$/pass  # one GPU here/' \
        > "$work/record_script.py"
    grep -q 'one GPU here' "$work/record_script.py" || echo "note: no 8-GPU assert found in the record script"
    # Its warm-up lines carry no time: note when each line of its own log appears (how long its compilation takes,
    # even when the part is stopped).
    note_progress "$work/logs" "$CHECK_DIR/public_progress.txt" >/dev/null 2>&1 &
    local watcher=$!
    # It runs its whole schedule; stop it once it has logged RECORD_STEPS steps (awk exits 0 then, and the script
    # dies on the closed pipe). Short of that step, the part's exit code is the script's (1 if it ended with 0).
    timed public 'step_avg|peak memory' bash -c "cd '$work' && \
        '$PYTHON' -m torch.distributed.run --standalone --nproc_per_node=1 record_script.py 2>&1 | \
        awk '{print; fflush()} /^step:$RECORD_STEPS\\/[0-9]+ train_time/ {reached = 1; exit} END {exit !reached}'; \
        s=(\${PIPESTATUS[@]}); [[ \${s[1]:-1} == 0 ]] || exit \$(( \${s[0]} ? \${s[0]} : 1 ))"
    local status=$?
    kill "$watcher" 2>/dev/null
    # Its console shows nothing before step 0; its own log (after the script's text) shows how far it got.
    for own_log in "$work"/logs/*.txt; do
        [[ -f "$own_log" ]] && awk 'seen {print} /^=+$/ && length($0) >= 20 {seen = 1}' "$own_log" \
            > "$CHECK_DIR/public_own_log.txt"
    done
    rm -rf "$work"
    side_by_side
    return "$status"
}

# Every PROGRESS_SECONDS, the newest line of the logs in folder $1 with the seconds since the start, into $2
# when it changed; it ends with the check ($$), also when the check stops on an error before killing it.
note_progress() {
    local start=$SECONDS last="" line
    : > "$2"
    while kill -0 $$ 2>/dev/null && sleep "${PROGRESS_SECONDS:-5}"; do
        line="$(tail -q -n 1 "$1"/*.txt 2>/dev/null | tail -n 1)"
        [[ -n "$line" && "$line" != "$last" ]] && echo "$((SECONDS - start)) s: $line" >> "$2"
        last="$line"
    done
}

# The number the side-by-side is for: both scripts' average step time at step RECORD_STEPS, and their ratio.
side_by_side() {
    local ours theirs pattern="step:$RECORD_STEPS/[0-9]+ train_time:[0-9]+ms step_avg:[0-9.]+"
    ours="$(grep -hoE "$pattern" "$CHECK_DIR/record.log" 2>/dev/null | tail -n 1 | sed 's/.*step_avg://')"
    theirs="$(grep -hoE "$pattern" "$CHECK_DIR/public.log" 2>/dev/null | tail -n 1 | sed 's/.*step_avg://')"
    if [[ -z "$ours" || -z "$theirs" ]]; then
        echo "side by side: no ratio (step $RECORD_STEPS logged by ours: ${ours:-no}," \
            "by the public script: ${theirs:-no})"
        return 0
    fi
    local ratio line
    ratio="$(awk -v a="$ours" -v b="$theirs" 'BEGIN {printf "%.3f", a / b}')"
    line="step_avg at step $RECORD_STEPS: ours ${ours} ms, public record ${theirs} ms, ours/public $ratio"
    echo "side by side: $line"
    printf '| side_by_side | record vs public | 0 | 0 | %s |\n' "$line" >> "$SUMMARY"
}

part_icot() {
    # shellcheck disable=SC2086
    timed icot 'accuracy|acc|problems/s|step_avg|wall|Error|error' "$PYTHON" train_icot.py \
        ${ICOT_ARGS:-all --stages teacher --task=4x4 --per_line=1 --stage_minutes=2 --paper_dir=$SHARED/icot --log_dir=$CHECK_DIR/icot --ckpt_dir=checkpoints/icot/gpu_check}
}

part_oocl() {
    # shellcheck disable=SC2086
    timed oocl 'runs|steps/s|step_avg|wall|Error|error' "$PYTHON" oocl.py \
        ${OOCL_ARGS:-sweep --p 113 --model_dim 128 --mlp_dim 512 --num_heads 4 --lr 1e-3 --eval_every 250 --holdout1 0.9 --holdout2 0.3 --k 1 0 0 1 1 1 --seeds 0 1 2 --steps 1000 --quiet --overwrite --out_dir $CHECK_DIR/oocl}
}

# train_gpt.py's CUDA tests first: a tests part stopped at its limit has then checked the speedrun's kernels.
GPU_TESTS=(tests/gpu/test_gpu_train_gpt.py)
for file in tests/gpu/test_*.py; do
    [[ "$file" == "${GPU_TESTS[0]}" || ! -f "$file" ]] || GPU_TESTS+=("$file")
done

write_env
failed=0
for part in "$@"; do
    PART_START=$SECONDS
    case "$part" in
        env) ;;
        tests) timed tests 'passed|failed|error' "$PYTHON" -m pytest -v -s -rfEs --tb=short --durations=0 "${GPU_TESTS[@]}" \
                   || failed=1 ;;
        suite) timed suite 'passed|failed|error' "$PYTHON" -m pytest -v -rfEs --tb=short tests || failed=1 ;;
        gpt) part_gpt || failed=1 ;;
        record) part_record || failed=1 ;;
        public) part_public || failed=1 ;;
        icot) part_icot || failed=1 ;;
        oocl) part_oocl || failed=1 ;;
    esac
done
echo "results: $CHECK_DIR (summary.md)"
exit "$failed"
