"""data/multiplication.py: the paper's exact format, disjoint splits, --exclude, determinism, the line validator."""

import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_folder

from data import multiplication as mult
from test_data import assert_user_error

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_DIR = shared_folder(REPO_ROOT, "icot")  # ../shared/icot, or shared/icot in the checkout (the GPU machine)
PAPER_FILES = sorted(glob.glob(str(PAPER_DIR / "*" / "*.txt"))) if PAPER_DIR else []


def operands_of(line: str) -> list[tuple[int, int]]:
    """Operands read straight from the input part (independent of the module's parser)."""
    problems = []
    for problem in line.split("||")[0].split(" $ "):
        a, b = problem.split(" * ")
        problems.append((int(a.replace(" ", "")[::-1]), int(b.replace(" ", "")[::-1])))
    return problems


def generate(tmp_path, *args) -> dict[str, list[str]]:
    out_dir = tmp_path / "out"
    mult.main([*args, "--out-dir", str(out_dir)])
    return {p.stem: p.read_text().splitlines() for p in out_dir.glob("*.txt")}


def problems_in(lines: list[str]) -> set[tuple[int, int]]:
    return {problem for line in lines for problem in operands_of(line)}


def test_icot_md_examples():
    assert mult.format_line([(3719, 3349)], 4, 4) == (
        "9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 ( 1 3 9 7 9 2 1 ) "
        "+ 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1")
    assert mult.format_line([(71, 31), (26, 36)], 2, 2) == (
        "1 7 * 1 3 $ 6 2 * 6 3||1 7 0 + 0 3 1 2 $ 6 5 1 + 0 8 7 0 #### 1 0 2 2 $ 6 3 9 0")


@pytest.mark.skipif(not PAPER_FILES, reason="the paper's files are neither in ../shared/icot nor in shared/icot")
def test_reproduces_every_paper_line():
    assert len(PAPER_FILES) == 4
    for path in PAPER_FILES:
        lines = Path(path).read_text().splitlines()
        assert len(lines) == 1000
        for number, line in enumerate(lines, start=1):
            n = len(line.split(" * ")[0].split(" "))
            problems = operands_of(line)
            assert all(a >= 10 ** (n - 1) and b >= 10 ** (n - 1) for a, b in problems)  # no leading zeros
            assert mult.format_line(problems, n, n) == line, f"{path}:{number}"
        assert len(mult.read_lines(path)) == 1000  # and the validator accepts them all


def test_splits_disjoint_deterministic_and_sized(tmp_path):
    args = ["--digits", "2x3", "--per-line", "2", "--splits", "train=3000,valid=200,test=200", "--seed", "7"]
    first = generate(tmp_path / "a", *args)
    assert first == generate(tmp_path / "b", *args)  # same seed, same files
    assert first != generate(tmp_path / "c", *args[:-1], "8")
    assert {name: len(lines) for name, lines in first.items()} == {"train": 3000, "valid": 200, "test": 200}
    sets = {name: problems_in(lines) for name, lines in first.items()}
    assert not sets["train"] & sets["valid"] and not sets["train"] & sets["test"] and not sets["valid"] & sets["test"]
    for line in first["train"][:50]:
        assert line.count(" $ ") == 3 and mult.parse_line(line)[1:] == (2, 3)


def test_every_answer_and_partial_product_is_the_arithmetic():
    """The format pins the layout; this pins the numbers, for problems the examples above do not cover."""
    def number(digits):  # least significant digit first
        return int(digits.replace(" ", "")[::-1])

    for a in range(100, 1000, 7):
        b = (a * 37) % 900 + 100
        _, cot, answer = mult.format_problem(a, b, 3, 3)
        assert number(answer) == a * b, (a, b)
        terms = cot.split(" + ")  # a*b0, a*b1*10 ( running sum ), a*b2*100
        assert [number(term.split(" (")[0]) for term in terms] == [a * int(d) * 10 ** j for j, d in
                                                                   enumerate(reversed(str(b)))], (a, b, cot)
        assert number(terms[1].split("( ")[1].rstrip(" )")) == a * (b % 100), (a, b, cot)


def test_held_out_splits_are_drawn_before_the_training_split(tmp_path):
    """A training split that covers every 1x1 problem, listed first, still leaves a test split to draw: the
    smaller splits are drawn first, whatever the order of --splits."""
    files = generate(tmp_path, "--digits", "1x1", "--splits", "train=2000,test=5", "--seed", "0")
    assert len(files["test"]) == 5 and not problems_in(files["train"]) & problems_in(files["test"])


