#!/usr/bin/env bash
# Launch a training script on every GPU of this node (or of several nodes) with torchrun.
#
#   ./run.sh [SCRIPT.py] [ARGS...]      SCRIPT defaults to train_gpt.py; ARGS go to the script
#   ./run.sh records/<track>/<attempt>/train_gpt.py
#   ./run.sh --help                     this text (-h or --help anywhere: nothing is set up or launched)
#
# Environment:
#   NPROC=N                  processes (GPUs) per node; default: the GPUs nvidia-smi lists that
#                            CUDA_VISIBLE_DEVICES leaves visible
#   NNODES, NODE_RANK, MASTER_ADDR[, MASTER_PORT=29500]
#                            multi-node: run the same command on every node with its own NODE_RANK
#   FINEWEB_TRAIN_SHARDS=30  FineWeb train shards fetched for train_gpt.py (100M tokens each)
#   PYTHON=python3           the interpreter to use
#   RUN_SH_DRY_RUN=1         print the set-up and launch commands instead of running them (also without a
#                            GPU: then it shows an NPROC-GPU node, default 8)
#
# Set-up on a fresh node: installs requirements.txt when torch/numpy/tiktoken/triton do not import,
# and for scripts named train_gpt.py checks the flags and the process count with the script itself (a
# mistake ends there, before the download), then downloads the FineWeb shards that are missing (not with
# --preset tiny or with both --train_files and --val_files: such runs do not read them). The script runs
# with the repository root (the directory of this file) as working directory, so data/ and logs/
# are the repository's wherever the script was copied to.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${RUN_SH_DRY_RUN:-0}"

die() {
    echo "run.sh: error: $*" >&2
    exit 1
}

# --help or -h anywhere: the header above, before any GPU check, set-up or download.
for arg in "$@"; do
    if [[ "$arg" == --help || "$arg" == -h ]]; then
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
        echo
        echo "The script's own flags: $PYTHON train_gpt.py --help (or the script you launch)."
        exit 0
    fi
done

is_positive_int() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

# Run a set-up command, or only show it in a dry run.
run_step() {
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "+ $*"
    else
        "$@"
    fi
}

# ---- GPUs ----
# PHYSICAL_GPUS: what nvidia-smi -L lists; VISIBLE_GPUS: what CUDA_VISIBLE_DEVICES leaves of them.
PHYSICAL_GPUS=0
if command -v nvidia-smi >/dev/null 2>&1; then
    PHYSICAL_GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi
VISIBLE_GPUS=$PHYSICAL_GPUS
if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    # CUDA stops at the first -1 entry; an empty value hides every GPU.
    listed=0
    IFS=',' read -r -a entries <<< "$CUDA_VISIBLE_DEVICES"
    for entry in "${entries[@]+"${entries[@]}"}"; do
        entry="${entry// /}"
        [[ -z "$entry" || "$entry" == -* ]] && break
        listed=$((listed + 1))
    done
    if (( listed < VISIBLE_GPUS )); then VISIBLE_GPUS=$listed; fi
fi

if [[ -n "${NPROC+set}" ]] && ! is_positive_int "$NPROC"; then
    die "NPROC must be a positive integer (processes = GPUs per node), got '$NPROC'"
fi
if [[ "$VISIBLE_GPUS" == 0 ]]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        reason="nvidia-smi is not installed"
    elif [[ "$PHYSICAL_GPUS" == 0 ]]; then
        reason="nvidia-smi -L lists none"
    else
        reason="CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides the $PHYSICAL_GPUS GPU(s) nvidia-smi lists"
    fi
    if [[ "$DRY_RUN" == 1 ]]; then
        # A dry run shows what a GPU node would run, e.g. to check a command before a run on the 8-GPU node.
        VISIBLE_GPUS="${NPROC:-8}"
        echo "run.sh: note: no NVIDIA GPU is visible here ($reason); a real run stops here." \
             "This dry run shows the launch on a node with NPROC=$VISIBLE_GPUS GPUs (set NPROC to change)." >&2
    else
        cat >&2 <<EOF
run.sh: error: no NVIDIA GPU is visible ($reason).
run.sh launches the multi-GPU training runs (the GPT-2 Medium record runs on 8x H100).
Without a GPU, run the CPU smoke configurations of the same code instead:
  python train_gpt.py --preset tiny
  python train_icot.py all --preset tiny
  python oocl.py --preset tiny
