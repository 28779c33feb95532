"""Val loss curves and a summary table of record attempts, from the logs records/ttest.py reads.

    python records/plot.py ATTEMPT_DIR_OR_LOGS... [--baseline DIR_OR_LOGS...] [--threshold 2.92]
                           [--out logs/attempts.png] [--allow_mixed]

Each directory is one attempt (its *.txt logs); log files given one by one are grouped into attempts by
script text, run name and settings, as ttest.py tells runs apart. --baseline names one more attempt, drawn in black.
As in ttest.py, a log counts once: one in two attempts (a folder and one of its logs), on both sides, or copied
under two names, and two runs of one script, settings and seed within an attempt, are errors.

Writes one PNG: val loss against training time (minutes) and against step, the full run on top and the last
20% of training below, one colour per attempt: every run a thin line, the mean of its finished runs a thick
one, the target (--threshold) a dashed horizontal line. An unfinished run is drawn dotted, ends in an x and
is not counted. Prints one row per attempt: finished runs, mean final val loss, its std (population, as
ttest.py's stats), mean training time, ms/step and the p-value of "mean < threshold" computed by ttest.py.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ttest  # noqa: E402  (records/ttest.py: the same log reading and t-test)

ZOOM_FRACTION = 0.2  # the lower panels show the last 20% of training
BASELINE_COLOR = "black"


# ---- Attempts ----

def load_attempts(paths, baseline=None, allow_mixed=False):
    """[{label, runs (ttest.read_runs dicts), baseline}]: one per directory, loose logs split by identity."""
    attempts = []
    loose = []
    for name in paths:
        if Path(name).is_dir():
            attempts.append({"label": Path(name).resolve().name, "runs": ttest.read_runs([name], allow_mixed),
                             "baseline": False})
        else:
            loose.append(name)
    if loose:
        by_identity = {}
        for run in ttest.read_runs(loose, allow_mixed=True):
            by_identity.setdefault(run["identity"], []).append(run)
        for (code, run_name, settings), runs in by_identity.items():
            label = f"{run_name or runs[0]['path'].parent.resolve().name} [{code}]"
            alike = [identity for identity in by_identity if identity[:2] == (code, run_name)]
            if len(alike) > 1:  # the same script and run name with other settings
                label += f" settings {alike.index((code, run_name, settings)) + 1}"
            attempts.append({"label": label, "runs": runs, "baseline": False})
    if baseline:
        attempts.append({"label": "baseline", "runs": ttest.read_runs(baseline, allow_mixed), "baseline": True})
    check_counted_once(attempts)
    for attempt in attempts:
        if not any(run["evals"] for run in attempt["runs"]):
            raise ValueError(f"attempt {attempt['label']}: no log has an evaluation line "
                             f"(step:S/T val_loss:L train_time:Xms step_avg:Yms); are these training logs?")
    return attempts


def check_counted_once(attempts):
    """As ttest.py: a log in one attempt only (a folder and one of its logs, or the same logs as the baseline, would
    draw a run twice) and no copied log anywhere (ttest.read_runs refuses one seed twice within an attempt, whose
    mean would count one run twice). Two attempts may share a seed: the same script on other hardware, say."""
    sides = [[run for attempt in attempts if attempt["baseline"] == side for run in attempt["runs"]]
             for side in (False, True)]
    ttest.check_apart([run["path"] for run in sides[0]], [run["path"] for run in sides[1]])
    owner = {}
    for attempt in attempts:
        for run in attempt["runs"]:
            other = owner.setdefault(run["path"].resolve(), attempt)
            if other is not attempt:
                raise ValueError(f"{run['path']} is in two attempts ({other['label']} and {attempt['label']}): give "
                                 f"each log once")
    copy = ttest.first_repeat(sides[0] + sides[1], lambda run: run["digest"])
    if copy:
        raise ValueError(f"{copy[0]['path']} and {copy[1]['path']} have identical content: one run under two names "
                         f"would be drawn twice. Keep one of them (delete or move the copy).")


def finished(run):
    return not isinstance(run["result"], str)


def run_curve(run):
    """(steps, minutes, val losses) of every evaluation of a run."""
    steps = np.array([e[0] for e in run["evals"]], dtype=np.int64)
    minutes = np.array([e[3] / 60 for e in run["evals"]])
    losses = np.array([_number(e[2]) for e in run["evals"]])
    return steps, minutes, losses


def _number(text):
    try:
        return float(text)
    except ValueError:  # a garbled intermediate evaluation: a gap in the curve
        return float("nan")


def mean_curve(runs):
    """(steps, mean minutes, mean val loss) of the finished runs, at the steps all of them evaluated."""
    curves = [run_curve(run) for run in runs if finished(run)]
    if not curves:
        return None
    steps = curves[0][0]
    for curve in curves[1:]:
        steps = np.intersect1d(steps, curve[0])
    picked = [[np.flatnonzero(curve[0] == step)[-1] for step in steps] for curve in curves]
    minutes = np.mean([curve[1][index] for curve, index in zip(curves, picked)], axis=0)
    losses = np.mean([curve[2][index] for curve, index in zip(curves, picked)], axis=0)
    return steps, minutes, losses


def summary(attempt, threshold):
    """One table row; the p-value from ttest.one_sided_ttest, or why there is none."""
    results = [run["result"] for run in attempt["runs"] if finished(run)]
    row = {"attempt": attempt["label"], "runs": len(results), "unfinished": len(attempt["runs"]) - len(results)}
    if not results:
        return row
    losses = [loss for loss, _ in results]
    final_steps = [run["evals"][-1][0] for run in attempt["runs"] if finished(run)]
    row["hardware"] = len({run["hardware"] for run in attempt["runs"] if finished(run)})  # times pool on one only
    row.update({"mean_loss": float(np.mean(losses)), "std": ttest.basic_stats(losses)["Std"],
                "mean_minutes": float(np.mean([seconds for _, seconds in results])) / 60,
                "ms_per_step": float(np.mean([1000 * seconds / steps for (_, seconds), steps
                                              in zip(results, final_steps)]))})
    try:
        row["p_value"] = ttest.one_sided_ttest(losses, threshold, ttest.RECORD_ALPHA)["p_value"]
    except ValueError as e:  # fewer than 2 runs, or zero variance
        row["p_value"] = None
        row["no_p_value"] = str(e).split(":")[0]
    return row


def format_table(rows, threshold):
    header = (f"{'attempt':<28} {'runs':>4} {'unfinished':>10} {'mean val loss':>13} {'std':>9} "
              f"{'mean time':>10} {'ms/step':>8}  p (mean < {threshold})")
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["runs"] == 0:
            lines.append(f"{row['attempt']:<28} {0:>4} {row['unfinished']:>10}  no finished run")
            continue
        p_text = f"{row['p_value']:.3g}" if row["p_value"] is not None else f"n/a ({row['no_p_value']})"
        lines.append(f"{row['attempt']:<28} {row['runs']:>4} {row['unfinished']:>10} {row['mean_loss']:>13.6f} "
                     f"{row['std']:>9.6f} {row['mean_minutes']:>8.2f} m {row['ms_per_step']:>8.2f}  {p_text}"
                     + (f"  (times mix {row['hardware']} hardware set-ups)" if row["hardware"] > 1 else ""))
    return "\n".join(lines)


# ---- Figure ----

def plot_attempts(attempts, threshold, out):
    """Draw the 2x2 figure into out and return it. Each line's gid says what it is: '<attempt>/run/<file>',
    '<attempt>/unfinished/<file>', '<attempt>/mean' or 'target'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for attempt in attempts:
        color = BASELINE_COLOR if attempt["baseline"] else next(colors)
        mean = mean_curve(attempt["runs"])
        for row in axes:
            for ax, x_index in zip(row, (1, 0)):  # left: minutes, right: steps
                for run in attempt["runs"]:
                    curve = run_curve(run)
                    done = finished(run)
                    kind = "run" if done else "unfinished"
                    ax.plot(curve[x_index], curve[2], color=color, linewidth=0.7, alpha=0.5 if done else 0.8,
                            linestyle="-" if done else ":", gid=f"{attempt['label']}/{kind}/{run['path'].name}")
                    if not done and len(curve[0]):
                        ax.plot(curve[x_index][-1:], curve[2][-1:], marker="x", markersize=9, color=color,
                                linestyle="none", gid=f"{attempt['label']}/unfinished-end/{run['path'].name}")
                if mean is not None:
                    ax.plot(mean[x_index], mean[2], color=color, linewidth=2.5, gid=f"{attempt['label']}/mean",
                            label=f"{attempt['label']} (mean of {sum(map(finished, attempt['runs']))} runs)")
    for row in axes:
        for ax in row:
            ax.axhline(threshold, color="red", linestyle="--", linewidth=1, gid="target", label=f"target {threshold}")
            ax.grid(alpha=0.3)
            ax.set_ylabel("val loss")
    _set_limits(axes, attempts, threshold)
    axes[0][0].set_title("val loss vs training time")
    axes[0][1].set_title("val loss vs step")
    axes[1][0].set_title(f"last {ZOOM_FRACTION:.0%} of training (time)")
    axes[1][1].set_title(f"last {ZOOM_FRACTION:.0%} of training (steps)")
    for row in axes:
        row[0].set_xlabel("training time (min)")
        row[1].set_xlabel("step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if any(not finished(run) for attempt in attempts for run in attempt["runs"]):
        handles.append(matplotlib.lines.Line2D([], [], color="grey", linestyle=":", marker="x"))
        labels.append("unfinished run (drawn, not counted)")
    axes[0][1].legend(handles, labels, loc="upper right", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def _set_limits(axes, attempts, threshold):
    """Top row: from 10% of training on (the first evaluations are far above). Bottom: the last 20%."""
    runs = [run for attempt in attempts for run in attempt["runs"] if run["evals"]]
    curves = [run_curve(run) for run in runs]
    total_steps = max(run["evals"][-1][1] for run in runs)
    max_minutes = max(curve[1].max() for curve in curves)
    # The time zoom starts at 80% of the fastest finished run, so that every attempt's end is in view.
    zoom_minutes = min(curve[1][-1] for run, curve in zip(runs, curves) if finished(run)) \
        if any(map(finished, runs)) else max_minutes
    for row, start_fraction in ((axes[0], 0.1), (axes[1], 1 - ZOOM_FRACTION)):
        start_step = start_fraction * total_steps
        shown = np.concatenate([curve[2][curve[0] >= start_step] for curve in curves])
        shown = shown[np.isfinite(shown)]
        # The top row always shows the target; the zoom only when it is near the curves (a tiny CPU run ends near
        # 7.8: with the 2.92 target in view its curves would be one line)
        span = shown.max() - shown.min() if len(shown) else 0.0
        if row is axes[0] or not len(shown) or shown.min() - 2 * span <= threshold <= shown.max() + 2 * span:
            shown = np.append(shown, threshold)
        else:
            for ax in row:
                ax.set_title(f"(target {threshold} out of view)", loc="right", fontsize=9)
        margin = 0.05 * (shown.max() - shown.min()) + 1e-4
        for ax in row:
            ax.set_ylim(shown.min() - margin, shown.max() + margin)
        row[1].set_xlim(start_step if start_fraction > 0.1 else 0, total_steps * 1.01)
        row[0].set_xlim(start_fraction * zoom_minutes if start_fraction > 0.1 else 0, max_minutes * 1.01)


# ---- Command line ----

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("attempts", nargs="+", help="attempt directories, or log files")
    parser.add_argument("--baseline", nargs="+", default=None, help="the baseline's directory or log files")
    parser.add_argument("--threshold", type=float, default=2.92, help="the target val loss (default 2.92)")
    parser.add_argument("--out", help="the PNG to write (default: logs/attempts.png under the current directory)")
    parser.add_argument("--allow_mixed", "--allow-mixed", action="store_true",
                        help="let a directory pool logs of different scripts or run names")
    args = parser.parse_args(argv)
    ttest.check_given_once(parser, sys.argv[1:] if argv is None else argv)
    ttest.check_threshold(parser, args.threshold)
    out = Path(args.out or os.path.join("logs", "attempts.png"))
    records = Path(__file__).resolve().parent
    if args.out is None and records in out.resolve().parents:  # records/ gets only what a user points there
        parser.error(f"the default --out {out} would write into the repository's records/ ({out.resolve()}): run "
                     f"from the repository root ({records.parent}), or pass --out")
    if out.suffix.lower() != ".png":
        parser.error(f"--out {out}: give a .png file name")
    if out.is_dir():
        parser.error(f"--out {out} is a folder: give a .png file name (e.g. {out / 'attempts.png'})")
    try:
        attempts = load_attempts(args.attempts, args.baseline, args.allow_mixed)
    except ValueError as e:  # a missing log, a diverged run, mixed scripts in one directory
        parser.error(str(e))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {out}: cannot create {out.parent} ({e.strerror or e})")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        parser.error(f"--out {out}: not writable; choose another path")
    print(format_table([summary(attempt, args.threshold) for attempt in attempts], args.threshold))
    for attempt in attempts:
        for run in attempt["runs"]:
            if not finished(run):
                print(f"not counted: {run['path']} ({attempt['label']}): {run['result']}")
    plot_attempts(attempts, args.threshold, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
