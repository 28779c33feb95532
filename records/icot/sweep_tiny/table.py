"""Table of a sweep: final validation loss and exact match per run (from each run's log in FOLDER/logs/<stage>_lr<lr>_
emb<mult>_wd<wd>/, plain or gzipped), best first per stage. FOLDER: this sweep's folder by default.

    python records/icot/sweep_tiny/table.py [records/icot/sweep_nocot_3x3]
"""
import glob
import gzip
import os
import re
import sys

folder = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
rows, unfinished = [], []
for log in glob.glob(os.path.join(folder, "logs", "*", "*.txt")) + glob.glob(os.path.join(folder, "logs", "*", "*.txt.gz")):
    name = os.path.basename(os.path.dirname(log))
    stage, lr, mult, wd = re.fullmatch(r"(\w+?)_lr(\S+)_emb(\S+)_wd(\S+)", name).groups()
    text = (gzip.open if log.endswith(".gz") else open)(log, "rt").read()
    evals = re.findall(r"^step:(\d+)/\d+ removed_cot:\d+ val_loss:(\S+) ppl:\S+ accuracy:(\S+)", text, re.M)
    if not re.search(r"^stage \w+ done", text, re.M):  # stopped (a time limit): sweep.sh runs it again beside this log
        unfinished.append(log)
        continue
    steps, loss, accuracy = evals[-1]  # the last evaluation (at the last step, or where --stage_minutes stopped it)
    rows.append((stage, float(loss), float(lr), float(mult), float(wd), float(accuracy), int(steps)))
if unfinished:
    print(f"table.py: left out {len(unfinished)} log(s) with no final evaluation (runs cut short; remove them once "
          f"sweep.sh has run them again): " + " ".join(sorted(unfinished)), file=sys.stderr)
print("| stage | lr | embed lr mult | weight decay | steps | val loss | val exact match |")
print("|---|---|---|---|---|---|---|")
for stage, loss, lr, mult, wd, accuracy, steps in sorted(rows):
    print(f"| {stage} | {lr:g} | {mult:g} | {wd:g} | {steps} | {loss:.4f} | {accuracy:.3f} |")
