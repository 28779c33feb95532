"""Multiplication data in the exact format of "Implicit Chain of Thought Reasoning via Knowledge Distillation".

One example per line: `INPUT||COT #### ANSWER`, digits least significant first, separated by single spaces.
For A (n digits) * B (m digits) with B's digits b_0 (least significant) .. b_{m-1}:
  p_j = A * b_j * 10^j, reversed and zero-padded to n+1+j digits;
  COT = p_0 + p_1 ( s_1 ) + p_2 ( s_2 ) ... + p_{m-1}, s_j = p_0 + .. + p_j padded like p_j;
  ANSWER = A*B reversed, zero-padded to n+m digits.
K problems on one line are joined with ` $ ` inside each of the three parts.

    python data/multiplication.py --digits 4x4 --per-line 1 --count 1000 --seed 0 --out FILE
    python data/multiplication.py --digits 2x2 --per-line 2 --splits train=808000,valid=1000,test=1000 --out-dir DIR
    python data/multiplication.py ... --exclude ../shared/icot/4_by_4_mult/test_bigbench.txt   # keep those problems out
    python data/multiplication.py --check FILE...   # validate files; the first bad line is reported with its number

Problems (operand pairs) never appear in two splits, nor in any --exclude file. Within one split problems are drawn
with replacement (like the paper's and the seed's data), so a tiny digit space such as 2x2 can still fill 800k lines.
"""

import argparse
import os
import random
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fineweb import Once  # noqa: E402  (data/fineweb.py, next to this script)

ALLOWED_CHARACTERS = set("0123456789 *+()$|#")


# ---- Formatting ----

def reversed_digits(value: int, width: int) -> str:
    """value zero-padded to width digits, least significant first, single spaces between digits."""
    text = str(value).zfill(width)
    if len(text) != width:
        raise ValueError(f"{value} does not fit in {width} digits")
    return " ".join(reversed(text))


def format_problem(a: int, b: int, n: int, m: int) -> tuple[str, str, str]:
    """(input, cot, answer) of a*b with a written on n digits and b on m digits."""
    b_digits = [int(c) for c in reversed(str(b).zfill(m))]
    parts, running = [], 0
    for j, digit in enumerate(b_digits):
        partial = a * digit * 10**j
        running += partial
        parts.append(reversed_digits(partial, n + 1 + j))
        if 0 < j < m - 1:  # the last partial product has no running sum: that sum is the answer
            parts.append("( " + reversed_digits(running, n + 1 + j) + " )")
    cot = parts[0]
    for part in parts[1:]:
        cot += (" " if part.startswith("(") else " + ") + part
    return f"{reversed_digits(a, n)} * {reversed_digits(b, m)}", cot, reversed_digits(a * b, n + m)


def format_line(problems: list[tuple[int, int]], n: int, m: int) -> str:
    formatted = [format_problem(a, b, n, m) for a, b in problems]
    inputs, cots, answers = (" $ ".join(f[i] for f in formatted) for i in range(3))
    return f"{inputs}||{cots} #### {answers}"


# ---- Parsing and validation (the one validator of this repository's multiplication data) ----

def _parse_number(text: str) -> tuple[int, int]:
    """'9 1 7 3' -> (3719, 4): value and digit count of a reversed, space-separated number."""
    digits = text.split(" ")
    if not digits or any(len(d) != 1 or not d.isdigit() for d in digits):
        raise ValueError(f"malformed number {text!r} (expected single digits separated by single spaces)")
    return int("".join(reversed(digits))), len(digits)


def parse_line(line: str) -> tuple[list[tuple[int, int]], int, int]:
    """Operands of every problem of a line and the digit sizes (n, m); raises ValueError if the line is not valid:
    a foreign character, a malformed part, or a CoT or answer that is arithmetically wrong."""
    bad = sorted(set(line) - ALLOWED_CHARACTERS)
    if bad:
        raise ValueError(f"character(s) {''.join(bad)!r} not allowed (only digits, space and *+()$|#)")
    if line.count("||") != 1 or line.count(" #### ") != 1:
        raise ValueError("expected exactly one '||' and one ' #### ' (format INPUT||COT #### ANSWER)")
    inputs, rest = line.split("||")
    cots, answers = rest.split(" #### ")
    inputs, cots, answers = inputs.split(" $ "), cots.split(" $ "), answers.split(" $ ")
    if not len(inputs) == len(cots) == len(answers):
        raise ValueError(f"{len(inputs)} inputs, {len(cots)} CoTs and {len(answers)} answers separated by ' $ '")
    problems, sizes = [], set()
    for k, (problem, cot, answer) in enumerate(zip(inputs, cots, answers)):
        operands = problem.split(" * ")
        if len(operands) != 2:
            raise ValueError(f"problem {k + 1}: input {problem!r} is not 'A * B'")
        (a, n), (b, m) = _parse_number(operands[0]), _parse_number(operands[1])
        expected_input, expected_cot, expected_answer = format_problem(a, b, n, m)
        if problem != expected_input:
            raise ValueError(f"problem {k + 1}: malformed input {problem!r}")
        if cot != expected_cot:
            raise ValueError(f"problem {k + 1}: CoT {cot!r} is wrong for {a}*{b}, expected {expected_cot!r}")
        if answer != expected_answer:
            raise ValueError(f"problem {k + 1}: answer {answer!r} is wrong for {a}*{b}, expected {expected_answer!r}")
        problems.append((a, b))
        sizes.add((n, m))
    if len(sizes) != 1:
        raise ValueError(f"problems of different digit sizes on one line: {sorted(sizes)}")
    n, m = sizes.pop()
    return problems, n, m


