"""train_gpt.py against the public record script, on the CPU (no GPU needed): model, block masks, data order,
gradients, schedules, Newton-Schulz and the Muon update, and a few training steps.

    python bench/compare_public.py RECORD_LOG [--seq_len 2048] [--windows 1 2 3 4 8] [--train_steps 16]

RECORD_LOG is the public GPT-2 Medium record's log (its first part is the script; records/gpu/README.md says where
it comes from). Its code is read from the log and run here, never copied into the repository, with the run-time
changes in CHANGES, which keep the math. Both models get the same random non-zero weights (the zero-initialised
ones too) and run in fp32. The record's attention is train_gpt.py's CPU attention, which honours the block mask's
kv-block counts as FlexAttention's kernel does (eager FlexAttention on a CPU applies only the mask function, so
the sliding window would be ignored), and the block masks themselves are compared block by block. Prints one line
per check; exit 1 when one differs."""

import argparse
import copy
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402
from data.fineweb import Once, write_shard  # noqa: E402

CHANGES = [  # (the record's text, what runs here, why) : run-time changes that keep the math
    ('torch.empty(1, device="cuda", requires_grad=True).backward()', "pass", "no GPU here"),
    ('torch.arange(NUM_BLOCKS, dtype=torch.int32, device="cuda")',
     "torch.arange(NUM_BLOCKS, dtype=torch.int32, device=input_seq.device)", "masks on the input's device"),
    ('.to(device="cuda"', '.to(device="cpu"', "batches stay on the CPU"),
    ("pin_memory=True", "pin_memory=False", "no GPU to pin memory for"),
    ("self.lm_head_w.bfloat16()", "self.lm_head_w", "fp32 comparison"),
    ("torch.uint32", "torch.int32", "CPU has no uint32 shifts; the same bits"),
]
VOCAB = 50257  # the record's embedding rows (its head and train_gpt.py's tables are padded to 50304)


def load_public(record_log, fp32_head=True):
    """The record script's code before its main part, with CHANGES (the head's bf16 cast kept when not fp32_head)."""
    try:
        text = Path(record_log).read_text()
    except UnicodeDecodeError as e:
        raise SystemExit(f"compare_public.py: error: {record_log} is not a text log ({e.reason} at byte {e.start}): "
                         "pass the GPT-2 Medium record's log (records/gpu/README.md)") from None
    script = text.split("=" * 100)[0]
    if "class GPT(" not in script or "# int main" not in script:
        raise SystemExit(f"compare_public.py: error: {record_log} does not start with the record script (no GPT class"
                         " or '# int main' line): pass the GPT-2 Medium record's log (records/gpu/README.md)")
    code = script[:script.index("# int main")]
    for old, new, _ in CHANGES:
        if new == "self.lm_head_w" and not fp32_head:
            continue
        if old not in code:
            raise SystemExit(f"compare_public.py: error: the record script has no {old!r}: not the script this "
                             "comparison was written for (the 2025-09-11 GPT-2 Medium record)")
        code = code.replace(old, new)
    public = types.ModuleType("public_record")
    public.__dict__["__file__"] = record_log
    saved_argv = sys.argv
    sys.argv = [record_log]  # it reads its own text as sys.argv[0] for its log
    try:
        exec(compile(code, record_log, "exec"), public.__dict__)
    finally:
        sys.argv = saved_argv
    public.flex_attention = tg.attention  # block counts honoured, as by the compiled kernel
    return public


def same_weights(public, seq_len):
    """The record's GPT and train_gpt.py's, in fp32, with the same random non-zero weights."""
    theirs = public.GPT(vocab_size=VOCAB, num_layers=16, num_heads=8, model_dim=1024, max_seq_len=seq_len).float()
    ours = tg.build_model(tg.Hyperparameters(micro_batch_tokens=seq_len, val_seq_len=seq_len)).float()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.ndim >= 2 else 0.5 + 0.3 * torch.randn_like(p))
    copy_weights(theirs, ours)
    return ours, theirs


