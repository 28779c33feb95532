# Out-of-context learning (OOCL) on (x^2 + y^2) mod p with aliased tokens.
#
# Question: hold out so much of the operation table that a model trained on it alone cannot generalise,
# then add a second copy of the table written with alias tokens (its own, independently held-out part)
# plus p "linkage" facts i -> i+p. Does the model connect the two tables through the linkages and
# generalise on table 1? Loss = k1*loss_op1 + k2*loss_op2 + k3*loss_linkages; the answer is the
# contrast between (k1, k2, k3) = (1, 0, 0) and (1, 1, 1).
#
#   python oocl.py --p 113 --holdout1 0.8 --holdout2 0.8 --k 1 1 1 --steps 10000 --seed 0
#   python oocl.py sweep --holdout1 0.5 0.7 0.9 --holdout2 0.5 0.7 0.9 --k 1 0 0 1 1 1 --seeds 0 1 2
#   python oocl.py --preset tiny
#
# A single run is a sweep of one: every run of a sweep trains at the same time with its own weights,
# its own data split, its own loss weights and its own AdamW state, held as tensors with a leading run
# dimension and multiplied with batched matmuls (bmm). Runs never interact, so a run trained inside a
# sweep ends where the same run trained alone ends.
import csv
import dataclasses
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ---- Hyperparameters ----


@dataclass
class Hyperparameters:
    # task
    p: int = 113                      # prime modulus; vocabulary is 2p+4
    holdout1: list = field(default_factory=lambda: [0.8])  # fraction of table 1 (originals) held out
    holdout2: list = field(default_factory=lambda: [0.8])  # fraction of table 2 (aliases) held out
    k: list = field(default_factory=lambda: [1.0, 1.0, 1.0])  # loss weights (k1, k2, k3), several triples in a sweep
    seeds: list = field(default_factory=lambda: [0])  # `--seed S` is accepted for a single run
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
    cooldown_frac: float = 0.25       # lr decays linearly to 0 over this last part: the final metrics are
                                      # read after the loss spikes that full-batch Adam has at constant lr
    # evaluation and output
    eval_every: int = 100
    log_dir: str = "logs"
    out_dir: str = "records/oocl"     # sweep table, CSV and heatmap
    # execution
    max_runs_per_batch: int = 0       # 0 = the whole grid at once; else train it in groups of this many runs
    threads: int = 0                  # torch CPU threads (0 = torch's default)
    compile: int = -1                 # -1: torch.compile on CUDA only; 0: never; 1: always
    quiet: int = 0                    # 1: no per-step stdout lines


PRESETS = {
    # CPU smoke config: a small table that a small model memorises in a few seconds
    "tiny": dict(p=11, holdout1=[0.5], holdout2=[0.5], model_dim=32, num_heads=2, mlp_dim=64,
                 steps=300, lr=3e-3, eval_every=100, threads=1),
}

LIST_FIELDS = {"holdout1": float, "holdout2": float, "k": float, "seeds": int}
SCALAR_ALIASES = {"seed": "seeds"}


def die(message):
    raise SystemExit(f"oocl.py: error: {message}")


def parse_args(argv):
    """`[sweep] [--preset NAME] [--field value ...] [--field=value]` -> (mode, Hyperparameters)."""
    mode = "single"
    if argv and argv[0] == "sweep":
        mode, argv = "sweep", argv[1:]
    raw, name = {}, None
    for arg in argv:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            name = SCALAR_ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
            raw[name] = [value] if value else []
        elif name is None:
            die(f"unexpected argument {arg!r}; options look like --steps 1000 (run `python oocl.py --preset tiny` to try)")
        else:
            raw[name].append(arg)
    overrides = {}
    if "preset" in raw:
        preset = " ".join(raw.pop("preset"))
        if preset not in PRESETS:
            die(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        overrides.update(PRESETS[preset])
    types = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}
    for name, values in raw.items():
        if name not in types:
            die(f"unknown option --{name}; known options: {', '.join('--' + n for n in types)}")
        try:
            if name in LIST_FIELDS:
                overrides[name] = [LIST_FIELDS[name](v) for v in values]
            else:
                if len(values) != 1:
                    die(f"--{name} takes exactly one value, got {len(values)}")
                overrides[name] = types[name](values[0])
        except ValueError as exc:
            die(f"bad value for --{name}: {exc}")
    args = Hyperparameters(**overrides)
    validate(args, mode)
    return mode, args


