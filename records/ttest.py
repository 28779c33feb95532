"""Is the mean final validation loss of a set of runs below the record threshold, or below a baseline's?

    python records/ttest.py [--threshold 2.92] [--alpha 0.05] [--allow_mixed] LOG_OR_DIR...
                            [--baseline LOG_OR_DIR...]

Reads training logs (a directory stands for every *.txt in it) in the speedrun's format, where each
evaluation is a line `step:S/T val_loss:L train_time:Xms step_avg:Yms`. A run's result is its
evaluation at step T/T: the final val_loss, and train_time (printed here in seconds). A log without
that line (an unfinished run) is listed as skipped and not counted; a run that diverged (a val_loss that
is not finite, or the line with which train_gpt.py stops on a NaN loss) is an error.

Prints the losses with their mean, median, std (population, ddof=0, as the public record READMEs
report it), min and max; a one-sided one-sample t-test of H1 "mean < threshold" (the sample std in
it uses ddof=1) with the one-sided upper confidence bound of the mean; the verdict at the track's rule
(mean < threshold at p < 0.01, records/README.md) in one line, whatever --alpha is; and the same basic
stats of the run times.

--baseline LOG_OR_DIR... (after the attempt's logs) compares the attempt with another set of runs, e.g. the
train_gpt.py you started from, on the same machine and preset: useful where the threshold means nothing
(the tiny preset on a CPU ends near 7.8). Its logs are read by the same rules and need at least 2 finished
runs; the report then adds their losses and basic stats and a one-sided Welch two-sample t-test of H1
"mean < baseline mean" (variances not assumed equal): the difference of the means, t, the degrees of
freedom and p. The threshold test and the record verdict are unchanged: the record rule is the threshold.
A log given on both sides (or a copy of one on each side) is an error, and so is an attempt run that repeats a
baseline run's script, settings and seed (the attempt's copy of the script not edited yet).

The runs of one test must come from one script and configuration: logs whose script text (the part
above the first ==== line), run name (run_name=... in the header) or settings (the Hyperparameters(...)
line, seed and output paths aside) differ are not pooled; the error lists the groups and the settings
that differ. --allow_mixed pools them anyway (on each side). Identical losses (zero variance) are an error,
not t = -inf.

Each finished run must be an independent sample: two logs with identical content (one run copied under
two names) are an error, as are two runs of one script and settings whose settings line logs the same
seed=N (train_gpt.py logs the seed it ran, drawn fresh when --seed is -1). Logs without a logged seed are
not checked for it. The same path given twice is simply read once.
"""

import argparse
import ast
import hashlib
import math
import re
import sys
from pathlib import Path

import numpy as np
from scipy import stats

SEPARATOR = "=" * 100  # ends the script text at the top of every log
EVAL_LINE = re.compile(r"step:(\d+)/(\d+) val_loss:(\S+) train_time:(\d+)ms step_avg:\S+ms")
STOPPED_NOT_FINITE = re.compile(r"step:(\d+)/(\d+) (train|validation) loss is (nan|-?inf)\b")  # train_gpt.py
HARDWARE = re.compile(r"world_size:\d+ device:.+")  # train_gpt.py: what the run ran on
RUN_NAME = re.compile(r"\brun_name\s*[=:]\s*['\"]?([^'\",)\s]+)")
CONFIG_PREFIX = "Hyperparameters("  # the settings line of the scripts' logs
PER_RUN_SETTINGS = {"seed", "seeds", "run_name", "log_dir", "out_dir", "ckpt_dir", "save_checkpoint"}  # may differ
RECORD_ALPHA = 0.01  # the track's rule, records/README.md


# ---- Reading logs ----

