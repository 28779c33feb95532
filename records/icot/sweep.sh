#!/usr/bin/env bash
# Short sweep of train_icot.py's teacher and no-CoT model over lr x embedding-lr multiplier x weight decay: one run
# each, its log in FOLDER/logs/<stage>_lr<lr>_emb<mult>_wd<wd>/ (the table: python3 records/icot/sweep_tiny/table.py
# FOLDER). Run from the repository root:
#
#   records/icot/sweep.sh FOLDER [train_icot.py arguments ...]
#
# The arguments give everything but the three swept values and --log_dir: size, data, --ckpt_dir, the steps
# (--teacher_steps, --nocot_steps). Environment: STAGES (default "teacher nocot"), LRS ("1e-3 3e-3 1e-2"),
# MULTS ("1 10"), WDS ("0 0.1"), SCRIPT (train_icot.py). A run whose folder holds a finished log is skipped, so a
# sweep stopped by a time limit goes on where it stopped, and a share of it (LRS=6e-4) fits a shorter command.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 FOLDER [train_icot.py arguments ...]" >&2; exit 2; }
folder=$1
shift

# Does a log of the folder (plain or gzipped, as committed logs are) say the stage finished?
finished() {
    local log
    for log in "$1"/*.txt "$1"/*.txt.gz; do
        [[ -f "$log" ]] && zgrep -q "^stage $2 done" "$log" && return 0
    done
    return 1
}

for stage in ${STAGES:-teacher nocot}; do
    for lr in ${LRS:-1e-3 3e-3 1e-2}; do
        for mult in ${MULTS:-1 10}; do
            for wd in ${WDS:-0 0.1}; do
                logs="$folder/logs/${stage}_lr${lr}_emb${mult}_wd${wd}"
                if finished "$logs" "$stage"; then
                    echo "done already: $logs"
                    continue
                fi
                echo "running: $logs"
                python3 "${SCRIPT:-train_icot.py}" "$stage" "$@" --lr="$lr" --embed_lr_mult="$mult" \
                    --weight_decay="$wd" --log_dir="$logs" | tail -n 5
            done
        done
    done
done
