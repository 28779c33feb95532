"""GPT-2 Medium speedrun (2.92 track): one self-contained training script.

Reproduces the public record "Add additional input embedding" (mean val loss 2.9194 in 1412 s on 8x H100):
two RMS-normed input embeddings x00, x01 mixed into every block as x = l0*x + l1*x00 + l2*x01 (learned,
init (1, 0, 0)), value embeddings, U-net skips, document-masked sliding-window FlexAttention, Muon + AdamW,
Triton kernels for the soft-capped cross-entropy and for the symmetric X @ X^T of Newton-Schulz.

    torchrun --standalone --nproc_per_node=8 train_gpt.py            # the record configuration
    python train_gpt.py --preset tiny                               # CPU smoke run through the same code
    python train_gpt.py --num_iterations=100 --val_every=50         # any Hyperparameters field can be overridden

Copy this file to records/<track>/<attempt>/ to try an idea; data paths resolve against the working directory.
"""
import copy
import dataclasses
import glob
import math
import os
import platform
import resource
import shutil
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

@dataclass
class Hyperparameters:
    # data (patterns resolve against the current working directory; run.sh runs from the repository root)
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"
    val_tokens: int = 10_485_760  # exactly this many validation tokens, always the first ones
    micro_batch_tokens: int = 64 * 1024  # one flattened sequence per micro-step, split into documents by the mask
    micro_batches_per_step: int = 8  # per optimizer step, summed over ranks: world_size must divide it
    eos_token: int = 50256  # document separator: every document starts with it
    # model
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 128
    num_layers: int = 16
    model_dim: int = 1024
    num_heads: int = 8
    head_dim: int = 128
    mlp_hidden: int = 4096
    num_value_embeds: int = 5  # value-embedding tables, used by the first and the last num_value_embeds blocks
    attn_scale: float = 0.12
    rope_min_freq: float = 1 / 1024
    logit_cap: float = 15.0  # logits soft-capped as cap * z / sqrt(z^2 + cap^2)
    attn_block_size: int = 128  # FlexAttention block, also the window granularity
    max_window_tokens: int = 3456  # long window at the end of training; short window = long / 2
    # optimization
    num_iterations: int = 5690
    cooldown_frac: float = 0.7  # lr constant for the first 1 - cooldown_frac of the steps, then linear to 0
    muon_lr: float = 0.025
    muon_weight_decay: float = 0.01  # decoupled, multiplied by the scheduled lr; MLP matrices get twice this
    muon_momentum_start: float = 0.85
    muon_momentum_end: float = 0.95
    muon_momentum_warmup_steps: int = 300
    head_lr: float = 1 / 320
    embed_lr: float = 0.3
    scalar_lr: float = 0.015
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    adam_eps: float = 1e-10
    # run
    val_every: int = 125  # evaluate at step 0, every val_every steps and at the end; 0: only at the end
    warmup_steps: int = 10  # untimed steps on random tokens (compiles everything); weights and state restored
    compile: str = "auto"  # auto = torch.compile on CUDA only; "true" / "false" force it
    coordinate_descent_tuning: bool = True
    ce_chunk_rows: int = 8192  # rows of logits alive at once in the fused cross-entropy
    seed: int = -1  # -1 draws a fresh seed (logged); set it for reproducible runs
    save_checkpoint: bool = False
    allow_cpu: bool = False  # without CUDA only small models may run (the full model would take weeks on a CPU)
    log_dir: str = "logs"
    run_name: str = "gpt"

    @property
    def step_tokens(self):  # training tokens per optimizer step, summed over ranks
        return self.micro_batch_tokens * self.micro_batches_per_step


PRESETS = {
    "full": {},
    # CPU smoke configuration: the same code with a small model; still reads real GPT-2 token shards, and keeps
    # FlexAttention's 128-token blocks so it also runs on a GPU.
    "tiny": dict(
        num_layers=6, model_dim=64, num_heads=2, head_dim=32, mlp_hidden=256, num_value_embeds=2,
        micro_batch_tokens=512, micro_batches_per_step=2, attn_block_size=128, max_window_tokens=384,
        val_tokens=2048, num_iterations=20, val_every=10, warmup_steps=2, ce_chunk_rows=128,
        muon_momentum_warmup_steps=10, seed=1234, allow_cpu=True, run_name="gpt_tiny",
    ),
}


