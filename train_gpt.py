"""GPT-2 Medium speedrun (2.92 track): one self-contained training script.

Reproduces the public record "Add additional input embedding" (mean val loss 2.9194 in 1412 s on 8x H100):
two RMS-normed input embeddings x00, x01 mixed into every block as x = l0*x + l1*x00 + l2*x01 (learned,
init (1, 0, 0)), value embeddings, U-net skips, document-masked sliding-window FlexAttention, Muon + AdamW,
Triton kernels for the soft-capped cross-entropy and for the symmetric X @ X^T of Newton-Schulz.

    torchrun --standalone --nproc_per_node=8 train_gpt.py            # the record configuration
    python train_gpt.py --preset tiny                               # CPU smoke run through the same code
    python train_gpt.py --help                                      # every hyperparameter, with its default
    torchrun --standalone --nproc_per_node=1 train_gpt.py --stop_after_steps=30   # timed check: ms/step, MFU, memory

Copy this file to records/<track>/<attempt>/ to try an idea; data paths resolve against the working directory.
"""
import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # read when CUDA initialises: set it first

import argparse
import copy
import dataclasses
import datetime
import glob
import itertools
import math
import platform
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # Triton ships with CUDA builds of torch on Linux; the CPU path only needs the PyTorch references.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


# ---- Hyperparameters ----

def hp(default, help):
    return dataclasses.field(default=default, metadata=dict(help=help))


@dataclass
class Hyperparameters:
    # data (patterns resolve against the current working directory; run.sh runs from the repository root)
    train_files: str = hp("data/fineweb10B/fineweb_train_*.bin", "train shards (glob pattern)")
    val_files: str = hp("data/fineweb10B/fineweb_val_*.bin", "validation shards (glob pattern)")
    val_tokens: int = hp(10_485_760, "validation tokens: always the first ones of the val shards")
    val_seq_len: int = hp(4 * 64 * 1024, "tokens per validation sequence (the record: 256K, 5 per rank on 8 GPUs)")
    micro_batch_tokens: int = hp(64 * 1024, "tokens per micro-step: one sequence split into documents by the mask")
    micro_batches_per_step: int = hp(8, "micro-batches per optimizer step summed over ranks (world size divides it)")
    eos_token: int = hp(50256, "document separator: every document starts with it")
    synthetic_fallback: bool = hp(False, "no shards at the default paths: write and use a small synthetic set")
    # model
    vocab_size: int = hp(50304, "GPT-2's 50257 padded to a multiple of 128")
    num_layers: int = hp(16, "transformer blocks")
    model_dim: int = hp(1024, "residual stream width")
    num_heads: int = hp(8, "attention heads")
    head_dim: int = hp(128, "dimension per head")
    mlp_hidden: int = hp(4096, "MLP hidden width (ReLU squared)")
    num_value_embeds: int = hp(5, "value-embedding tables, used by the first and the last that many blocks")
    attn_scale: float = hp(0.12, "attention logit scale")
    rope_min_freq: float = hp(1 / 1024, "lowest rotary frequency")
    logit_cap: float = hp(15.0, "logits soft-capped as cap * z / sqrt(z^2 + cap^2)")
    attn_block_size: int = hp(128, "FlexAttention block, also the window granularity")
    max_window_tokens: int = hp(3456, "long attention window at the end of training; short window = long / 2")
    # optimization
    num_iterations: int = hp(5690, "optimizer steps")
    cooldown_frac: float = hp(0.7, "lr constant for the first 1 - cooldown_frac of the steps, then linear to 0")
    muon_lr: float = hp(0.025, "Muon lr (times sqrt(max(1, rows/cols)))")
    muon_weight_decay: float = hp(0.01, "decoupled, times the scheduled lr; MLP matrices get twice this")
    muon_momentum_start: float = hp(0.85, "Muon momentum at step 0")
    muon_momentum_end: float = hp(0.95, "Muon momentum after the warm-up")
    muon_momentum_warmup_steps: int = hp(300, "steps of the linear momentum warm-up")
    head_lr: float = hp(1 / 320, "AdamW lr of the head")
    embed_lr: float = hp(0.3, "AdamW lr of the token and value embeddings")
    scalar_lr: float = hp(0.015, "AdamW lr of the scalars (lambdas, value mix, skip weights)")
    adam_beta1: float = hp(0.8, "AdamW beta1")
    adam_beta2: float = hp(0.95, "AdamW beta2")
    adam_eps: float = hp(1e-10, "AdamW eps")
    # run
    val_every: int = hp(125, "validate at step 0, every val_every steps and at the end; 0: only at the end")
    warmup_steps: int = hp(10, "untimed steps on random tokens (compiles everything); weights and state restored")
    stop_after_steps: int = hp(0, "stop after this many timed steps (schedules still of num_iterations); 0: off")
    compile: str = hp("auto", "auto: torch.compile on CUDA only; true / false force it")
    coordinate_descent_tuning: bool = hp(True, "inductor's coordinate descent tuning (allowed on this track)")
    ce_chunk_rows: int = hp(8192, "rows of logits alive at once in the fused cross-entropy")
    seed: int = hp(-1, "-1 draws a fresh seed (logged); set it for reproducible runs")
    save_checkpoint: bool = hp(False, "save the final weights to <log_dir>/<run id>_final.pt")
    allow_cpu: bool = hp(False, "run without CUDA (small models only: the full one would take weeks)")
    log_dir: str = hp("logs", "directory of the run logs (and checkpoints)")
    run_name: str = hp("gpt", "prefix of the run id")

    @property
    def step_tokens(self):  # training tokens per optimizer step, summed over ranks
        return self.micro_batch_tokens * self.micro_batches_per_step


PRESETS = {
    "full": {},
    # CPU smoke configuration: the same code with a small model; keeps FlexAttention's 128-token blocks so it also
    # runs on a GPU. Without FineWeb shards it trains on a small synthetic set (synthetic_fallback).
    "tiny": dict(
        num_layers=6, model_dim=64, num_heads=2, head_dim=32, mlp_hidden=256, num_value_embeds=2,
        micro_batch_tokens=512, micro_batches_per_step=2, attn_block_size=128, max_window_tokens=384,
        val_tokens=2048, val_seq_len=1024, num_iterations=20, val_every=10, warmup_steps=2, ce_chunk_rows=128,
        muon_momentum_warmup_steps=10, seed=1234, allow_cpu=True, synthetic_fallback=True, run_name="gpt_tiny",
    ),
}


class UserError(Exception):
    """A mistake of the user's (command line, configuration, data, output path): one message, exit code 2."""


class LossNotFinite(UserError):
    """A NaN or infinite loss; unlike the other errors it may show on one rank only."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of a usage dump of every option
        extra = message.split(" ")[2:] if message.startswith("unrecognized arguments: ") else []
        if any(os.path.exists(arg) for arg in extra):  # an unquoted --train_files 'dir/*.bin', expanded by the shell
            message += ("; these are files: quote a glob pattern so that the shell passes it whole, e.g. "
                        "--train_files 'data/fineweb10B/fineweb_train_*.bin'")
        raise UserError(message)


class Once(argparse.Action):
    """Stores the value; the same option given again, in any spelling, is an error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if hasattr(namespace, self.dest):
            parser.error(f"argument {self.option_strings[0]}: given twice")
        setattr(namespace, self.dest, values)


