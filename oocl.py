# Out-of-context learning (OOCL) on (x^2 + y^2) mod p with aliased tokens.
#
# Question: hold out so much of the operation table that a model trained on it alone cannot generalise,
# then add a second copy of the table written with alias tokens (its own, independently held-out part)
# plus p "linkage" facts i -> i+p. Does the model connect the two tables through the linkages and
# generalise on table 1? Loss = k1*loss_op1 + k2*loss_op2 + k3*loss_linkages; the answer is the
# contrast between (k1, k2, k3) = (1, 0, 0) and (1, 1, 1), read against two controls that every sweep
# trains beside them: (1, 1, 0) (the alias table without linkages) and the hard-wired upper bound (alias
# i+p's input row and output column are original i's plus one learned per-table vector, so the link is
# given, not learned).
#
#   python oocl.py --p 113 --holdout1 0.8 --holdout2 0.8 --k 1 1 1 --steps 10000 --seed 0
#   python oocl.py sweep --holdout1 0.5 0.7 0.9 --holdout2 0.5 0.7 0.9 --k 1 0 0 1 1 1 --seeds 0 1 2
#   ./run.sh oocl.py sweep ...          (torchrun: every rank trains its share of the grid on its own GPU)
#   python oocl.py merge --out_dir D PART PART ...   (one table from the parts of a sweep split by seed)
#   python oocl.py --preset tiny
#
# A single run is a sweep of one: every run of a sweep trains at the same time with its own weights,
# its own data split, its own loss weights and its own AdamW state, held as tensors with a leading run
# dimension and multiplied with batched matmuls (bmm). Runs never interact, so a run trained inside a
# sweep ends where the same run trained alone ends.
import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---- Hyperparameters ----


@dataclass
class Hyperparameters:
    # task
    p: int = 113                      # prime modulus; vocabulary is (alias_groups+1)*p + 3 + alias_groups
    holdout1: list = field(default_factory=lambda: [0.8])  # fraction of table 1 (originals) held out
    holdout2: list = field(default_factory=lambda: [0.8])  # fraction of table 2 (the test aliases) held out
    k: list = field(default_factory=lambda: [1.0, 1.0, 1.0])  # loss weights k1 k2 k3; a sweep takes several triples
    seeds: list = field(default_factory=lambda: [0])  # the runs' seeds (split and initial weights); --seed S: the same
    # design variants (the seed's setup is the default)
    links_both_ways: bool = False     # also train the reverse linkages DEFINE i+p END i
    tied_embeddings: bool = False     # output column of a token = its (normed) input embedding
    alias_groups: int = 1             # >1: out-of-context meta-learning; groups 2.. get full tables and linkages
    hardwired: bool = False           # single run: the hard-wired-link control (alias rows/columns = originals')
    controls: bool = True             # sweep: add (1,1,0) and hard-wired (1,1,1) to every cell of the grid
    # model: 1 block of the speedrun architecture at grokking size
    num_layers: int = 1
    model_dim: int = 128
    num_heads: int = 4
    mlp_dim: int = 512
    # optimisation: full-batch AdamW with strong weight decay (the grokking recipe)
    steps: int = 10000
    lr: float = 1e-3
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 10
    cooldown_frac: float = 0.25       # lr decays linearly to 0 over this last part (full-batch Adam spikes at constant lr)
    patience: int = 0                 # a run stops once held-out table-1 accuracy has not improved for this many steps (0: never)
    # evaluation and output
    eval_every: int = 100
    log_dir: str = "logs"
    out_dir: str = "logs/oocl_sweep"  # sweep table, CSVs and plots (records/ only when pointed there)
    overwrite: bool = field(default=False, repr=False)  # sweep: replace the outputs an earlier sweep left in --out_dir
    # execution
    max_runs_per_batch: int = 0       # 0 = the whole grid (or its share of one rank) at once
    threads: int = 0                  # torch CPU threads (0 = torch's default)
    compile: str = "auto"             # auto: torch.compile on CUDA only
    quiet: bool = False               # no per-step stdout lines


PRESETS = {
    # CPU smoke config: a small table that a small model memorises in a few seconds
    "tiny": dict(p=11, holdout1=[0.5], holdout2=[0.5], model_dim=32, num_heads=2, mlp_dim=64,
                 steps=300, lr=3e-3, eval_every=100, threads=1),
}

LIST_TYPES = {"holdout1": float, "holdout2": float, "k": float, "seeds": int}
HELP = {  # the comment beside each field, for --help
    line.split(":")[0].strip(): line.split("#", 1)[1].strip()
    for line in open(__file__).read().split("class Hyperparameters:")[1].split("\n\n")[0].splitlines()
    if ":" in line and "#" in line and not line.strip().startswith("#")
}


