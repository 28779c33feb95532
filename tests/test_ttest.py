"""records/ttest.py: log parsing, statistics against scipy's own numbers and the seed record's README."""

import importlib.util
import math
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_data import assert_user_error

REPO_ROOT = Path(__file__).resolve().parents[1]
TTEST_PATH = REPO_ROOT / "records" / "ttest.py"
_spec = importlib.util.spec_from_file_location("records_ttest", TTEST_PATH)
ttest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttest)

# The 19 runs of the public record "Add additional input embedding" (seed 004) and its printed statistics.
SEED_LOSSES = [2.919502, 2.91976, 2.920582, 2.919331, 2.919008, 2.919827, 2.918785, 2.918519, 2.919297, 2.920061,
               2.918938, 2.919342, 2.918186, 2.920546, 2.91954, 2.919093, 2.918951, 2.919599, 2.919956]
SEED_TIMES = [1414.299, 1412.033, 1411.668, 1421.735, 1411.998, 1411.094, 1412.637, 1410.047, 1410.509, 1412.048,
              1411.574, 1415.299, 1411.649, 1412.94, 1412.508, 1410.912, 1415.296, 1410.778, 1407.511]
SEED_P_VALUE = 0.00035946114919240566

# The script text opens every log; an example line in it must not be read as a result.
SCRIPT_TEXT = '"""Logs lines such as\nstep:10/10 val_loss:0.1234 train_time:5ms step_avg:0.50ms\n"""\n' \
              'print(f"step:{step}/{steps} val_loss:{loss:.4f} train_time:{ms:.0f}ms step_avg:{avg:.2f}ms")\n'


def write_log(path, val_loss=None, train_time_ms=0, steps=5690, last_step=None, val_every=125, script=SCRIPT_TEXT,
              run_name="gpt", curve=lambda step: 3.5, settings=None, hardware=None):
    """A log in the shared format; val_loss=None or last_step < steps gives an unfinished run; curve(step) is
    the val_loss of the evaluations before the last step. By default each path logs a seed of its own, as
    train_gpt.py draws one per run."""
    last_step = steps if last_step is None else last_step
    settings = f"seed={zlib.crc32(str(path).encode())}, log_dir='logs'" if settings is None else settings
    lines = [script, "=" * 100, "Python 3.12.3", "PyTorch 2.7.0", "CUDA 12.6", "8x H100", "=" * 100,
             *([hardware] if hardware else []), f"Hyperparameters(num_iterations={steps}, run_name='{run_name}', {settings})",
             f"step:0/{steps} val_loss:10.8258 train_time:0ms step_avg:nanms"]
    for step in range(1, last_step + 1):
        ms = round(train_time_ms * step / steps)
        lines.append(f"step:{step}/{steps} train_time:{ms}ms step_avg:{ms / step:.2f}ms")
        if step % val_every == 0 and step != steps:
            lines.append(f"step:{step}/{steps} val_loss:{curve(step):.6f} train_time:{ms}ms step_avg:{ms / step:.2f}ms")
    if last_step == steps and val_loss is not None:
        lines.append(f"step:{steps}/{steps} val_loss:{val_loss} train_time:{train_time_ms}ms "
                     f"step_avg:{train_time_ms / steps:.2f}ms")
        lines.append("peak memory allocated: 54321 MiB reserved: 60000 MiB")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_main(capsys, *argv):
    ttest.main([str(a) for a in argv])
    return capsys.readouterr().out


def printed(out, key):
    """The value printed after `key` (a dict key 'key': or a stats label Key:) in the first section that has it."""
    return re.search(rf"(?:'{key}'|{key}): (\S+?),?\n", out)[1]


@pytest.fixture
def seed_logs(tmp_path):
    for i, (loss, seconds) in enumerate(zip(SEED_LOSSES, SEED_TIMES)):
        write_log(tmp_path / f"run{i:02d}.txt", loss, round(seconds * 1000), steps=20, val_every=5)
    return tmp_path