@torch.no_grad()
def copy_weights(theirs, ours):
    """The record model's weights into ours (our embedding tables have 47 more rows, never read)."""
    n = len(ours.blocks)
    for a, b in [(ours.embed1, theirs.embed1), (ours.embed2, theirs.embed2), *zip(ours.value_embeds, theirs.value_embeds)]:
        a.weight[:VOCAB].copy_(b.weight)
    ours.head.weight.copy_(theirs.lm_head_w)
    for a, b in zip(ours.blocks, theirs.blocks):
        if (a.attn is None) != (b.attn is None):
            raise SystemExit("compare_public.py: the blocks without attention differ")
        if a.attn is not None:
            a.attn.qkv_weight.copy_(b.attn.qkvo_w[:3])
            a.attn.proj.weight.copy_(b.attn.qkvo_w[3])
        a.mlp.fc.weight.copy_(b.mlp.fc_w)
        a.mlp.proj.weight.copy_(b.mlp.proj_w)
    s = theirs.scalars  # skip weights (n), block lambdas (3n), value-mix lambdas (2n)
    skips = [s[source] for source in ours.layout["skips"].values()]
    ours.scalars.copy_(torch.cat([s[n:4 * n], s[4 * n:6 * n], torch.stack(skips)]))


def function_text(public, name):
    """The source of one top-level function of the record script, up to its next top-level line."""
    code = Path(public.__file__).read_text().split("=" * 100)[0]
    start = code.index(f"\ndef {name}(") + 1
    lines = code[start:].split("\n")
    end = next(i for i, line in enumerate(lines[1:], 1) if line and not line[0].isspace() and line[0] != ")")
    return "\n".join(lines[:end])


def public_in_float64(public):
    """The record's Newton-Schulz function with float64 instead of bf16: its exact arithmetic."""
    text = function_text(public, "zeropower_via_newtonschulz5")
    if "G.bfloat16()" not in text:
        raise SystemExit("compare_public.py: error: the record's Newton-Schulz has no G.bfloat16(): not the script "
                         "this comparison was written for (the 2025-09-11 GPT-2 Medium record)")
    namespace = dict(torch=torch, Tensor=torch.Tensor)
    exec(text.replace("G.bfloat16()", "G.double()"), namespace)
    return namespace["zeropower_via_newtonschulz5"]


def gradient_pairs(ours, theirs):
    """(name, our gradient, the record's) for every weight of the record's model."""
    n = len(ours.blocks)
    yield "embed1", ours.embed1.weight.grad[:VOCAB], theirs.embed1.weight.grad
    yield "embed2", ours.embed2.weight.grad[:VOCAB], theirs.embed2.weight.grad
    for i, (a, b) in enumerate(zip(ours.value_embeds, theirs.value_embeds)):
        yield f"value_embeds.{i}", a.weight.grad[:VOCAB], b.weight.grad
    yield "head", ours.head.weight.grad, theirs.lm_head_w.grad
    for i, (a, b) in enumerate(zip(ours.blocks, theirs.blocks)):
        if a.attn is not None:
            yield f"blocks.{i}.qkv", a.attn.qkv_weight.grad, b.attn.qkvo_w.grad[:3]
            yield f"blocks.{i}.attn_out", a.attn.proj.weight.grad, b.attn.qkvo_w.grad[3]
        yield f"blocks.{i}.mlp_fc", a.mlp.fc.weight.grad, b.mlp.fc_w.grad
        yield f"blocks.{i}.mlp_proj", a.mlp.proj.weight.grad, b.mlp.proj_w.grad
    g = theirs.scalars.grad
    skips = torch.stack([g[source] for source in ours.layout["skips"].values()])
    yield "scalars", ours.scalars.grad, torch.cat([g[n:4 * n], g[4 * n:6 * n], skips])


