"""records/plot.py: curves and table read back from the figure's own data, on generated logs of both formats."""

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
from test_data import assert_user_error
from test_ttest import SCRIPT_TEXT, run_main, write_log

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"records_{name}", REPO_ROOT / "records" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot = _load("plot")
ttest = _load("ttest")  # loaded on its own: plot's p-values must equal what this copy computes

STEPS, VAL_EVERY = 400, 50
OURS = [2.9180, 2.9186, 2.9178, 2.9190]  # final val losses of the attempt's finished runs
OURS_MS = [100_000, 101_000, 99_500, 100_400]
PUBLIC = [2.9195, 2.9201, 2.9188]
PUBLIC_MS = [120_000, 121_500, 119_800]


def curve(final, offset=0.0):
    return lambda step: final + offset + 7.9 * math.exp(-step / 40) + 0.3 * (1 - step / STEPS)


def write_public_log(path, final, train_time_ms):
    """The public speedrun's format: its own script text, 'Running ...' header lines, 4-decimal val_loss."""
    lines = ["import os  # the public record script", "=" * 100, "Running Python 3.12.7", "Running PyTorch 2.7.0",
             "=" * 100]
    for step in range(0, STEPS + 1):
        ms = round(train_time_ms * step / STEPS)
        average = f"{ms / max(step, 1):.2f}"
        lines.append(f"step:{step}/{STEPS} train_time:{ms}ms step_avg:{average}ms")
        if step % VAL_EVERY == 0:
            loss = final if step == STEPS else curve(final)(step)
            lines.append(f"step:{step}/{STEPS} val_loss:{loss:.4f} train_time:{ms}ms step_avg:{average}ms")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def logs(tmp_path):
    ours, public = tmp_path / "my-idea", tmp_path / "public-record"
    ours.mkdir()
    public.mkdir()
    for i, (final, ms) in enumerate(zip(OURS, OURS_MS)):
        write_log(ours / f"gpt_{i}.txt", final, ms, steps=STEPS, val_every=VAL_EVERY, curve=curve(final))
    # Unfinished, and far above the others: counting it would move both the mean curve and the table.
    write_log(ours / "gpt_crashed.txt", train_time_ms=100_000, steps=STEPS, last_step=320, val_every=VAL_EVERY,
              curve=curve(2.9, 0.2))
    for i, (final, ms) in enumerate(zip(PUBLIC, PUBLIC_MS)):
        write_public_log(public / f"public_{i}.txt", final, ms)
    return ours, public


def lines_by_gid(fig):
    """{gid: [Line2D in each of the 4 panels]}, panels in the order top-left, top-right, bottom-left, bottom-right."""
    found = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            found.setdefault(line.get_gid(), []).append(line)
    return found


def test_curves_are_the_logged_evaluations(logs, tmp_path):
    ours, public = logs
    attempts = plot.load_attempts([ours], baseline=[public])
    assert [(a["label"], a["baseline"]) for a in attempts] == [("my-idea", False), ("baseline", True)]
    fig = plot.plot_attempts(attempts, 2.92, tmp_path / "out.png")
    assert (tmp_path / "out.png").stat().st_size > 10_000
    lines = lines_by_gid(fig)
    eval_steps = np.arange(0, STEPS + 1, VAL_EVERY)
    for i, (final, ms) in enumerate(zip(OURS, OURS_MS)):
        time_panel, step_panel, zoom_time, zoom_step = lines[f"my-idea/run/gpt_{i}.txt"]
        expected = [curve(final)(s) for s in eval_steps[1:-1]]
        np.testing.assert_allclose(step_panel.get_ydata(), [10.8258] + expected + [final], atol=5e-7)
        np.testing.assert_array_equal(step_panel.get_xdata(), eval_steps)
        np.testing.assert_allclose(time_panel.get_xdata(), [round(ms * s / STEPS) / 60_000 for s in eval_steps])
        assert zoom_step.get_ydata().tolist() == step_panel.get_ydata().tolist()
    # The thick mean line: of the finished runs only, step by step.
    mean_loss = [np.mean([curve(f)(s) for f in OURS]) for s in eval_steps[1:-1]]
    mean_step = lines["my-idea/mean"][1]
    np.testing.assert_allclose(mean_step.get_ydata(), [10.8258] + mean_loss + [np.mean(OURS)], atol=5e-7)
    assert mean_step.get_linewidth() > 2 * lines["my-idea/run/gpt_0.txt"][1].get_linewidth()
    np.testing.assert_allclose(lines["my-idea/mean"][0].get_xdata(),
                               [np.mean([round(ms * s / STEPS) for ms in OURS_MS]) / 60_000 for s in eval_steps])
    # The public-format logs in the same figure, in black.
    np.testing.assert_allclose(lines["baseline/run/public_2.txt"][1].get_ydata()[-1], PUBLIC[2])
    np.testing.assert_allclose(lines["baseline/mean"][1].get_ydata()[-1], np.mean(PUBLIC), atol=1e-12)
    assert lines["baseline/mean"][0].get_color() == "black" != lines["my-idea/mean"][0].get_color()
    # The target in every panel; the lower panels show the last 20% of the steps.
    assert [line.get_ydata() for line in lines["target"]] == [[2.92, 2.92]] * 4
    assert fig.axes[3].get_xlim()[0] == pytest.approx(0.8 * STEPS)
    assert fig.axes[2].get_xlim()[0] == pytest.approx(0.8 * min(OURS_MS) / 60_000)  # the fastest run's last 20%
    assert fig.axes[2].get_xlim()[1] >= max(PUBLIC_MS) / 60_000
    assert fig.axes[3].get_ylim()[1] < curve(2.9, 0.2)(0.8 * STEPS)  # zoomed in on the loss too
    assert all(ax.get_ylim()[0] < 2.92 < ax.get_ylim()[1] for ax in fig.axes)  # the target near the curves: in view