class Flag(Once):
    """--x sets true, --no-x / --no_x false; takes no value, so it never swallows the next argument."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, not option_string.startswith(("--no-", "--no_")), option_string)


def build_parser():
    parser = ArgumentParser(prog="train_gpt.py", description="GPT-2 Medium speedrun training.", allow_abbrev=False,
                            argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", action=Once, choices=sorted(PRESETS),
                        help="apply a preset's values first; explicit flags override them (default: full)")
    for field in dataclasses.fields(Hyperparameters):
        spellings = dict.fromkeys([field.name, field.name.replace("_", "-")])
        help = f"{field.metadata['help']} (default: {field.default})"
        if field.type is bool:
            names = [f"--{name}" for name in spellings] + [f"--no-{field.name.replace('_', '-')}", f"--no_{field.name}"]
            parser.add_argument(*dict.fromkeys(names), dest=field.name, action=Flag, help=help)
        else:
            parser.add_argument(*(f"--{name}" for name in spellings), dest=field.name, action=Once, type=field.type,
                                help=help, choices=["auto", "true", "false"] if field.name == "compile" else None)
    return parser


def parse_args(argv):
    given = vars(build_parser().parse_args(argv))
    return Hyperparameters(**{**PRESETS[given.pop("preset", "full")], **given})


def preset_note(argv):
    """The log line naming what a --preset set (None without one): a default edited in a copy of this script does
    not reach a run whose preset sets that value."""
    given = vars(build_parser().parse_args(argv))
    name = given.pop("preset", "full")
    applied = {key: value for key, value in PRESETS[name].items() if key not in given}
    if not applied:
        return None
    return (f"preset {name} sets " + ", ".join(f"{key}={value!r}" for key, value in applied.items())
            + f" over the defaults of Hyperparameters; to change one, pass its flag or edit PRESETS[{name!r}]")


def check_config(args, world_size):
    """Impossible configurations end here, before any process group or data is touched."""
    bounds = [  # checked first: the rules below divide by some of these
        ((">= 1", lambda v: v >= 1), ("micro_batch_tokens", "micro_batches_per_step", "val_seq_len", "val_tokens",
         "vocab_size", "model_dim", "num_heads", "head_dim", "mlp_hidden", "attn_block_size", "max_window_tokens",
         "num_iterations", "ce_chunk_rows")),
        ((">= 0", lambda v: v >= 0), ("num_value_embeds", "warmup_steps", "stop_after_steps", "val_every",
         "muon_momentum_warmup_steps", "muon_lr", "muon_weight_decay", "head_lr", "embed_lr", "scalar_lr")),
        (("> 0", lambda v: v > 0), ("logit_cap", "attn_scale", "rope_min_freq", "adam_eps")),
        (("in [0, 1]", lambda v: 0 <= v <= 1), ("cooldown_frac",)),
        (("in [0, 1)", lambda v: 0 <= v < 1), ("adam_beta1", "adam_beta2", "muon_momentum_start", "muon_momentum_end")),
    ]
    problems = [f"{field.name}={getattr(args, field.name)} must be a finite number" for field in
                dataclasses.fields(args) if field.type is float and not math.isfinite(getattr(args, field.name))]
    problems += [f"{name}={getattr(args, name)} must be {rule}" for (rule, holds), names in bounds for name in names
                 if math.isfinite(getattr(args, name)) and not holds(getattr(args, name))]
    if args.seed + world_size > 2 ** 64:  # torch seeds are unsigned 64-bit; rank r seeds its warm-up batches seed + r
        problems.append(f"seed={args.seed} must be at most 2**64 - {world_size} (the processes' seeds are seed + rank; "
                        f"or -1: a fresh seed per run)")
    if not args.log_dir:
        problems.append("log_dir='' is empty: give the folder for the run logs (default: logs)")
    if os.sep in args.run_name or (os.altsep and os.altsep in args.run_name):
        problems.append(f"run_name={args.run_name!r} names a file in log_dir and cannot hold a path separator: "
                        "put folders into --log_dir")
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
    if args.micro_batches_per_step % world_size != 0:
        counts = [n for n in range(1, args.micro_batches_per_step + 1) if args.micro_batches_per_step % n == 0]
        suggestion = max(n for n in counts if n <= world_size)
        problems.append(f"world size {world_size} does not divide micro_batches_per_step={args.micro_batches_per_step}: "
                        f"the valid process counts are {', '.join(map(str, counts))}; "
                        f"e.g. torchrun --standalone --nproc_per_node={suggestion} train_gpt.py <your flags>")
    for name in ("micro_batch_tokens", "val_seq_len"):
        if getattr(args, name) % args.attn_block_size != 0:
            problems.append(f"{name}={getattr(args, name)} must be a multiple of attn_block_size={args.attn_block_size}")
    if args.val_tokens % (args.val_seq_len * world_size) != 0:
        problems.append(f"val_tokens={args.val_tokens} must be a multiple of val_seq_len * world size = "
                        f"{args.val_seq_len * world_size}")
    if args.num_heads * args.head_dim != args.model_dim:
        problems.append(f"num_heads * head_dim = {args.num_heads * args.head_dim} must equal model_dim={args.model_dim} "
                        "(value embeddings are added to v)")
    if args.head_dim % 4 != 0:
        problems.append(f"head_dim={args.head_dim} must be a multiple of 4 (half-truncated rotary)")
    if args.num_layers < 2 or 2 * args.num_value_embeds > args.num_layers:
        problems.append(f"num_layers={args.num_layers} must be >= 2 and >= 2 * num_value_embeds={args.num_value_embeds}")
    if not 0 <= args.eos_token < args.vocab_size:
        problems.append(f"eos_token={args.eos_token} must be a token id below vocab_size={args.vocab_size}")
    if problems:
        raise UserError("invalid configuration:\n  " + "\n  ".join(problems))


def check_log_dir(args, argv):
    """The default --log_dir follows the working directory: run from inside records/ (a copy from its own folder) it
    would put untracked logs into the committed records/, which gets only what a user points there."""
    root = os.path.dirname(os.path.realpath(__file__))
    while not os.path.isdir(os.path.join(root, "records")):  # a copy in records/<track>/<attempt>/: the checkout above
        if os.path.dirname(root) == root:
            return
        root = os.path.dirname(root)
    records, log_dir = os.path.join(root, "records"), os.path.realpath(args.log_dir)
    if "log_dir" not in vars(build_parser().parse_args(argv)) and os.path.commonpath([log_dir, records]) == records:
        raise UserError(f"the default --log_dir {args.log_dir} would write into the repository's records/ ({log_dir}): "
                        f"run from the repository root ({root}), or pass --log_dir")


# ---- Model ----

def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def layer_layout(num_layers, num_value_embeds):
    """Per-layer structure derived from num_layers (16 layers give the record exactly):
    - value embeddings: tables 0..k-1 in the first k blocks and again in the last k blocks (k = num_value_embeds);
    - no attention in block num_layers // 2 - 1 (block 7 of 16);
    - long windows in blocks 0, q, n-1-q, n-1 with q = n // 4 (L S S S L S S S S S S L S S S L for 16), short elsewhere;
    - U-net skips: output of block m-2-2j into the input of block m+1+j, m = n // 2, j = 0, 1, 2 (6->9, 4->10, 2->11),
      keeping those that fit."""
    n, k = num_layers, num_value_embeds
    value_embed = [i if i < k else (i - (n - k) if i >= n - k else None) for i in range(n)]
    has_attention = [i != n // 2 - 1 for i in range(n)]
    long_window = [i in {0, n // 4, n - 1 - n // 4, n - 1} for i in range(n)]
    middle = n // 2
    skips = {middle + 1 + j: middle - 2 - 2 * j for j in range(3) if middle - 2 - 2 * j >= 0 and middle + 1 + j < n}
    return dict(value_embed=value_embed, has_attention=has_attention, long_window=long_window, skips=skips)


def make_block_masks(inputs, eos_token, block_size, long_window_blocks):
    """Two FlexAttention block masks (long window, short = long // 2) for causal attention within documents,
    built directly from document boundaries: kv blocks entirely inside the query block's single document and
    strictly in its past are "full" (no per-token mask), blocks that touch its documents are "partial" (mask_mod
    decides per token). Each query block keeps its `window` nearest kv blocks (itself included)."""
    docs = (inputs == eos_token).cumsum(0)  # document id per token; a document starts at its eos token

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    num_blocks = inputs.size(0) // block_size
    block_idx = torch.arange(num_blocks, dtype=torch.int32, device=inputs.device)
    block_docs = docs.view(num_blocks, block_size)
    first_doc, last_doc = block_docs[:, 0], block_docs[:, -1]
    any_causal = block_idx[:, None] >= block_idx[None, :]
    all_causal = block_idx[:, None] > block_idx[None, :]
    any_same_doc = (first_doc[:, None] <= last_doc[None, :]) & (last_doc[:, None] >= first_doc[None, :])
    all_same_doc = (first_doc[:, None] == last_doc[None, :]) & (last_doc[:, None] == first_doc[None, :])
    full = all_causal & all_same_doc
    partial = any_causal & any_same_doc & ~full

    def nearest_first(mask):  # counts and kv block indices, highest (nearest) index first
        counts = mask.sum(dim=-1, dtype=torch.int32)
        order = torch.where(mask, block_idx[None, :], -1).sort(dim=-1, descending=True).values.clamp_min(0)
        return counts[None, None].contiguous(), order.to(torch.int32)[None, None].contiguous()

    partial_counts, partial_indices = nearest_first(partial)
    full_counts, full_indices = nearest_first(full)

    def build(window_blocks):
        # up to window-1 full blocks; partial blocks fill the rest of the window (at least the diagonal block)
        return BlockMask.from_kv_blocks(
            torch.minimum(partial_counts, torch.clamp_min(window_blocks - full_counts, 1)), partial_indices,
            torch.minimum(full_counts, window_blocks - 1), full_indices,
            BLOCK_SIZE=block_size, mask_mod=document_causal)

    long_window_blocks = torch.clamp_min(long_window_blocks, 1)
    return build(long_window_blocks), build(torch.clamp_min(long_window_blocks // 2, 1))


def uniform_(weight, fan_in):
    bound = math.sqrt(3) * 0.5 / math.sqrt(fan_in)  # std 0.5 / sqrt(fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def linear(x, weight):
    """x @ weight^T with the weight cast to the activation dtype."""
    return matmul(x, weight.type_as(x).mT)


class CastedLinear(nn.Module):
    """No bias; the weight keeps its storage dtype and is cast to the activation dtype for the matmul."""

    def __init__(self, in_features, out_features, zero_init=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if zero_init:
            nn.init.zeros_(self.weight)
        else:
            uniform_(self.weight, in_features)

    def forward(self, x):
        return linear(x, self.weight)


class Rotary(nn.Module):
    """Half-truncated RoPE: dim/4 frequencies (min_freq)^t, t evenly spaced in [0, 1]; the other half of the
    dims has zero frequency (not rotated). Tables cover max_seq_len positions (training and validation)."""

    def __init__(self, head_dim, max_seq_len, min_freq):
        super().__init__()
        freqs = min_freq ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        freqs = torch.cat([freqs, freqs.new_zeros(head_dim // 2 - head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x):  # (1, T, heads, head_dim)
        cos, sin = self.cos[None, :x.size(1), None, :], self.sin[None, :x.size(1), None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, model_dim, num_heads, head_dim, scale, rotary):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = num_heads, head_dim, scale
        hidden = num_heads * head_dim
        self.qkv_weight = nn.Parameter(uniform_(torch.empty(3, hidden, model_dim), model_dim))
        self.proj = CastedLinear(hidden, model_dim, zero_init=True)
        self.rotary = rotary  # one table for all layers (256K positions x head_dim / 2 in fp32 each for cos and sin)

    def forward(self, x, value_embed, v_lambdas, mask):
        seq_len = x.size(1)
        qkv = linear(x, self.qkv_weight.flatten(0, 1)).view(1, seq_len, 3 * self.num_heads, self.head_dim)
        q, k, v = (norm(t) for t in qkv.chunk(3, dim=2))
        q, k = self.rotary(q), self.rotary(k)
        v = v_lambdas[0] * v
        if value_embed is not None:
            v = v + v_lambdas[1] * value_embed.view_as(v)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)
        return self.proj(y.transpose(1, 2).reshape(1, seq_len, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, model_dim, hidden):
        super().__init__()
        self.fc = CastedLinear(model_dim, hidden)
        self.proj = CastedLinear(hidden, model_dim, zero_init=True)
        self.fc.weight.wd_mul = self.proj.weight.wd_mul = 2.0  # MLP matrices: twice the weight decay

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, attention, mlp):
        super().__init__()
        self.attn, self.mlp = attention, mlp  # attention is None in the block without attention

    def forward(self, x, x00, x01, lambdas, v_lambdas, value_embed, mask):
        x = lambdas[0] * x + lambdas[1] * x00 + lambdas[2] * x01
        if self.attn is not None:
            x = x + self.attn(x, value_embed, v_lambdas, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, num_layers, model_dim, num_heads, head_dim, mlp_hidden, num_value_embeds,
                 max_seq_len, attn_scale, rope_min_freq, logit_cap, eos_token, attn_block_size, ce_chunk_rows):
        super().__init__()
        self.layout = layer_layout(num_layers, num_value_embeds)
        self.eos_token, self.attn_block_size, self.logit_cap, self.ce_chunk_rows = eos_token, attn_block_size, logit_cap, ce_chunk_rows
        self.embed1 = nn.Embedding(vocab_size, model_dim)
        self.embed2 = nn.Embedding(vocab_size, model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(vocab_size, model_dim) for _ in range(num_value_embeds))
        rotary = Rotary(head_dim, max_seq_len, rope_min_freq)
        self.blocks = nn.ModuleList(
            Block(CausalSelfAttention(model_dim, num_heads, head_dim, attn_scale, rotary) if has_attention else None,
                  MLP(model_dim, mlp_hidden))
            for has_attention in self.layout["has_attention"])
        self.head = CastedLinear(model_dim, vocab_size, zero_init=True)
        # all scalars in one fp32 vector: per block (l0, l1, l2) = (1, 0, 0), per block value mix (0.5, 0.5),
        # one weight per U-net skip (1)
        n = num_layers
        self.scalars = nn.Parameter(torch.cat([
            torch.tensor([1.0, 0.0, 0.0]).repeat(n), torch.full((2 * n,), 0.5), torch.ones(len(self.layout["skips"]))]))
        for p in [*self.embed1.parameters(), *self.embed2.parameters(), *self.value_embeds.parameters(),
                  *self.blocks.parameters()]:
            p.data = p.data.bfloat16()  # block matrices and embeddings are stored in bf16; head and scalars stay fp32

    def forward(self, inputs, targets, long_window_blocks):
        layout, n = self.layout, len(self.blocks)
        long_mask, short_mask = make_block_masks(inputs, self.eos_token, self.attn_block_size, long_window_blocks)
        x = x00 = norm(self.embed1(inputs)[None])
        x01 = norm(self.embed2(inputs)[None])
        value_embeds = [table(inputs)[None] for table in self.value_embeds]
        lambdas = self.scalars[:3 * n].view(n, 3)
        v_lambdas = self.scalars[3 * n:5 * n].view(n, 2)
        skip_weights = dict(zip(layout["skips"], self.scalars[5 * n:]))  # input block -> its learned weight
        outputs = []
        for i, block in enumerate(self.blocks):
            if i in layout["skips"]:
                x = x + skip_weights[i] * outputs[layout["skips"][i]]
            table = layout["value_embed"][i]
            x = block(x, x00, x01, lambdas[i], v_lambdas[i], None if table is None else value_embeds[table],
                      long_mask if layout["long_window"][i] else short_mask)
            outputs.append(x)
        return softcap_cross_entropy(norm(x)[0], self.head.weight, targets, self.logit_cap, self.ce_chunk_rows)


def build_model(args):
    return GPT(args.vocab_size, args.num_layers, args.model_dim, args.num_heads, args.head_dim, args.mlp_hidden,
               args.num_value_embeds, max(args.micro_batch_tokens, args.val_seq_len), args.attn_scale,
               args.rope_min_freq, args.logit_cap, args.eos_token, args.attn_block_size, args.ce_chunk_rows)


def parameter_groups(model):
    """Muon: every >= 2-D matrix inside the blocks. AdamW: head, embeddings (incl. value embeddings), scalars."""
    embeds = [model.embed1.weight, model.embed2.weight, *(table.weight for table in model.value_embeds)]
    return dict(matrices=[p for p in model.blocks.parameters() if p.ndim >= 2], embeddings=embeds,
                head=[model.head.weight], scalars=[model.scalars])


# ---- Optimizers ----

def lr_factor(step, args):
    """Stable then linear decay to 0."""
    progress = step / args.num_iterations
    return 1.0 if progress < 1 - args.cooldown_frac else max((1 - progress) / args.cooldown_frac, 0.0)


def muon_momentum(step, args):
    frac = min(step / max(args.muon_momentum_warmup_steps, 1), 1.0)
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum_end


NEWTON_SCHULZ_COEFFICIENTS = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]


def newton_schulz(grad):
    """Approximately orthogonalise the last two dims (batched over leading dims) with 5 quintic steps in bf16."""
    x = grad.bfloat16()
    transposed = grad.size(-2) > grad.size(-1)
    if transposed:  # work on the wide orientation so X @ X^T is the small square
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for a, b, c in NEWTON_SCHULZ_COEFFICIENTS:
        gram = xxt(x)
        poly = b * gram + c * xxt(gram)  # gram is symmetric, so gram @ gram == gram @ gram^T
        x = a * x + matmul(poly, x)
    return x.mT if transposed else x


def split_master(master):
    """fp32 master -> (bf16 high half as int16 bits, low half)."""
    bits = master.view(torch.int32)
    return (bits >> 16).to(torch.int16), bits.to(torch.int16)  # int32 -> int16 keeps the low 16 bits


def join_master(weight_bf16, low_bits):
    """bf16 weight + 16-bit low half -> the exact fp32 master copy."""
    high = weight_bf16.view(torch.int16).to(torch.int32) << 16
    return (high | (low_bits.to(torch.int32) & 0xFFFF)).view(torch.float32)


def muon_update(weight, grad, momentum_buffer, low_bits, momentum_lr, lr_mul, decay):
    """One matrix's Muon step, in place: EMA momentum, Nesterov blend, Newton-Schulz, decoupled weight decay, and
    the fp32 master (bf16 weight + low half) update. momentum_lr = tensor([momentum, lr]) so that a compiled
    version is not recompiled as the schedules move; lr_mul = sqrt(max(1, rows/cols)), decay = wd * wd_mul."""
    momentum, lr = momentum_lr[0], momentum_lr[1]
    grad = grad.float()
    momentum_buffer.lerp_(grad, 1 - momentum)  # EMA of gradients
    update = newton_schulz(grad.lerp(momentum_buffer, momentum))  # Nesterov: momentum * buf + (1 - momentum) * grad
    master = join_master(weight, low_bits) * (1 - lr * decay) - (lr * lr_mul) * update.float()
    high, low = split_master(master)
    weight.view(torch.int16).copy_(high)
    low_bits.copy_(low)


def to_device_async(tensor, device):
    """A CPU tensor on `device`; on CUDA through pinned memory, so the copy does not wait for the GPU work already
    queued (a plain .to(device) from pageable memory waits for all of it)."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


class Muon:
    """Momentum + Newton-Schulz orthogonalisation for the block matrices. Matrices of equal shape are dealt
    round-robin to the ranks: each rank updates its share, then the new bf16 weights are all-gathered."""

    def __init__(self, params, lr, weight_decay, rank, world_size, compiled):
        self.lr, self.weight_decay, self.rank, self.world_size = lr, weight_decay, rank, world_size
        shapes = list(dict.fromkeys(p.shape for p in params))
        self.groups = [[p for p in params if p.shape == shape] for shape in shapes]
        self.params = [p for group in self.groups for p in group]
        self.state = {}  # only the owning rank holds a matrix's state
        self.update = torch.compile(muon_update, dynamic=False) if compiled else muon_update

    @torch.no_grad()
    def step(self, lr_scale, momentum):
        # queued behind the backward, not waited for: the CPU goes on launching the updates
        momentum_lr = to_device_async(torch.tensor([momentum, self.lr * lr_scale]), self.params[0].device)
        gathers = []
        for group in self.groups:
            for base in range(0, len(group), self.world_size):
                if base + self.rank < len(group):
                    p = group[base + self.rank]
                    if p not in self.state:
                        self.state[p] = dict(momentum_buffer=torch.zeros_like(p, dtype=torch.float32),
                                             low_bits=torch.zeros_like(p, dtype=torch.int16))
                    self.update(p.data, p.grad, self.state[p]["momentum_buffer"], self.state[p]["low_bits"], momentum_lr,
                                max(1.0, p.size(-2) / p.size(-1)) ** 0.5, self.weight_decay * getattr(p, "wd_mul", 1.0))
                if self.world_size > 1:
                    outputs = group[base:base + self.world_size]
                    outputs = outputs + [torch.empty_like(group[0]) for _ in range(self.world_size - len(outputs))]
                    gathers.append(dist.all_gather(outputs, outputs[self.rank], async_op=True))
        for work in gathers:
            work.wait()

    def state_dict(self):
        return {p: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()}

    def load_state_dict(self, state):
        self.state = {p: {k: v.clone() for k, v in s.items()} for p, s in state.items()}


def build_optimizers(model, args, rank, world_size, compiled):
    """Muon for the block matrices; PyTorch's fused AdamW (state in the parameter's dtype, no weight decay) for the
    head, the embeddings and the scalars. Each group keeps its base lr as initial_lr (the schedule scales it)."""
    groups = parameter_groups(model)
    muon = Muon(groups["matrices"], args.muon_lr, args.muon_weight_decay, rank, world_size, compiled)
    adam = torch.optim.AdamW(
        [dict(params=groups["head"], lr=args.head_lr, initial_lr=args.head_lr),
         dict(params=groups["embeddings"], lr=args.embed_lr, initial_lr=args.embed_lr),
         dict(params=groups["scalars"], lr=args.scalar_lr, initial_lr=args.scalar_lr)],
        betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps, weight_decay=0.0, fused=True)
    return muon, adam


class GradientAverager:
    """Averages every gradient across ranks in its own dtype (bf16 for bf16 weights): on the last micro-step a hook
    launches an asynchronous all-reduce for each parameter as soon as autograd has accumulated its gradient, so the
    communication overlaps the rest of the backward. wait(params) waits only for those parameters."""

    def __init__(self, params, world_size):
        self.world_size, self.pending, self.last_micro_step = world_size, {}, True
        self.nccl = world_size > 1 and dist.get_backend() == "nccl"  # gloo has no averaging all-reduce: sum, divide
        if world_size > 1:
            for p in params:
                p.register_post_accumulate_grad_hook(self._launch)

    def _launch(self, p):
        if self.last_micro_step:
            self.pending[p] = dist.all_reduce(p.grad, op=dist.ReduceOp.AVG if self.nccl else dist.ReduceOp.SUM, async_op=True)

    def wait(self, params):
        for p in params:
            if p.grad is None:
                raise RuntimeError(f"a parameter of shape {tuple(p.shape)} received no gradient this step")
            work = self.pending.pop(p, None)
            if work is not None:
                work.wait()
                if not self.nccl:
                    p.grad.div_(self.world_size)


# ---- Data ----

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
GPT2_VOCAB = 50257  # token ids in GPT-2 shards; the model's vocab_size is padded beyond it
FETCH_HINT = "run `python data/cached_fineweb10B.py N` from the repository root to fetch the val shard and N train shards"
DEFAULT_FILES = (Hyperparameters.train_files, Hyperparameters.val_files)
SYNTHETIC_DIR = "data/synthetic_tiny"
SYNTHETIC_TOKENS = dict(train=2_000_000, val=65_536, shard=1_000_000)  # the tiny preset's set (data/synthetic.py)


def shard_token_count(path):
    """Validates the header of a token shard and returns its token count."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header.size < SHARD_HEADER_INTS:
        raise UserError(f"{path}: corrupt shard, {size} bytes is shorter than the {4 * SHARD_HEADER_INTS}-byte header")
    if header[0] != SHARD_MAGIC:
        raise UserError(f"{path}: wrong magic number {header[0]} (expected {SHARD_MAGIC}): not a token shard")
    if header[1] != SHARD_VERSION:
        raise UserError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = 4 * SHARD_HEADER_INTS + 2 * count
    if size != expected:
        raise UserError(f"{path}: corrupt shard, header says {count} tokens ({expected} bytes) but the file has "
                        f"{size} bytes; {shard_fix(path)}")
    return count


def shard_fix(path):
    """How to replace a damaged shard: a synthetic one is written, not fetched."""
    if os.path.realpath(os.path.dirname(path)) == os.path.realpath(SYNTHETIC_DIR):
        return f"delete the folder {SYNTHETIC_DIR}/ (the tiny preset writes the synthetic set again)"
    if os.path.basename(path).startswith("synthetic_"):
        return "delete its folder and write the synthetic set again with data/synthetic.py"
    return "delete it and fetch it again"


def synthetic_set_problem():
    """What is missing or damaged in the tiny preset's synthetic set, or None when it is whole: a set short of a
    shard would train on less data than the runs it is compared with, under the same log note."""
    train_shards = math.ceil(SYNTHETIC_TOKENS["train"] / SYNTHETIC_TOKENS["shard"])
    expected = {"synthetic_val_000000.bin": SYNTHETIC_TOKENS["val"]}
    for index in range(1, train_shards + 1):
        expected[f"synthetic_train_{index:06d}.bin"] = min(
            SYNTHETIC_TOKENS["shard"], SYNTHETIC_TOKENS["train"] - (index - 1) * SYNTHETIC_TOKENS["shard"])
    found = {os.path.basename(path) for path in glob.glob(f"{SYNTHETIC_DIR}/synthetic_*.bin")}
    if found != set(expected):
        return "; ".join(f"{what}: {', '.join(sorted(names))}" for what, names in
                         (("missing", set(expected) - found), ("not of the set", found - set(expected))) if names)
    for name, tokens in expected.items():
        try:
            if shard_token_count(os.path.join(SYNTHETIC_DIR, name)) != tokens:
                return f"{name} does not hold {tokens} tokens"
        except UserError as error:
            return str(error).split("; ")[0]  # the problem, without the fix (the set is written again)
    return None


def load_shard(path):
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * SHARD_HEADER_INTS, shape=(shard_token_count(path),))


def check_tokens(tokens, vocab_size, path):
    """Token ids must lie in GPT-2's vocabulary (50257; vocab_size if smaller): checked when a shard is opened,
    before training (one pass over the shard)."""
    limit = min(vocab_size, GPT2_VOCAB)
    if len(tokens) and int(tokens.max()) >= limit:
        raise UserError(f"{path}: token id {int(tokens.max())} is >= {limit} (vocab_size={vocab_size}, GPT-2 has "
                        f"{GPT2_VOCAB}): not a GPT-2 token shard for this model")
    return tokens


def find_shards(args, kind):
    """The shard files of --train_files (kind "train") or --val_files ("val"), sorted."""
    pattern = getattr(args, f"{kind}_files")
    files = sorted(glob.glob(pattern))
    if not files:
        fallback = (" (the synthetic fallback applies only when neither --train_files nor --val_files is given)"
                    if args.synthetic_fallback and (args.train_files, args.val_files) != DEFAULT_FILES else "")
        raise UserError(f"no {kind} shards match {pattern!r} (relative to {os.getcwd()}){fallback}: {FETCH_HINT}")
    folders = [path for path in files if os.path.isdir(path)]
    if folders:
        raise UserError(f"--{kind}_files {pattern!r} matches the folder {folders[0]!r}: give a pattern of shard files, "
                        f"e.g. {os.path.join(folders[0], '*.bin')!r}")
    return files


def use_synthetic_data(args, rank, world_size):
    """With synthetic_fallback and no shards at the default paths, point the run at a small synthetic set, written
    once under data/ by data/synthetic.py (run from the repository root). Returns the note to log, or None."""
    if not args.synthetic_fallback or (args.train_files, args.val_files) != DEFAULT_FILES or glob.glob(args.train_files):
        return None
    args.train_files = f"{SYNTHETIC_DIR}/synthetic_train_*.bin"
    args.val_files = f"{SYNTHETIC_DIR}/synthetic_val_*.bin"
    command = [sys.executable, "data/synthetic.py", "--out", SYNTHETIC_DIR, "--train_tokens",
               str(SYNTHETIC_TOKENS["train"]), "--val_tokens", str(SYNTHETIC_TOKENS["val"]), "--shard_tokens",
               str(SYNTHETIC_TOKENS["shard"]), "--seed", "0"]
    complete = lambda: synthetic_set_problem() is None
    if os.path.exists(SYNTHETIC_DIR) and not os.path.isdir(SYNTHETIC_DIR):
        raise UserError(f"{SYNTHETIC_DIR} is a file, not the synthetic set's folder: move or delete it (the tiny preset "
                        "writes its synthetic set there)")
    problem = synthetic_set_problem() if rank == 0 else None
    damaged = problem if os.path.isdir(SYNTHETIC_DIR) else None  # not a first run: say the set was written again
    if problem:
        if not os.path.exists("data/synthetic.py"):
            raise UserError(f"no shards at {DEFAULT_FILES[0]!r} and no data/synthetic.py to write a synthetic set: run "
                            f"from the repository root, or {FETCH_HINT}")
        partial = f"{SYNTHETIC_DIR}.partial{os.getpid()}"  # renamed when complete: an interrupted write leaves no set
        try:
            result = subprocess.run([*command[:3], partial, *command[4:]], capture_output=True, text=True)
            if result.returncode != 0:
                raise UserError(f"writing the synthetic set failed ({' '.join(command[1:])}): "
                                f"{result.stderr.strip()[-500:]}")
            try:
                os.rename(partial, SYNTHETIC_DIR)  # fails where the folder is there (and not empty)
            except OSError:
                if not complete():  # an incomplete or damaged set, left by hand: the same seed writes the same set
                    shutil.rmtree(SYNTHETIC_DIR)
                    os.rename(partial, SYNTHETIC_DIR)
                # else runs started side by side: another one finished the same set first and may read it
        finally:  # failed, interrupted (Ctrl-C, SIGTERM: subprocess.run has stopped the writer) or not needed
            shutil.rmtree(partial, ignore_errors=True)
    if world_size > 1:
        dist.barrier()  # the other ranks wait for rank 0's shards
    return (f"no FineWeb shards at {DEFAULT_FILES[0]}: training on the synthetic set {SYNTHETIC_DIR}/ "
            f"(written once by `python {' '.join(command[1:])}`)"
            + (f"; the set found there was incomplete and was written again ({damaged})" if damaged else ""))


def steps_in(num_tokens, step_tokens):
    """Whole steps a token stream provides: a step reads step_tokens + 1 consecutive tokens (inputs and targets)."""
    return max(0, (num_tokens - 1) // step_tokens)


def check_train_data(files, args):
    """Enough steps for the steps that will run (num_iterations, or fewer with stop_after_steps), and every
    shard the run reads opened (and checked) before training."""
    needed = min(args.num_iterations, args.stop_after_steps or args.num_iterations)
    available = 0
    for path in files:
        if available >= needed:
            break
        available += steps_in(len(check_tokens(load_shard(path), args.vocab_size, path)), args.step_tokens)
    if available < needed:
        flag = "stop_after_steps" if needed < args.num_iterations else "num_iterations"
        if args.train_files == DEFAULT_FILES[0]:
            shards = math.ceil(needed / (100_000_000 // args.step_tokens))
            fix = f"run `python data/cached_fineweb10B.py {shards}` from the repository root (100M-token shards)"
        elif available:
            fix = f"pass --{flag}={available} or give more data"
        else:
            fix = "give more data (or a smaller --micro_batch_tokens)"
        raise UserError(f"the {len(files)} train shards matching {args.train_files!r} hold {available} steps of "
                        f"{args.step_tokens} tokens but {flag}={needed}: {fix}")


def to_device(tokens, device):
    """n + 1 consecutive tokens -> (inputs int32, targets int64) of n tokens each, copied asynchronously on CUDA."""
    pair = torch.from_numpy(np.asarray(tokens[:-1], dtype=np.int32)), torch.from_numpy(np.asarray(tokens[1:], dtype=np.int64))
    return tuple(to_device_async(t, device) for t in pair)


def rank_sequences(tokens, seq_len, per_rank, rank, world_size):
    """This rank's sequences (seq_len + 1 tokens each) of a token stream. Step s reads the next
    seq_len * per_rank * world_size (+1) tokens; rank r takes its sequences r*A .. r*A + A-1 (A = per_rank):
    the same tokens per step for any world size. Training: micro-batches; validation: val_seq_len sequences."""
    step_tokens = seq_len * per_rank * world_size
    for pos in range(0, steps_in(len(tokens), step_tokens) * step_tokens, step_tokens):
        for index in range(rank * per_rank, (rank + 1) * per_rank):
            yield tokens[pos + index * seq_len:pos + (index + 1) * seq_len + 1]


def train_batches(files, args, rank, world_size, device):
    """Yields (inputs, targets) per micro-step, shard after shard."""
    for path in files:
        for chunk in rank_sequences(load_shard(path), args.micro_batch_tokens,
                                    args.micro_batches_per_step // world_size, rank, world_size):
            yield to_device(chunk, device)


def load_val_tokens(files, args):
    """The first val_tokens (+1 for the last target) tokens of the val shards, in order."""
    parts, have = [], 0
    for path in files:
        if have > args.val_tokens:
            break
        parts.append(check_tokens(np.asarray(load_shard(path)[:args.val_tokens + 1 - have]), args.vocab_size, path))
        have += len(parts[-1])
    if have < args.val_tokens + 1:
        raise UserError(f"the val shards {files} hold {have} tokens but val_tokens={args.val_tokens} needs "
                        f"{args.val_tokens + 1}: fetch the full val shard ({FETCH_HINT}) or lower --val_tokens")
    return np.concatenate(parts)


# ---- Kernels and their references: soft-capped cross-entropy ----
# The head's logits are computed chunk by chunk (ce_chunk_rows rows at a time); for every chunk one kernel computes
# the soft-capped loss per row and overwrites the logits with d(loss)/d(logits), so the chunk's gradient wrt the
# hidden states and the head weight can be formed immediately. Only one chunk of logits (in the activation dtype) is
# ever alive: the fp32 logits of a whole micro-batch (65536 x 50304 x 4 bytes = 13 GB) are never stored.

def softcap_ce_rows_reference(logits, targets, cap, grad_scale, write_grad):
    """Per-row loss of cross_entropy(cap * z / sqrt(z^2 + cap^2)); optionally writes the scaled gradient wrt z into
    `logits` in place. Computes in fp32 (float64 for float64 inputs), in place where it can: it is the CPU path."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    inv_root = (z * z).add_(cap * cap).rsqrt_()  # 1 / sqrt(z^2 + cap^2)
    capped = (z * inv_root).mul_(cap)
    loss = -capped.gather(1, targets[:, None]).squeeze(1)
    exps = capped.sub_(cap).exp_()  # capped logits lie in (-cap, cap): exp(c - cap) needs no running max
    sums = exps.sum(dim=-1)
    loss += cap + sums.log()
    if write_grad:
        grad = exps.div_(sums[:, None])  # softmax
        grad[torch.arange(len(targets), device=logits.device), targets] -= 1
        grad *= inv_root.mul_(cap).pow_(3).mul_(grad_scale)  # d capped / dz = cap^3 / (z^2 + cap^2)^1.5
        logits.copy_(grad)
    return loss


CE_ROWS_PER_PROGRAM, CE_BLOCK_V = 4, 1024

if HAS_TRITON:
    @triton.jit
    def softcap_ce_rows_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, num_rows, vocab_size: tl.constexpr, cap,
                               grad_scale, WRITE_GRAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < num_rows
        row_starts = logits_ptr + rows.to(tl.int64) * row_stride
        row_ptrs = row_starts[:, None]
        # capped logits lie in (-cap, cap): exp(c - cap) can neither overflow nor underflow, no running max needed
        sum_exp = tl.zeros((ROWS, BLOCK_V), dtype=tl.float32)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < vocab_size)
            z = tl.load(row_ptrs + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            capped = cap * z * tl.rsqrt(z * z + cap * cap)
            sum_exp += tl.where(ok, tl.exp(capped - cap), 0.0)
        lse = cap + tl.log(tl.sum(sum_exp, axis=1))
        target = tl.load(targets_ptr + rows, mask=row_ok, other=0)
        z_target = tl.load(row_starts + target, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(loss_ptr + rows, lse - cap * z_target * tl.rsqrt(z_target * z_target + cap * cap), mask=row_ok)
        if WRITE_GRAD:
            for start in range(0, vocab_size, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                ok = row_ok[:, None] & (cols[None, :] < vocab_size)
                z = tl.load(row_ptrs + cols[None, :], mask=ok, other=0.0).to(tl.float32)
                inv_root = tl.rsqrt(z * z + cap * cap)
                prob = tl.exp(cap * z * inv_root - lse[:, None])
                prob = tl.where(cols[None, :] == target[:, None], prob - 1.0, prob)
                grad = prob * (cap * cap * cap * grad_scale) * (inv_root * inv_root * inv_root)
                tl.store(row_ptrs + cols[None, :], grad.to(logits_ptr.dtype.element_ty), mask=ok)


def softcap_ce_rows_triton(logits, targets, cap, grad_scale, write_grad):
    """Triton version of softcap_ce_rows_reference (same contract); logits must have unit column stride."""
    assert logits.stride(1) == 1 and targets.is_contiguous()
    rows = logits.size(0)
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    softcap_ce_rows_kernel[(triton.cdiv(rows, CE_ROWS_PER_PROGRAM),)](
        logits, logits.stride(0), targets, loss, rows, logits.size(1), float(cap), float(grad_scale),
        WRITE_GRAD=write_grad, ROWS=CE_ROWS_PER_PROGRAM, BLOCK_V=CE_BLOCK_V, num_warps=8)
    return loss


def chunked_softcap_ce(x, weight, targets, cap, chunk_rows, with_grads):
    """Mean soft-capped cross-entropy of logits = x @ weight.T; with_grads also returns (grad_x, grad_weight)."""
    compute_dtype = ce_compute_dtype(x)
    w = weight.to(compute_dtype)
    n = x.size(0)
    losses = torch.empty(n, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    grad_x = torch.empty_like(x) if with_grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=x.device) if with_grads else None
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        x_chunk = x[start:end].to(compute_dtype)
        logits = x_chunk @ w.t()
        losses[start:end] = softcap_ce_rows(logits, targets[start:end], cap, 1.0 / n, with_grads)
        if with_grads:  # logits now holds d(mean loss)/d(logits) for these rows
            grad_x[start:end] = logits @ w
            grad_w += (logits.t() @ x_chunk).to(grad_w.dtype)
    return losses.mean(), grad_x, grad_w


class SoftcapCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, cap, chunk_rows):
        loss, grad_x, grad_w = chunked_softcap_ce(x, weight, targets, cap, chunk_rows, with_grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None


@torch.compiler.disable  # runs eagerly between compiled graphs: cuBLAS matmuls + the Triton kernel
def softcap_cross_entropy(x, weight, targets, cap, chunk_rows):
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return SoftcapCrossEntropy.apply(x, weight, targets, cap, chunk_rows)
    return chunked_softcap_ce(x, weight, targets, cap, chunk_rows, with_grads=False)[0]


# ---- Kernels and their references: symmetric X @ X^T for Newton-Schulz ----
# X @ X^T is symmetric: the kernel computes only the tiles on and below the diagonal and writes each off-diagonal tile
# twice (as itself and transposed), halving the FLOPs of the two symmetric products of every Newton-Schulz step.
# The tiles are a guess not yet measured on a GPU: tests/gpu times them against cuBLAS (issue 9).
XXT_TILES = dict(block_m=64, block_k=64, num_warps=4, num_stages=4)


def xxt_reference(x):
    return matmul(x, x.mT)


if HAS_TRITON:
    @triton.jit
    def xxt_kernel(x_ptr, out_ptr, rows, cols: tl.constexpr, stride_xb, stride_xr, stride_xc, stride_ob, stride_or, stride_oc,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m, pid_n, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if pid_n <= pid_m:  # lower triangle of tiles only
            x_ptr += batch.to(tl.int64) * stride_xb
            out_ptr += batch.to(tl.int64) * stride_ob
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
            for k in range(0, cols, BLOCK_K):
                k_ok = (k + offs_k)[None, :] < cols
                a = tl.load(x_ptr + offs_m[:, None] * stride_xr + (k + offs_k)[None, :] * stride_xc,
                            mask=(offs_m[:, None] < rows) & k_ok, other=0.0)
                b = tl.load(x_ptr + offs_n[:, None] * stride_xr + (k + offs_k)[None, :] * stride_xc,
                            mask=(offs_n[:, None] < rows) & k_ok, other=0.0)
                acc = tl.dot(a, tl.trans(b), acc)
            tile = acc.to(out_ptr.dtype.element_ty)
            in_bounds = (offs_m[:, None] < rows) & (offs_n[None, :] < rows)
            tl.store(out_ptr + offs_m[:, None] * stride_or + offs_n[None, :] * stride_oc, tile, mask=in_bounds)
            if pid_n < pid_m:  # mirror: out[n, m] = out[m, n]
                tl.store(out_ptr + offs_n[None, :] * stride_or + offs_m[:, None] * stride_oc, tile, mask=in_bounds)


def xxt_triton(x, block_m=None, block_k=None, num_warps=None, num_stages=None):
    """X @ X^T for X of shape (..., rows, cols) (any strides), computing one triangle; tiles default to XXT_TILES."""
    tiles = dict(XXT_TILES, **{k: v for k, v in dict(block_m=block_m, block_k=block_k, num_warps=num_warps,
                                                       num_stages=num_stages).items() if v is not None})
    batch_shape, rows, cols = x.shape[:-2], x.size(-2), x.size(-1)
    x3 = x.reshape(-1, rows, cols)
    out = torch.empty(x3.size(0), rows, rows, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, tiles["block_m"]), triton.cdiv(rows, tiles["block_m"]), x3.size(0))
    xxt_kernel[grid](x3, out, rows, cols, *x3.stride(), *out.stride(), BLOCK_M=tiles["block_m"],
                     BLOCK_K=tiles["block_k"], num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])
    return out.reshape(*batch_shape, rows, rows)


# ---- CPU stand-ins: the same math where CUDA, Triton or FlexAttention's backward are missing ----
# CPUs without bf16 units are ~20x slower at bf16 matmuls: bf16 inputs are multiplied in fp32 and rounded to bf16,
# the same fp32 accumulation and output rounding as the GPU's bf16 GEMM.

def matmul(a, b):
    if a.is_cuda or a.dtype != torch.bfloat16:
        return a @ b
    return (a.float() @ b.float()).bfloat16()


def ce_compute_dtype(x):  # head matmuls: the activation dtype on CUDA (bf16, like the record), fp32 on CPU
    return x.dtype if x.is_cuda or x.dtype == torch.float64 else torch.float32


def softcap_ce_rows(logits, targets, cap, grad_scale, write_grad):
    if logits.is_cuda and HAS_TRITON:
        return softcap_ce_rows_triton(logits, targets, cap, grad_scale, write_grad)
    return softcap_ce_rows_reference(logits, targets, cap, grad_scale, write_grad)


def xxt(x):
    if x.is_cuda and HAS_TRITON:
        return xxt_triton(x)
    return xxt_reference(x)


def block_mask_to_dense(block_mask, seq_len):
    """Token-level boolean mask with exactly the semantics FlexAttention gives `block_mask` (CPU attention path)."""
    q_block, kv_block = block_mask.BLOCK_SIZE
    device = block_mask.kv_indices.device

    def blocks(counts, indices):
        counts, indices = counts[0, 0], indices[0, 0]
        valid = torch.arange(indices.size(1), device=device)[None, :] < counts[:, None]
        hits = torch.zeros(indices.shape, dtype=torch.int32, device=device).scatter_add_(1, indices.long(), valid.int())
        dense = hits > 0  # scatter, not boolean indexing: no data-dependent shapes (torch.compile friendly)
        return dense.repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:seq_len, :seq_len]

    positions = torch.arange(seq_len, device=device)
    mask = blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    mask = mask & block_mask.mask_mod(0, 0, positions[:, None], positions[None, :])
    if block_mask.full_kv_num_blocks is not None:
        mask = mask | blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return mask


compiled_flex_attention = torch.compile(flex_attention, dynamic=False)  # eager FlexAttention materialises all scores


def attention(q, k, v, block_mask, scale):
    """q, k, v: (1, heads, T, head_dim). FlexAttention on GPU (compiled, also inside an uncompiled model); on CPU
    (no FlexAttention backward) SDPA in fp32 with the same mask expanded to tokens."""
    if q.is_cuda:
        flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention
        return flex(q, k, v, block_mask=block_mask, scale=scale)
    mask = block_mask_to_dense(block_mask, q.size(2))
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale).type_as(q)