def say(text):
    """A line on the console. The console's reader gone (`| head`, or `| tee` stopped by the same Ctrl-C): the run goes
    on, its log files have every line."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def die(message):
    """A user's mistake: one line on stderr, exit code 2, nothing trained."""
    print(f"oocl.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Once(argparse.Action):
    """Stores the value; a second occurrence of the option, in any spelling, is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given", set())
        if self.dest in seen:
            parser.error(f"argument {self.option_strings[0]}: given twice")
        seen.add(self.dest)
        setattr(namespace, self.dest, self.value(values, option_string))

    def value(self, values, option_string):
        return values


class Flag(Once):
    """--x sets true, --no-x / --no_x sets false; takes no value."""

    def __init__(self, option_strings, dest, **kwargs):
        negated = [f"--no-{s[2:]}" for s in option_strings] + [f"--no_{dest}"]
        super().__init__(option_strings + list(dict.fromkeys(negated)), dest, nargs=0, **kwargs)

    def value(self, values, option_string):
        return not option_string.startswith("--no")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="oocl.py", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage="python oocl.py [sweep] [--preset NAME] [--field value ...]",
        description="Out-of-context learning on (x^2+y^2) mod p. `sweep` as the first argument trains the grid "
                    "holdout1 x holdout2 x k triples x seeds (plus the controls) and writes a table; `merge` "
                    "(python oocl.py merge --help) writes one table from the parts of a sweep split by seed.")
    parser.add_argument("--preset", choices=sorted(PRESETS), action=Once, help="apply a preset's values first")
    for f in dataclasses.fields(Hyperparameters):
        names = list(dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"]))
        if f.name == "seeds":
            names.append("--seed")
        kwargs = dict(dest=f.name, help=HELP.get(f.name, " "), default=getattr(Hyperparameters(), f.name))
        if f.type is bool:
            parser.add_argument(*names, action=Flag, **kwargs)
        elif f.name in LIST_TYPES:
            parser.add_argument(*names, action=Once, nargs="+", type=LIST_TYPES[f.name], metavar="V", **kwargs)
        elif f.name == "compile":
            parser.add_argument(*names, action=Once, choices=["auto", "true", "false"], **kwargs)
        else:
            parser.add_argument(*names, action=Once, type=f.type, metavar=f.type.__name__.upper(), **kwargs)
    return parser


def parse_args(argv):
    """`[sweep] [--preset NAME] [--field value | --field=value ...]` -> (mode, Hyperparameters)."""
    mode = "single"
    if argv and argv[0] == "sweep":
        mode, argv = "sweep", argv[1:]
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset  # the preset's values become the defaults
    if preset:
        parser.set_defaults(**PRESETS[preset])
    namespace, extras = parser.parse_known_args(argv)
    if "sweep" in extras:
        die("`sweep` must come first: python oocl.py sweep [flags]")
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    namespace = vars(namespace)
    given = namespace.pop("_given", set())
    namespace.pop("preset")
    args = Hyperparameters(**namespace)
    validate(args, mode, given)
    return mode, args


def is_prime(n):
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def repository_root():
    """The checkout this script belongs to: the nearest folder at or above it that holds records/ (a copy in
    records/oocl/<attempt>/ belongs to the checkout above it), or None for a copy outside any checkout."""
    folder = os.path.dirname(os.path.realpath(__file__))
    while not os.path.isdir(os.path.join(folder, "records")):
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)
    return folder


def script_path():
    """This script as a sweep's table names it: relative to the checkout's root (oocl.py, or a copy's
    records/oocl/<attempt>/oocl.py, so a copy's results are not taken for the original's), absolute outside one."""
    root, path = repository_root(), os.path.realpath(__file__)
    return os.path.relpath(path, root) if root else path


def check_defaults_outside_records(args, mode, given):
    """Default output paths follow the working directory: run from inside records/ (a copy from its own folder)
    they would put untracked logs there. records/ gets only what a user points there on purpose."""
    root = repository_root()
    if root is None:
        return
    records = os.path.join(root, "records")
    inside = [name for name in ["log_dir"] + ["out_dir"] * (mode == "sweep") if name not in given
              and os.path.commonpath([os.path.realpath(getattr(args, name)), records]) == records]
    if inside:
        die(f"the default {' and '.join(f'--{n} {getattr(args, n)}' for n in inside)} would write into the "
            f"repository's records/ ({os.path.realpath(getattr(args, inside[0]))}); run from the repository root "
            f"({root}), or pass {' and '.join(f'--{n}' for n in inside)}")


def check_writable_dir(path, flag):
    """An output folder that cannot be created or written is reported now, not after training."""
    if os.path.exists(path) and not os.path.isdir(path):
        die(f"--{flag} {path} is a file, not a folder; pass a folder path (it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        die(f"--{flag} {path} cannot be created ({exc.strerror}); pass a writable folder")
    if not os.access(path, os.W_OK | os.X_OK):
        die(f"--{flag} {path} is not writable; pass a writable folder")


def validate(args, mode, given=()):
    if not is_prime(args.p):
        die(f"--p must be a prime (the task is arithmetic mod p), got {args.p}; try 23, 31, 59 or 113")
    for name in ("holdout1", "holdout2"):
        for h in getattr(args, name):
            if not 0.0 <= h < 1.0:
                die(f"--{name} must be a fraction in [0, 1) (at least one pair must stay in training), got {h}")
            held, pairs = held_out_pairs(args.p, h)  # what the split will hold out
            if h > 0 and not 0 < held < pairs:
                die(f"--{name} {h:g} holds out {held} of the {pairs} pairs {{x, y}} of table {name[-1]} at --p "
                    f"{args.p} (floor({h:g} * {pairs})) and trains on {pairs - held}; each side needs at least one "
                    f"pair: use a fraction in [{math.ceil(1000 / pairs) / 1000:g}, 1) or a larger --p"
                    + (", or 0 to hold out none" if name == "holdout2" else ""))
    if 0.0 in args.holdout1:
        die("--holdout1 0 holds out no table-1 pair, so there is nothing to test on; use a fraction in (0, 1)")
    if len(args.k) % 3:
        die(f"--k takes the three loss weights k1 k2 k3 (a sweep: several triples), got {len(args.k)} values: {args.k}")
    for triple in k_triples(args):
        if not all(0 <= w < math.inf for w in triple):
            die(f"loss weights must be finite and >= 0, got {triple}")
        if not any(w > 0 for w in triple):
            die(f"loss weights {triple} are all zero: nothing would be trained; set at least one of k1 k2 k3 > 0")
    if mode == "single" and (len(args.holdout1), len(args.holdout2), len(args.k), len(args.seeds)) != (1, 1, 3, 1):
        die("a single run takes one --holdout1, one --holdout2, exactly three --k values and one --seed; "
            "for a grid use `python oocl.py sweep ...`")
    for name, values in (("holdout1", args.holdout1), ("holdout2", args.holdout2), ("k", k_triples(args)),
                         ("seeds", args.seeds)):
        for v in values:
            if values.count(v) > 1:
                shown = " ".join(map(fmt, v)) if name == "k" else fmt(v)
                times = "twice" if values.count(v) == 2 else "more than once"
                die(f"--{name} lists {shown} {times}; list each once (a repeat trains the same runs again, and the "
                    f"table would count them as further seeds)")
    if mode == "sweep" and args.hardwired:
        die("--hardwired is the control of a single run; a sweep adds it to every cell by itself (--controls)")
    model = [f"--{name} must be >= 1, got {getattr(args, name)}"
             for name in ("num_layers", "model_dim", "num_heads", "mlp_dim") if getattr(args, name) < 1]
    if args.num_heads >= 1 and args.model_dim % args.num_heads:
        model.append(f"--model_dim {args.model_dim} must be divisible by --num_heads {args.num_heads} "
                     f"(every head gets model_dim / num_heads dimensions)")
    if model:
        die("; ".join(model))
    if not 0.0 <= args.cooldown_frac <= 1.0:
        die(f"--cooldown_frac must be in [0, 1], got {args.cooldown_frac}")
    if not (0 < args.lr < math.inf and 0 <= args.weight_decay < math.inf
            and 0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        die(f"need a finite --lr > 0, a finite --weight_decay >= 0 and betas in [0, 1); got lr {args.lr}, "
            f"weight_decay {args.weight_decay}, beta1 {args.beta1}, beta2 {args.beta2}")
    for name in ("steps", "eval_every", "alias_groups"):
        if getattr(args, name) < 1:
            die(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "patience", "max_runs_per_batch", "threads"):
        if getattr(args, name) < 0:
            die(f"--{name} must be >= 0, got {getattr(args, name)}")
    check_defaults_outside_records(args, mode, given)
    check_writable_dir(args.log_dir, "log_dir")
    if mode == "sweep":
        check_writable_dir(args.out_dir, "out_dir")


def k_triples(args):
    return [tuple(args.k[i:i + 3]) for i in range(0, len(args.k), 3)]


@dataclass(frozen=True)
class RunSpec:
    holdout1: float
    holdout2: float
    k: tuple
    seed: int
    hardwired: bool = False


def fmt(v):
    return f"{v:g}"


def run_name(p, spec):
    return (f"oocl_ssq_{p}_{fmt(spec.holdout1)}_{fmt(spec.holdout2)}_" + "_".join(fmt(w) for w in spec.k)
            + ("_hardwired" if spec.hardwired else ""))


def arm_label(spec):
    return " ".join(map(fmt, spec.k)) + (" hard-wired" if spec.hardwired else "")


def grid(args, mode="sweep"):
    """The runs of a sweep: every (holdout1, holdout2, k, seed), plus with --controls the (1,1,0) and the
    hard-wired (1,1,1) runs of every cell (once, if the k triples already hold (1,1,0))."""
    if mode == "single":
        return [RunSpec(args.holdout1[0], args.holdout2[0], tuple(args.k), args.seeds[0], args.hardwired)]
    arms = [(k, False) for k in k_triples(args)]
    if args.controls:
        arms += [((1.0, 1.0, 0.0), False)] * ((1.0, 1.0, 0.0) not in k_triples(args)) + [((1.0, 1.0, 1.0), True)]
    return [RunSpec(h1, h2, k, s, hw) for h1 in args.holdout1 for h2 in args.holdout2
            for k, hw in arms for s in args.seeds]


# ---- Data ----
# Vocabulary ((G+1)p+3+G for G alias groups; the seed's 2p+4 for G = 1): 0..p-1 numbers ("originals"), then G
# groups of p aliases (token g*p+i means i), then END, RANDOM, NOT_RANDOM and one DEFINE per group (one shared
# DEFINE would give G different answers to the same `DEFINE i END`). Every example is 4 tokens; the model
# reads the first 3 and is trained on the 4th only:
#   table 1 row:  x      y      END  (x^2+y^2) mod p            (all originals)
#   table 2 row:  x+p    y+p    END  ((x^2+y^2) mod p) + p      (all aliases of group 1, the test group)
#   linkage:      DEF    i      END  i+p                         (predict the alias of i)
#   reverse link: DEF    i+p    END  i                           (--links_both_ways)
# RANDOM and NOT_RANDOM are kept only so the vocabulary matches the original experiment.
# Out-of-context meta-learning (--alias_groups G > 1, after Krasheninnikov et al.): groups 2..G are written
# like group 1, but their whole table is in training, so a model can learn from them what a DEFINE statement
# means; group 1 keeps the seed's held-out table 2 and linkages. Their rows count in the k2 and k3 losses.
# The split is over unordered pairs {x, y}: (x, y) and (y, x) are always on the same side, otherwise
# commutativity alone would answer part of the "held-out" rows.
TABLE1, TABLE2, LINKS, META_TABLES, META_LINKS = 0, 1, 2, 3, 4
LOSS_OF_GROUP = {TABLE1: 0, TABLE2: 1, LINKS: 2, META_TABLES: 1, META_LINKS: 2}  # index into k


def special_tokens(p, alias_groups=1):
    """END, RANDOM, NOT_RANDOM, then one DEFINE token per alias group (DEFINE is group 1's)."""
    base = (alias_groups + 1) * p
    return dict(END=base, RANDOM=base + 1, NOT_RANDOM=base + 2, DEFINE=base + 3)


def define_token(p, alias_groups, g):
    """Group g's DEFINE: `DEFINE_g i END` names the group whose alias of i is the answer."""
    return special_tokens(p, alias_groups)["DEFINE"] + g - 1


def vocab_size(p, alias_groups=1):
    return (alias_groups + 1) * p + 3 + alias_groups


def build_sequences(p, alias_groups=1, links_both_ways=False):
    """All examples: (tokens [N, 4], group [N]). Row x*p+y of table 1 and of every alias table is the pair
    (x, y); table 1 comes first, then group 1's table, its linkages, then the meta groups' tables and linkages."""
    sp = special_tokens(p, alias_groups)
    x = torch.arange(p).repeat_interleave(p)
    y = torch.arange(p).repeat(p)
    result = (x * x + y * y) % p
    end = torch.full_like(x, sp["END"])
    i = torch.arange(p)
    end_i = torch.full_like(i, sp["END"])
    parts, groups = [torch.stack([x, y, end, result], 1)], [TABLE1]
    for g in range(1, alias_groups + 1):
        a = g * p  # group g's alias of n is n + a
        define = torch.full_like(i, define_token(p, alias_groups, g))
        links = [torch.stack([define, i, end_i, i + a], 1)]
        if links_both_ways:
            links.append(torch.stack([define, i + a, end_i, i], 1))
        parts += [torch.stack([x + a, y + a, end, result + a], 1), torch.cat(links)]
        groups += [TABLE2, LINKS] if g == 1 else [META_TABLES, META_LINKS]
    group = torch.cat([torch.full((len(t),), g) for t, g in zip(parts, groups)])
    return torch.cat(parts), group


def held_out_pairs(p, holdout):
    """(pairs held out, unordered pairs) of a table: floor(holdout * #unordered pairs {x, y})."""
    n_pairs = p * (p + 1) // 2
    return int(math.floor(holdout * n_pairs)), n_pairs


def heldout_rows(p, holdout, generator):
    """Boolean [p*p] mask of held-out table rows: held_out_pairs(p, holdout) pairs, both orders."""
    xs, ys = torch.triu_indices(p, p)  # unordered pairs x <= y
    n_held = held_out_pairs(p, holdout)[0]
    pick = torch.randperm(xs.numel(), generator=generator)[:n_held]
    held = torch.zeros(p, p, dtype=torch.bool)
    held[xs[pick], ys[pick]] = True
    held[ys[pick], xs[pick]] = True
    return held.flatten()


def make_split(p, holdout1, holdout2, seed, group):
    """Boolean mask over the examples of `group`, True = training example. The two tables' held-out sets are
    drawn one after the other from one seeded generator, so they are independent; linkages and meta tables
    are always in training. The split depends only on (p, holdouts, seed), not on k, so runs that differ in k
    are paired."""
    generator = torch.Generator().manual_seed(1_000_003 * seed + 17)
    held1 = heldout_rows(p, holdout1, generator)
    held2 = heldout_rows(p, holdout2, generator)
    split = torch.ones(group.numel(), dtype=torch.bool)
    split[group == TABLE1] = ~held1
    split[group == TABLE2] = ~held2
    return split


def covered_rows(p, split, group):
    """[p*p] mask of held-out table-1 pairs whose table-2 (group 1) version is in training: the pairs that a
    model using the linkages could answer from table 2."""
    return ~split[group == TABLE1] & split[group == TABLE2]


def example_weights(spec, group, is_train):
    """Per-example loss weight so that sum(w * CE) = k1*mean CE(table 1 train) + k2*mean CE(alias tables
    train) + k3*mean CE(linkages)."""
    weights = torch.zeros(group.numel())
    family = torch.tensor([LOSS_OF_GROUP[g] for g in range(len(LOSS_OF_GROUP))])[group]
    for loss in range(3):
        rows = is_train & (family == loss)
        if spec.k[loss] > 0 and rows.any():
            weights[rows] = spec.k[loss] / rows.sum().item()
    return weights


# ---- Model ----
# The speedrun block at grokking size, written with a leading run dimension R on every weight so R
# independent models train at once: two RMS-normed token embeddings x00, x01; the residual starts as x00
# and before every block x = l0*x + l1*x00 + l2*x01 with learned (l0, l1, l2) initialised (1, 0, 0);
# attention with RMS-normed q, k, v per head and logit scale 0.12; MLP with RMS-normed input and ReLU^2;
# no biases, no learned norm weights, zero-initialised output projections and head. There is no positional
# embedding: the op is commutative and the answer position is fixed, and the model is then exactly
# symmetric in (x, y).
# Variants: tied embeddings read the logits off the normed input embeddings (scaled by 1/sqrt(d), so a
# logit is sqrt(d) times a cosine); hard-wired runs replace every alias's embedding rows and head column by
# its original's plus one learned vector per alias group (the "table" it belongs to).


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def init_params(args, seed, device):
    """One run's weights, from its own seeded generator (the same for a run alone or inside a sweep)."""
    generator = torch.Generator().manual_seed(2_000_003 * seed + 29)
    d, V = args.model_dim, vocab_size(args.p, args.alias_groups)

    def uniform(fan_in, fan_out):  # std 0.5/sqrt(fan_in), as the speedrun's linear layers
        bound = 0.5 * math.sqrt(3.0 / fan_in)
        return (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound

    params = {
        "embed00": torch.randn(V, d, generator=generator),
        "embed01": torch.randn(V, d, generator=generator),
        "lambdas": torch.tensor([1.0, 0.0, 0.0]).repeat(args.num_layers, 1),
    }
    if not args.tied_embeddings:
        params["head"] = torch.zeros(d, V)
    for layer in range(args.num_layers):
        params[f"qkv{layer}"] = uniform(d, 3 * d)
        params[f"attn_out{layer}"] = torch.zeros(d, d)
        params[f"mlp_in{layer}"] = uniform(d, args.mlp_dim)
        params[f"mlp_out{layer}"] = torch.zeros(args.mlp_dim, d)
    # the hard-wired control's per-group vectors (drawn last: the other weights do not depend on them)
    params["alias_in00"] = 0.1 * torch.randn(args.alias_groups, d, generator=generator)
    params["alias_in01"] = 0.1 * torch.randn(args.alias_groups, d, generator=generator)
    if not args.tied_embeddings:
        params["alias_out"] = torch.zeros(args.alias_groups, d)
    return {name: t.to(device) for name, t in params.items()}


def stack_params(per_run):
    return {name: torch.stack([p[name] for p in per_run]).requires_grad_(True) for name in per_run[0]}


def hardwire(table, group_vectors, p, mix):
    """table [R, V, d]: alias rows of runs with mix 1 become their original's row plus their group's vector."""
    R, V, d = table.shape
    G = group_vectors.size(1)
    source = torch.cat([torch.arange(p), torch.arange(p).repeat(G), torch.arange((G + 1) * p, V)]).to(table.device)
    offset = torch.cat([table.new_zeros(R, p, d), group_vectors.repeat_interleave(p, dim=1),
                        table.new_zeros(R, V - (G + 1) * p, d)], dim=1)
    return table + mix.view(R, 1, 1) * (table[:, source] + offset - table)


def token_tables(params, p, hardwired=None):
    """The embeddings and head each run uses: (embed00 [R, V, d], embed01 [R, V, d], head [R, d, V]).
    hardwired: None, or [R] 0/1 floats (1 = that run's aliases are wired to their originals)."""
    e00, e01 = params["embed00"], params["embed01"]
    head = params.get("head")
    if hardwired is not None:
        e00 = hardwire(e00, params["alias_in00"], p, hardwired)
        e01 = hardwire(e01, params["alias_in01"], p, hardwired)
        if head is not None:
            head = hardwire(head.transpose(1, 2), params["alias_out"], p, hardwired).transpose(1, 2)
    if head is None:  # tied
        head = norm(e00).transpose(1, 2) / math.sqrt(e00.size(-1))
    return e00, e01, head


def linear(x, weight):
    """x [R, ..., in] @ weight [R, in, out], one matmul per run."""
    R, out = x.size(0), weight.size(-1)
    return torch.bmm(x.reshape(R, -1, x.size(-1)), weight).view(*x.shape[:-1], out)


def qkv_heads(x, qkv_weight, num_heads):
    """[R, ..., d] -> RMS-normed q, k, v, each [R, ..., heads, head_dim]."""
    qkv = linear(x, qkv_weight).unflatten(-1, (3 * num_heads, -1))
    return norm(qkv).chunk(3, dim=-2)


def attend(q, k, v):
    """q [R, N, Tq, H, hd] over k, v [R, N, T, H, hd]; causal when Tq == T, else the last Tq positions see all.
    Sequences are 3 tokens long, so broadcasting beats a fused attention kernel here."""
    scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) * 0.12  # [R, N, Tq, T, H]
    Tq, T = q.size(2), k.size(2)
    if Tq == T:
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future.view(T, T, 1), float("-inf"))
    return (scores.softmax(dim=3).unsqueeze(-1) * v.unsqueeze(2)).sum(3)  # [R, N, Tq, H, hd]


def mlp(x, in_weight, out_weight):
    return linear(F.relu(linear(norm(x), in_weight)).square(), out_weight)


def first_layer_input(params, x00_vocab, x01_vocab):
    """What block 0 reads for every vocabulary entry: l0*x00 + l1*x00 + l2*x01 [R, V, d]."""
    lam = params["lambdas"][:, 0].view(-1, 3, 1, 1)
    return (lam[:, 0] + lam[:, 1]) * x00_vocab + lam[:, 2] * x01_vocab


def forward(params, tokens, num_layers, num_heads, p, hardwired=None):
    """tokens [R, N, 3] (each run its own examples) -> answer logits [R, N, V].
    Until the first attention everything depends on the token alone, so block 0's mixing and q, k, v are
    computed once per vocabulary entry and then gathered: exact, and ~3x cheaper than per position.
    The last block computes only the last position, the only one the answer reads."""
    R = tokens.size(0)
    run = torch.arange(R, device=tokens.device).view(R, 1, 1)
    gather = lambda table: table[run, tokens]  # [R, V, ...] -> [R, N, 3, ...]
    embed00, embed01, head = token_tables(params, p, hardwired)
    x00_vocab, x01_vocab = norm(embed00), norm(embed01)
    for layer in range(num_layers):
        last = layer == num_layers - 1
        if layer == 0:
            x = first_layer_input(params, x00_vocab, x01_vocab)  # [R, V, d]
            q, k, v = map(gather, qkv_heads(x, params["qkv0"], num_heads))
            x = gather(x)
        else:
            lam = params["lambdas"][:, layer].view(R, 3, 1, 1, 1)
            x = lam[:, 0] * x + lam[:, 1] * gather(x00_vocab) + lam[:, 2] * gather(x01_vocab)
            q, k, v = qkv_heads(x, params[f"qkv{layer}"], num_heads)
        if last:
            q, x = q[:, :, -1:], x[:, :, -1:]
        x = x + linear(attend(q, k, v).flatten(-2), params[f"attn_out{layer}"])
        x = x + mlp(x, params[f"mlp_in{layer}"], params[f"mlp_out{layer}"])
    return linear(norm(x[:, :, -1]), head).float()


def weighted_loss(params, tokens, targets, weights, num_layers, num_heads, p, hardwired=None):
    """Sum over runs of each run's k-weighted loss. Summing (not averaging) over runs keeps every run's
    gradient exactly what it would be alone; a weight of 0 removes an example from the gradient."""
    logits = forward(params, tokens, num_layers, num_heads, p, hardwired)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(weights)
    return (ce * weights).sum()


def alias_cosines(params, p, hardwired=None):
    """Mean over i of the cosine between number i and its group-1 alias i+p: of what block 0 reads (input) and
    of the head columns (output); beside each, the same for i and the alias of another number (i+1 mod p),
    the level that says "no closer than any two tokens". -> dict of [R] tensors."""
    embed00, embed01, head = token_tables(params, p, hardwired)
    x_in = first_layer_input(params, norm(embed00), norm(embed01))
    head = head.transpose(1, 2)
    i = torch.arange(p, device=x_in.device)
    other = (i + 1) % p + p
    cos = lambda t, j: F.cosine_similarity(t[:, i], t[:, j], dim=-1).mean(-1)
    return dict(cos_in=cos(x_in, i + p), cos_in_other=cos(x_in, other),
                cos_out=cos(head, i + p), cos_out_other=cos(head, other))


def matmul_flops_per_example(args):
    """Forward matmul FLOPs of one example as `forward` computes it: block 0's q, k, v are per vocabulary
    entry (not per example), the last block computes one position."""
    d, m, V = args.model_dim, args.mlp_dim, vocab_size(args.p, args.alias_groups)
    flops = 2 * d * V
    for layer in range(args.num_layers):
        positions = 1 if layer == args.num_layers - 1 else 3
        flops += (3 * 2 * 3 * d * d if layer > 0 else 0) + positions * 2 * (d * d + 2 * d * m)
    return flops


# ---- Optimizer ----
# AdamW is elementwise, so one AdamW over the stacked [R, ...] tensors is R independent AdamWs. The mixing
# scalars are not decayed (decay would pull l0 toward 0 and cut the residual stream).


def make_optimizer(params, args):
    decayed = [t for name, t in params.items() if name != "lambdas"]
    return torch.optim.AdamW(
        [dict(params=decayed, weight_decay=args.weight_decay), dict(params=[params["lambdas"]], weight_decay=0.0)],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)


def lr_factor(step, args):
    warmup = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0
    cooldown = min(1.0, (args.steps - step) / (args.cooldown_frac * args.steps)) if args.cooldown_frac > 0 else 1.0
    return min(warmup, cooldown)


# ---- Batched runs ----


class RunGroup:
    """R runs trained together: stacked weights, each run's padded training examples and their weights,
    and each run's split for evaluation."""

    def __init__(self, args, specs, device):
        self.args, self.specs = args, specs
        tokens, self.group = build_sequences(args.p, args.alias_groups, args.links_both_ways)
        self.tokens = tokens.to(device)
        splits = [make_split(args.p, s.holdout1, s.holdout2, s.seed, self.group) for s in specs]
        self.is_train = torch.stack(splits)  # [R, N_all], on the CPU (evaluation masks)
        self.covered = torch.stack([covered_rows(args.p, split, self.group) for split in splits])  # [R, p*p]
        # Training examples of each run: only rows with a non-zero weight, padded with weight-0 rows.
        weights = [example_weights(s, self.group, split) for s, split in zip(specs, splits)]
        rows = [torch.nonzero(w > 0).squeeze(1) for w in weights]
        n_max = max(r.numel() for r in rows)
        self.train_count = sum(r.numel() for r in rows)
        train_rows = torch.zeros(len(specs), n_max, dtype=torch.long)
        train_weights = torch.zeros(len(specs), n_max)
        for i, (r, w) in enumerate(zip(rows, weights)):
            train_rows[i, :r.numel()] = r
            train_weights[i, :r.numel()] = w[r]
        train_examples = self.tokens[train_rows.to(device)]  # [R, n_max, 4]
        self.train_inputs, self.train_targets = train_examples[..., :3], train_examples[..., 3]
        self.train_weights = train_weights.to(device)
        # None when no run is hard-wired: the plain runs then skip the wiring arithmetic
        self.hardwired = (torch.tensor([float(s.hardwired) for s in specs], device=device)
                          if any(s.hardwired for s in specs) else None)
        self.params = stack_params([init_params(args, s.seed, device) for s in specs])
        self.optimizer = make_optimizer(self.params, args)
        use_compile = args.compile == "true" or (args.compile == "auto" and device.type == "cuda")
        self.loss_fn = torch.compile(weighted_loss) if use_compile else weighted_loss

    def train_step(self, step):
        lr = self.args.lr * lr_factor(step, self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss_fn(self.params, self.train_inputs, self.train_targets, self.train_weights,
                            self.args.num_layers, self.args.num_heads, self.args.p, self.hardwired)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self):
        """Every run on every example -> list of metric dicts (one per run)."""
        args = self.args
        R, N = len(self.specs), self.tokens.size(0)
        V = vocab_size(args.p, args.alias_groups)
        chunk = max(1, (1 << 24) // (R * max(V, 3 * args.mlp_dim)))  # bounds activation memory
        losses, correct = [], []
        for start in range(0, N, chunk):
            examples = self.tokens[start:start + chunk]
            logits = forward(self.params, examples[:, :3].expand(R, -1, -1), args.num_layers, args.num_heads,
                             args.p, self.hardwired)
            target = examples[:, 3].expand(R, -1)
            losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(R, -1))
            correct.append((logits.argmax(-1) == target).float())
        losses, correct = torch.cat(losses, 1).cpu(), torch.cat(correct, 1).cpu()
        cosines = {key: value.cpu() for key, value in alias_cosines(self.params, args.p, self.hardwired).items()}
        table1, table2, links, meta = (self.group == g for g in (TABLE1, TABLE2, LINKS, META_TABLES))
        metrics = []
        for r, train in enumerate(self.is_train):
            test1 = torch.zeros_like(train)
            test1[table1] = ~train[table1]
            covered = torch.zeros_like(train)
            covered[table1] = self.covered[r]
            subsets = {"op1_train": train & table1, "op1_test": test1, "op1_covered": covered,
                       "op1_uncovered": test1 & ~covered, "op2_train": train & table2, "op2_test": ~train & table2,
                       "link": links, "meta": meta}
            m = {}
            for key, rows in subsets.items():
                empty = not rows.any()
                m[f"{key}_loss"] = float("nan") if empty else losses[r, rows].mean().item()
                m[f"{key}_acc"] = float("nan") if empty else correct[r, rows].mean().item()
            m.update({key: value[r].item() for key, value in cosines.items()})
            metrics.append(m)
        return metrics


# ---- Logging ----
# logs/<run_id>.txt per run: the script, the environment, the hyperparameters, one line per step and per
# evaluation (val_loss = loss on held-out table-1 rows), flushed line by line.

SOLVED_ACC = 0.9  # a run is "solved" once its held-out table-1 accuracy reaches this

METRIC_KEYS = ["op1_train_loss", "op1_train_acc", "op1_test_loss", "op1_test_acc", "op1_covered_acc",
               "op1_uncovered_acc", "op2_train_loss", "op2_train_acc", "op2_test_loss", "op2_test_acc", "link_loss",
               "link_acc", "meta_acc", "cos_in", "cos_in_other", "cos_out", "cos_out_other"]


def environment_lines(device):
    lines = [f"Python {platform.python_version()}", f"PyTorch {torch.__version__}",
             f"CUDA {torch.version.cuda or 'none'}"]
    if device.type == "cuda":
        if shutil.which("nvidia-smi"):
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.rstrip())
        else:
            lines += [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        lines.append("no GPU (CPU run)")
    return lines


class RunLogs:
    """One log file per run; `echo` runs also print every line to stdout."""

    def __init__(self, args, specs, device, echo, rank=0, world_size=1):
        stamp = time.strftime("%Y%m%d_%H%M%S")
        script = open(__file__).read()
        env = environment_lines(device) + [f"rank {rank} of {world_size} ({device})"]
        self.echo, self.files, self.paths = echo, [], []
        for spec in specs:
            name = run_name(args.p, spec)
            run_id = f"{name}_seed{spec.seed}_{stamp}_{uuid.uuid4().hex[:6]}"
            path = os.path.join(args.log_dir, run_id + ".txt")
            f = open(path, "w")
            hyper = dataclasses.replace(args, holdout1=[spec.holdout1], holdout2=[spec.holdout2], k=list(spec.k),
                                        seeds=[spec.seed], hardwired=spec.hardwired)
            f.write(script + "\n" + "=" * 100 + "\n" + "\n".join(env) + "\n" + "=" * 100 + "\n")
            f.write(f"run_name: {name} seed: {spec.seed}\n{hyper!r}\n")
            f.flush()
            self.files.append(f)
            self.paths.append(path)
        if echo:
            say("\n".join(env))
            say(f"run_name: {run_name(args.p, specs[0])} seed: {specs[0].seed}\n{args!r}")

    def each(self, lines, echo=True):
        """lines[r] to run r's log (None: nothing, the run has stopped); with echo, the first run's line to stdout."""
        for f, line in zip(self.files, lines):
            if line is not None:
                f.write(line + "\n")
                f.flush()
        if self.echo and echo and lines[0] is not None:
            say(lines[0])

    def close(self):
        for f in self.files:
            f.close()


# dense bf16 tensor-core peaks (NVIDIA's datasheets halve their sparsity figures); the first name found in the
# device's name counts, so the PCIe and NVL variants come before the SXM parts' family names
PEAK_BF16_FLOPS = {"H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H200 NVL": 835.5e12,
                   "H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_line(device):
    if device.type == "cuda":
        return (f"peak memory allocated: {torch.cuda.max_memory_allocated(device) // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved(device) // 2**20} MiB")
    return f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"


# ---- Training loop ----


def trained_losses(args, spec):
    """The evaluated training losses a run's loss sums (k > 0): a non-finite one means the run diverged."""
    keys = [key for key, w in zip(("op1_train_loss", "op2_train_loss", "link_loss"), spec.k) if w > 0]
    if args.alias_groups > 1 and (spec.k[1] > 0 or spec.k[2] > 0):
        keys.append("meta_loss")  # the meta groups' tables and linkages count in the k2 and k3 losses
    return keys


def train_group(args, specs, device, echo, rank=0, world_size=1):
    """Train the runs in `specs` together; returns one dict per run: final metrics, per-eval history, the step
    it stopped at, log path. A run stops at --steps, or once its held-out table-1 accuracy has not improved
    for --patience steps; from then on its result is frozen (the group trains on until every run stopped)."""
    group = RunGroup(args, specs, device)
    logs = RunLogs(args, specs, device, echo, rank, world_size)
    flops_per_step = 3 * matmul_flops_per_example(args) * group.train_inputs.shape[0] * group.train_inputs.shape[1]
    peak = peak_flops(device)
    history = [[] for _ in specs]
    best, best_step, stop_step = [-1.0] * len(specs), [0] * len(specs), [None] * len(specs)
    train_time_ms, timed_steps = 0.0, 0
    # Steps are timed together between two evaluations, not one by one: a wait for the GPU around every step
    # would keep it from running ahead of the CPU. Step 0 (compilation) is not timed.
    window_start, window_steps = None, 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            if window_start is not None:
                sync()
                train_time_ms += (time.perf_counter() - window_start) * 1000
                timed_steps += window_steps
                window_start = None
            metrics = group.evaluate()
            step_avg = f"{train_time_ms / timed_steps:.2f}" if timed_steps else "nan"
            active = [stop_step[r] is None for r in range(len(specs))]
            logs.each([f"step:{step}/{args.steps} val_loss:{m['op1_test_loss']:.4f} train_time:{train_time_ms:.0f}ms "
                       f"step_avg:{step_avg}ms" if a else None for m, a in zip(metrics, active)])
            logs.each([f"step:{step}/{args.steps} " + " ".join(f"{key}:{m[key]:.4f}" for key in METRIC_KEYS)
                       if a else None for m, a in zip(metrics, active)])
            for r, m in enumerate(metrics):
                if not active[r]:
                    continue
                diverged = next((key for key in trained_losses(args, specs[r]) if not math.isfinite(m[key])), None)
                if diverged:
                    message = (f"run {run_name(args.p, specs[r])} seed {specs[r].seed}: the training loss {diverged} "
                               f"is {m[diverged]} at step {step}; lower --lr (now {args.lr})")
                    # the log of every run still training ends here: say why in each, not only on stderr
                    logs.each([f"oocl.py: error: {message}" if a else None for a in active], echo=False)
                    logs.close()
                    die(message)
                history[r].append(dict(step=step, **m))
                if m["op1_test_acc"] > best[r]:
                    best[r], best_step[r] = m["op1_test_acc"], step
                if step == args.steps or (args.patience and step - best_step[r] >= args.patience):
                    stop_step[r] = step
            logs.each([f"stopped at step {step}: held-out table-1 accuracy {best[r]:.4f} at step {best_step[r]} "
                       f"not improved for {step - best_step[r]} steps (--patience {args.patience})"
                       if a and stop_step[r] is not None and step < args.steps else None
                       for r, a in enumerate(active)])
            if not echo:
                accs = [m["op1_test_acc"] for m in metrics]
                say(f"step:{step}/{args.steps} runs:{len(specs)} running:{stop_step.count(None)} "
                    f"op1_test_acc mean:{sum(accs) / len(accs):.3f} min:{min(accs):.3f} max:{max(accs):.3f} "
                    f"train_time:{train_time_ms:.0f}ms step_avg:{step_avg}ms")
        if None not in stop_step:
            break
        if step > 0 and window_start is None:
            sync()
            window_start, window_steps = time.perf_counter(), 0
        group.train_step(step)
        if step == 0:
            sync()
        else:
            window_steps += 1
        if not args.quiet:  # between evaluations the time of the steps queued so far, not waited for
            approx_ms = train_time_ms + (1000 * (time.perf_counter() - window_start) if window_start is not None else 0)
            line = (f"step:{step + 1}/{args.steps} train_time:{approx_ms:.0f}ms "
                    f"step_avg:{approx_ms / max(timed_steps + window_steps, 1):.2f}ms")
            logs.each([line if s is None else None for s in stop_step])
    if timed_steps:
        seconds = train_time_ms / 1000 / timed_steps
        mfu = f"{flops_per_step / seconds / peak:.4f}" if peak else "n/a"
        logs.each([f"ms_per_step:{seconds * 1000:.2f} runs:{len(specs)} examples_per_s:{group.train_count / seconds:.0f} "
                   f"tokens_per_s:{3 * group.train_count / seconds:.0f} mfu:{mfu}"] * len(specs))
    logs.each([peak_memory_line(device)] * len(specs))
    logs.close()
    return [dict(spec=spec, final=h[-1], history=h, stop_step=s, log=path)
            for spec, h, s, path in zip(specs, history, stop_step, logs.paths)]


def train_size_estimate(p, spec):
    return (spec.k[0] > 0) * (1 - spec.holdout1) * p * p + (spec.k[1] > 0) * (1 - spec.holdout2) * p * p \
        + (spec.k[2] > 0) * p


def run_groups(args, specs, world_size=1):
    """The grid cut into groups trained together: runs ordered by training-set size (similar sizes waste
    less compute on padding), --max_runs_per_batch at a time (0: one group per rank)."""
    order = sorted(range(len(specs)), key=lambda i: train_size_estimate(args.p, specs[i]))
    size = args.max_runs_per_batch or math.ceil(len(specs) / world_size)
    return [order[start:start + size] for start in range(0, len(specs), size)]


def share_of_rank(args, specs, groups, rank, world_size):
    """The groups rank `rank` trains: largest group first to the least loaded rank (cost of a group ~ runs x
    padded training-set size), so the ranks finish together."""
    cost = lambda g: len(g) * max(train_size_estimate(args.p, specs[i]) for i in g)
    load, mine = [0.0] * world_size, []
    for g in sorted(groups, key=cost, reverse=True):
        least = load.index(min(load))
        load[least] += cost(g)
        if least == rank:
            mine.append(g)
    return mine


def train_runs(args, specs, echo=False, device=None, rank=0, world_size=1):
    """Train this rank's share of `specs` -> {index in specs: result}; prints progress per finished group."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mine = share_of_rank(args, specs, run_groups(args, specs, world_size), rank, world_size)
    total, results, start = sum(map(len, mine)), {}, time.perf_counter()
    for chunk in mine:
        for i, result in zip(chunk, train_group(args, [specs[i] for i in chunk], device, echo, rank, world_size)):
            results[i] = result
        if not echo:
            say(f"progress: rank {rank}/{world_size} runs done {len(results)}/{total} (grid {len(specs)}) "
                f"elapsed {time.perf_counter() - start:.0f}s")
    return results


# ---- Sweep outputs ----
# runs.csv (one row per run), history.csv (every evaluation of every run), summary.csv and table.md (one row
# per cell and arm: mean ± std over seeds; the effect = paired difference to (1,0,0) with the same seed and
# split), heatmap.png and curves.png; sweep.json (the settings and the commands, for `merge`). Metrics of a
# loss that a run does not train (k2 = 0: table 2, k3 = 0: linkages) are left blank.

SWEEP_OUTPUTS = ["table.md", "summary.csv", "runs.csv", "history.csv", "heatmap.png", "curves.png", "sweep.json"]
TABLE_KEYS = ["op1_test_acc", "op1_covered_acc", "op1_uncovered_acc", "op2_test_acc", "link_acc", "cos_in",
              "cos_in_other", "cos_out", "cos_out_other"]
BASELINE = (1.0, 0.0, 0.0)


def best_op1_test_acc(result):
    return max(h["op1_test_acc"] for h in result["history"])


def solved_step(result):
    """The first evaluated step with held-out table-1 accuracy >= SOLVED_ACC, or None."""
    return next((h["step"] for h in result["history"] if h["op1_test_acc"] >= SOLVED_ACC), None)


def trained(spec, key):
    """False for the metrics of a table a run never trains on."""
    return not ((key.startswith("op2") and spec.k[1] == 0) or (key.startswith("link") and spec.k[2] == 0))


def mean_std(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def arm_key(spec):
    return spec.k, spec.hardwired


def summarise(results):
    """Mean/std over seeds per (holdout1, holdout2, arm) -> rows for the table."""
    cells = {}
    for res in results:
        s = res["spec"]
        cells.setdefault((s.holdout1, s.holdout2, arm_key(s)), []).append(res)
    rows = []
    for (h1, h2, arm), runs in cells.items():
        spec = runs[0]["spec"]
        row = dict(holdout1=h1, holdout2=h2, arm=arm_label(spec), seeds=len(runs))
        for key in TABLE_KEYS:
            mean, std = mean_std([r["final"][key] for r in runs]) if trained(spec, key) else (None, None)
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        row["op1_test_acc_best_mean"] = mean_std([best_op1_test_acc(r) for r in runs])[0]
        solved = [solved_step(r) for r in runs if solved_step(r) is not None]
        row["solved"] = len(solved)
        row["solved_step_mean"] = sum(solved) / len(solved) if solved else None
        row["stop_step_mean"] = sum(r["stop_step"] for r in runs) / len(runs)
        baseline = cells.get((h1, h2, (BASELINE, False)))
        if baseline is not None and arm != (BASELINE, False):
            base_acc = {r["spec"].seed: r["final"]["op1_test_acc"] for r in baseline}
            diffs = [r["final"]["op1_test_acc"] - base_acc[r["spec"].seed] for r in runs if r["spec"].seed in base_acc]
            row["effect_mean"], row["effect_std"] = mean_std(diffs) if diffs else (None, None)
            row["effect_wins"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
        else:
            row["effect_mean"] = row["effect_std"] = row["effect_wins"] = None
        rows.append(row)
    return rows


def cell_text(row, key, digits=3):
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if mean is None:
        return ""
    return f"{mean:+.{digits}f} ± {std:.{digits}f}" if key == "effect" else f"{mean:.{digits}f} ± {std:.{digits}f}"


def check_out_dir_free(args):
    """The outputs have fixed names, so a second sweep into one --out_dir (e.g. two parts of a sweep split by seed)
    would replace the first one's. Checked when a sweep starts, not in validate: code that only parses arguments
    (the GPU tests) must not fail on what an earlier sweep left in the default --out_dir."""
    found = [name for name in SWEEP_OUTPUTS if os.path.exists(os.path.join(args.out_dir, name))]
    if found and not args.overwrite:
        die(f"--out_dir {args.out_dir} already holds the outputs of another sweep ({', '.join(found)}), which these "
            f"outputs would replace; pass another --out_dir (one per sweep, and per part of a sweep split by seed), "
            f"delete those files, or pass --overwrite to replace them")


def write_sweep_outputs(args, results, commands):
    """The sweep's outputs in args.out_dir; `commands`: the command that trained the runs (a merged table: the
    parts' commands, then the merge's)."""
    os.makedirs(args.out_dir, exist_ok=True)
    if os.path.exists(os.path.join(args.out_dir, "sweep.json")):  # written last: a folder holds it once complete
        os.remove(os.path.join(args.out_dir, "sweep.json"))
    with open(os.path.join(args.out_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_name", "p", "holdout1", "holdout2", "k1", "k2", "k3", "hardwired", "seed", "steps",
                         "stop_step", "solved_step", "op1_test_acc_best"] + METRIC_KEYS + ["log"])
        for res in results:
            s, m = res["spec"], res["final"]
            writer.writerow([run_name(args.p, s), args.p, s.holdout1, s.holdout2, *s.k, int(s.hardwired), s.seed,
                             args.steps, res["stop_step"], "" if solved_step(res) is None else solved_step(res),
                             f"{best_op1_test_acc(res):.6f}"]
                            + [f"{m[key]:.6f}" if trained(s, key) else "" for key in METRIC_KEYS] + [res["log"]])
    with open(os.path.join(args.out_dir, "history.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_name", "seed", "step"] + METRIC_KEYS)
        for res in results:
            for h in res["history"]:
                writer.writerow([run_name(args.p, res["spec"]), res["spec"].seed, h["step"]]
                                + [f"{h[key]:.6f}" for key in METRIC_KEYS])
    rows = summarise(results)
    with open(os.path.join(args.out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow(["" if v is None else v for v in row.values()])
    lines = [f"Held-out table-1 accuracy, p={args.p} (chance {1 / args.p:.3f}), at the end of each run (--steps "
             f"{args.steps}, --patience {args.patience or 'off'}), mean ± std over seeds. covered / uncovered: held-out "
             f"table-1 pairs whose alias pair is / is not in table 2's training set. effect: paired difference to "
             f"(1,0,0) with the same seed (wins = seeds where it is > 0). best: highest accuracy at any evaluation; "
             f"solved: seeds reaching {SOLVED_ACC:g}, at mean step. cos in / out: cosine of i and i+p (block-0 input, "
             f"head column), beside it the cosine of i and another number's alias. Blank: a table the run does not "
             f"train.", "",
             "| holdout1 | holdout2 | k1 k2 k3 | seeds | op1 test acc | covered | uncovered | effect vs (1,0,0) | wins "
             "| best | solved (step) | stop step | op2 test acc | link acc | cos in (other) | cos out (other) |",
             "|" + "---|" * 16]
    for row in rows:
        solved = f"{row['solved']}/{row['seeds']}" + (f" ({row['solved_step_mean']:.0f})" if row["solved"] else "")
        lines.append(
            f"| {fmt(row['holdout1'])} | {fmt(row['holdout2'])} | {row['arm']} | {row['seeds']} | "
            f"{cell_text(row, 'op1_test_acc')} | {cell_text(row, 'op1_covered_acc')} | "
            f"{cell_text(row, 'op1_uncovered_acc')} | {cell_text(row, 'effect')} | {row['effect_wins'] or ''} | "
            f"{row['op1_test_acc_best_mean']:.3f} | {solved} | {row['stop_step_mean']:.0f} | "
            f"{cell_text(row, 'op2_test_acc')} | {cell_text(row, 'link_acc')} | "
            f"{row['cos_in_mean']:.2f} ({row['cos_in_other_mean']:.2f}) | "
            f"{row['cos_out_mean']:.2f} ({row['cos_out_other_mean']:.2f}) |")
    if len(commands) == 1:
        lines += ["", f"Command: `{commands[0]}`"]
    else:
        lines += ["", "Commands (the parts of the sweep, then the merge that wrote this table):"]
        lines += [f"- `{command}`" for command in commands]
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_heatmap(args, rows, os.path.join(args.out_dir, "heatmap.png"))
    plot_curves(args, results, os.path.join(args.out_dir, "curves.png"))
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(dict(hyperparameters=dataclasses.asdict(args), commands=commands), f, indent=1)
    return "\n".join(lines)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(args, rows, path):
    """One panel per arm: mean final table-1 test accuracy over the holdout grid."""
    plt = pyplot()
    h1s, h2s = sorted(set(args.holdout1)), sorted(set(args.holdout2))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, axes = plt.subplots(1, len(arms), figsize=(1.0 + 0.9 * len(h2s) * len(arms) + 1.5 * len(arms),
                                                    1.5 + 0.7 * len(h1s)), squeeze=False)
    cell = {(r["holdout1"], r["holdout2"], r["arm"]): r for r in rows}
    for ax, arm in zip(axes[0], arms):
        grid_acc = [[cell[(h1, h2, arm)]["op1_test_acc_mean"] for h2 in h2s] for h1 in h1s]
        image = ax.imshow(grid_acc, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i, h1 in enumerate(h1s):
            for j, h2 in enumerate(h2s):
                c = cell[(h1, h2, arm)]
                ax.text(j, i, f"{c['op1_test_acc_mean']:.2f}\n{c['solved']}/{c['seeds']}", ha="center", va="center",
                        color="white" if c["op1_test_acc_mean"] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(h2s)), [fmt(h) for h in h2s])
        ax.set_yticks(range(len(h1s)), [fmt(h) for h in h1s])
        ax.set_xlabel("holdout2 (alias table)")
        ax.set_title(f"k = {arm}", fontsize=9)
    axes[0][0].set_ylabel("holdout1 (original table)")
    fig.colorbar(image, ax=axes[0].tolist(), label="table-1 held-out accuracy")
    fig.suptitle(f"(x²+y²) mod {args.p}: final held-out table-1 accuracy (mean over seeds; solved/seeds)", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def seed_mean_curve(runs, key):
    """Steps and the mean over seeds of `key`; a run that stopped early holds its final value."""
    steps = sorted({h["step"] for r in runs for h in r["history"]})
    curves = []
    for r in runs:
        by_step, value, curve = {h["step"]: h[key] for h in r["history"]}, r["history"][0][key], []
        for s in steps:
            value = by_step.get(s, value)
            curve.append(value)
        curves.append(curve)
    return steps, [sum(c) / len(c) for c in zip(*curves)]


def plot_curves(args, results, path):
    """Per holdout cell (columns): held-out table-1 accuracy on covered (solid) and uncovered (dashed) pairs,
    and the i / i+p cosine of block 0's input (solid; dotted: i and another number's alias), per arm, over
    training, mean over seeds."""
    plt = pyplot()
    cells = list(dict.fromkeys((r["spec"].holdout1, r["spec"].holdout2) for r in results))
    arms = list(dict.fromkeys(arm_key(r["spec"]) for r in results))
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 6.5), squeeze=False, sharex=True)
    for col, (h1, h2) in enumerate(cells):
        for n, arm in enumerate(arms):
            runs = [r for r in results if (r["spec"].holdout1, r["spec"].holdout2) == (h1, h2) and arm_key(r["spec"]) == arm]
            color, label = f"C{n}", arm_label(runs[0]["spec"])
            for key, style, row in (("op1_covered_acc", "-", 0), ("op1_uncovered_acc", "--", 0),
                                    ("cos_in", "-", 1), ("cos_in_other", ":", 1)):
                steps, values = seed_mean_curve(runs, key)
                axes[row][col].plot(steps, values, style, color=color, label=label if style == "-" else None)
        axes[0][col].set_title(f"holdout1 {fmt(h1)}, holdout2 {fmt(h2)}", fontsize=9)
        axes[1][col].set_xlabel("step")
    axes[0][0].set_ylabel("held-out table-1 acc\n(solid covered, dashed uncovered)")
    axes[1][0].set_ylabel("cos(i, i+p) at block 0 input\n(dotted: i vs another alias)")
    axes[0][0].legend(fontsize=7, title="k1 k2 k3", title_fontsize=7)
    fig.suptitle(f"(x²+y²) mod {args.p}, mean over seeds", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---- Merging the parts of a sweep ----
# A sweep too long for one command (p = 113 in 10-minute GPU calls) runs as parts, one seed (or a few) per
# --out_dir; `merge` reads the parts' runs.csv, history.csv and sweep.json and writes the outputs that one sweep
# over all their seeds would have written: means over seeds, paired effects, plots. Only settings that change no
# result may differ between the parts.

EXECUTION_SETTINGS = {"seeds", "log_dir", "out_dir", "overwrite", "max_runs_per_batch", "threads", "compile", "quiet"}


def build_merge_parser():
    parser = argparse.ArgumentParser(
        prog="oocl.py merge", allow_abbrev=False,
        usage="python oocl.py merge --out_dir DIR PART [PART ...]",
        description="One table from the parts of a sweep split by seed: each PART is the --out_dir of an "
                    "`oocl.py sweep` with the same settings and other seeds.")
    parser.add_argument("parts", nargs="+", metavar="PART", help="a part's --out_dir (holds its sweep.json)")
    parser.add_argument("--out_dir", "--out-dir", dest="out_dir", action=Once, required=True,
                        help="where the merged outputs go (records/ only when pointed there)")
    parser.add_argument("--overwrite", action=Flag, default=False, help="replace the outputs already in --out_dir")
    return parser


def grid_setting(args, name):
    """A setting as merge compares it: the grid's lists in any order."""
    if name == "k":
        return sorted(k_triples(args))
    return sorted(getattr(args, name)) if name in ("holdout1", "holdout2") else getattr(args, name)


