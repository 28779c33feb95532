"""Table of a sweep: final validation loss and exact match per run (from each run's log in FOLDER/logs/<stage>_lr<lr>_
emb<mult>_wd<wd>/, plain or gzipped), best first per stage. FOLDER: this sweep's folder by default.

    python records/icot/sweep_tiny/table.py [records/icot/sweep_nocot_3x3]
"""
import argparse
import glob
import gzip
import os
import re
import sys

parser = argparse.ArgumentParser(prog="table.py", description=__doc__.split("\n\n")[0])
parser.add_argument("folder", nargs="?", default=os.path.dirname(os.path.abspath(__file__)),
                    help="a sweep's folder (holds logs/<stage>_lr<lr>_emb<mult>_wd<wd>/); default: this one")
folder = parser.parse_args().folder
logs = glob.glob(os.path.join(folder, "logs", "*", "*.txt")) + glob.glob(os.path.join(folder, "logs", "*", "*.txt.gz"))
if not logs:  # a wrong path would print an empty table, as if the sweep had no runs
    parser.error((f"{folder}: no such folder" if not os.path.isdir(folder) else
                  f"{folder} holds no logs/<stage>_lr<lr>_emb<mult>_wd<wd>/*.txt[.gz]")
                 + "; give the folder of a sweep (sweep.sh's FOLDER)")
rows, unfinished = [], []
for log in logs:
    name = os.path.basename(os.path.dirname(log))
    match = re.fullmatch(r"(\w+?)_lr(\S+)_emb(\S+)_wd(\S+)", name)
    if not match:
        parser.error(f"{log}: its folder {name} is not named <stage>_lr<lr>_emb<mult>_wd<wd> (as sweep.sh names it)")
    stage, lr, mult, wd = match.groups()
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