# ---- Training ----

def window_blocks(step, args):
    """Long window in attention blocks: round_up(max_window * f(x)), f(x) = 4x^3 - 6x^2 + 3x, x = step / steps."""
    x = step / args.num_iterations
    window = args.max_window_tokens * (4 * x ** 3 - 6 * x ** 2 + 3 * x)
    return max(1, math.ceil(window / args.attn_block_size))


def flops_per_token(args, layout, matmul_params, long_blocks):
    """Training FLOPs per token: 6 x matmul parameters (blocks + head) plus causal attention over the window
    (about window - half a block keys per query; document masking not counted)."""
    flops = 6 * matmul_params
    for has_attention, long in zip(layout["has_attention"], layout["long_window"]):
        if has_attention:
            blocks = long_blocks if long else max(long_blocks // 2, 1)
            keys = min(blocks * args.attn_block_size, args.micro_batch_tokens) - args.attn_block_size / 2
            flops += 12 * args.num_heads * args.head_dim * keys
    return flops


# dense bf16 tensor-core peaks (NVIDIA's datasheets halve their sparsity figures); the first name found in the
# device's name counts, so the PCIe and NVL variants come before the SXM parts' family names
PEAK_BF16_FLOPS = {"H100 PCIe": 756.5e12, "H100 NVL": 835.5e12, "H200 NVL": 835.5e12,
                   "H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def throughput_line(steps_done, training_time_ms, total_flops, step_tokens, peak, world_size):
    """Tokens per second of the whole run, ms per step, and MFU: the model FLOPs done over what all world_size GPUs
    (peak FLOP/s each; None off a known GPU) could have done in the time."""
    seconds = training_time_ms / 1000
    tokens_per_s = steps_done * step_tokens / max(seconds, 1e-9)
    mfu = f"{100 * total_flops / (seconds * peak * world_size):.2f}%" if peak and seconds > 0 else "n/a"
    return f"tokens_per_s:{tokens_per_s:.0f} ms_per_step:{training_time_ms / max(steps_done, 1):.2f} mfu:{mfu}"


class Logger:
    """Rank 0 writes logs/<run_id>.txt line by line (flushed) and echoes to stdout; other ranks stay quiet."""
    opened = None  # the path of this process's run log once open: an interruption says whether a log is kept

    def __init__(self, args, is_master):
        self.file = None
        if is_master:
            self.run_id = f"{args.run_name}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:8]}"
            self.path = os.path.join(args.log_dir, f"{self.run_id}.txt")
            if os.path.exists(args.log_dir) and not os.path.isdir(args.log_dir):
                raise UserError(f"--log_dir {args.log_dir!r} is a file, not a folder: choose a folder for the run logs")
            try:
                os.makedirs(args.log_dir, exist_ok=True)
                self.file = open(self.path, "w")
                Logger.opened = self.path
            except OSError as error:
                raise UserError(f"cannot write the run log {self.path!r} ({error.strerror}): choose a writable "
                                "--log_dir (logs and checkpoints go there)") from None

    def __call__(self, text, console=True):
        if self.file is None:
            return
        self.file.write(text + "\n")  # the file first: a run stopped right after a printed line has it too
        self.file.flush()
        if console:
            try:
                print(text, flush=True)
            except BrokenPipeError:  # the console's reader is gone (`| head`, or `| tee` stopped by the same Ctrl-C):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the run goes on, the file has all


def gpu_list(use_cuda):
    """The GPUs of the run for its log header: nvidia-smi's table (the record logs carry it), not on a CPU run."""
    if not use_cuda:
        return "no GPU (CPU run)"
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.rstrip()
    return "\n".join(f"GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))


def read_later(value):
    """A function that returns float(value), waiting only for the GPU work queued before this call. (value.item()
    called later would wait for everything queued by then: the next step's whole work.)"""
    if value.device.type != "cuda":
        return value.item
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read():
        copied.synchronize()
        return host.item()
    return read


def check_finite(kind, loss, step, args, log):
    """A NaN or infinite loss ends the run at once, with a log line and one error."""
    if not math.isfinite(loss):
        message = (f"step:{step}/{args.num_iterations} {kind} loss is {loss}: stopping the run (lower the learning "
                   "rates, or check the data)")
        log(message)
        raise LossNotFinite(message)


def train_step(model, batches, micro_steps, averager, muon, adam, lr_scale, momentum, window):
    """One optimizer step: micro-steps of forward + backward (gradients accumulate in p.grad, averaged across ranks
    by the hooks), then each optimizer steps once its own gradients are averaged. Returns the mean loss (on device)."""
    total = 0.0
    for micro in range(micro_steps):
        inputs, targets = next(batches)
        averager.last_micro_step = micro == micro_steps - 1
        loss = model(inputs, targets, window)
        (loss / micro_steps).backward()
        total = total + loss.detach()
    averager.wait(muon.params)
    muon.step(lr_scale, momentum)
    for group in adam.param_groups:
        averager.wait(group["params"])
        group["lr"] = group["initial_lr"] * lr_scale
    adam.step()
    model.zero_grad(set_to_none=True)
    return total / micro_steps


@torch.no_grad()
def evaluate(model, val_tokens, args, rank, world_size, window, device):
    """Mean loss over the val_seq_len sequences of the validation tokens, averaged across ranks."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in rank_sequences(val_tokens, args.val_seq_len, 1, rank, world_size):
        total += model(*to_device(chunk, device), window)
    if world_size > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / (args.val_tokens // args.val_seq_len)).item()


def main(argv):
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_config(args, world_size)
    check_log_dir(args, argv)
    if os.environ.get("TRAIN_GPT_CHECK_ONLY") == "1":  # run.sh: the flags checked before it downloads and launches
        return
    use_cuda = torch.cuda.is_available()
    if not use_cuda and not args.allow_cpu:
        raise UserError("no CUDA GPU is visible: this configuration needs GPUs (launch it with ./run.sh on a GPU "
                        "node). For a CPU run of the same code use --preset tiny (or --allow_cpu with a small model).")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:  # the timeout covers the minutes of compilation during which ranks do not talk
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None,
                                timeout=datetime.timedelta(minutes=30))
    # data and output paths first: a missing or corrupt file should fail before minutes of compilation
    data_note = use_synthetic_data(args, rank, world_size)
    train_files, val_files = find_shards(args, "train"), find_shards(args, "val")
    shared = sorted(set(map(os.path.realpath, train_files)) & set(map(os.path.realpath, val_files)))
    if shared:
        raise UserError(f"{shared[0]} is both a train and a val shard ({len(shared)} shared): the validation loss "
                        f"would be measured on training data; give --train_files and --val_files disjoint patterns")
    check_train_data(train_files, args)
    val_tokens = load_val_tokens(val_files, args)
    is_master = rank == 0
    log = Logger(args, is_master)

    with open(__file__) as script:
        log(script.read(), console=False)
    log("=" * 100, console=False)
    log(f"Python {platform.python_version()}\nPyTorch {torch.__version__}\nCUDA {torch.version.cuda or 'none'}")
    log(gpu_list(use_cuda))
    log("=" * 100)
    # what the run ran on, in one line: run times of different hardware are not one sample
    log(f"world_size:{world_size} device:{torch.cuda.get_device_name(device) if use_cuda else 'cpu'}")
    if args.seed < 0:  # a fresh seed per run, shared by all ranks
        seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=device)
        if world_size > 1:
            dist.broadcast(seed, 0)
        args.seed = int(seed)
    log(repr(args))
    for note in (preset_note(argv), data_note):
        if note:
            log(note)
    compile_model = args.compile == "true" or (args.compile == "auto" and use_cuda)

    torch.manual_seed(args.seed)
    with device:
        model = build_model(args)
    if world_size > 1:
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    counts = {name: sum(p.numel() for p in params) for name, params in parameter_groups(model).items()}
    log(f"parameters: {sum(counts.values()):,} (" + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")")
    muon, adam = build_optimizers(model, args, rank, world_size, compiled=compile_model)
    averager = GradientAverager(model.parameters(), world_size)
    micro_steps = args.micro_batches_per_step // world_size
    if compile_model:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = args.coordinate_descent_tuning
    run_model = torch.compile(model, dynamic=False) if compile_model else model
    # every long-window size of the run as a device tensor now, not a blocking host-to-device copy on the clock
    windows = {blocks: torch.tensor(blocks, dtype=torch.int32, device=device)
               for blocks in sorted({window_blocks(step, args) for step in range(args.num_iterations + 1)})}

    # untimed warm-up on random tokens (compiles the kernels), then restore weights and optimizer state
    warmup_start = time.perf_counter()
    if args.warmup_steps > 0:
        initial = dict(model=copy.deepcopy(model.state_dict()), muon=muon.state_dict(), adam=copy.deepcopy(adam.state_dict()))
        generator = torch.Generator().manual_seed(args.seed + rank)
        random_batches = (to_device(torch.randint(0, args.vocab_size, (args.micro_batch_tokens + 1,), generator=generator).numpy(), device)
                          for _ in itertools.count())
        for warmup_step in range(1, args.warmup_steps + 1):  # mid-training windows and schedules
            middle = args.num_iterations // 2
            train_step(run_model, random_batches, micro_steps, averager, muon, adam, lr_factor(middle, args),
                       muon_momentum(middle, args), windows[window_blocks(middle, args)])
            if use_cuda:
                torch.cuda.synchronize()
            # progress through a compilation that can take minutes (the first step holds most of it)
            log(f"warm-up step {warmup_step}/{args.warmup_steps}: {time.perf_counter() - warmup_start:.1f}s")
        model.load_state_dict(initial["model"])
        muon.load_state_dict(initial["muon"])
        adam.load_state_dict(initial["adam"])
        del initial
    if use_cuda:
        torch.cuda.synchronize()
    log(f"warm-up ({args.warmup_steps} steps, compilation included): {time.perf_counter() - warmup_start:.1f}s")

    batches = train_batches(train_files, args, rank, world_size, device)
    last_step = min(args.num_iterations, args.stop_after_steps or args.num_iterations)
    if last_step < args.num_iterations:
        log(f"stop_after_steps={args.stop_after_steps}: stopping after step {last_step} of {args.num_iterations} "
            "(schedules of the full run); the final validation is skipped")
    peak = peak_flops(device)
    matmul_params = counts["matrices"] + counts["head"]
    training_time_ms, total_flops, read_loss = 0.0, 0.0, None

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    if world_size > 1:
        dist.barrier()  # all ranks start the clock together
    sync()
    t0 = time.perf_counter()
    for step in range(last_step + 1):
        if step == args.num_iterations or (args.val_every > 0 and step % args.val_every == 0):
            sync()
            training_time_ms += 1000 * (time.perf_counter() - t0)
            if read_loss is not None:
                check_finite("train", read_loss(), step, args, log)
            val_loss = evaluate(run_model, val_tokens, args, rank, world_size, windows[window_blocks(step, args)], device)
            step_avg = f"{training_time_ms / step:.2f}" if step else "nan"
            log(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.6f} train_time:{training_time_ms:.0f}ms step_avg:{step_avg}ms")
            check_finite("validation", val_loss, step, args, log)
            if step:
                log(throughput_line(step, training_time_ms, total_flops, args.step_tokens, peak, world_size))
            sync()
            t0 = time.perf_counter()
        if step == last_step:
            break
        read_previous_loss = read_loss
        read_loss = read_later(train_step(run_model, batches, micro_steps, averager, muon, adam, lr_factor(step, args),
                                          muon_momentum(step, args), windows[window_blocks(step, args)]))
        if read_previous_loss is not None:  # one step behind: waits for the last step, not for this one
            check_finite("train", read_previous_loss(), step, args, log)
        total_flops += args.step_tokens * flops_per_token(args, model.layout, matmul_params, window_blocks(step, args))
        approx_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
        log(f"step:{step + 1}/{args.num_iterations} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / (step + 1):.2f}ms")

    if last_step < args.num_iterations:
        sync()
        training_time_ms += 1000 * (time.perf_counter() - t0)
        check_finite("train", read_loss(), last_step, args, log)
        log(f"timed steps: {last_step} ({args.step_tokens} tokens each) "
            + throughput_line(last_step, training_time_ms, total_flops, args.step_tokens, peak, world_size))
    if use_cuda:
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2 ** 20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2 ** 20} MiB")
    else:
        log(f"peak memory: max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB (CPU run)")
    if args.save_checkpoint and is_master:
        path = os.path.join(args.log_dir, f"{log.run_id}_final.pt")
        torch.save(dict(step=last_step, model=model.state_dict(), hyperparameters=dataclasses.asdict(args)), path)
        log(f"checkpoint: {path}")
    if is_master:
        log(f"log: {log.path}")
    if world_size > 1:
        dist.destroy_process_group()


def sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, sigterm_as_ctrl_c)  # `timeout` and `kill` stop a run with SIGTERM: as Ctrl-C
    try:
        main(sys.argv[1:])
    except UserError as error:
        if int(os.environ.get("RANK", "0")) == 0 or isinstance(error, LossNotFinite):  # the others: said once
            print(f"train_gpt.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C is the user's choice, not a crash: one line, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            kept = (f"the log so far is kept in {Logger.opened} (records/ttest.py lists it as an unfinished run)"
                    if Logger.opened else "no log was written yet (the run stopped before opening it)")
            print(f"train_gpt.py: interrupted: {kept}", file=sys.stderr)
        sys.exit(130)