def is_prime(n):
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def validate(args, mode):
    if not is_prime(args.p):
        die(f"--p must be a prime (the task is arithmetic mod p), got {args.p}; try 23, 59, 97 or 113")
    for name in ("holdout1", "holdout2"):
        values = getattr(args, name)
        if not values:
            die(f"--{name} needs at least one value in [0, 1)")
        for h in values:
            if not 0.0 <= h < 1.0:
                die(f"--{name} must be a fraction in [0, 1) (at least one pair must stay in training), got {h}")
    if len(args.k) == 0 or len(args.k) % 3:
        die(f"--k takes the three loss weights k1 k2 k3 (a sweep: several triples), got {len(args.k)} values: {args.k}")
    for triple in k_triples(args):
        if any(w < 0 for w in triple):
            die(f"loss weights must be >= 0, got {triple}")
        if not any(w > 0 for w in triple):
            die(f"loss weights {triple} are all zero: nothing would be trained; set at least one of k1 k2 k3 > 0")
    if not args.seeds:
        die("--seeds needs at least one integer")
    if mode == "single" and (len(args.holdout1), len(args.holdout2), len(args.k), len(args.seeds)) != (1, 1, 3, 1):
        die("a single run takes one --holdout1, one --holdout2, exactly three --k values and one --seed; "
            "for a grid use `python oocl.py sweep ...`")
    if args.model_dim % args.num_heads:
        die(f"--model_dim {args.model_dim} must be divisible by --num_heads {args.num_heads}")
    if not 0.0 <= args.cooldown_frac <= 1.0:
        die(f"--cooldown_frac must be in [0, 1], got {args.cooldown_frac}")
    if args.steps < 1 or args.eval_every < 1 or args.num_layers < 1:
        die("--steps, --eval_every and --num_layers must be >= 1")


def k_triples(args):
    return [tuple(args.k[i:i + 3]) for i in range(0, len(args.k), 3)]


@dataclass(frozen=True)
class RunSpec:
    holdout1: float
    holdout2: float
    k: tuple
    seed: int


def fmt(v):
    return f"{v:g}"


def run_name(p, spec):
    return f"oocl_ssq_{p}_{fmt(spec.holdout1)}_{fmt(spec.holdout2)}_" + "_".join(fmt(w) for w in spec.k)


def grid(args):
    return [RunSpec(h1, h2, k, s) for h1 in args.holdout1 for h2 in args.holdout2
            for k in k_triples(args) for s in args.seeds]


# ---- Data ----
# Vocabulary (2p+4): 0..p-1 numbers ("originals"), p..2p-1 their aliases (token i+p means i), then four
# special tokens. Every example is 4 tokens; the model reads the first 3 and is trained on the 4th only:
#   table 1 row:  x    y    END  (x^2+y^2) mod p          (all originals)
#   table 2 row:  x+p  y+p  END  ((x^2+y^2) mod p) + p    (all aliases)
#   linkage:      DEF  i    END  i+p                       (predict the alias of i)
# RANDOM and NOT_RANDOM are kept only so the vocabulary matches the original experiment.
# The split is over unordered pairs {x, y}: (x, y) and (y, x) are always on the same side, otherwise
# commutativity alone would answer part of the "held-out" rows.
TABLE1, TABLE2, LINKS = 0, 1, 2


def special_tokens(p):
    return dict(END=2 * p, RANDOM=2 * p + 1, NOT_RANDOM=2 * p + 2, DEFINE=2 * p + 3)


def vocab_size(p):
    return 2 * p + 4