def parse_bool(text):
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_args(argv):
    """`--preset NAME` first, then `--field=value` / `--field value` overrides (a bare bool flag means true)."""
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    preset, overrides, i = "full", {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: hyperparameters are given as --field=value")
        name, has_value, value = arg[2:].partition("=")
        if name != "preset" and name not in fields:
            raise SystemExit(f"unknown hyperparameter --{name}; the fields are: {', '.join(fields)}")
        if not has_value:
            is_flag = name in fields and fields[name].type is bool
            if is_flag and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise SystemExit(f"--{name} needs a value")
        i += 1
        if name == "preset":
            if value not in PRESETS:
                raise SystemExit(f"unknown preset {value!r}; choose one of {sorted(PRESETS)}")
            preset = value
        else:
            kind = fields[name].type
            try:
                overrides[name] = parse_bool(value) if kind is bool else kind(value)
            except ValueError as error:
                raise SystemExit(f"--{name}={value!r} is not a valid {kind.__name__}: {error}")
    return Hyperparameters(**{**PRESETS[preset], **overrides})


def check_config(args, world_size):
    """Impossible configurations end here, before any process group or data is touched."""
    problems = []
    if args.micro_batches_per_step % world_size != 0:
        divisors = [n for n in range(1, args.micro_batches_per_step + 1) if args.micro_batches_per_step % n == 0]
        problems.append(f"world size {world_size} does not divide micro_batches_per_step={args.micro_batches_per_step}: "
                        f"launch {', '.join(map(str, divisors))} processes (e.g. torchrun --nproc_per_node=8)")
    if args.micro_batch_tokens % args.attn_block_size != 0:
        problems.append(f"micro_batch_tokens={args.micro_batch_tokens} must be a multiple of attn_block_size={args.attn_block_size}")
    if args.val_tokens <= 0 or args.val_tokens % args.step_tokens != 0:
        problems.append(f"val_tokens={args.val_tokens} must be a positive multiple of micro_batch_tokens * "
                        f"micro_batches_per_step = {args.step_tokens}")
    if args.num_heads * args.head_dim != args.model_dim:
        problems.append(f"num_heads * head_dim = {args.num_heads * args.head_dim} must equal model_dim={args.model_dim} "
                        "(value embeddings are added to v)")
    if args.head_dim % 4 != 0:
        problems.append(f"head_dim={args.head_dim} must be a multiple of 4 (half-truncated rotary)")
    if args.num_layers < 2 or 2 * args.num_value_embeds > args.num_layers:
        problems.append(f"num_layers={args.num_layers} must be >= 2 and >= 2 * num_value_embeds={args.num_value_embeds}")
    if not 0 <= args.eos_token < args.vocab_size:
        problems.append(f"eos_token={args.eos_token} must be a token id below vocab_size={args.vocab_size}")
    if args.num_iterations < 1 or args.ce_chunk_rows < 1 or args.warmup_steps < 0:
        problems.append("num_iterations and ce_chunk_rows must be >= 1, warmup_steps >= 0")
    if args.compile not in ("auto", "true", "false"):
        problems.append(f"compile={args.compile!r} must be auto, true or false")
    if problems:
        raise SystemExit("invalid configuration:\n  " + "\n  ".join(problems))


# ---- Kernels: soft-capped cross-entropy ----
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


if HAS_TRITON:
    @triton.jit
    def softcap_ce_rows_kernel(logits_ptr, row_stride, targets_ptr, loss_ptr, vocab_size: tl.constexpr, cap, grad_scale,
                               WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        # capped logits lie in (-cap, cap): exp(c - cap) can neither overflow nor underflow, no running max needed
        sum_exp = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < vocab_size, other=0.0).to(tl.float32)
            capped = cap * z / tl.sqrt(z * z + cap * cap)
            sum_exp += tl.where(cols < vocab_size, tl.exp(capped - cap), 0.0)
        lse = cap + tl.log(tl.sum(sum_exp, axis=0))
        target = tl.load(targets_ptr + row)
        z_target = tl.load(row_ptr + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - cap * z_target / tl.sqrt(z_target * z_target + cap * cap))
        if WRITE_GRAD:
            for start in range(0, vocab_size, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                z = tl.load(row_ptr + cols, mask=cols < vocab_size, other=0.0).to(tl.float32)
                denom = z * z + cap * cap
                prob = tl.exp(cap * z / tl.sqrt(denom) - lse)
                prob = tl.where(cols == target, prob - 1.0, prob)
                grad = prob * (cap * cap * cap * grad_scale) / (denom * tl.sqrt(denom))
                tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < vocab_size)


def softcap_ce_rows_triton(logits, targets, cap, grad_scale, write_grad):
    """Triton version of softcap_ce_rows_reference (same contract); logits must have unit column stride."""
    assert logits.stride(1) == 1 and targets.is_contiguous()
    loss = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    softcap_ce_rows_kernel[(logits.size(0),)](logits, logits.stride(0), targets, loss, logits.size(1), float(cap),
                                              float(grad_scale), WRITE_GRAD=write_grad, BLOCK_V=1024, num_warps=8)
    return loss


def softcap_ce_rows(logits, targets, cap, grad_scale, write_grad):
    if logits.is_cuda and HAS_TRITON:
        return softcap_ce_rows_triton(logits, targets, cap, grad_scale, write_grad)
    return softcap_ce_rows_reference(logits, targets, cap, grad_scale, write_grad)


def chunked_softcap_ce(x, weight, targets, cap, chunk_rows, with_grads):
    """Mean soft-capped cross-entropy of logits = x @ weight.T; with_grads also returns (grad_x, grad_weight).
    On CUDA the matmuls run in the activation dtype (bf16, like the record); the CPU reference runs them in fp32
    because CPUs without bf16 units are very slow at bf16 matmuls."""
    compute_dtype = x.dtype if x.is_cuda or x.dtype == torch.float64 else torch.float32
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


# ---- Kernels: symmetric X @ X^T for Newton-Schulz ----
# X @ X^T is symmetric: the kernel computes only the tiles on and below the diagonal and writes each off-diagonal tile
# twice (as itself and transposed), halving the FLOPs of the two symmetric products of every Newton-Schulz step.

def matmul(a, b):
    """a @ b with bf16 GEMM semantics. CPUs without bf16 units are ~20x slower at bf16 matmuls, so on CPU the
    bf16-valued inputs are multiplied in fp32 and the result rounded to bf16: the same fp32 accumulation and
    output rounding as the GPU's bf16 GEMM."""
    if a.is_cuda or a.dtype != torch.bfloat16:
        return a @ b
    return (a.float() @ b.float()).bfloat16()


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


def xxt_triton(x, block_m=64, block_k=64):
    """X @ X^T for X of shape (..., rows, cols) (any strides), computing one triangle."""
    batch_shape, rows, cols = x.shape[:-2], x.size(-2), x.size(-1)
    x3 = x.reshape(-1, rows, cols)
    out = torch.empty(x3.size(0), rows, rows, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(rows, block_m), x3.size(0))
    xxt_kernel[grid](x3, out, rows, cols, *x3.stride(), *out.stride(), BLOCK_M=block_m, BLOCK_K=block_k,
                     num_warps=4, num_stages=4)
    return out.reshape(*batch_shape, rows, rows)


def xxt(x):
    if x.is_cuda and HAS_TRITON:
        return xxt_triton(x)
    return xxt_reference(x)


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


FLEX_ATTENTION = flex_attention  # replaced by a compiled version on CUDA when the model is not compiled


def attention(q, k, v, mask, scale):
    """q, k, v: (1, heads, T, head_dim). FlexAttention on GPU; on CPU (no FlexAttention backward) SDPA with the
    same mask expanded to tokens."""
    if isinstance(mask, BlockMask):
        return FLEX_ATTENTION(q, k, v, block_mask=mask, scale=scale)
    y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    return y.type_as(q)  # fp32 math on CPU for speed, as in matmul()


def uniform_(weight, fan_in):
    bound = math.sqrt(3) * 0.5 / math.sqrt(fan_in)  # std 0.5 / sqrt(fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def linear(x, weight):
    """x @ weight^T with the weight cast to the activation dtype (bf16 on CPU computed as in matmul())."""
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
    dims has zero frequency (not rotated)."""

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
    def __init__(self, args):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = args.num_heads, args.head_dim, args.attn_scale
        hidden = args.num_heads * args.head_dim
        self.qkv_weight = nn.Parameter(uniform_(torch.empty(3, hidden, args.model_dim), args.model_dim))
        self.proj = CastedLinear(hidden, args.model_dim, zero_init=True)
        self.rotary = Rotary(args.head_dim, args.micro_batch_tokens, args.rope_min_freq)

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
    def __init__(self, args):
        super().__init__()
        self.fc = CastedLinear(args.model_dim, args.mlp_hidden)
        self.proj = CastedLinear(args.mlp_hidden, args.model_dim, zero_init=True)
        self.fc.weight.wd_mul = self.proj.weight.wd_mul = 2.0  # MLP matrices: twice the weight decay

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, args, has_attention):
        super().__init__()
        self.attn = CausalSelfAttention(args) if has_attention else None
        self.mlp = MLP(args)

    def forward(self, x, x00, x01, lambdas, v_lambdas, value_embed, mask):
        x = lambdas[0] * x + lambdas[1] * x00 + lambdas[2] * x01
        if self.attn is not None:
            x = x + self.attn(x, value_embed, v_lambdas, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.layout = layer_layout(args.num_layers, args.num_value_embeds)
        self.embed1 = nn.Embedding(args.vocab_size, args.model_dim)
        self.embed2 = nn.Embedding(args.vocab_size, args.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(args.vocab_size, args.model_dim) for _ in range(args.num_value_embeds))
        self.blocks = nn.ModuleList(Block(args, has_attention) for has_attention in self.layout["has_attention"])
        self.head = CastedLinear(args.model_dim, args.vocab_size, zero_init=True)
        n = args.num_layers
        # all scalars in one fp32 vector: per block (l0, l1, l2) = (1, 0, 0), per block value mix (0.5, 0.5),
        # one weight per U-net skip (1)
        self.scalars = nn.Parameter(torch.cat([
            torch.tensor([1.0, 0.0, 0.0]).repeat(n), torch.full((2 * n,), 0.5), torch.ones(len(self.layout["skips"]))]))
        for p in [*self.embed1.parameters(), *self.embed2.parameters(), *self.value_embeds.parameters(),
                  *self.blocks.parameters()]:
            p.data = p.data.bfloat16()  # block matrices and embeddings are stored in bf16; head and scalars stay fp32

    def forward(self, inputs, targets, long_window_blocks):
        args, layout, n = self.args, self.layout, self.args.num_layers
        masks = make_block_masks(inputs, args.eos_token, args.attn_block_size, long_window_blocks)
        if not inputs.is_cuda:
            masks = [block_mask_to_dense(mask, inputs.size(0)) for mask in masks]
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
                      masks[0] if layout["long_window"][i] else masks[1])
            outputs.append(x)
        return softcap_cross_entropy(norm(x)[0], self.head.weight, targets, args.logit_cap, args.ce_chunk_rows)


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


class GradientReducer:
    """Accumulates every parameter's gradient in fp32 over the micro-steps (hooks free p.grad as soon as it is
    ready) and, on the last micro-step, starts an asynchronous all-reduce per parameter right away, overlapping
    the rest of the backward. finish() divides by the total number of micro-batches, so 1 process x 8 micro-steps
    and 8 processes x 1 micro-step compute the same mean gradient."""

    def __init__(self, params, world_size):
        self.params, self.world_size = list(params), world_size
        self.grads = {p: torch.zeros_like(p, dtype=torch.float32) for p in self.params}
        self.first = self.last = True
        self.pending, self.ready = [], 0
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def begin_micro_step(self, first, last):
        self.first, self.last = first, last

    def _on_grad(self, p):
        buffer = self.grads[p]
        buffer.copy_(p.grad) if self.first else buffer.add_(p.grad)
        p.grad = None
        if self.last:
            self.ready += 1
            if self.world_size > 1:
                self.pending.append(dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True))

    def finish(self, total_micro_batches):
        for work in self.pending:
            work.wait()
        if self.ready != len(self.params):
            raise RuntimeError(f"only {self.ready} of {len(self.params)} parameters received a gradient this step")
        self.pending, self.ready = [], 0
        torch._foreach_div_(list(self.grads.values()), float(total_micro_batches))
        return self.grads


def split_master(master):
    """fp32 master -> (bf16 high half as int16 bits, low half)."""
    bits = master.view(torch.int32)
    return (bits >> 16).to(torch.int16), bits.to(torch.int16)  # int32 -> int16 keeps the low 16 bits


def join_master(weight_bf16, low_bits):
    """bf16 weight + 16-bit low half -> the exact fp32 master copy."""
    high = weight_bf16.view(torch.int16).to(torch.int32) << 16
    return (high | (low_bits.to(torch.int32) & 0xFFFF)).view(torch.float32)


class Snapshots:
    """state_snapshot / load_snapshot (the untimed warm-up restores them) for an optimizer whose `state` is a list
    of None or dicts of tensors and plain numbers."""

    @staticmethod
    def _clone(states):
        return [None if s is None else {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in states]

    def state_snapshot(self):
        return self._clone(self.state)

    def load_snapshot(self, snapshot):
        self.state = self._clone(snapshot)


class Muon(Snapshots):
    """Momentum + Newton-Schulz orthogonalisation for the block matrices. Matrices of equal shape are dealt
    round-robin to the ranks: each rank updates its share (bf16 weight + low half buffer = exact fp32 master),
    then the new bf16 weights are all-gathered."""

    def __init__(self, params, lr, weight_decay, rank, world_size):
        self.lr, self.weight_decay, self.rank, self.world_size = lr, weight_decay, rank, world_size
        shapes = []
        for p in params:
            if p.shape not in shapes:
                shapes.append(p.shape)
        self.groups = [[p for p in params if p.shape == shape] for shape in shapes]
        self.params = [p for group in self.groups for p in group]
        self.slot = {id(p): i for i, p in enumerate(self.params)}
        self.state = [None] * len(self.params)  # only the owning rank holds a matrix's state

    @torch.no_grad()
    def step(self, grads, lr_scale, momentum):
        lr = self.lr * lr_scale
        gathers = []
        for group in self.groups:
            for base in range(0, len(group), self.world_size):
                index = base + self.rank
                if index < len(group):
                    self._update(group[index], grads[group[index]], lr, momentum)
                if self.world_size > 1:
                    outputs = group[base:base + self.world_size]
                    outputs = outputs + [torch.empty_like(group[0]) for _ in range(self.world_size - len(outputs))]
                    gathers.append(dist.all_gather(outputs, outputs[self.rank], async_op=True))
        for work in gathers:
            work.wait()

    def _update(self, p, grad, lr, momentum):
        slot = self.slot[id(p)]
        if self.state[slot] is None:
            self.state[slot] = dict(momentum_buffer=torch.zeros_like(grad), low_bits=torch.zeros_like(p, dtype=torch.int16))
        state = self.state[slot]
        buffer = state["momentum_buffer"]
        buffer.lerp_(grad, 1 - momentum)  # EMA of gradients
        update = newton_schulz(grad.lerp(buffer, momentum))  # Nesterov: momentum * buf + (1 - momentum) * grad
        lr_eff = lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        master = join_master(p.data, state["low_bits"])
        master.mul_(1 - lr * self.weight_decay * getattr(p, "wd_mul", 1.0))
        master.add_(update.float(), alpha=-lr_eff)
        high, low = split_master(master)
        p.data.view(torch.int16).copy_(high)
        state["low_bits"].copy_(low)


class AdamW(Snapshots):
    """Adam without weight decay (decoupled decay is 0 here) with fp32 state; bf16 parameters are updated in fp32
    and rounded back."""

    def __init__(self, groups, betas, eps):
        self.groups = groups  # list of dict(params=[...], lr=...)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.state = [dict(step=0, exp_avg=None, exp_avg_sq=None) for g in groups for _ in g["params"]]

    @torch.no_grad()
    def step(self, grads, lr_scale):
        slot = 0
        for group in self.groups:
            lr = group["lr"] * lr_scale
            for p in group["params"]:
                state, grad = self.state[slot], grads[p]
                slot += 1
                if state["exp_avg"] is None:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] += 1
                state["exp_avg"].lerp_(grad, 1 - self.beta1)
                state["exp_avg_sq"].mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
                bias1, bias2 = 1 - self.beta1 ** state["step"], 1 - self.beta2 ** state["step"]
                denom = state["exp_avg_sq"].sqrt().div_(math.sqrt(bias2)).add_(self.eps)
                update = torch.div(state["exp_avg"], denom, out=denom).mul_(lr / bias1)  # one temporary, reused
                if p.dtype == torch.float32:
                    p.sub_(update)
                else:
                    p.copy_(p.float().sub_(update))


# ---- Data ----

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
FETCH_HINT = "run `python data/cached_fineweb10B.py N` from the repository root to fetch the val shard and N train shards"


def shard_token_count(path):
    """Validates the header of a token shard and returns its token count."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header.size < SHARD_HEADER_INTS:
        raise SystemExit(f"{path}: corrupt shard, {size} bytes is shorter than the {4 * SHARD_HEADER_INTS}-byte header")
    if header[0] != SHARD_MAGIC:
        raise SystemExit(f"{path}: wrong magic number {header[0]} (expected {SHARD_MAGIC}): not a token shard")
    if header[1] != SHARD_VERSION:
        raise SystemExit(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = 4 * SHARD_HEADER_INTS + 2 * count
    if size != expected:
        raise SystemExit(f"{path}: corrupt shard, header says {count} tokens ({expected} bytes) but the file has "
                         f"{size} bytes; delete it and fetch it again")
    return count


def load_shard(path):
    count = shard_token_count(path)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * SHARD_HEADER_INTS, shape=(count,))