EOF
        if [[ $# -gt 0 && "$1" == *.py ]]; then
            echo "A copied script runs the same way, from the repository root: python $1 --preset tiny" >&2
        fi
        exit 1
    fi
fi
NPROC="${NPROC:-$VISIBLE_GPUS}"
if (( NPROC > VISIBLE_GPUS )); then
    die "NPROC=$NPROC but only $VISIBLE_GPUS GPU(s) are visible on this node; lower NPROC"
fi

# ---- Script and arguments ----
SCRIPT="train_gpt.py"
if [[ $# -gt 0 && "$1" == *.py ]]; then
    SCRIPT="$1"
    shift
fi
# A path relative to the current directory first, then to the repository root.
if [[ -f "$SCRIPT" ]]; then
    SCRIPT_PATH="$(cd "$(dirname "$SCRIPT")" && pwd)/$(basename "$SCRIPT")"
elif [[ "$SCRIPT" != /* && -f "$REPO_ROOT/$SCRIPT" ]]; then
    SCRIPT_PATH="$REPO_ROOT/$SCRIPT"
elif [[ "$SCRIPT" == /* ]]; then
    die "training script '$SCRIPT' not found"
elif [[ "$PWD" == "$REPO_ROOT" ]]; then
    die "training script '$SCRIPT' not found (looked in $PWD)"
else
    die "training script '$SCRIPT' not found (looked in $PWD and $REPO_ROOT)"
fi

# ---- Rendezvous: one node, or several ----
if [[ -n "${NNODES:-}${NODE_RANK:-}${MASTER_ADDR:-}${MASTER_PORT:-}" ]]; then
    [[ -n "${NNODES:-}" && -n "${NODE_RANK:-}" && -n "${MASTER_ADDR:-}" ]] \
        || die "multi-node runs need NNODES, NODE_RANK and MASTER_ADDR all set (MASTER_PORT defaults to 29500); got NNODES='${NNODES:-}' NODE_RANK='${NODE_RANK:-}' MASTER_ADDR='${MASTER_ADDR:-}'"
    is_positive_int "$NNODES" || die "NNODES must be a positive integer, got '$NNODES'"
    [[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) \
        || die "NODE_RANK must be an integer in [0, NNODES=$NNODES), got '$NODE_RANK'"
    MASTER_PORT="${MASTER_PORT:-29500}"
    [[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a port number, got '$MASTER_PORT'"
    RENDEZVOUS=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT")
else
    RENDEZVOUS=(--standalone)
fi

# ---- Set-up of a fresh node ----
# What the scripts and the FineWeb download import (a node with torch but no hub client would fail the download).
NEEDED="torch, numpy, tiktoken, triton, huggingface_hub"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $PYTHON -m pip install -r $REPO_ROOT/requirements.txt  (only if: $PYTHON -c 'import $NEEDED' fails)"
elif ! "$PYTHON" -c "import $NEEDED" >/dev/null 2>&1; then
    echo "run.sh: installing $REPO_ROOT/requirements.txt (one of $NEEDED is missing)"
    "$PYTHON" -m pip install -r "$REPO_ROOT/requirements.txt" || die "pip install -r requirements.txt failed (see above)"
    "$PYTHON" -c "import $NEEDED" || die "$NEEDED still do not all import after installing requirements.txt"
fi
# train_gpt.py checks its flags and the process count itself, in seconds (TRAIN_GPT_CHECK_ONLY): a mistake ends
# here, before a download of minutes and a launch. A dry run checks them where torch imports.
WORLD=$((NPROC * ${NNODES:-1}))
HAS_TORCH="import importlib.util as u; exit(not (u.find_spec('torch') and u.find_spec('numpy')))"  # not imported
# (a copy made before the check existed would start training here instead: it is launched unchecked)
if [[ "$(basename "$SCRIPT_PATH")" == train_gpt.py ]] && grep -q TRAIN_GPT_CHECK_ONLY "$SCRIPT_PATH"; then
    if [[ "$DRY_RUN" == 1 ]] && ! "$PYTHON" -c "$HAS_TORCH" >/dev/null 2>&1; then
        echo "run.sh: note: $PYTHON cannot import torch and numpy here: this dry run does not check the flags" >&2
    elif ! (cd "$REPO_ROOT" && TRAIN_GPT_CHECK_ONLY=1 WORLD_SIZE=$WORLD RANK=0 "$PYTHON" "$SCRIPT_PATH" "$@"); then
        die "$(basename "$SCRIPT_PATH") refuses these flags for $WORLD processes (NPROC=$NPROC per node, see above);" \
            "nothing was fetched or launched"
    fi
fi
# FineWeb is fetched only for a run that reads it from the default paths: not for other shards
# (--train_files and --val_files) nor for the tiny preset (it trains on a synthetic set when FineWeb is missing).
fetch_reason=""
own_train=0
own_val=0
previous=""
for arg in "$@"; do
    case "$arg" in
        --train[_-]files*) own_train=1 ;;
        --val[_-]files*) own_val=1 ;;
        --preset=tiny) fetch_reason="--preset tiny" ;;
        tiny) [[ "$previous" == --preset ]] && fetch_reason="--preset tiny" ;;
    esac
    previous="$arg"
done
if (( own_train && own_val )); then fetch_reason="the run names its own train and val shards"; fi
if [[ "$(basename "$SCRIPT_PATH")" == train_gpt.py && -n "$fetch_reason" ]]; then
    echo "run.sh: not fetching FineWeb: $fetch_reason"
elif [[ "$(basename "$SCRIPT_PATH")" == train_gpt.py ]]; then
    FINEWEB_TRAIN_SHARDS="${FINEWEB_TRAIN_SHARDS:-30}"
    [[ "$FINEWEB_TRAIN_SHARDS" =~ ^[0-9]+$ ]] \
        || die "FINEWEB_TRAIN_SHARDS must be a number of shards, got '$FINEWEB_TRAIN_SHARDS'"
    run_step "$PYTHON" "$REPO_ROOT/data/cached_fineweb10B.py" "$FINEWEB_TRAIN_SHARDS"
fi

# ---- Launch ----
if command -v torchrun >/dev/null 2>&1; then
    LAUNCHER=(torchrun)
else
    LAUNCHER=("$PYTHON" -m torch.distributed.run)
fi
COMMAND=("${LAUNCHER[@]}" "${RENDEZVOUS[@]}" --nproc_per_node="$NPROC" "$SCRIPT_PATH" "$@")
cd "$REPO_ROOT"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "(cd $REPO_ROOT)"
    printf '%q ' "${COMMAND[@]}"
    echo
    exit 0
fi
exec "${COMMAND[@]}"