def test_reproduces_seed_record_statistics(seed_logs, capsys):
    out = run_main(capsys, seed_logs)
    loss_section, time_section = out.split("Run times in seconds:")
    assert f"over 19 runs:\n{SEED_LOSSES}" in loss_section and f"\n{SEED_TIMES}\n" in time_section
    expected_loss_stats = {"Mean": "2.9194117368421053", "Median": "2.919342", "Std": "0.000613243648848653",
                           "Min": "2.918186", "Max": "2.920582"}
    expected_time_stats = {"Mean": "1412.4492105263155", "Median": "1411.998", "Std": "2.8062021268488864",
                           "Min": "1407.511", "Max": "1421.735"}
    for key, value in expected_loss_stats.items():
        assert f"  {key}: {value}\n" in loss_section
    for key, value in expected_time_stats.items():
        assert f"  {key}: {value}\n" in time_section
    for key, value in {"n": "19", "sample_mean": "2.9194117368421053", "sample_std": "0.0006300479560324045",
                       "t_stat": "-4.069816643193549", "alpha": "0.05",
                       "upper_conf_bound_mean": "2.919662383449226", "threshold": "2.92"}.items():
        assert f"    '{key}': {value},\n" in out or f"    '{key}': {value}\n" in out, key
    assert "'decision': 'REJECT H0 (mean < threshold)'" in out
    assert ("\nRecord verdict (track rule: mean < 2.92 at p < 0.01, records/README.md): MET, mean 2.919412 is below "
            "2.92 with p = 0.000359\n") in out
    # scipy < 1.12 prints the seed's p bit for bit; newer scipy's t CDF differs in the 16th digit.
    p_value = float(printed(out, "p_value"))
    assert p_value == pytest.approx(SEED_P_VALUE, rel=1e-14)
    assert p_value == float(stats.ttest_1samp(SEED_LOSSES, 2.92, alternative="less").pvalue)


def test_generated_losses_match_scipy_and_textbook_formulas(tmp_path, capsys):
    rng = np.random.default_rng(0)
    losses = [round(x, 6) for x in rng.normal(2.9203, 0.0008, size=7)]
    for i, loss in enumerate(losses):
        write_log(tmp_path / f"r{i}.txt", loss, 1000 + i, steps=4, val_every=2)
    out = run_main(capsys, tmp_path, "--threshold", "2.921", "--alpha", "0.1")
    n, mean, sample_std = len(losses), np.mean(losses), np.std(losses, ddof=1)
    scipy_result = stats.ttest_1samp(losses, 2.921, alternative="less")
    t_stat = (mean - 2.921) / (sample_std / math.sqrt(n))
    assert float(printed(out, "t_stat")) == pytest.approx(t_stat, rel=1e-12)
    assert float(printed(out, "t_stat")) == float(scipy_result.statistic)
    assert float(printed(out, "p_value")) == float(scipy_result.pvalue)
    assert float(printed(out, "p_value")) == pytest.approx(stats.t.cdf(t_stat, n - 1), rel=1e-10)
    bound = mean + stats.t.ppf(0.9, n - 1) * sample_std / math.sqrt(n)
    assert float(printed(out, "upper_conf_bound_mean")) == pytest.approx(bound, rel=1e-14)
    assert printed(out, "alpha") == "0.1" and printed(out, "threshold") == "2.921"
    decision = "REJECT H0 (mean < threshold)" if scipy_result.pvalue < 0.1 else "FAIL TO REJECT H0"
    assert f"'decision': '{decision}'" in out
    assert f"{[(1000 + i) / 1000 for i in range(7)]}" in out


def test_mean_above_threshold_is_not_rejected():
    result = ttest.one_sided_ttest([2.93, 2.925, 2.931], threshold=2.92, alpha=0.05)
    assert result["decision"] == "FAIL TO REJECT H0" and result["p_value"] > 0.5
    assert result["upper_conf_bound_mean"] > 2.93


def test_unfinished_log_is_skipped_not_counted(tmp_path, capsys):
    for i, loss in enumerate([2.918, 2.919]):
        write_log(tmp_path / f"done{i}.txt", loss, 2000, steps=300)
    write_log(tmp_path / "crashed.txt", steps=300, last_step=260)
    out = run_main(capsys, tmp_path)
    assert re.search(r"skipped \S*crashed.txt: no evaluation at step T/T: unfinished run, "
                     r"last evaluation at step 250/300", out)
    assert "over 2 runs:\n[2.918, 2.919]" in out and "'n': 2," in out
    (tmp_path / "done1.txt").unlink()
    assert_user_error(capsys, ttest.main, [str(tmp_path)], "at least 2 finished runs, got 1 \\(1 skipped\\)")