def check_token_range(tokens, vocab_size, path):
    """Checked per batch (microseconds) rather than per shard, so opening a shard costs no full read."""
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise SystemExit(f"{path}: token id {int(tokens.max())} is >= vocab_size={vocab_size}")


def find_shards(pattern, kind):
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"no {kind} shards match {pattern!r} (relative to {os.getcwd()}): {FETCH_HINT}")
    return files


def steps_in_shard(num_tokens, step_tokens):
    """Whole steps a shard provides: a step reads step_tokens + 1 consecutive tokens (inputs and shifted targets)."""
    return max(0, (num_tokens - 1) // step_tokens)


def check_train_data(files, args):
    step_tokens = args.step_tokens
    available = sum(steps_in_shard(shard_token_count(path), step_tokens) for path in files)
    if available < args.num_iterations:
        per_shard = 100_000_000 // step_tokens
        need = math.ceil(args.num_iterations / per_shard)
        raise SystemExit(f"the {len(files)} train shards hold {available} steps of {step_tokens} tokens but "
                         f"num_iterations={args.num_iterations}: run `python data/cached_fineweb10B.py {need}` "
                         "from the repository root (100M-token shards)")


def to_device(tokens, device):
    """n + 1 consecutive tokens -> (inputs int32, targets int64) of n tokens each, copied asynchronously on CUDA."""
    pair = torch.from_numpy(np.asarray(tokens[:-1], dtype=np.int32)), torch.from_numpy(np.asarray(tokens[1:], dtype=np.int64))
    if device.type == "cuda":
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in pair)
    return pair