def same_data_streams(public, seq_len=1024, ranks=8):
    """The record's loader on 8 ranks against ours on one process with 8 micro-steps, over three small shards
    (whole steps only, as the record): the same sequences in the same order, training and validation."""
    step = ranks * seq_len
    sizes = [2 * step + 5000, 3 * step + 777, step + 300]  # not k * step + 1, where the two rules part (FineWeb's 1e8 is not)
    rng = np.random.default_rng(0)
    old_dir = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # the record's loader globs relative to the working directory
        try:
            for i, size in enumerate(sizes, start=1):
                write_shard(f"fineweb_train_{i:06d}.bin", rng.integers(0, VOCAB, size))
            write_shard("fineweb_val_000000.bin", rng.integers(0, VOCAB, 5 * step + 9))
            hp = tg.Hyperparameters(micro_batch_tokens=seq_len, micro_batches_per_step=ranks, val_seq_len=seq_len,
                                    val_tokens=4 * step)
            ours = list(tg.train_batches(sorted(Path(".").glob("fineweb_train_*.bin")), hp, 0, 1, torch.device("cpu")))
            theirs = [public.distributed_data_generator("fineweb_train_*.bin", step, rank, ranks) for rank in range(ranks)]
            record = []
            try:
                while True:
                    record.extend(next(loader) for loader in theirs)
            except (StopIteration, RuntimeError):  # its generator ends when the shards do
                pass
            train_same = len(ours) == len(record) and all(
                torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, record))
            val_ours = tg.load_val_tokens(["fineweb_val_000000.bin"], hp)
            ours_val = [tg.to_device(chunk, torch.device("cpu"))[0]
                        for chunk in tg.rank_sequences(val_ours, seq_len, 1, 0, 1)]
            theirs_val = [public.distributed_data_generator("fineweb_val_*.bin", step, rank, ranks) for rank in range(ranks)]
            record_val = [next(loader)[0] for _ in range(hp.val_tokens // step) for loader in theirs_val]
            val_same = len(ours_val) == len(record_val) and all(map(torch.equal, ours_val, record_val))
        finally:
            os.chdir(old_dir)
    return train_same, val_same, len(ours) // ranks


def schedules_of(public, num_iterations, cooldown_frac):
    """The record's get_lr and get_window_size_blocks (defined in its main part, which does not run here)."""
    namespace = dict(args=types.SimpleNamespace(num_iterations=num_iterations, cooldown_frac=cooldown_frac),
                     next_multiple_of_n=public.next_multiple_of_n,
                     get_window_size_blocks_helper=lambda window_size: torch.tensor(window_size // 128))
    for name in ["get_lr", "get_window_size_blocks"]:
        exec(function_text(public, name), namespace)
    return namespace["get_lr"], namespace["get_window_size_blocks"]


def record_training(public, initial, batches, nudge=False):
    """The record's training steps as its main part runs them on one rank: its GPT (bf16 blocks and embeddings),
    AdamW (head 1/320, embeddings 0.3, scalars 0.015, betas 0.8/0.95, eps 1e-10) and Muon (lr 0.025), the
    schedules, Muon's momentum warm-up over 300 steps. nudge: one embedding weight one bf16 step up first."""
    model = copy.deepcopy(initial)
    if nudge:
        with torch.no_grad():
            model.embed1.weight[5, 0] = torch.nextafter(model.embed1.weight[5, 0], torch.tensor(1.0, dtype=torch.bfloat16))
    get_lr, get_window = schedules_of(public, len(batches), tg.Hyperparameters().cooldown_frac)
    matrices = sorted((p for p in model.blocks.parameters() if p.ndim >= 2), key=lambda p: p.size(), reverse=True)
    embeds = [model.embed1.weight, model.embed2.weight, *(table.weight for table in model.value_embeds)]
    adam = torch.optim.AdamW([dict(params=[model.lm_head_w], lr=1 / 320), dict(params=embeds, lr=0.3),
                              dict(params=[model.scalars], lr=0.015)], betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                             fused=True)
    muon = public.Muon(matrices, lr=0.025, momentum=0.95, rank=0, world_size=1)
    base_lrs = [[group["lr"] for group in opt.param_groups] for opt in (adam, muon)]
    losses = []
    for step, (inputs, targets) in enumerate(batches):
        loss = model(inputs, targets, get_window(step))
        loss.backward()
        for opt, lrs in zip((adam, muon), base_lrs):
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * get_lr(step)
        for group in muon.param_groups:
            group["momentum"] = (1 - min(step / 300, 1)) * 0.85 + min(step / 300, 1) * 0.95
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def our_training(initial, batches, hp):
    model = tg.build_model(hp)
    copy_weights(initial, model)
    muon, adam = tg.build_optimizers(model, hp, 0, 1, compiled=False)
    averager = tg.GradientAverager(model.parameters(), 1)
    return [tg.train_step(model, iter([batch]), 1, averager, muon, adam, tg.lr_factor(step, hp),
                          tg.muon_momentum(step, hp), torch.tensor(tg.window_blocks(step, hp), dtype=torch.int32)).item()
            for step, batch in enumerate(batches)]


def same_training(record_log, steps, seq_len=1024):
    """`steps` training steps of both from the record's initialisation, 16 layers at width 128 (one head of 128),
    on the same batches, in the record's bf16 arithmetic on this CPU (train_gpt.py's CPU path multiplies bf16 in
    fp32 and takes fp32 logits; here it uses the CPU's bf16 matmuls and bf16 logits as the record, and as our GPU
    path). Returns the largest loss difference, and that of the record against itself with one weight nudged."""
    public = load_public(record_log, fp32_head=False)
    public.update = public.update.__wrapped__  # its compiled Muon update, run eagerly
    own_group = not dist.is_initialized()
    if own_group:  # its Muon all-gathers, also on one rank
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    initial = public.GPT(vocab_size=VOCAB, num_layers=16, num_heads=1, model_dim=128, max_seq_len=seq_len)
    for module in initial.modules():
        if isinstance(module, torch.nn.Embedding):
            module.bfloat16()  # as its main part does
    batches = []
    for _ in range(steps):  # a 1000-token vocabulary: something to learn in a few steps
        tokens = torch.randint(0, 1000, (seq_len + 1,))
        tokens[::97] = 50256
        batches.append((tokens[:-1].int(), tokens[1:]))
    hp = tg.Hyperparameters(num_layers=16, model_dim=128, num_heads=1, head_dim=128, mlp_hidden=512,
                            micro_batch_tokens=seq_len, micro_batches_per_step=1, val_seq_len=seq_len,
                            num_iterations=steps)
    cpu_arithmetic = tg.matmul, tg.ce_compute_dtype
    try:
        record = record_training(public, initial, batches)
        nudged = record_training(public, initial, batches, nudge=True)
        tg.matmul, tg.ce_compute_dtype = torch.matmul, lambda x: x.dtype
        ours = our_training(initial, batches, hp)
    finally:
        tg.matmul, tg.ce_compute_dtype = cpu_arithmetic
        if own_group:
            dist.destroy_process_group()
    return max(abs(a - b) for a, b in zip(ours, record)), max(abs(a - b) for a, b in zip(nudged, record)), record


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kv_blocks(mask):
    """Per query block: the sorted partial and full kv blocks a block mask attends to."""
    rows = []
    for counts, indices in [(mask.kv_num_blocks, mask.kv_indices), (mask.full_kv_num_blocks, mask.full_kv_indices)]:
        counts = counts[0, 0].clamp_min(0)
        rows.append([sorted(indices[0, 0, r, :counts[r]].tolist()) for r in range(counts.numel())])
    return rows


def check_forward(ours, theirs, inputs, targets, windows):
    ok = True
    for window in windows:
        blocks = torch.tensor(window, dtype=torch.int32)
        masks_equal = all(kv_blocks(a) == kv_blocks(b) for a, b in zip(
            tg.make_block_masks(inputs, 50256, 128, blocks), theirs.create_blockmasks(inputs.int(), blocks)))
        with torch.no_grad():
            loss_ours = ours(inputs, targets, blocks).item()
            loss_theirs = theirs(inputs.int(), targets, blocks).item()
        same = masks_equal and abs(loss_ours - loss_theirs) < 1e-5
        ok &= same
        print(f"window {window} blocks: block masks {'equal' if masks_equal else 'DIFFER'}; loss ours {loss_ours:.6f}, "
              f"record {loss_theirs:.6f}, difference {abs(loss_ours - loss_theirs):.1e} {'ok' if same else 'DIFFERS'}")
    return ok


def check_data(public):
    train_same, val_same, steps = same_data_streams(public)
    print(f"data: {steps} training steps over 3 shards {'the same' if train_same else 'DIFFER'} (8 ranks against 8 "
          f"micro-steps), validation sequences {'the same' if val_same else 'DIFFER'}")
    return train_same and val_same


def check_gradients(ours, theirs, inputs, targets, window):
    """Gradients of every weight, ours through the fused cross-entropy's own backward."""
    blocks = torch.tensor(window, dtype=torch.int32)
    ours(inputs, targets, blocks).backward()
    theirs(inputs.int(), targets, blocks).backward()
    worst, where = max((relative(a, b), name) for name, a, b in gradient_pairs(ours, theirs))
    ok = worst < 1e-4
    print(f"gradients (window {window} blocks): largest relative difference {worst:.1e} ({where}) "
          f"{'ok' if ok else 'DIFFER'}")
    return ok


def check_schedules(public):
    """Learning rate and long attention window at each of the record's 5690 steps."""
    hp = tg.Hyperparameters()
    get_lr, get_window = schedules_of(public, hp.num_iterations, hp.cooldown_frac)
    steps = range(hp.num_iterations)
    lr_same = all(abs(tg.lr_factor(step, hp) - get_lr(step)) < 1e-12 for step in steps)
    window_same = all(tg.window_blocks(step, hp) == int(get_window(step)) for step in steps)
    print(f"schedules over {hp.num_iterations} steps: learning rate {'same' if lr_same else 'DIFFERS'}, "
          f"long window {'same' if window_same else 'DIFFERS'}")
    return lr_same and window_same


def check_muon(public):
    """The record computes (c * A) @ A where train_gpt.py computes c * (A @ A^T) with its X @ X^T kernel: the same
    math, other bf16 roundings, so the two are compared by their distance from the record's own iteration in float64
    (exact arithmetic): ours must be no further from it than twice the record's own bf16 result."""
    exact_ns = public_in_float64(public)
    ok = True
    for shape, wd_mul in [((4096, 1024), 2.0), ((3, 1024, 1024), 1.0)]:
        grad = torch.randn(shape)
        exact = exact_ns(grad)
        ours_ns, theirs_ns = tg.newton_schulz(grad).double(), public.zeropower_via_newtonschulz5(grad).double()
        err_ours, err_theirs = relative(ours_ns, exact), relative(theirs_ns, exact)
        weight = (torch.randn(shape) * 0.02).bfloat16()
        w_ours, w_theirs = weight.clone(), weight.clone()
        buf_ours, buf_theirs = torch.zeros(shape), torch.zeros(shape)
        low_ours, low_theirs = torch.zeros(shape, dtype=torch.int16), torch.zeros(shape, dtype=torch.uint16)
        lr_mul = max(1, shape[-2] / shape[-1]) ** 0.5
        for lr, momentum in [(0.025, 0.85), (0.02, 0.9), (0.01, 0.95)]:
            grad = (torch.randn(shape) * 1e-3).bfloat16()
            tg.muon_update(w_ours, grad, buf_ours, low_ours, torch.tensor([momentum, lr]), lr_mul, 0.01 * wd_mul)
            public.update.__wrapped__(w_theirs.view(torch.uint16), low_theirs, buf_theirs, grad, torch.tensor(momentum),
                                      torch.tensor(lr * lr_mul), torch.tensor(lr * 0.01 * wd_mul))
        master_theirs = tg.join_master(w_theirs, low_theirs.view(torch.int16))
        apart = relative(tg.join_master(w_ours, low_ours) - weight.float(), master_theirs - weight.float())
        same = err_ours <= 2 * err_theirs and apart <= 2 * err_theirs
        ok &= same
        print(f"Muon {tuple(shape)}: Newton-Schulz from exact arithmetic: ours {err_ours:.1e}, record {err_theirs:.1e}; "
              f"3 updates apart by {apart:.1e} of their size {'ok' if same else 'DIFFER'}")
    return ok


def check_training(record_log, steps):
    apart, noise, record = same_training(record_log, steps)
    ok = apart <= 3 * noise + 1e-3
    print(f"training, {steps} steps at width 128 (loss {record[0]:.3f} -> {record[-1]:.3f}): losses at most "
          f"{apart:.0e} apart; the record against itself with one weight one bf16 step off: {noise:.0e} "
          f"{'ok' if ok else 'DIFFER'}")
    return ok


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("record_log")
    parser.add_argument("--seq_len", "--seq-len", action=Once, type=int, default=2048,
                        help="tokens (a multiple of 128)")
    parser.add_argument("--windows", action=Once, type=int, nargs="+", default=[1, 2, 3, 4, 8],
                        help="long windows, in blocks")
    parser.add_argument("--train_steps", "--train-steps", action=Once, type=int, default=16,
                        help="steps of the training comparison (0: none)")
    parser.add_argument("--seed", action=Once, type=int, default=0)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.record_log):
        parser.error(f"no file {args.record_log}: fetch the record's log first (records/gpu/README.md)")
    if args.seq_len % 128 or args.seq_len <= 0:
        parser.error("--seq_len must be a positive multiple of 128 (FlexAttention's block)")
    if min(args.windows) < 1:
        parser.error("--windows are long windows in blocks of 128 tokens: 1 or more")
    torch.manual_seed(args.seed)
    public = load_public(args.record_log)
    ours, theirs = same_weights(public, args.seq_len)
    tokens = torch.randint(0, VOCAB, (args.seq_len + 1,))
    tokens[torch.randint(0, args.seq_len, (args.seq_len // 100,))] = 50256  # about 20 documents per 2048 tokens
    tokens[0] = 50256
    inputs, targets = tokens[:-1], tokens[1:]
    checks = [check_forward(ours, theirs, inputs, targets, args.windows), check_data(public),
              check_gradients(ours, theirs, inputs, targets, args.windows[-1]), check_schedules(public),
              check_muon(public)]
    if args.train_steps > 0:
        checks.append(check_training(args.record_log, args.train_steps))
    failed = not all(checks)
    print("same as the record" if not failed else "DIFFERENT from the record")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