def read_part(part):
    """A part's settings, commands and runs: {(run_name, seed): (runs.csv row, [history rows])}."""
    if not os.path.isdir(part):
        die(f"{part} is not a folder; pass the --out_dir of each part of the sweep")
    missing = [name for name in ("sweep.json", "runs.csv", "history.csv") if not os.path.isfile(os.path.join(part, name))]
    if missing:
        die(f"{part} holds no {' or '.join(missing)}: pass the --out_dir of a finished `oocl.py sweep` (a part that "
            f"was stopped, or written by an oocl.py older than `merge`, has to be run again)")
    try:
        with open(os.path.join(part, "sweep.json")) as f:
            saved = json.load(f)
        settings = Hyperparameters(**saved["hyperparameters"])
        commands = list(saved["commands"])
        with open(os.path.join(part, "runs.csv"), newline="") as f:
            runs = {(row["run_name"], int(row["seed"])): (row, []) for row in csv.DictReader(f)}
        with open(os.path.join(part, "history.csv"), newline="") as f:
            for row in csv.DictReader(f):
                runs[(row["run_name"], int(row["seed"]))][1].append(
                    dict(step=int(row["step"]), **{key: float(row[key]) for key in METRIC_KEYS}))
        for (name, seed), (row, history) in runs.items():
            # the last evaluation is the run's result: a history.csv cut short would give a wrong final row
            if history and history[-1]["step"] != int(row["stop_step"]):
                die(f"{part}: run {name} seed {seed} stopped at step {row['stop_step']} (runs.csv) but its history.csv "
                    f"ends at step {history[-1]['step']}: the part is incomplete; run that part again")
    except (ValueError, KeyError, TypeError) as exc:
        die(f"{part}: its sweep.json, runs.csv or history.csv cannot be read ({type(exc).__name__}: {exc}); "
            f"run that part again")
    return settings, commands, runs


