#!/usr/bin/env bash
# Short lr sweep of the teacher and the no-CoT model at the tiny size (3 layers, width 64, 2x2, one per line,
# 20k training lines, batch 64, 250 steps, validation on 500 lines): 3 lrs x embedding-lr multiplier {1, 10} x
# weight decay {0, 0.1}. Run from the repository root, one thread: records/icot/sweep_tiny/sweep.sh [SCRIPT]
# (SCRIPT: the train_icot.py to run; the logs hold the full script that ran).
set -euo pipefail
[ -f data/icot/sweep_2x2_k1/train.txt ] || python3 data/multiplication.py --digits 2x2 --per-line 1 \
  --splits train=20000,valid=500,test=500 --out-dir data/icot/sweep_2x2_k1 --seed 0
for stage in teacher nocot; do
  STAGES=$stage SCRIPT=${1:-train_icot.py} records/icot/sweep.sh records/icot/sweep_tiny --preset tiny \
    --data_dir=data/icot/sweep_2x2_k1 --ckpt_dir=checkpoints/icot/sweep_tiny --warmup_steps=20 --eval_every=1000 \
    --eval_lines=500 --eval_batch=500 --cpu_threads=1 --${stage}_steps=250
done