def build_sequences(p):
    """All 2p^2+p examples: (tokens [N, 4], group [N]). Row x*p+y of each table is the pair (x, y)."""
    sp = special_tokens(p)
    x = torch.arange(p).repeat_interleave(p)
    y = torch.arange(p).repeat(p)
    result = (x * x + y * y) % p
    end = torch.full_like(x, sp["END"])
    table1 = torch.stack([x, y, end, result], 1)
    table2 = torch.stack([x + p, y + p, end, result + p], 1)
    i = torch.arange(p)
    links = torch.stack([torch.full_like(i, sp["DEFINE"]), i, torch.full_like(i, sp["END"]), i + p], 1)
    tokens = torch.cat([table1, table2, links])
    group = torch.cat([torch.full((p * p,), TABLE1), torch.full((p * p,), TABLE2), torch.full((p,), LINKS)])
    return tokens, group


def heldout_rows(p, holdout, generator):
    """Boolean [p*p] mask of held-out table rows: floor(holdout * #unordered pairs) pairs, both orders."""
    xs, ys = torch.triu_indices(p, p)  # unordered pairs x <= y
    n_held = int(math.floor(holdout * xs.numel()))
    pick = torch.randperm(xs.numel(), generator=generator)[:n_held]
    held = torch.zeros(p, p, dtype=torch.bool)
    held[xs[pick], ys[pick]] = True
    held[ys[pick], xs[pick]] = True
    return held.flatten()


def make_split(p, holdout1, holdout2, seed):
    """Boolean [2p^2+p] mask, True = training example. The two tables' held-out sets are drawn one after
    the other from one seeded generator, so they are independent; linkages are always in training.
    The split depends only on (p, holdouts, seed), not on k, so runs that differ in k are paired."""
    generator = torch.Generator().manual_seed(1_000_003 * seed + 17)
    held1 = heldout_rows(p, holdout1, generator)
    held2 = heldout_rows(p, holdout2, generator)
    return torch.cat([~held1, ~held2, torch.ones(p, dtype=torch.bool)])


def example_weights(p, spec, group, is_train):
    """Per-example loss weight so that sum(w * CE) = k1*mean CE(table 1 train) + k2*... + k3*... ."""
    weights = torch.zeros(group.numel())
    for g in (TABLE1, TABLE2, LINKS):
        rows = is_train & (group == g)
        if spec.k[g] > 0 and rows.any():
            weights[rows] = spec.k[g] / rows.sum().item()
    return weights