def merge_parts(argv):
    options = build_merge_parser().parse_args(argv)
    out_dir = os.path.realpath(options.out_dir)
    if out_dir in {os.path.realpath(part) for part in options.parts}:
        die(f"--out_dir {options.out_dir} is one of the parts: the merge would replace that part's outputs; "
            f"pass a folder of its own")
    parts = {}
    for part in options.parts:
        if os.path.realpath(part) in {os.path.realpath(p) for p in parts}:
            die(f"{part} is given twice; list each part once")
        parts[part] = read_part(part)
    first = options.parts[0]
    settings, part_of_seed = parts[first][0], {}
    for part, (other, _, _) in parts.items():
        differ = [f"--{f.name} {getattr(settings, f.name)} in {first} but {getattr(other, f.name)} in {part}"
                  for f in dataclasses.fields(Hyperparameters)
                  if f.name not in EXECUTION_SETTINGS
                  and grid_setting(settings, f.name) != grid_setting(other, f.name)]
        if differ:
            die("the parts are not one sweep: " + "; ".join(differ) + " (only the seeds and the execution settings "
                "may differ; merge the parts that share their settings)")
        for seed in other.seeds:
            if seed in part_of_seed:
                die(f"seed {seed} is in two parts, {part_of_seed[seed]} and {part}; each seed's runs may be counted "
                    f"once: leave one of those parts out")
            part_of_seed[seed] = part
    seeds = list(part_of_seed)
    args = dataclasses.replace(settings, seeds=seeds, out_dir=options.out_dir, overwrite=options.overwrite)
    found = {key: value for _, _, runs in parts.values() for key, value in runs.items()}
    results = []
    for spec in grid(args):
        key = (run_name(args.p, spec), spec.seed)
        if key not in found or not found[key][1]:
            die(f"no results of run {key[0]} seed {key[1]} in the parts: a part's runs.csv or history.csv is "
                f"incomplete; run that part again")
        row, history = found[key]
        results.append(dict(spec=spec, final=history[-1], history=history, stop_step=int(row["stop_step"]),
                            log=row["log"]))
    check_writable_dir(args.out_dir, "out_dir")
    check_out_dir_free(args)
    commands = [command for _, part_commands, _ in parts.values() for command in part_commands]
    commands.append(f"python {script_path()} merge " + shlex.join(argv))
    say(write_sweep_outputs(args, results, commands))
    say(f"wrote {args.out_dir}/{', '.join(SWEEP_OUTPUTS)}: {len(results)} runs, seeds {' '.join(map(str, seeds))}")
    return results