def test_public_speedrun_line_format(tmp_path):
    log = tmp_path / "public.txt"
    log.write_text(SCRIPT_TEXT + "=" * 100 + "\nRunning Python 3.12.7\nRunning PyTorch 2.7.0\n" + "=" * 100 + "\n"
                   "step:0/5690 val_loss:10.8258 train_time:0ms step_avg:0.03ms\n"
                   "step:1/5690 train_time:612ms step_avg:612.44ms\n"
                   "step:5689/5690 train_time:1414051ms step_avg:248.56ms\n"
                   "step:5690/5690 train_time:1414299ms step_avg:248.56ms\n"
                   "step:5690/5690 val_loss:2.9195 train_time:1414299ms step_avg:248.56ms\n"
                   "peak memory allocated: 55380 MiB reserved: 74064 MiB\n")
    assert ttest.final_evaluation(log) == (2.9195, 1414.299)
    (tmp_path / "no_evals.txt").write_text(SCRIPT_TEXT + "=" * 100 + "\nstep:1/3 train_time:5ms step_avg:5.00ms\n")
    assert "no evaluation line" in ttest.final_evaluation(tmp_path / "no_evals.txt")


def test_diverged_run_is_an_error_not_dropped(tmp_path, capsys):
    for i in range(2):
        write_log(tmp_path / f"ok{i}.txt", 2.91 + i / 1000, 1000, steps=4)
    run_main(capsys, tmp_path)  # the finished runs alone pass
    write_log(tmp_path / "nan.txt", "nan", 1000, steps=4)
    assert_user_error(capsys, ttest.main, [str(tmp_path)], "nan.txt: val_loss is nan at step 4/4 \\(the run diverged\\)")
    # train_gpt.py stops at the first non-finite loss: no final evaluation, but not an unfinished run to skip
    write_log(tmp_path / "nan.txt", steps=4, last_step=2, val_every=2, curve=lambda step: float("nan"))
    assert_user_error(capsys, ttest.main, [str(tmp_path)], "nan.txt: val_loss is nan at step 2/4 \\(the run diverged\\)")
    # a non-finite evaluation before a finite final one
    write_log(tmp_path / "nan.txt", 2.91, 1000, steps=4, val_every=2, curve=lambda step: float("nan"))
    assert_user_error(capsys, ttest.main, [str(tmp_path)], "nan.txt: val_loss is nan at step 2/4 \\(the run diverged\\)")
    write_log(tmp_path / "nan.txt", steps=4, last_step=3)
    with open(tmp_path / "nan.txt", "a") as log:
        log.write("step:3/4 train loss is nan: stopping the run (lower the learning rates, or check the data)\n")
    assert_user_error(capsys, ttest.main, [str(tmp_path)], "nan.txt: train loss is nan at step 3/4 \\(the run diverged\\)")