@pytest.mark.parametrize("held_out_lines", [40, 300])  # ~32 or ~79 of the 81: drawn by rejection, or from a list
def test_exclude_keeps_problems_out(tmp_path, held_out_lines):
    held_out = tmp_path / "held_out.txt"
    mult.main(["--digits", "1x1", "--count", str(held_out_lines), "--seed", "1", "--out", str(held_out)])
    excluded = problems_in(held_out.read_text().splitlines())
    assert len(excluded) > 20  # a large part of the 81 one-digit problems
    assert (len(excluded) > 81 // 2) == (held_out_lines == 300)  # both ways of drawing the rest are exercised
    lines = generate(tmp_path, "--digits", "1x1", "--splits", "train=2000", "--exclude", str(held_out))["train"]
    assert not problems_in(lines) & excluded
    assert len(problems_in(lines)) == 81 - len(excluded)  # and everything else is still reachable


def test_leading_zeros_only_when_asked(tmp_path):
    def leading_zero_share(*extra):
        lines = generate(tmp_path / str(len(extra)), "--digits", "2x2", "--splits", "train=2000", *extra)["train"]
        problems = [p for line in lines for p in operands_of(line)]
        return sum(a < 10 or b < 10 for a, b in problems) / len(problems)
    assert leading_zero_share() == 0
    assert 0.1 < leading_zero_share("--leading-zeros") < 0.3  # 1 - 0.9^2 = 0.19 expected


@pytest.mark.parametrize("corrupt, message", [
    (lambda line: line[:-1] + str((int(line[-1]) + 1) % 10), "answer"),
    (lambda line: line.replace("+ 0", "+ 1", 1), "CoT"),  # p_1 always starts with a 0 (it is a multiple of 10)
    (lambda line: line.replace("*", "x", 1), "not allowed"),
    (lambda line: line.replace(" #### ", " ## ", 1), "####"),
])
def test_validator_rejects_corrupted_line_with_its_number(tmp_path, corrupt, message):
    path = tmp_path / "data.txt"
    mult.main(["--digits", "3x3", "--count", "5", "--out", str(path)])
    lines = path.read_text().splitlines()
    lines[2] = corrupt(lines[2])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"data.txt:3: invalid line: .*{message}"):
        mult.read_lines(str(path))