def test_zoom_leaves_out_a_far_target(tmp_path):
    """Tiny CPU runs end near 7.8: the zoomed panels show their curves, not the 2.92 target (the top row does)."""
    for i, final in enumerate((7.78, 7.80, 7.76)):
        write_log(tmp_path / f"tiny_{i}.txt", final, 20_000, steps=STEPS, val_every=VAL_EVERY, curve=curve(final))
    fig = plot.plot_attempts(plot.load_attempts([tmp_path]), 2.92, tmp_path / "out.png")
    top, zoom = fig.axes[:2], fig.axes[2:]
    assert all(ax.get_ylim()[0] < 2.92 for ax in top)
    assert all(7.7 < ax.get_ylim()[0] < 7.76 for ax in zoom)
    assert [ax.get_title(loc="right") for ax in zoom] == ["(target 2.92 out of view)"] * 2
    fig = plot.plot_attempts(plot.load_attempts([tmp_path]), 7.79, tmp_path / "out.png")
    assert all(ax.get_ylim()[0] < 7.76 and ax.get_ylim()[1] > 7.79 for ax in fig.axes[2:])


def test_unfinished_run_is_drawn_marked_and_not_counted(logs, tmp_path):
    ours, _ = logs
    attempts = plot.load_attempts([ours])
    lines = lines_by_gid(plot.plot_attempts(attempts, 2.92, tmp_path / "out.png"))
    crashed = lines["my-idea/unfinished/gpt_crashed.txt"][1]
    np.testing.assert_allclose(crashed.get_ydata()[1:], [curve(2.9, 0.2)(s) for s in range(50, 301, 50)], atol=5e-7)
    assert crashed.get_linestyle() == ":"
    end = lines["my-idea/unfinished-end/gpt_crashed.txt"][1]
    assert end.get_marker() == "x" and end.get_xdata().tolist() == [300]
    row = plot.summary(attempts[0], 2.92)
    assert (row["runs"], row["unfinished"]) == (4, 1)
    assert row["mean_loss"] == pytest.approx(np.mean(OURS), abs=1e-12)
    assert row["std"] == pytest.approx(np.std(OURS), abs=1e-12)
    assert row["mean_minutes"] == pytest.approx(np.mean(OURS_MS) / 60_000)
    assert row["ms_per_step"] == pytest.approx(np.mean(OURS_MS) / STEPS)