def test_command_line_with_directory_and_file_arguments(tmp_path):
    runs = tmp_path / "records" / "attempt"
    runs.mkdir(parents=True)
    for i, loss in enumerate([2.9181, 2.9179, 2.9190]):
        write_log(runs / f"{i}.txt", loss, 1_400_000 + i, steps=5, val_every=2)
    (runs / "README.md").write_text("step:5/5 val_loss:9.9 train_time:1ms step_avg:0.20ms\n")  # not a *.txt log
    result = subprocess.run([sys.executable, str(TTEST_PATH), str(runs), str(runs / "0.txt")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "over 3 runs:\n[2.9181, 2.9179, 2.919]" in result.stdout  # 0.txt given twice is counted once
    assert "\n[1400.0, 1400.001, 1400.002]\n" in result.stdout
    missing = subprocess.run([sys.executable, str(TTEST_PATH), str(tmp_path / "nope")], capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "error: " in missing.stderr and "nope does not exist" in missing.stderr


def test_verdict_uses_the_track_rule_whatever_alpha(tmp_path, capsys):
    """p between 0.01 and 0.05: the t-test dict at the default alpha rejects, the track's rule does not."""
    losses = [2.9193, 2.9197, 2.9192, 2.9198]
    for i, loss in enumerate(losses):
        write_log(tmp_path / f"r{i}.txt", loss, 1000, steps=4, val_every=2)
    p_value = float(stats.ttest_1samp(losses, 2.92, alternative="less").pvalue)
    assert 0.01 < p_value < 0.05
    out = run_main(capsys, tmp_path)
    assert "'decision': 'REJECT H0 (mean < threshold)'" in out
    verdict = [line for line in out.splitlines() if line.startswith("Record verdict")]
    assert verdict == [f"Record verdict (track rule: mean < 2.92 at p < 0.01, records/README.md): NOT MET, "
                       f"p = {p_value:.3g} for mean 2.919500 is not below 0.01"]
    assert "NOT MET" in run_main(capsys, tmp_path, "--alpha", "0.2")


@pytest.mark.parametrize("difference", ["script", "run_name"])
def test_logs_of_different_scripts_are_not_pooled(tmp_path, capsys, difference):
    for i, loss in enumerate([2.918, 2.919, 2.9185]):
        write_log(tmp_path / f"a{i}.txt", loss, 1000, steps=4, val_every=2)
    other = {"script": SCRIPT_TEXT + "# tuned lr\n"} if difference == "script" else {"run_name": "gpt_wider"}
    write_log(tmp_path / "b0.txt", 2.95, 1000, steps=4, val_every=2, **other)
    write_log(tmp_path / "b1.txt", steps=4, last_step=3, **other)  # unfinished: not a group of its own
    assert_user_error(capsys, ttest.main, [str(tmp_path)], "error: the logs come from 2 different scripts or "
                                                             "configurations")
    with pytest.raises(ValueError) as info:
        ttest.read_runs([tmp_path])
    message = str(info.value)
    assert re.search(r"script \w+, run_name gpt: 3 logs \(\S*a0.txt, \S*a1.txt, \S*a2.txt\)", message)
    expected_name = "gpt" if difference == "script" else "gpt_wider"
    assert re.search(rf"script \w+, run_name {expected_name}: 1 log \(\S*b0.txt\)", message)
    assert "b1.txt" not in message and "--allow_mixed" in message
    out = run_main(capsys, tmp_path, "--allow_mixed")
    assert "over 4 runs:\n[2.918, 2.919, 2.9185, 2.95]" in out


def test_logs_with_different_settings_are_not_pooled_but_seeds_and_paths_may_differ(tmp_path, capsys):
    """Every setting is a flag, so one script text covers many configurations: the logged settings tell them apart."""
    for i, loss in enumerate([2.918, 2.919]):
        write_log(tmp_path / f"a{i}.txt", loss, 1000, steps=4, settings=f"seed={i}, log_dir='logs/{i}', muon_lr=0.025")
    assert "over 2 runs" in run_main(capsys, tmp_path)
    write_log(tmp_path / "b.txt", 2.95, 1000, steps=4, settings="seed=5, log_dir='logs', muon_lr=0.05")
    with pytest.raises(ValueError) as info:
        ttest.read_runs([tmp_path])
    assert re.search(r"script \w+, run_name gpt, muon_lr=0.025: 2 logs \(\S*a0.txt, \S*a1.txt\)\n"
                     r"  script \w+, run_name gpt, muon_lr=0.05: 1 log \(\S*b.txt\)", str(info.value))
    assert "over 3 runs" in run_main(capsys, tmp_path, "--allow_mixed")


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "nan"], "--threshold must be a finite loss, got nan"),
    (["--threshold", "inf"], "--threshold must be a finite loss, got inf"),  # the verdict was MET for any loss
    (["--threshold=-inf"], "--threshold must be a finite loss, got -inf"),
    (["--alpha", "nan"], "--alpha must lie strictly between 0 and 1, got nan"),
    (["--alpha", "1"], "--alpha must lie strictly between 0 and 1, got 1.0"),
])
def test_a_threshold_or_alpha_that_tests_nothing_is_an_error(tmp_path, capsys, argv, message):
    for i, loss in enumerate([2.918, 2.919]):
        write_log(tmp_path / f"a{i}.txt", loss, 1000, steps=4)
    assert_user_error(capsys, ttest.main, [str(tmp_path), *argv], re.escape(message))