def test_cli_writes_file_and_rejects_bad_arguments(tmp_path):
    script = REPO_ROOT / "data" / "multiplication.py"
    out = tmp_path / "x.txt"
    run = subprocess.run([sys.executable, script, "--digits", "4x4", "--per-line", "1", "--count", "10", "--seed", "0",
                          "--out", out], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(mult.read_lines(str(out))) == 10
    bad = subprocess.run([sys.executable, script, "--digits", "4by4", "--count", "1", "--out", out],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "multiplication.py: error: --digits '4by4': expected NxM" in bad.stderr


@pytest.mark.parametrize("argv, message", [
    ("--count 3 --out {tmp}/x.txt --seed 1 --seed=2", "argument --seed: given twice"),
    ("--count 3 --out {tmp}/x.txt --leading-zeros --leading-zeros", "argument --leading-zeros: given twice"),
    ("--count 0 --out {tmp}/x.txt", "--count must be >= 1"),
    ("--count 3 --out {tmp}/a_dir", "--out {tmp}/a_dir is a folder: give the path of the file to write"),
    ("--splits train=3 --out-dir {tmp}/a_file", "--out-dir {tmp}/a_file is a file, not a folder: choose a folder"),
    ("--check {tmp}/a_file", "{tmp}/a_file:1: invalid line"),
    ("--check {tmp}/a_file --seed 1", "--check only validates files and writes nothing; drop --seed"),
    ("--count 3 --out {tmp}/x.txt --out-dir {tmp}/a_dir", "--out-dir is the folder of --splits; with --count N"),
    ("--splits train=3 --out-dir {tmp}/a_dir --out {tmp}/x.txt", "--out is the file of --count; with --splits"),
    ("--splits ../escape=3 --out-dir {tmp}/a_dir", "--splits item '../escape=3': a split name is a plain file name"),
    ("--splits train=3,a/b=2 --out-dir {tmp}/a_dir", "--splits item 'a/b=2': a split name is a plain file name"),
    ("--count 3 --out {tmp}/a_file/x.txt", "--out {tmp}/a_file/x.txt: {tmp}/a_file is a file, not a folder"),
    ("--splits train=3 --out-dir {tmp}/a_file/sub", "--out-dir {tmp}/a_file/sub: {tmp}/a_file is a file, not a folder"),
    ("--count 3 --out {tmp}/x.txt --per_line 2 --per-line 2", "argument --per-line: given twice"),
    ("--count 3 --out {tmp}/x.txt --exclude {tmp}/a_file", "{tmp}/a_file:1: invalid line"),
])
def test_bad_arguments_are_one_error_before_any_file_is_written(tmp_path, capsys, argv, message):
    (tmp_path / "a_file").write_text("not a line of multiplication data\n")
    (tmp_path / "a_dir").mkdir()
    assert_user_error(capsys, mult.main, argv.format(tmp=tmp_path).split(),
                      "multiplication.py: error: " + re.escape(message.format(tmp=tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file"] and not any((tmp_path / "a_dir").iterdir())


def test_an_unwritable_output_is_refused_before_the_generation(tmp_path, capsys, monkeypatch):
    def generated(*args):
        raise AssertionError("generated before the output was checked")

    monkeypatch.setattr(mult, "generate_lines", generated)
    (tmp_path / "a_file").write_text("")
    assert_user_error(capsys, mult.main, ["--count", "3", "--out", str(tmp_path / "a_file" / "x.txt")],
                      "is a file, not a folder")
    (tmp_path / "out" / "valid.txt").mkdir(parents=True)  # the second split's file is taken by a folder
    assert_user_error(capsys, mult.main, ["--splits", "train=3,valid=2", "--out-dir", str(tmp_path / "out")],
                      re.escape("valid.txt is a folder"))
    if Path("/proc/self").is_dir():  # Linux: /proc takes no new file, even from root (which os.access lets through)
        assert_user_error(capsys, mult.main, ["--count", "3", "--out", "/proc/nope.txt"],
                          re.escape("--out /proc/nope.txt: cannot write a new file in /proc"))


def test_two_word_options_take_both_spellings(tmp_path):
    dashes = generate(tmp_path / "dashes", "--digits", "2x2", "--per-line", "2", "--leading-zeros", "--splits", "a=5")
    mult.main(["--digits", "2x2", "--per_line", "2", "--leading_zeros", "--splits", "a=5",
               "--out_dir", str(tmp_path / "underscores")])
    assert (tmp_path / "underscores" / "a.txt").read_text().splitlines() == dashes["a"]


LINE_4X4 = mult.format_line([(3719, 3349)], 4, 4)
BAD_INPUTS = {  # name: file content; each must be rejected by both validators
    "empty file": "",
    "foreign character": LINE_4X4.replace("*", "x", 1) + "\n",
    "wrong CoT": LINE_4X4.replace("+ 0 6", "+ 0 7", 1) + "\n",
    "wrong answer": LINE_4X4[:-1] + "2\n",
    "bad separator": LINE_4X4.replace(" #### ", " ### ") + "\n",
    "two-digit token": LINE_4X4.replace("9 1 7 3 *", "91 7 3 *", 1) + "\n",
    "blank line": LINE_4X4 + "\n\n",
    "trailing space": LINE_4X4 + " \n",
    "mixed digit sizes": LINE_4X4 + "\n" + mult.format_line([(12, 34)], 2, 2) + "\n",
    "mixed problems per line": mult.format_line([(12, 34)], 2, 2) + "\n" + mult.format_line([(12, 34), (56, 78)], 2, 2)
                               + "\n",
    "missing problem in the answer": mult.format_line([(12, 34), (56, 78)], 2, 2).rsplit(" $ ", 1)[0] + "\n",
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_one_validator_rule_set(tmp_path, name):
    """data/multiplication.py --check and train_icot.py's loader reject the same bad files (and accept good ones)."""
    import train_icot

    path = tmp_path / "data.txt"
    path.write_text(BAD_INPUTS[name])
    with pytest.raises(SystemExit):
        mult.main(["--check", str(path)])
    with pytest.raises(SystemExit):
        train_icot.load_dataset(str(path))
    path.write_text(LINE_4X4 + "\n" + mult.format_line([(1000, 9999)], 4, 4) + "\n")
    assert len(mult.read_lines(str(path))) == len(train_icot.load_dataset(str(path)).tokens) == 2