def find_logs(paths):
    """Files as given, directories expanded to their *.txt files (sorted); each file once."""
    logs = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise ValueError(f"directory {path} contains no *.txt logs")
            logs.extend(found)
        elif path.is_file():
            logs.append(path)
        else:
            raise ValueError(f"{path} does not exist (give log files or directories of *.txt logs)")
    unique = {}
    for path in logs:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_log(path):
    """(script text above the first separator line or None, the log lines below it)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    # Skip the script text at the top: it may itself contain text shaped like a log line.
    if SEPARATOR not in lines:
        return None, lines
    split = lines.index(SEPARATOR)
    return "\n".join(lines[:split]), lines[split + 1:]


def evaluations(lines):
    """Every evaluation line as (step, total steps, val_loss text, train_time in s), in log order."""
    matches = (EVAL_LINE.fullmatch(line.strip()) for line in lines)
    return [(int(m[1]), int(m[2]), m[3], int(m[4]) / 1000) for m in matches if m]


def logged_settings(lines):
    """The logged Hyperparameters(...) as {name: value text}, {"settings line": line} where it does not parse, or
    None for a log without that line."""
    line = next((line.strip() for line in lines if line.startswith(CONFIG_PREFIX)), None)
    if line is None:
        return None
    try:
        call = ast.parse(line, mode="eval").body
        return {k.arg: ast.unparse(k.value) for k in call.keywords}
    except SyntaxError:
        return {"settings line": line}


def settings(lines):
    """The logged settings as ((name, value text), ...) without the per-run ones (seed, paths), or None for a log
    without a settings line."""
    logged = logged_settings(lines)
    if logged is None:
        return None
    return tuple(sorted((name, value) for name, value in logged.items() if name not in PER_RUN_SETTINGS))


def logged_seed(lines):
    """The seed=<int> of the settings line, or None: public logs carry none, and a negative one (-1 asks
    train_gpt.py to draw one) does not say which seed ran."""
    seed = (logged_settings(lines) or {}).get("seed", "")
    return int(seed) if seed.isdigit() else None


def hardware(lines):
    """The run's `world_size:N device:NAME` line, or "not logged" (older and public logs)."""
    return next((line.strip() for line in lines if HARDWARE.fullmatch(line.strip())), "not logged")


def run_identity(script_text, lines):
    """What makes two logs the same attempt: a digest of the script text, the run name and the settings."""
    code = hashlib.sha1(script_text.encode()).hexdigest()[:8] if script_text is not None else "no script text"
    name = next((m[1] for m in map(RUN_NAME.search, lines) if m), None)
    return code, name, settings(lines)


def number(text):
    """float(text), or None where the text is not a number."""
    try:
        return float(text)
    except ValueError:
        return None


def final_result(path, lines, evals):
    """(final val_loss, final train_time in s) from a log's evaluations, or a str saying why it cannot count.
    A diverged run is an error: a failed run belongs to the attempt."""
    stop = next((m for m in map(STOPPED_NOT_FINITE.match, lines) if m), None)
    bad_eval = next((e for e in evals if number(e[2]) is not None and not math.isfinite(number(e[2]))), None)
    if stop or bad_eval:
        what = (f"{stop[3]} loss is {stop[4]} at step {stop[1]}/{stop[2]}" if stop
                else f"val_loss is {bad_eval[2]} at step {bad_eval[0]}/{bad_eval[1]}")
        raise ValueError(f"{path}: {what} (the run diverged). A failed run belongs to the attempt: do not drop it "
                         f"silently; move it out deliberately if it must go.")
    finals = [e for e in evals if e[0] == e[1]]
    if not finals:
        if not evals:
            return "no evaluation line (step:S/T val_loss:L train_time:Xms step_avg:Yms) found"
        return f"no evaluation at step T/T: unfinished run, last evaluation at step {evals[-1][0]}/{evals[-1][1]}"
    _, _, loss_text, seconds = finals[-1]
    if number(loss_text) is None:
        return f"final val_loss {loss_text!r} is not a number"
    return number(loss_text), seconds


def final_evaluation(path):
    """(final val_loss, final train_time in s) of one log, or a str saying why the log cannot count."""
    lines = read_log(path)[1]
    return final_result(path, lines, evaluations(lines))