def test_a_repeated_option_is_an_error(tmp_path, capsys):
    for i, loss in enumerate([2.918, 2.919]):
        write_log(tmp_path / f"a{i}.txt", loss, 1000, steps=4)
    assert_user_error(capsys, ttest.main, [str(tmp_path), "--threshold", "3", "--threshold=2"], "--threshold given twice")
    assert_user_error(capsys, ttest.main, [str(tmp_path), "--allow-mixed", "--allow_mixed"],
                      "--allow_mixed given twice")
    assert_user_error(capsys, ttest.main, [str(tmp_path), "--allow"], "unrecognized arguments: --allow")  # no abbreviation
    assert "over 2 runs" in run_main(capsys, tmp_path, "--allow-mixed")  # both spellings


def test_public_logs_without_run_name_pool_with_each_other(tmp_path, capsys):
    for i, loss in enumerate([2.918, 2.919]):
        (tmp_path / f"public{i}.txt").write_text(SCRIPT_TEXT + "=" * 100 + "\nRunning PyTorch 2.7.0\n" + "=" * 100
                                                 + f"\nstep:5/5 val_loss:{loss} train_time:1000ms step_avg:200.00ms\n")
    assert "over 2 runs" in run_main(capsys, tmp_path)
    assert ttest.read_runs([tmp_path])[0]["identity"][1] is None


def test_identical_losses_are_a_clear_error_not_infinite_t(tmp_path, capsys):
    for i in range(3):
        write_log(tmp_path / f"r{i}.txt", 2.9191, 1000, steps=4, val_every=2)
    assert_user_error(capsys, ttest.main, [str(tmp_path)],
                      "error: all 3 final val losses are 2.9191: with zero variance the t-test is undefined "
                      "\\(t would be infinite\\)")
    with pytest.raises(ValueError, match="zero variance"):
        ttest.one_sided_ttest([2.93, 2.93], threshold=2.92, alpha=0.05)


def test_a_log_copied_under_two_names_is_an_error(tmp_path, capsys):
    for i, loss in enumerate([2.918, 2.919]):
        write_log(tmp_path / f"r{i}.txt", loss, 1000, steps=4)
    assert "over 2 runs" in run_main(capsys, tmp_path, tmp_path / "r0.txt")  # the same path twice: read once
    (tmp_path / "r0_copy.txt").write_bytes((tmp_path / "r0.txt").read_bytes())
    assert_user_error(capsys, ttest.main, [str(tmp_path)], r"error: \S*r0.txt and \S*r0_copy.txt have identical "
                                                             r"content: .* Keep one of them")
    (tmp_path / "r0_copy.txt").unlink()
    for name in ("crashed.txt", "crashed_copy.txt"):  # not counted, so a copy changes nothing
        write_log(tmp_path / name, steps=4, last_step=2, settings="seed=3")
    assert "over 2 runs" in run_main(capsys, tmp_path)


def test_runs_with_one_seed_are_an_error(tmp_path, capsys):
    for i, loss in enumerate([2.918, 2.919]):
        write_log(tmp_path / f"a{i}.txt", loss, 1000, steps=4, settings=f"seed=3, log_dir='logs/{i}'")
    assert_user_error(capsys, ttest.main, [str(tmp_path)], r"error: \S*a0.txt and \S*a1.txt both ran seed=3 with one "
                                                             r"script and settings: .*--seed N per run.*-1")
    assert [run["seed"] for run in ttest.read_runs([tmp_path / "a0.txt"])] == [3]
    for unlogged in ("log_dir='logs'", "seed=-1"):  # no seed, or not the one that ran: nothing to check
        for i, loss in enumerate([2.918, 2.919]):
            write_log(tmp_path / f"a{i}.txt", loss, 1000, steps=4, settings=unlogged)
        assert "over 2 runs" in run_main(capsys, tmp_path)
    # One seed across configurations is not one run twice (pooled only with --allow_mixed)
    for i, loss in enumerate([2.918, 2.919]):
        write_log(tmp_path / f"a{i}.txt", loss, 1000, steps=4, settings=f"seed=3, muon_lr=0.0{i + 2}")
    assert "over 2 runs" in run_main(capsys, tmp_path, "--allow_mixed")