def read_lines(path: str) -> list[tuple[list[tuple[int, int]], int, int]]:
    """Every line of a file parsed; the first invalid line raises ValueError with its file and line number. The same
    rules as train_icot.py's loader (which repeats them, being self-contained): every line valid, one digit size and
    one number of problems per line in a file, and at least one line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (generate it with data/multiplication.py or fix the path)")
    parsed = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            try:
                problems, n, m = parse_line(line.rstrip("\n"))
            except ValueError as error:
                raise ValueError(f"{path}:{number}: invalid line: {error}") from None
            if parsed and (n, m, len(problems)) != (parsed[0][1], parsed[0][2], len(parsed[0][0])):
                first_problems, first_n, first_m = parsed[0]
                raise ValueError(f"{path}:{number}: {n}x{m} with {len(problems)} per line, but line 1 is "
                                 f"{first_n}x{first_m} with {len(first_problems)}: one digit size and K per file")
            parsed.append((problems, n, m))
    if not parsed:
        raise ValueError(f"{path}: empty file")
    return parsed


# ---- Sampling ----

def sample_problems(rng: random.Random, count: int, n: int, m: int, leading_zeros: bool,
                    forbidden: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """count problems drawn uniformly with replacement from all n-digit * m-digit pairs not in forbidden."""
    a_low, b_low = (0, 0) if leading_zeros else (10 ** (n - 1), 10 ** (m - 1))
    a_high, b_high = 10**n - 1, 10**m - 1
    space = (a_high - a_low + 1) * (b_high - b_low + 1)
    allowed_estimate = space - sum(a_low <= a <= a_high and b_low <= b <= b_high for a, b in forbidden)
    if allowed_estimate <= 0:
        raise ValueError(f"no {n}x{m} problem is left after the excluded ones: use fewer excluded/earlier-split lines")
    if allowed_estimate < space // 2:  # small space mostly excluded: draw from the explicit list of allowed pairs
        pool = [(a, b) for a in range(a_low, a_high + 1) for b in range(b_low, b_high + 1) if (a, b) not in forbidden]
        return [pool[rng.randrange(len(pool))] for _ in range(count)]
    problems = []
    while len(problems) < count:  # rejection sampling: each draw succeeds with probability >= 1/2
        pair = (rng.randint(a_low, a_high), rng.randint(b_low, b_high))
        if pair not in forbidden:
            problems.append(pair)
    return problems


def generate_lines(rng: random.Random, count: int, n: int, m: int, per_line: int, leading_zeros: bool,
                   forbidden: set[tuple[int, int]]) -> tuple[list[str], list[tuple[int, int]]]:
    problems = sample_problems(rng, count * per_line, n, m, leading_zeros, forbidden)
    return [format_line(problems[i:i + per_line], n, m) for i in range(0, len(problems), per_line)], problems


def excluded_problems(paths: list[str]) -> set[tuple[int, int]]:
    return {problem for path in paths for problems, _, _ in read_lines(path) for problem in problems}


# ---- Command line ----

def parse_digits(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.lower().split("x"))
        assert n >= 1 and m >= 1
    except (ValueError, AssertionError):
        raise ValueError(f"--digits {text!r}: expected NxM with positive integers, e.g. 4x4 or 3x5") from None
    return n, m


def parse_splits(text: str) -> list[tuple[str, int]]:
    splits = []
    for item in text.split(","):
        name, _, count = item.partition("=")
        if not name or not count.isdigit() or int(count) <= 0:
            raise ValueError(f"--splits item {item!r}: expected name=count, e.g. train=808000,valid=1000,test=1000")
        if not re.fullmatch(r"\w[\w.-]*", name):  # the file --out-dir/<name>.txt: no path may leave --out-dir
            raise ValueError(f"--splits item {item!r}: a split name is a plain file name (letters, digits, _ . -), "
                             f"e.g. train; the split is written to --out-dir/<name>.txt")
        splits.append((name, int(count)))
    if len({name for name, _ in splits}) != len(splits):
        raise ValueError(f"--splits {text!r}: a split name appears twice")
    return splits


def check_writable(path: str, option: str) -> None:
    """An output file that cannot be written is reported before the generation, not after it; nothing is created."""
    if os.path.isdir(path):
        raise ValueError(f"{option}: {path} is a folder: give the path of the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the folders write_lines would create: the nearest existing one must take them
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{option}: {folder} is a file, not a folder, so {path} cannot be written: "
                         f"choose another path")
    # a probe, not os.access: root passes os.access where the file system refuses (/proc, read-only mounts)
    where = path if os.path.exists(path) else f"a new file in {folder}"
    try:
        if os.path.exists(path):
            open(path, "a").close()  # opened, not changed
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise ValueError(f"{option}: cannot write {where} ({error.strerror}): choose a writable path") from None


def write_lines(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)
    print(f"wrote {len(lines)} lines to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="multiplication.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", action=Once, default="4x4", help="NxM: first operand N digits, second M digits")
    # options with two words take both spellings (--per-line, --per_line), as the other scripts' options do
    parser.add_argument("--per-line", "--per_line", action=Once, type=int, default=1,
                        help="K problems per line, joined with ' $ '")
    parser.add_argument("--count", action=Once, type=int, help="number of lines written to --out")
    parser.add_argument("--out", action=Once, help="output file (with --count)")
    parser.add_argument("--splits", action=Once,
                        help="name=count,... written to --out-dir/<name>.txt, no problem in two splits")
    parser.add_argument("--out-dir", "--out_dir", action=Once, help="output directory (with --splits)")
    parser.add_argument("--exclude", action=Once, nargs="+", default=[],
                        help="files whose problems must not be generated")
    parser.add_argument("--leading-zeros", "--leading_zeros", action=Once, nargs=0, const=True, default=False,
                        help="allow operands that start with a zero")
    parser.add_argument("--seed", action=Once, type=int, default=0)
    parser.add_argument("--check", action=Once, nargs="+", help="only validate these files")
    args = parser.parse_args(argv)

    try:  # every check, and the generation, before the first file is written
        if args.check:
            others = sorted(getattr(args, "_given", set()) - {"check"})
            if others:  # --check only validates: a generation option beside it would be ignored
                raise ValueError(f"--check only validates files and writes nothing; drop "
                                 f"{' '.join('--' + name.replace('_', '-') for name in others)}, or generate "
                                 f"in a command of its own")
            for path in args.check:
                print(f"{path}: {len(read_lines(path))} valid lines")
            return
        n, m = parse_digits(args.digits)
        if args.per_line < 1:
            raise ValueError("--per-line must be >= 1")
        if args.count is not None and args.count < 1:
            raise ValueError(f"--count must be >= 1 (the number of lines to write), got {args.count}")
        if (args.count is None) == (args.splits is None):
            raise ValueError("give either --count N --out FILE, or --splits name=count,... --out-dir DIR")
        if args.count is not None and not args.out:
            raise ValueError("--count needs --out FILE")
        if args.splits is not None and not args.out_dir:
            raise ValueError("--splits needs --out-dir DIR")
        if args.count is not None and args.out_dir:  # --out-dir is where the splits go: with --count it is unused
            raise ValueError("--out-dir is the folder of --splits; with --count N the lines go to --out FILE only: "
                             "drop --out-dir")
        if args.splits is not None and args.out:
            raise ValueError("--out is the file of --count; with --splits the splits go to --out-dir DIR: drop --out")
        if args.out and os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder: give the path of the file to write")
        if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise ValueError(f"--out-dir {args.out_dir} is a file, not a folder: choose a folder for the splits")
        splits = [("out", args.count)] if args.count is not None else parse_splits(args.splits)
        paths = {name: args.out if args.count is not None else os.path.join(args.out_dir, f"{name}.txt")
                 for name, _ in splits}
        for path in paths.values():
            check_writable(path, f"--out {args.out}" if args.count is not None else f"--out-dir {args.out_dir}")

        rng = random.Random(args.seed)
        forbidden = excluded_problems(args.exclude)
        # Smallest split first: the held-out splits are drawn before the big training split takes what is left.
        generated = {}
        for name, count in sorted(splits, key=lambda split: split[1]):
            generated[name], problems = generate_lines(rng, count, n, m, args.per_line, args.leading_zeros, forbidden)
            forbidden |= set(problems)
    except ValueError as error:
        parser.error(str(error))  # one message, exit code 2
    for name, path in paths.items():
        write_lines(path, generated[name])


if __name__ == "__main__":
    main(sys.argv[1:])