def test_table_p_value_is_ttests(logs, tmp_path, capsys, monkeypatch):
    ours, public = logs
    out = run_main(capsys, ours)  # records/ttest.py on the same logs
    ttest_p = float(re.search(r"'p_value': (\S+),", out)[1])
    rows = [plot.summary(a, 2.92) for a in plot.load_attempts([ours], baseline=[public])]
    assert rows[0]["p_value"] == ttest_p
    assert rows[1]["p_value"] == ttest.one_sided_ttest(PUBLIC, 2.92, 0.01)["p_value"]
    assert rows[1]["p_value"] > 0.05 and rows[0]["p_value"] < 0.01  # the two attempts are told apart
    at_threshold = plot.summary(plot.load_attempts([ours])[0], 2.9185)["p_value"]  # the threshold given, not 2.92
    assert at_threshold == ttest.one_sided_ttest(OURS, 2.9185, 0.01)["p_value"] and at_threshold > 0.05
    monkeypatch.chdir(tmp_path)
    plot.main([str(ours), "--baseline", str(public)])
    table = capsys.readouterr().out
    assert (tmp_path / "logs" / "attempts.png").is_file()  # the default: under logs/ of the current directory
    assert re.search(rf"my-idea +4 +1 +{np.mean(OURS):.6f} +{np.std(OURS):.6f} +1\.67 m "
                     rf"+{np.mean(OURS_MS) / STEPS:.2f} +{rows[0]['p_value']:.3g}\n", table), table
    assert re.search(rf"baseline +3 +0 +{np.mean(PUBLIC):.6f} .* {rows[1]['p_value']:.3g}\n", table), table
    assert re.search(r"not counted: \S+gpt_crashed.txt \(my-idea\): no evaluation at step T/T", table)


def test_loose_logs_are_split_by_script_and_run_name(logs):
    ours, public = logs
    attempts = plot.load_attempts([*sorted(ours.glob("gpt_[0-3].txt")), *sorted(public.glob("*.txt"))])
    assert [len(a["runs"]) for a in attempts] == [4, 3]
    assert re.fullmatch(r"gpt \[\w{8}\]", attempts[0]["label"])
    assert re.fullmatch(r"public-record \[\w{8}\]", attempts[1]["label"])  # no run name: the directory's
    write_log(ours / "wider.txt", 2.95, 1000, steps=STEPS, val_every=VAL_EVERY, settings="seed=9, model_dim=2048")
    attempts = plot.load_attempts([*sorted(ours.glob("gpt_[0-3].txt")), ours / "wider.txt"])
    assert [len(a["runs"]) for a in attempts] == [4, 1]
    assert [a["label"][-10:] for a in attempts] == ["settings 1", "settings 2"]  # same script and run name


def test_single_run_and_identical_runs_have_no_p_value(tmp_path):
    for i in range(2):
        write_log(tmp_path / f"same{i}.txt", 2.9190, 1000, steps=4, val_every=2)
    row = plot.summary(plot.load_attempts([tmp_path])[0], 2.92)
    assert row["p_value"] is None and row["no_p_value"].startswith("all 2 final val losses are 2.919")
    (tmp_path / "same1.txt").unlink()
    row = plot.summary(plot.load_attempts([tmp_path])[0], 2.92)
    assert row["no_p_value"] == "a t-test needs at least 2 finished runs, got 1"
    assert "n/a (a t-test needs at least 2 finished runs, got 1)" in plot.format_table([row], 2.92)


def test_user_errors(logs, tmp_path, capsys):
    ours, _ = logs
    write_log(ours / "other.txt", 2.91, 1000, steps=STEPS, val_every=VAL_EVERY, script=SCRIPT_TEXT + "# changed\n")
    assert_user_error(capsys, plot.main, [str(ours), "--out", str(tmp_path / "x.png")],
                      "2 different scripts or configurations")
    (ours / "other.txt").unlink()
    (tmp_path / "file").write_text("")
    (tmp_path / "d.png").mkdir()
    for argv, message in [(["--out", str(tmp_path / "x.pdf")], "give a .png file name"),
                          (["--out", str(tmp_path / "file" / "x.png")], "cannot create"),
                          (["--out", str(tmp_path / "d.png")], r"d.png is a folder: give a .png file name"),
                          (["--baseline", str(tmp_path / "nope")], "nope does not exist"),
                          (["--threshold", "inf"], "--threshold must be a finite loss, got inf"),
                          (["--threshold", "nan"], "--threshold must be a finite loss, got nan")]:
        assert_user_error(capsys, plot.main, [str(ours), *argv], message)