ATTEMPT_LOSSES = [7.812, 7.797, 7.805, 7.821]  # tiny preset on a CPU: the 2.92 threshold means nothing
BASELINE_LOSSES = [7.84, 7.861, 7.829, 7.852, 7.835]


@pytest.fixture
def attempt_and_baseline(tmp_path):
    for side, losses in [("attempt", ATTEMPT_LOSSES), ("baseline", BASELINE_LOSSES)]:
        (tmp_path / side).mkdir()
        for i, loss in enumerate(losses):
            write_log(tmp_path / side / f"r{i}.txt", loss, 60_000 + i, steps=4, run_name=f"gpt_tiny_{side}")
    return tmp_path / "attempt", tmp_path / "baseline"


def test_baseline_welch_test_matches_the_textbook_formula(attempt_and_baseline, capsys):
    attempt, baseline = attempt_and_baseline
    out = run_main(capsys, attempt, "--baseline", baseline)
    assert "over 4 runs:\n[7.812, 7.797, 7.805, 7.821]" in out and "NOT MET" in out  # the threshold test stays
    assert re.search(r"\nbaseline used    \S+r0.txt: val_loss 7.84 ", out)
    baseline_section = out.split("Baseline final validation losses")[1]
    assert " over 5 runs:\n[7.84, 7.861, 7.829, 7.852, 7.835]\n" in baseline_section
    assert float(printed(baseline_section, "Mean")) == pytest.approx(np.mean(BASELINE_LOSSES), rel=1e-15)
    assert float(printed(baseline_section, "Std")) == pytest.approx(np.std(BASELINE_LOSSES), rel=1e-12)
    welch = out.split("One-sided Welch t-test")[1]
    a, b = np.array(ATTEMPT_LOSSES), np.array(BASELINE_LOSSES)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t_stat = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    assert float(printed(welch, "mean_difference")) == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    assert float(printed(welch, "t_stat")) == pytest.approx(t_stat, rel=1e-12)
    assert float(printed(welch, "df")) == pytest.approx(df, rel=1e-12)
    assert float(printed(welch, "p_value")) == pytest.approx(stats.t.cdf(t_stat, df), rel=1e-10)
    assert printed(welch, "n") == "4" and printed(welch, "baseline_n") == "5"
    assert "'decision': 'REJECT H0 (mean < baseline mean)'" in welch
    swapped = run_main(capsys, baseline, "--baseline", attempt).split("One-sided Welch t-test")[1]
    assert float(printed(swapped, "p_value")) == pytest.approx(1 - stats.t.cdf(t_stat, df), rel=1e-10)
    assert "'decision': 'FAIL TO REJECT H0'" in swapped


def test_an_attempt_identical_to_its_baseline_is_named_as_such(tmp_path, capsys):
    """records/README.md's CPU trial run before the copy was edited: one script, settings and seeds on both sides."""
    for side in ("my-idea", "baseline"):
        (tmp_path / side).mkdir()
        for seed, loss in [(1, 7.81), (2, 7.83)]:
            write_log(tmp_path / side / f"s{seed}.txt", loss + (side == "baseline") * 0.001, 60_000, steps=4,
                      run_name="gpt_tiny", settings=f"seed={seed}, log_dir='logs/{side}'")
    assert_user_error(capsys, ttest.main, [str(tmp_path / "my-idea"), "--baseline", str(tmp_path / "baseline")],
                      r"--baseline: the attempt's script and settings are identical to the baseline's: \S*my-idea/s1.txt "
                      r"and \S*baseline/s1.txt ran one script with the same settings and seed=1, so the attempt would "
                      r"be compared with itself. Edit the attempt's copy of the script")
    with pytest.raises(SystemExit):
        ttest.main([str(tmp_path / "my-idea"), "--baseline", str(tmp_path / "baseline")])
    assert "Run distinct seeds" not in capsys.readouterr().err  # the seeds are distinct within each side
    write_log(tmp_path / "my-idea" / "s2.txt", 7.8, 60_000, steps=4, run_name="gpt_tiny",
              settings="seed=1, log_dir='logs/my-idea'")  # one seed twice within the attempt: still that error
    assert_user_error(capsys, ttest.main, [str(tmp_path / "my-idea"), "--baseline", str(tmp_path / "baseline")],
                      r"my-idea/s1.txt and \S*my-idea/s2.txt both ran seed=1 .* Run distinct seeds")