def read_runs(paths, allow_mixed=False):
    """The logs under paths as dicts (path, evals, result, identity, digest, seed, hardware); results of finished runs are
    (loss, seconds), of the others a str saying why they do not count. Raises ValueError when the finished
    runs come from different scripts or run names, unless allow_mixed, for a missing path or a diverged run,
    and when two finished runs are one run twice (check_independent)."""
    runs = []
    for path in find_logs(paths):
        script_text, lines = read_log(path)
        evals = evaluations(lines)
        runs.append({"path": path, "evals": evals, "result": final_result(path, lines, evals),
                     "identity": run_identity(script_text, lines),
                     "digest": hashlib.sha256(path.read_bytes()).hexdigest(), "seed": logged_seed(lines),
                     "hardware": hardware(lines)})
    groups = {}
    for run in runs:
        if not isinstance(run["result"], str):
            groups.setdefault(run["identity"], []).append(run["path"])
    if len(groups) > 1 and not allow_mixed:
        values = [dict(config or ()) for _, _, config in groups]
        differing = sorted({key for v in values for key in v if len({w.get(key) for w in values}) > 1})
        listing = "\n".join(f"  script {code}, run_name {name}"
                             + "".join(f", {key}={config.get(key, '(not logged)')}" for key in differing)
                             + f": {len(group)} log{'s' * (len(group) > 1)} ({', '.join(str(p) for p in group)})"
                             for (code, name, _), group, config in zip(groups, groups.values(), values))
        raise ValueError(f"the logs come from {len(groups)} different scripts or configurations, which one "
                         f"test must not pool:\n{listing}\nGive the logs of one attempt only, or --allow_mixed to "
                         f"pool them anyway.")
    check_independent(runs)
    return runs


def first_repeat(runs, key):
    """The first two finished runs of one identity with the same key(run) (None does not count), or None."""
    seen = {}
    for run in runs:
        if isinstance(run["result"], str) or key(run) is None:
            continue
        earlier = seen.setdefault((run["identity"], key(run)), run)
        if earlier is not run:
            return earlier, run
    return None


def check_independent(runs, baseline_runs=()):
    """Raises ValueError for two finished runs that are one run twice: a copied log (identical bytes, so also
    one identity), or the same script and settings run with the same seed. Either would count one result
    twice: n too large, p too small. Unfinished runs do not count, so they are not checked. With baseline_runs,
    also across the two sides, where one seed of one script and settings on both means the attempt is the baseline."""
    runs, baseline_runs = list(runs), list(baseline_runs)
    copy = first_repeat(runs + baseline_runs, lambda run: run["digest"])
    if copy:
        raise ValueError(f"{copy[0]['path']} and {copy[1]['path']} have identical content: one run under two "
                         f"names would be counted twice. Keep one of them (delete or move the copy).")
    same_seed = first_repeat(runs + baseline_runs, lambda run: run["seed"])
    if same_seed and same_seed[0] in runs and same_seed[1] in baseline_runs:
        first, second = same_seed  # the README's CPU trial run before the copy was edited
        raise ValueError(f"the attempt's script and settings are identical to the baseline's: {first['path']} and "
                         f"{second['path']} ran one script with the same settings and seed={first['seed']}, so the "
                         f"attempt would be compared with itself. Edit the attempt's copy of the script (or its "
                         f"flags), then run the attempt again.")
    if same_seed:
        first, second = same_seed
        raise ValueError(f"{first['path']} and {second['path']} both ran seed={first['seed']} with one script and "
                         f"settings: not independent samples. Run distinct seeds (train_gpt.py: --seed N per run, or "
                         f"its default -1, which draws a fresh one per run).")


def check_apart(logs, baseline_logs):
    """Raises ValueError for a log on both sides of the comparison: the attempt would be compared with itself."""
    baseline_paths = {path.resolve(): path for path in baseline_logs}
    shared = next((path for path in logs if path.resolve() in baseline_paths), None)
    if shared:
        raise ValueError(f"{shared} is given both as an attempt log and as a baseline log "
                         f"({baseline_paths[shared.resolve()]}); give each log to one side only.")


# ---- Statistics ----