# ---- Main ----
# Under torchrun (./run.sh oocl.py sweep ...), every rank trains its share of the grid's run groups on its own
# device (cuda:LOCAL_RANK) and writes those runs' logs; rank 0 gathers the results and writes the sweep's
# outputs. A run's result does not depend on the rank that trains it. A single run trains on rank 0 only.


def distributed_env():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def rank_device(local_rank):
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def main(argv):
    if argv and argv[0] == "merge":  # reads and writes files only: under torchrun, rank 0 does it
        return merge_parts(argv[1:]) if distributed_env()[0] == 0 else None
    mode, args = parse_args(argv)
    specs = grid(args, mode)
    if mode == "sweep":
        check_out_dir_free(args)
    rank, world_size, local_rank = distributed_env()
    if mode == "single":
        if rank != 0:
            say(f"oocl.py: rank {rank} of {world_size}: a single run trains on rank 0 only; this rank exits")
            return None
        result = train_runs(args, specs, echo=True, device=rank_device(local_rank))[0]
        say(f"log: {result['log']}")
        return result
    if rank == 0:
        say(f"sweep: {len(specs)} runs ({len(args.holdout1)} holdout1 x {len(args.holdout2)} holdout2 x "
            f"{len(specs) // (len(args.holdout1) * len(args.holdout2) * len(args.seeds))} arms x {len(args.seeds)} "
            f"seeds), p={args.p}, {args.steps} steps, {world_size} process(es)")
    if world_size > 1:
        dist.init_process_group("gloo")  # the ranks exchange only the results: python objects on the CPU
    mine = train_runs(args, specs, echo=False, device=rank_device(local_rank), rank=rank, world_size=world_size)
    if world_size > 1:
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        dist.barrier()  # teardown right after the gather aborted 10 of 130 two-process CPU runs, 2 of 200 with this
        dist.destroy_process_group()
        if rank != 0:
            return None
        mine = {i: result for part in gathered for i, result in part.items()}
    results = [mine[i] for i in range(len(specs))]
    command = f"python {script_path()} sweep " + shlex.join(argv[1:])
    say(write_sweep_outputs(args, results, [command]))
    say(f"wrote {args.out_dir}/{', '.join(SWEEP_OUTPUTS)}")
    return results


def sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)  # `timeout` and `kill` stop a run with SIGTERM: as Ctrl-C
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a crash: one line, no traceback
        if distributed_env()[0] == 0:
            print("oocl.py: interrupted: the run logs so far are kept in --log_dir; a sweep's table was not written",
                  file=sys.stderr)
        sys.exit(130)
    if distributed_env()[1] > 1:
        # Under torchrun the work is done and written: skip the interpreter's shutdown, in which a thread left by gloo
        # aborted 2 of 167 two-process CPU sweeps after main returned (torchrun then killed rank 0 before it wrote the
        # sweep's outputs); 0 of 441 with this
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