def test_flags_take_both_spellings_once_and_no_abbreviation(logs, tmp_path, capsys):
    ours, public = logs
    out = ["--out", str(tmp_path / "x.png")]
    for argv, message in [(out + ["--out", str(tmp_path / "y.png")], "--out given twice"),
                          (out + ["--threshold", "3", "--threshold=2.9"], "--threshold given twice"),
                          (out + ["--baseline", str(public), "--baseline", str(public)], "--baseline given twice"),
                          (out + ["--allow_mixed", "--allow-mixed"], "--allow_mixed given twice"),
                          (out + ["--thresh", "3"], "unrecognized arguments: --thresh")]:
        assert_user_error(capsys, plot.main, [str(ours), *argv], message)
    assert not (tmp_path / "x.png").exists()
    plot.main([str(ours), *out, "--allow-mixed"])
    assert (tmp_path / "x.png").is_file()


def test_a_default_out_inside_records_is_refused(logs, tmp_path, capsys, monkeypatch):
    """Run from inside records/, the default logs/attempts.png would land in the committed records/."""
    ours, _ = logs
    records = REPO_ROOT / "records"
    monkeypatch.chdir(records)
    assert_user_error(capsys, plot.main, [str(ours)], re.escape(
        f"the default --out logs/attempts.png would write into the repository's records/ ({records}/logs/attempts.png): "
        f"run from the repository root ({REPO_ROOT}), or pass --out"))
    assert not (records / "logs").exists()
    plot.main([str(ours), "--out", str(tmp_path / "given.png")])  # a path given on purpose is written
    assert (tmp_path / "given.png").is_file()


def test_a_run_drawn_twice_is_refused_as_ttest_refuses_it(logs, tmp_path, capsys):
    ours, public = logs
    out = ["--out", str(tmp_path / "x.png")]
    for argv, message in [
            ([ours, "--baseline", ours], r"\S*gpt_0.txt is given both as an attempt log and as a baseline log"),
            ([ours, public, "--baseline", public / "public_1.txt"], r"public_1.txt is given both as an attempt log"),
            ([ours, ours / "gpt_2.txt"], r"\S*gpt_2.txt is in two attempts \(my-idea and gpt \[\w{8}\]\): give each "
                                         r"log once"),
            ([ours, ours], r"\S*gpt_0.txt is in two attempts \(my-idea and my-idea\)")]:
        assert_user_error(capsys, plot.main, [*map(str, argv), *out], message)
    (public / "copy.txt").write_bytes((ours / "gpt_1.txt").read_bytes())  # one run in two attempts under two names
    assert_user_error(capsys, plot.main, [str(ours), str(public), "--allow_mixed", *out],
                      r"gpt_1.txt and \S*copy.txt have identical content")
    assert not (tmp_path / "x.png").exists()
    (public / "copy.txt").unlink()
    seeds = [tmp_path / "one_gpu", tmp_path / "two_gpus"]  # one script, settings and seed on two set-ups: two attempts
    for folder, hardware in zip(seeds, ("world_size:1 device:cpu", "world_size:2 device:cpu")):
        folder.mkdir()
        for i in range(2):
            write_log(folder / f"gpt_{i}.txt", OURS[i], OURS_MS[i] + i, steps=STEPS, val_every=VAL_EVERY,
                      settings=f"seed={i}", hardware=hardware, curve=curve(OURS[i]))
    plot.main([*map(str, seeds), *out])
    assert (tmp_path / "x.png").exists()
    write_log(seeds[0] / "gpt_2.txt", OURS[2], OURS_MS[2], steps=STEPS, val_every=VAL_EVERY, settings="seed=0",
              curve=curve(OURS[2]))  # within one attempt a seed twice would count one run twice in its mean
    assert_user_error(capsys, plot.main, [*map(str, seeds), *out], r"both ran seed=0 with one script and settings")


def test_table_flags_run_times_of_mixed_hardware(logs):
    ours, _ = logs
    row = plot.summary(plot.load_attempts([ours])[0], 2.92)
    assert "hardware" not in plot.format_table([row], 2.92)
    write_log(ours / "gpt_0.txt", OURS[0], OURS_MS[0], steps=STEPS, val_every=VAL_EVERY, curve=curve(OURS[0]),
              hardware="world_size:1 device:NVIDIA H100 80GB HBM3")  # one run on one GPU, the others unlogged
    row = plot.summary(plot.load_attempts([ours])[0], 2.92)
    assert plot.format_table([row], 2.92).endswith("  (times mix 2 hardware set-ups)")