def rank_micro_batches(tokens, args, rank, world_size):
    """This rank's micro-batches of a token stream (T + 1 tokens each). Step s reads the next step_tokens (+1)
    tokens; its micro-batch j covers tokens [j*T, (j+1)*T + 1) of that window and rank r takes micro-batches
    r*A .. r*A + A-1 (A = micro-steps per rank): the same tokens per step for any world size."""
    seq_len, per_rank, step_tokens = args.micro_batch_tokens, args.micro_batches_per_step // world_size, args.step_tokens
    for pos in range(0, steps_in_shard(len(tokens), step_tokens) * step_tokens, step_tokens):
        for micro in range(per_rank):
            start = pos + (rank * per_rank + micro) * seq_len
            yield tokens[start:start + seq_len + 1]


def train_batches(files, args, rank, world_size, device):
    """Yields (inputs, targets) per micro-step, shard after shard (see rank_micro_batches)."""
    for path in files:
        for chunk in rank_micro_batches(load_shard(path), args, rank, world_size):
            check_token_range(chunk, args.vocab_size, path)
            yield to_device(chunk, device)


def load_val_tokens(files, args):
    """The first val_tokens (+1 for the last target) tokens of the val shards, in order."""
    parts, have = [], 0
    for path in files:
        if have > args.val_tokens:
            break
        parts.append(np.asarray(load_shard(path)[:args.val_tokens + 1 - have]))
        check_token_range(parts[-1], args.vocab_size, path)
        have += len(parts[-1])
    if have < args.val_tokens + 1:
        raise SystemExit(f"the val shards {files} hold {have} tokens but val_tokens={args.val_tokens} needs "
                         f"{args.val_tokens + 1}: fetch the full val shard ({FETCH_HINT}) or lower --val_tokens")
    return np.concatenate(parts)


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