def basic_stats(values):
    values = np.asarray(values, dtype=np.float64)
    return {"Mean": float(values.mean()), "Median": float(np.median(values)), "Std": float(values.std()),
            "Min": float(values.min()), "Max": float(values.max())}


def check_sample(losses):
    """Raises ValueError where a t-test on losses is undefined: fewer than 2, or all equal."""
    n = len(losses)
    if n < 2:
        raise ValueError(f"a t-test needs at least 2 finished runs, got {n}")
    if np.all(losses == losses[0]):
        raise ValueError(f"all {n} final val losses are {float(losses[0])!r}: with zero variance the t-test is "
                         f"undefined (t would be infinite). Identical results usually mean one log counted twice "
                         f"under two names, or runs with the same seed; check the logs, or run seeds that differ")


def one_sided_ttest(losses, threshold, alpha):
    """H0: mean >= threshold against H1: mean < threshold."""
    losses = np.asarray(losses, dtype=np.float64)
    check_sample(losses)
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


def welch_ttest(losses, baseline_losses, alpha):
    """H0: mean >= baseline mean against H1: mean < baseline mean, without assuming equal variances (Welch)."""
    losses, baseline_losses = (np.asarray(values, dtype=np.float64) for values in (losses, baseline_losses))
    for values in (losses, baseline_losses):
        check_sample(values)
    result = stats.ttest_ind(losses, baseline_losses, equal_var=False, alternative="less")
    p_value = float(result.pvalue)
    return {"n": len(losses), "baseline_n": len(baseline_losses),
            "mean_difference": float(losses.mean() - baseline_losses.mean()), "t_stat": float(result.statistic),
            "df": float(result.df), "p_value": p_value, "alpha": alpha,
            "decision": "REJECT H0 (mean < baseline mean)" if p_value < alpha else "FAIL TO REJECT H0"}


# ---- Report ----

def record_verdict(p_value, mean, threshold):
    """One line: does the attempt meet the track's loss rule (p < RECORD_ALPHA)?"""
    rule = f"Record verdict (track rule: mean < {threshold} at p < {RECORD_ALPHA}, records/README.md): "
    if p_value < RECORD_ALPHA:
        return rule + f"MET, mean {mean:.6f} is below {threshold} with p = {p_value:.3g}"
    return rule + f"NOT MET, p = {p_value:.3g} for mean {mean:.6f} is not below {RECORD_ALPHA}"


def format_dict(values):
    return "{\n" + ",\n".join(f"    {key!r}: {value!r}" for key, value in values.items()) + "\n}"


def format_stats(values):
    return "\n".join(f"  {key}: {value!r}" for key, value in basic_stats(values).items())


def or_exit(parser, prefix, function, *args):
    """function(*args); a ValueError from it ends the run as the parser's error (exit 2), prefix first."""
    try:
        return function(*args)
    except ValueError as e:
        parser.error(prefix + str(e))


def finished_sample(parser, runs, side):
    """(losses, times) of the finished runs of one side ("attempt" or "baseline"), after listing every log as
    used or skipped; fewer than 2 finished runs is an error, raised before any statistics are printed."""
    baseline = side == "baseline"
    finished = [run for run in runs if not isinstance(run["result"], str)]
    for run in finished:
        print(f"{'baseline ' * baseline}used    {run['path']}: val_loss {run['result'][0]} "
              f"train_time {run['result'][1]} s")
    skipped = [run for run in runs if isinstance(run["result"], str)]
    for run in skipped:
        print(f"{'baseline ' * baseline}skipped {run['path']}: {run['result']}")
    if len(finished) < 2:
        parser.error(f"{'--baseline: ' * baseline}a t-test needs at least 2 finished runs, got {len(finished)} "
                     f"({len(skipped)} skipped); run more seeds of the {side}")
    return [run["result"][0] for run in finished], [run["result"][1] for run in finished]


def check_given_once(parser, argv):
    """A flag given twice, in either spelling (--allow_mixed, --allow-mixed), is an error: argparse would keep the
    last value silently. Also used by plot.py."""
    seen = set()
    for arg in argv:
        if arg == "--":  # positionals only after it
            break
        if arg.startswith("--"):
            flag = "--" + arg[2:].split("=")[0].replace("-", "_")
            if flag in seen:
                parser.error(f"{flag} given twice")
            seen.add(flag)