def test_baseline_errors_come_before_any_statistics(attempt_and_baseline, capsys):
    attempt, baseline = attempt_and_baseline
    write_log(attempt / "crashed.txt", steps=4, last_step=2, run_name="gpt_tiny_attempt")
    both_sides = r"--baseline: \S*{} is given both as an attempt log and as a baseline log"
    for argv, message in [
            ([attempt, "--baseline", baseline, attempt / "crashed.txt"], both_sides.format("crashed.txt")),
            ([attempt, baseline / "r0.txt", "--baseline", baseline], both_sides.format("r0.txt")),
            ([attempt, "--baseline", baseline, "--baseline", attempt / "r0.txt"], "--baseline given twice"),
            ([attempt, "--baseline", baseline, baseline / "nope"], r"--baseline: \S*nope does not exist")]:
        assert_user_error(capsys, ttest.main, [str(arg) for arg in argv], message)
    (baseline / "r0_copy.txt").write_bytes((attempt / "r0.txt").read_bytes())  # a copy on each side
    assert_user_error(capsys, ttest.main, [str(attempt), "--baseline", str(baseline)],
                      "--baseline: the logs come from 2 different scripts or configurations")
    assert_user_error(capsys, ttest.main, [str(attempt), "--allow_mixed", "--baseline", str(baseline)],
                      r"--baseline: \S*attempt/r0.txt and \S*baseline/r0_copy.txt have identical content")
    (baseline / "r0_copy.txt").unlink()
    for i in range(1, 5):
        write_log(baseline / f"r{i}.txt", 7.84 if i < 3 else None, 1000, steps=4, run_name="gpt_tiny_baseline")
    with pytest.raises(SystemExit):  # losses 7.84, 7.84, 7.84 (two unfinished): the Welch test is undefined
        ttest.main([str(attempt), "--baseline", str(baseline)])
    out, err = capsys.readouterr()
    assert "--baseline: all 3 final val losses are 7.84: with zero variance" in err and "Basic stats" not in out
    (baseline / "r1.txt").unlink()
    (baseline / "r2.txt").unlink()
    assert_user_error(capsys, ttest.main, [str(attempt), "--baseline", str(baseline)],
                      r"--baseline: a t-test needs at least 2 finished runs, got 1 \(2 skipped\); run more seeds of "
                      r"the baseline")


def test_run_times_of_different_hardware_are_not_pooled(tmp_path, capsys):
    """Losses of one configuration pool across hardware (the same math); run times do not: one set of time
    stats per `world_size:N device:NAME` line."""
    gpu, cpu = "world_size:8 device:NVIDIA H100 80GB HBM3", "world_size:1 device:cpu"
    for name, loss, ms, setup in (("a", 2.915, 1400000, gpu), ("b", 2.918, 1410000, gpu), ("c", 2.917, 20000, cpu),
                                  ("d", 2.916, 22000, cpu)):
        write_log(tmp_path / f"{name}.txt", loss, ms, hardware=setup)
    out = run_main(capsys, tmp_path)
    assert "over 4 runs" in out and "The runs ran on 2 different hardware set-ups" in out
    assert f"Run times in seconds on {gpu}:\n[1400.0, 1410.0]" in out and f"Run times in seconds on {cpu}:\n[20.0, 22.0]" in out
    assert f"Basic stats of the run times on {gpu} (Std = population std, ddof=0):\n  Mean: 1405.0" in out
    for name in "cd":
        write_log(tmp_path / f"{name}.txt", 2.91, 1420000, hardware=gpu)
    out = run_main(capsys, tmp_path)
    assert "hardware set-ups" not in out and "Run times in seconds:\n[1400.0, 1410.0, 1420.0, 1420.0]" in out