PEAK_BF16_FLOPS = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class Logger:
    """Rank 0 writes logs/<run_id>.txt line by line (flushed) and echoes to stdout; other ranks stay quiet."""

    def __init__(self, args, is_master):
        self.file = None
        if is_master:
            os.makedirs(args.log_dir, exist_ok=True)
            self.run_id = f"{args.run_name}_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:8]}"
            self.path = os.path.join(args.log_dir, f"{self.run_id}.txt")
            self.file = open(self.path, "w")

    def __call__(self, text, console=True):
        if self.file is None:
            return
        if console:
            print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def gpu_list():
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
        if result.returncode == 0:
            return result.stdout.rstrip()
    if torch.cuda.is_available():
        return "\n".join(f"GPU {i}: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count()))
    return "no GPU (CPU run)"


def main(argv):
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    check_config(args, world_size)
    use_cuda = torch.cuda.is_available()
    if not use_cuda and not args.allow_cpu:
        raise SystemExit("no CUDA GPU is visible: this configuration needs GPUs (launch it with ./run.sh on a GPU "
                         "node). For a CPU run of the same code use --preset tiny (or --allow_cpu with a small model).")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    # data first: a missing or corrupt file should fail before minutes of compilation (and before a log exists)
    train_files = find_shards(args.train_files, "train")
    check_train_data(train_files, args)
    val_tokens = load_val_tokens(find_shards(args.val_files, "val"), args)

    is_master = rank == 0
    log = Logger(args, is_master)
    with open(__file__) as script:
        log(script.read(), console=False)
    log("=" * 100, console=False)
    log(f"Python {platform.python_version()}\nPyTorch {torch.__version__}\nCUDA {torch.version.cuda or 'none'}")
    log(gpu_list())
    log("=" * 100)

    if args.seed < 0:  # a fresh seed per run, shared by all ranks
        seed = torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int64, device=device)
        if world_size > 1:
            dist.broadcast(seed, 0)
        args.seed = int(seed)
    log(repr(args))
    compile_model = args.compile == "true" or (args.compile == "auto" and use_cuda)

    torch.manual_seed(args.seed)
    with device:
        model = GPT(args)
    if world_size > 1:
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    groups = parameter_groups(model)
    counts = {name: sum(p.numel() for p in params) for name, params in groups.items()}
    log(f"parameters: {sum(counts.values()):,} (" + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")")
    muon = Muon(groups["matrices"], args.muon_lr, args.muon_weight_decay, rank, world_size)
    adam = AdamW([dict(params=groups["head"], lr=args.head_lr), dict(params=groups["embeddings"], lr=args.embed_lr),
                  dict(params=groups["scalars"], lr=args.scalar_lr)], (args.adam_beta1, args.adam_beta2), args.adam_eps)
    reducer = GradientReducer(model.parameters(), world_size)
    micro_steps = args.micro_batches_per_step // world_size

    global FLEX_ATTENTION
    if use_cuda:
        if compile_model:
            import torch._inductor.config as inductor_config
            inductor_config.coordinate_descent_tuning = args.coordinate_descent_tuning
        else:  # eager FlexAttention would materialise the full score matrix
            FLEX_ATTENTION = torch.compile(flex_attention, dynamic=False)
    run_model = torch.compile(model, dynamic=False) if compile_model else model

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    windows = {}  # long window size (blocks) -> device tensor: one blocking host-to-device copy per distinct size

    def window_tensor(step):
        blocks = window_blocks(step, args)
        if blocks not in windows:
            windows[blocks] = torch.tensor(blocks, dtype=torch.int32, device=device)
        return windows[blocks]

    def train_step(step, batches):
        window = window_tensor(step)
        for micro in range(micro_steps):
            inputs, targets = next(batches)
            reducer.begin_micro_step(first=micro == 0, last=micro == micro_steps - 1)
            run_model(inputs, targets, window).backward()
        grads = reducer.finish(args.micro_batches_per_step)
        scale = lr_factor(step, args)
        adam.step(grads, scale)
        muon.step(grads, scale, muon_momentum(step, args))

    @torch.no_grad()
    def evaluate(step):
        window = window_tensor(step)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for chunk in rank_micro_batches(val_tokens, args, rank, world_size):  # the same partition as in training
            total += run_model(*to_device(chunk, device), window)
        if world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return (total / (args.val_tokens // args.micro_batch_tokens)).item()

    # untimed warm-up on random tokens (compiles the kernels), then restore weights and optimizer state
    if args.warmup_steps > 0:
        initial = dict(model=copy.deepcopy(model.state_dict()), muon=muon.state_snapshot(), adam=adam.state_snapshot())
        generator = torch.Generator().manual_seed(args.seed + rank)

        def random_batches():
            while True:
                tokens = torch.randint(0, args.vocab_size, (args.micro_batch_tokens + 1,), generator=generator)
                yield to_device(tokens.numpy(), device)

        warmup_data = random_batches()
        for warmup_step in range(args.warmup_steps):
            train_step(args.num_iterations // 2, warmup_data)  # mid-training windows
        model.load_state_dict(initial["model"])
        muon.load_snapshot(initial["muon"])
        adam.load_snapshot(initial["adam"])
        del initial

    batches = train_batches(train_files, args, rank, world_size, device)
    step_tokens = args.step_tokens
    peak = peak_flops(device)
    matmul_params = counts["matrices"] + counts["head"]
    training_time_ms, total_flops = 0.0, 0.0

    def throughput_line(steps_done):
        seconds = training_time_ms / 1000
        tokens_per_s = steps_done * step_tokens / max(seconds, 1e-9)
        mfu = f"{100 * total_flops / (seconds * peak * world_size):.2f}%" if peak and seconds > 0 else "n/a"
        return f"tokens_per_s:{tokens_per_s:.0f} ms_per_step:{training_time_ms / max(steps_done, 1):.2f} mfu:{mfu}"

    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    if world_size > 1:
        dist.barrier()  # all ranks start the clock together
    sync()
    t0 = time.perf_counter()
    for step in range(args.num_iterations + 1):
        last_step = step == args.num_iterations
        if last_step or (args.val_every > 0 and step % args.val_every == 0):
            sync()
            training_time_ms += 1000 * (time.perf_counter() - t0)
            val_loss = evaluate(step)
            step_avg = f"{training_time_ms / step:.2f}" if step else "nan"
            log(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms step_avg:{step_avg}ms")
            if step:
                log(throughput_line(step))
            sync()
            t0 = time.perf_counter()
        if last_step:
            break
        train_step(step, batches)
        total_flops += step_tokens * flops_per_token(args, model.layout, matmul_params, window_blocks(step, args))
        approx_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
        log(f"step:{step + 1}/{args.num_iterations} train_time:{approx_ms:.0f}ms step_avg:{approx_ms / (step + 1):.2f}ms")

    if use_cuda:
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2 ** 20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2 ** 20} MiB")
    else:
        log(f"peak memory: max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB (CPU run)")
    if args.save_checkpoint and is_master:
        path = os.path.join(args.log_dir, f"{log.run_id}_final.pt")
        torch.save(dict(step=args.num_iterations, model=model.state_dict(), hyperparameters=dataclasses.asdict(args)), path)
        log(f"checkpoint: {path}")
    if is_master:
        log(f"log: {log.path}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