# ---- Model ----
# The speedrun block at grokking size, written with a leading run dimension R on every weight so R
# independent models train at once: two RMS-normed token embeddings x00, x01; the residual starts as x00
# and before every block x = l0*x + l1*x00 + l2*x01 with learned (l0, l1, l2) initialised (1, 0, 0);
# attention with RMS-normed q, k, v per head and logit scale 0.12; MLP with RMS-normed input and ReLU^2;
# no biases, no learned norm weights, zero-initialised output projections and head. There is no positional
# embedding: the op is commutative and the answer position is fixed, and the model is then exactly
# symmetric in (x, y).


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def init_params(args, seed, device):
    """One run's weights, from its own seeded generator (the same for a run alone or inside a sweep)."""
    generator = torch.Generator().manual_seed(2_000_003 * seed + 29)
    d, V = args.model_dim, vocab_size(args.p)

    def uniform(fan_in, fan_out):  # std 0.5/sqrt(fan_in), as the speedrun's linear layers
        bound = 0.5 * math.sqrt(3.0 / fan_in)
        return (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound

    params = {
        "embed00": torch.randn(V, d, generator=generator),
        "embed01": torch.randn(V, d, generator=generator),
        "lambdas": torch.tensor([1.0, 0.0, 0.0]).repeat(args.num_layers, 1),
        "head": torch.zeros(d, V),
    }
    for layer in range(args.num_layers):
        params[f"qkv{layer}"] = uniform(d, 3 * d)
        params[f"attn_out{layer}"] = torch.zeros(d, d)
        params[f"mlp_in{layer}"] = uniform(d, args.mlp_dim)
        params[f"mlp_out{layer}"] = torch.zeros(args.mlp_dim, d)
    return {name: t.to(device) for name, t in params.items()}


def stack_params(per_run):
    return {name: torch.stack([p[name] for p in per_run]).requires_grad_(True) for name in per_run[0]}


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


def forward(params, tokens, num_layers, num_heads):
    """tokens [R, N, 3] (each run its own examples) -> answer logits [R, N, V].
    Until the first attention everything depends on the token alone, so block 0's mixing and q, k, v are
    computed once per vocabulary entry and then gathered: exact, and ~3x cheaper than per position.
    The last block computes only the last position, the only one the answer reads."""
    R = tokens.size(0)
    run = torch.arange(R, device=tokens.device).view(R, 1, 1)
    gather = lambda table: table[run, tokens]  # [R, V, ...] -> [R, N, 3, ...]
    x00_vocab, x01_vocab = norm(params["embed00"]), norm(params["embed01"])
    x = x00_vocab
    for layer in range(num_layers):
        last = layer == num_layers - 1
        lam = params["lambdas"][:, layer].view(R, 3, 1, 1, 1)
        if layer == 0:
            x = lam[:, 0, 0] * x + lam[:, 1, 0] * x00_vocab + lam[:, 2, 0] * x01_vocab  # [R, V, d]
            q, k, v = map(gather, qkv_heads(x, params["qkv0"], num_heads))
            x = gather(x)
        else:
            x = lam[:, 0] * x + lam[:, 1] * gather(x00_vocab) + lam[:, 2] * gather(x01_vocab)
            q, k, v = qkv_heads(x, params[f"qkv{layer}"], num_heads)
        if last:
            q, x = q[:, :, -1:], x[:, :, -1:]
        x = x + linear(attend(q, k, v).flatten(-2), params[f"attn_out{layer}"])
        x = x + mlp(x, params[f"mlp_in{layer}"], params[f"mlp_out{layer}"])
    return linear(norm(x[:, :, -1]), params["head"]).float()


def weighted_loss(params, tokens, targets, weights, num_layers, num_heads):
    """Sum over runs of each run's k-weighted loss. Summing (not averaging) over runs keeps every run's
    gradient exactly what it would be alone; a weight of 0 removes an example from the gradient."""
    logits = forward(params, tokens, num_layers, num_heads)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(weights)
    return (ce * weights).sum()


def matmul_flops_per_example(args):
    """Forward matmul FLOPs of one example as `forward` computes it: block 0's q, k, v are per vocabulary
    entry (not per example), the last block computes one position."""
    d, m, V = args.model_dim, args.mlp_dim, vocab_size(args.p)
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
        tokens, self.group = build_sequences(args.p)
        self.tokens = tokens.to(device)
        splits = [make_split(args.p, s.holdout1, s.holdout2, s.seed) for s in specs]
        self.is_train = torch.stack(splits).to(device)  # [R, N_all]
        # Training examples of each run: only rows with a non-zero weight, padded with weight-0 rows.
        weights = [example_weights(args.p, s, self.group, split) for s, split in zip(specs, splits)]
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
        self.params = stack_params([init_params(args, s.seed, device) for s in specs])
        self.optimizer = make_optimizer(self.params, args)
        use_compile = args.compile == 1 or (args.compile == -1 and device.type == "cuda")
        self.loss_fn = torch.compile(weighted_loss) if use_compile else weighted_loss

    def train_step(self, step):
        lr = self.args.lr * lr_factor(step, self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss_fn(self.params, self.train_inputs, self.train_targets, self.train_weights,
                            self.args.num_layers, self.args.num_heads)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self):
        """Every run on every example -> list of metric dicts (one per run)."""
        R, N = len(self.specs), self.tokens.size(0)
        V = vocab_size(self.args.p)
        chunk = max(1, (1 << 24) // (R * max(V, 3 * self.args.mlp_dim)))  # bounds activation memory
        losses, correct = [], []
        for start in range(0, N, chunk):
            examples = self.tokens[start:start + chunk]
            logits = forward(self.params, examples[:, :3].expand(R, -1, -1), self.args.num_layers, self.args.num_heads)
            target = examples[:, 3].expand(R, -1)
            losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(R, -1))
            correct.append((logits.argmax(-1) == target).float())
        losses, correct = torch.cat(losses, 1).cpu(), torch.cat(correct, 1).cpu()
        table1, table2, links = (self.group == g for g in (TABLE1, TABLE2, LINKS))
        metrics = []
        for r, train in enumerate(self.is_train.cpu()):
            subsets = {"op1_train": train & table1, "op1_test": ~train & table1,
                       "op2_train": train & table2, "op2_test": ~train & table2, "link": train & links}
            m = {}
            for key, rows in subsets.items():
                empty = not rows.any()
                m[f"{key}_loss"] = float("nan") if empty else losses[r, rows].mean().item()
                m[f"{key}_acc"] = float("nan") if empty else correct[r, rows].mean().item()
            metrics.append(m)
        return metrics


# ---- Logging ----
# logs/<run_id>.txt per run: the script, the environment, the hyperparameters, one line per step and per
# evaluation (val_loss = loss on held-out table-1 rows), flushed line by line.

SOLVED_ACC = 0.9  # a run is "solved" once its held-out table-1 accuracy reaches this

METRIC_KEYS = ["op1_train_loss", "op1_train_acc", "op1_test_loss", "op1_test_acc", "op2_train_loss",
               "op2_train_acc", "op2_test_loss", "op2_test_acc", "link_loss", "link_acc"]


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

    def __init__(self, args, specs, device, echo):
        os.makedirs(args.log_dir, exist_ok=True)
        stamp = time.strftime("%Y%m%d_%H%M%S")
        script = open(__file__).read()
        env = environment_lines(device)
        self.echo, self.files, self.paths = echo, [], []
        for spec in specs:
            name = run_name(args.p, spec)
            run_id = f"{name}_seed{spec.seed}_{stamp}_{uuid.uuid4().hex[:6]}"
            path = os.path.join(args.log_dir, run_id + ".txt")
            f = open(path, "w")
            hyper = dataclasses.replace(args, holdout1=[spec.holdout1], holdout2=[spec.holdout2], k=list(spec.k),
                                        seeds=[spec.seed])
            f.write(script + "\n" + "=" * 100 + "\n" + "\n".join(env) + "\n" + "=" * 100 + "\n")
            f.write(f"run_name: {name} seed: {spec.seed}\n{hyper!r}\n")
            f.flush()
            self.files.append(f)
            self.paths.append(path)
        if echo:
            print("\n".join(env), flush=True)
            print(f"run_name: {run_name(args.p, specs[0])} seed: {specs[0].seed}\n{args!r}", flush=True)

    def each(self, lines, echo=True):
        """lines[r] to run r's log; with echo, the first run's line to stdout."""
        for f, line in zip(self.files, lines):
            f.write(line + "\n")
            f.flush()
        if self.echo and echo:
            print(lines[0], flush=True)

    def all(self, line, echo=True):
        self.each([line] * len(self.files), echo)

    def close(self):
        for f in self.files:
            f.close()


def peak_memory_line(device):
    if device.type == "cuda":
        return (f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    return f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"


# ---- Training loop ----


def train_group(args, specs, device, echo):
    """Train the runs in `specs` together; returns one dict per run: final metrics, per-eval history, log path."""
    group = RunGroup(args, specs, device)
    logs = RunLogs(args, specs, device, echo)
    flops_per_step = 3 * matmul_flops_per_example(args) * group.train_inputs.shape[0] * group.train_inputs.shape[1]
    peak = 989.5e12 if device.type == "cuda" else None  # H100 SXM dense bf16
    history = [[] for _ in specs]
    train_time_ms, timed_steps = 0.0, 0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            metrics = group.evaluate()
            step_avg = f"{train_time_ms / timed_steps:.2f}" if timed_steps else "nan"
            logs.each([f"step:{step}/{args.steps} val_loss:{m['op1_test_loss']:.4f} train_time:{train_time_ms:.0f}ms "
                       f"step_avg:{step_avg}ms" for m in metrics])
            logs.each([f"step:{step}/{args.steps} " + " ".join(f"{key}:{m[key]:.4f}" for key in METRIC_KEYS)
                       for m in metrics])
            for r, m in enumerate(metrics):
                history[r].append(dict(step=step, **m))
            if not echo:
                accs = [m["op1_test_acc"] for m in metrics]
                print(f"step:{step}/{args.steps} runs:{len(specs)} op1_test_acc mean:{sum(accs) / len(accs):.3f} "
                      f"min:{min(accs):.3f} max:{max(accs):.3f} train_time:{train_time_ms:.0f}ms "
                      f"step_avg:{step_avg}ms", flush=True)
        if step == args.steps:
            break
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        group.train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1000
        if step >= 1:  # step 0 includes compilation
            train_time_ms += elapsed
            timed_steps += 1
        logs.all(f"step:{step + 1}/{args.steps} train_time:{train_time_ms:.0f}ms "
                 f"step_avg:{train_time_ms / max(timed_steps, 1):.2f}ms", echo=not args.quiet)
    if timed_steps:
        seconds = train_time_ms / 1000 / timed_steps
        mfu = f"{flops_per_step / seconds / peak:.4f}" if peak else "n/a"
        logs.all(f"ms_per_step:{seconds * 1000:.2f} runs:{len(specs)} "
                 f"examples_per_s:{group.train_count / seconds:.0f} "
                 f"tokens_per_s:{3 * group.train_count / seconds:.0f} mfu:{mfu}")
    logs.all(peak_memory_line(device))
    logs.close()
    return [dict(spec=spec, final=h[-1], history=h, log=path) for spec, h, path in zip(specs, history, logs.paths)]


def train_runs(args, specs, echo=False):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Groups of similar training-set size waste less compute on padding.
    order = sorted(range(len(specs)), key=lambda i: train_size_estimate(args.p, specs[i]))
    size = args.max_runs_per_batch or len(specs)
    results = [None] * len(specs)
    for start in range(0, len(specs), size):
        chunk = order[start:start + size]
        for i, result in zip(chunk, train_group(args, [specs[i] for i in chunk], device, echo)):
            results[i] = result
    return results


def train_size_estimate(p, spec):
    return (spec.k[0] > 0) * (1 - spec.holdout1) * p * p + (spec.k[1] > 0) * (1 - spec.holdout2) * p * p \
        + (spec.k[2] > 0) * p


# ---- Sweep outputs ----


def best_op1_test_acc(result):
    return max(h["op1_test_acc"] for h in result["history"])


def solved_step(result):
    """The first evaluated step with held-out table-1 accuracy >= SOLVED_ACC, or None."""
    return next((h["step"] for h in result["history"] if h["op1_test_acc"] >= SOLVED_ACC), None)


def summarise(results):
    """Mean/std over seeds per (holdout1, holdout2, k) -> rows for the table."""
    cells = {}
    for res in results:
        s = res["spec"]
        cells.setdefault((s.holdout1, s.holdout2, s.k), []).append(res)
    rows = []
    for (h1, h2, k), runs in cells.items():
        final = lambda key: [r["final"][key] for r in runs]
        mean = lambda values: sum(values) / len(runs)
        acc = torch.tensor(final("op1_test_acc"))
        rows.append(dict(holdout1=h1, holdout2=h2, k=k, seeds=len(runs), op1_test_acc_mean=acc.mean().item(),
                         op1_test_acc_std=acc.std().item() if len(runs) > 1 else 0.0,
                         op1_test_acc_min=acc.min().item(),
                         solved=sum(a >= SOLVED_ACC for a in final("op1_test_acc")),
                         op1_test_acc_best_mean=mean(map(best_op1_test_acc, runs)),
                         op1_train_acc_mean=mean(final("op1_train_acc")),
                         op2_test_acc_mean=mean(final("op2_test_acc")),
                         link_acc_mean=mean(final("link_acc"))))
    return rows


def write_sweep_outputs(args, results, command):
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_name", "p", "holdout1", "holdout2", "k1", "k2", "k3", "seed", "steps", "solved_step",
                         "op1_test_acc_best"]
                        + METRIC_KEYS + ["log"])
        for res in results:
            s, m = res["spec"], res["final"]
            writer.writerow([run_name(args.p, s), args.p, s.holdout1, s.holdout2, *s.k, s.seed, args.steps,
                             "" if solved_step(res) is None else solved_step(res),
                             f"{best_op1_test_acc(res):.6f}"]
                            + [f"{m[key]:.6f}" for key in METRIC_KEYS] + [res["log"]])
    rows = summarise(results)
    with open(os.path.join(args.out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow([" ".join(map(fmt, v)) if isinstance(v, tuple) else v for v in row.values()])
    chance = 1 / args.p
    lines = [f"Final accuracy on held-out table-1 rows after {args.steps} steps, p={args.p} (chance {chance:.3f}), "
             f"mean ± std over seeds; solved = seeds with final accuracy >= {SOLVED_ACC:g}; "
             f"best = highest accuracy at any evaluation (mean over seeds).", "",
             "| holdout1 | holdout2 | k1 k2 k3 | seeds | op1 test acc | min | solved | best during training "
             "| op1 train acc | op2 test acc | link acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {fmt(row['holdout1'])} | {fmt(row['holdout2'])} | {' '.join(map(fmt, row['k']))} | "
                     f"{row['seeds']} | {row['op1_test_acc_mean']:.3f} ± {row['op1_test_acc_std']:.3f} | "
                     f"{row['op1_test_acc_min']:.3f} | {row['solved']}/{row['seeds']} | {row['op1_test_acc_best_mean']:.3f} | "
                     f"{row['op1_train_acc_mean']:.3f} | {row['op2_test_acc_mean']:.3f} | {row['link_acc_mean']:.3f} |")
    lines += ["", f"Command: `{command}`"]
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_heatmap(args, rows, os.path.join(args.out_dir, "heatmap.png"))
    return "\n".join(lines)


def plot_heatmap(args, rows, path):
    """One panel per loss-weight triple: mean final table-1 test accuracy over the holdout grid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h1s, h2s = sorted(set(args.holdout1)), sorted(set(args.holdout2))
    triples = k_triples(args)
    fig, axes = plt.subplots(1, len(triples), figsize=(1.0 + 0.9 * len(h2s) * len(triples) + 1.5 * len(triples),
                                                       1.5 + 0.7 * len(h1s)), squeeze=False)
    cell = {(r["holdout1"], r["holdout2"], r["k"]): r for r in rows}
    for ax, k in zip(axes[0], triples):
        grid_acc = [[cell[(h1, h2, k)]["op1_test_acc_mean"] for h2 in h2s] for h1 in h1s]
        image = ax.imshow(grid_acc, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        for i, h1 in enumerate(h1s):
            for j, h2 in enumerate(h2s):
                c = cell[(h1, h2, k)]
                ax.text(j, i, f"{c['op1_test_acc_mean']:.2f}\n{c['solved']}/{c['seeds']}", ha="center", va="center",
                        color="white" if c["op1_test_acc_mean"] < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(h2s)), [fmt(h) for h in h2s])
        ax.set_yticks(range(len(h1s)), [fmt(h) for h in h1s])
        ax.set_xlabel("holdout2 (alias table)")
        ax.set_title(f"k = ({', '.join(map(fmt, k))})")
    axes[0][0].set_ylabel("holdout1 (original table)")
    fig.colorbar(image, ax=axes[0].tolist(), label="table-1 held-out accuracy")
    fig.suptitle(f"(x²+y²) mod {args.p}: held-out table-1 accuracy after {args.steps} steps", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---- Main ----


def main(argv):
    mode, args = parse_args(argv)
    specs = grid(args)
    if mode == "single":
        result = train_runs(args, specs, echo=True)[0]
        print(f"log: {result['log']}")
        return result
    print(f"sweep: {len(specs)} runs ({len(args.holdout1)} holdout1 x {len(args.holdout2)} holdout2 x "
          f"{len(k_triples(args))} k x {len(args.seeds)} seeds), p={args.p}, {args.steps} steps", flush=True)
    results = train_runs(args, specs, echo=False)
    command = "python oocl.py " + " ".join(argv)
    print(write_sweep_outputs(args, results, command))
    print(f"wrote {args.out_dir}/table.md, summary.csv, runs.csv, heatmap.png")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