def check_threshold(parser, threshold):
    """A NaN or infinite target tests nothing (inf: the verdict MET for any loss). Also used by plot.py."""
    if not math.isfinite(threshold):
        parser.error(f"--threshold must be a finite loss, got {threshold}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("logs", nargs="+", help="log files, or directories of *.txt logs")
    parser.add_argument("--threshold", type=float, default=2.92, help="the loss to beat (default 2.92)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the t-test dicts "
                        f"(default 0.05; the record verdict always uses the track's {RECORD_ALPHA})")
    parser.add_argument("--allow_mixed", "--allow-mixed", action="store_true",
                        help="pool logs of different scripts or run names (refused by default), on each side")
    parser.add_argument("--baseline", nargs="+", metavar="LOG_OR_DIR",
                        help="logs of the run to compare with (files or directories): adds their stats and a "
                             "one-sided Welch t-test of mean < baseline mean")
    args = parser.parse_args(argv)
    check_given_once(parser, sys.argv[1:] if argv is None else argv)
    check_threshold(parser, args.threshold)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must lie strictly between 0 and 1, got {args.alpha}")

    # Paths first: a log on both sides would otherwise show as a mixed group, a less clear error
    baseline = args.baseline or []
    logs = or_exit(parser, "", find_logs, args.logs)
    baseline_logs = or_exit(parser, "--baseline: ", find_logs, baseline)
    or_exit(parser, "--baseline: ", check_apart, logs, baseline_logs)
    runs = or_exit(parser, "", read_runs, args.logs, args.allow_mixed)
    baseline_runs = or_exit(parser, "--baseline: ", read_runs, baseline, args.allow_mixed)
    or_exit(parser, "--baseline: ", check_independent, runs, baseline_runs)  # a copy of a log on each side
    losses, times = finished_sample(parser, runs, "attempt")
    baseline_losses = finished_sample(parser, baseline_runs, "baseline")[0] if args.baseline else None
    test = or_exit(parser, "", one_sided_ttest, losses, args.threshold, args.alpha)
    comparison = (or_exit(parser, "--baseline: ", welch_ttest, losses, baseline_losses, args.alpha)
                  if args.baseline else None)

    print(f"\nFinal validation losses over {len(losses)} runs:\n{losses}")
    print(f"\nBasic stats (Std = population std, ddof=0):\n{format_stats(losses)}")
    print(f"\nOne-sided t-test, H0: mean >= {args.threshold}, H1: mean < {args.threshold} "
          f"(sample_std uses ddof=1):\n{format_dict(test)}")
    print(record_verdict(test["p_value"], test["sample_mean"], args.threshold))
    # Losses pool across hardware (the same math), run times do not: one set of stats per hardware
    by_hardware = {}
    for run in runs:
        if not isinstance(run["result"], str):
            by_hardware.setdefault(run["hardware"], []).append(run["result"][1])
    if len(by_hardware) > 1:
        print(f"\nThe runs ran on {len(by_hardware)} different hardware set-ups: their times are not one sample")
    for setup, setup_times in by_hardware.items():
        on = f" on {setup}" if len(by_hardware) > 1 else ""
        print(f"\nRun times in seconds{on}:\n{setup_times}")
        print(f"\nBasic stats of the run times{on} (Std = population std, ddof=0):\n{format_stats(setup_times)}")
    if comparison:
        print(f"\nBaseline final validation losses over {len(baseline_losses)} runs:\n{baseline_losses}")
        print(f"\nBaseline basic stats (Std = population std, ddof=0):\n{format_stats(baseline_losses)}")
        print(f"\nOne-sided Welch t-test, H0: mean >= baseline mean, H1: mean < baseline mean (mean_difference = "
              f"mean - baseline mean; variances not assumed equal):\n{format_dict(comparison)}")


if __name__ == "__main__":
    main()
