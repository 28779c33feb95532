"""Is the mean final validation loss of a set of runs below the record threshold?

    python records/ttest.py [--threshold 2.92] [--alpha 0.05] LOG_OR_DIR...

Reads training logs (a directory stands for every *.txt in it) in the speedrun's format, where each
evaluation is a line `step:S/T val_loss:L train_time:Xms step_avg:Yms`. A run's result is its
evaluation at step T/T: the final val_loss, and train_time (printed here in seconds). A log without
that line (an unfinished run) is listed as skipped and not counted.

Prints the losses with their mean, median, std (population, ddof=0, as the public record READMEs
report it), min and max; a one-sided one-sample t-test of H1 "mean < threshold" (the sample std in
it uses ddof=1) with the one-sided upper confidence bound of the mean; and the same basic stats of
the run times.
"""

import argparse
import math
import re
from pathlib import Path

import numpy as np
from scipy import stats

SEPARATOR = "=" * 100  # ends the script text at the top of every log
EVAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+)ms step_avg:\S+ms")


# ---- Reading logs ----

def find_logs(paths):
    """Files as given, directories expanded to their *.txt files (sorted); each file once."""
    logs = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise SystemExit(f"error: directory {path} contains no *.txt logs")
            logs.extend(found)
        elif path.is_file():
            logs.append(path)
        else:
            raise SystemExit(f"error: {path} does not exist (give log files or directories of *.txt logs)")
    unique = {}
    for path in logs:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def final_evaluation(path):
    """(final val_loss, final train_time in s) of one log, or a str saying why the log cannot count."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    # Skip the script text at the top: it may itself contain text shaped like a log line.
    if SEPARATOR in lines:
        lines = lines[lines.index(SEPARATOR) + 1:]
    final, last = None, None
    for line in lines:
        match = EVAL_LINE.fullmatch(line.strip())
        if match:
            last = match
            if match[1] == match[2]:
                final = match
    if final is None:
        if last is None:
            return "no evaluation line (step:S/T val_loss:L train_time:Xms step_avg:Yms) found"
        return f"no evaluation at step T/T: unfinished run, last evaluation at step {last[1]}/{last[2]}"
    try:
        loss = float(final[3])
    except ValueError:
        return f"final val_loss {final[3]!r} is not a number"
    if not math.isfinite(loss):
        raise SystemExit(f"error: {path}: final val_loss is {final[3]} (the run diverged). A failed run belongs "
                         f"to the attempt: do not drop it silently; move it out deliberately if it must go.")
    return loss, int(final[4]) / 1000


# ---- Statistics ----

def basic_stats(values):
    values = np.asarray(values, dtype=np.float64)
    return {"Mean": float(values.mean()), "Median": float(np.median(values)), "Std": float(values.std()),
            "Min": float(values.min()), "Max": float(values.max())}


def one_sided_ttest(losses, threshold, alpha):
    """H0: mean >= threshold against H1: mean < threshold."""
    losses = np.asarray(losses, dtype=np.float64)
    n = len(losses)
    sample_mean = float(losses.mean())
    sample_std = float(losses.std(ddof=1))
    result = stats.ttest_1samp(losses, threshold, alternative="less")
    p_value = float(result.pvalue)
    # One-sided (1 - alpha) upper confidence bound: mean < bound with confidence 1 - alpha.
    upper_bound = sample_mean + float(stats.t.ppf(1 - alpha, n - 1)) * sample_std / math.sqrt(n)
    return {"n": n, "sample_mean": sample_mean, "sample_std": sample_std, "t_stat": float(result.statistic),
            "p_value": p_value, "alpha": alpha,
            "decision": "REJECT H0 (mean < threshold)" if p_value < alpha else "FAIL TO REJECT H0",
            "upper_conf_bound_mean": upper_bound, "threshold": threshold}


# ---- Report ----

def format_dict(values):
    return "{\n" + ",\n".join(f"    {key!r}: {value!r}" for key, value in values.items()) + "\n}"


def format_stats(values):
    return "\n".join(f"  {key}: {value!r}" for key, value in basic_stats(values).items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log files, or directories of *.txt logs")
    parser.add_argument("--threshold", type=float, default=2.92, help="the loss to beat (default 2.92)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        raise SystemExit(f"error: --alpha must lie strictly between 0 and 1, got {args.alpha}")

    losses, times, skipped = [], [], []
    for path in find_logs(args.logs):
        result = final_evaluation(path)
        if isinstance(result, str):
            skipped.append((path, result))
        else:
            losses.append(result[0])
            times.append(result[1])
            print(f"used    {path}: val_loss {result[0]} train_time {result[1]} s")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    if len(losses) < 2:
        raise SystemExit(f"error: a t-test needs at least 2 finished runs, got {len(losses)} "
                         f"({len(skipped)} skipped); run more seeds of the attempt")

    print(f"\nFinal validation losses over {len(losses)} runs:\n{losses}")
    print(f"\nBasic stats (Std = population std, ddof=0):\n{format_stats(losses)}")
    print(f"\nOne-sided t-test, H0: mean >= {args.threshold}, H1: mean < {args.threshold} "
          f"(sample_std uses ddof=1):\n{format_dict(one_sided_ttest(losses, args.threshold, args.alpha))}")
    print(f"\nRun times in seconds:\n{times}")
    print(f"\nBasic stats of the run times (Std = population std, ddof=0):\n{format_stats(times)}")


if __name__ == "__main__":
    main()
