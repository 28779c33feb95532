"""Tests of train_gpt.py on CPU: the tiny preset end to end (1 process and torchrun with 2 gloo processes), the
DDP / Muon-sharding equivalence, block masks, kernels vs references, data errors, and the full config's size."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from data.fineweb import write_shard

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "train_gpt.py"
TEST_VOCAB, TEST_EOS = 1024, 1023  # a small vocabulary keeps the CPU runs to seconds
STEPS = 8


def synthetic_tokens(num_tokens, seed):
    """Documents (each starting with the eos token) of arithmetic token progressions: easy to learn."""
    rng = np.random.default_rng(seed)
    tokens = []
    while len(tokens) < num_tokens:
        start, stride, length = rng.integers(0, TEST_EOS), rng.integers(1, 4), rng.integers(20, 200)
        tokens += [TEST_EOS] + [int((start + stride * i) % TEST_EOS) for i in range(length)]
    return np.array(tokens[:num_tokens], dtype=np.uint16)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_data")
    step_tokens = 512 * 2
    write_shard(root / "tiny_train_000001.bin", synthetic_tokens(STEPS * step_tokens + 1, seed=1))
    write_shard(root / "tiny_val_000000.bin", synthetic_tokens(2048 + 1, seed=2))
    return root


def tiny_args(data_dir, *extra):
    return ["--preset", "tiny", f"--train_files={data_dir}/tiny_train_*.bin", f"--val_files={data_dir}/tiny_val_*.bin",
            f"--vocab_size={TEST_VOCAB}", f"--eos_token={TEST_EOS}", f"--num_iterations={STEPS}", "--val_every=4",
            *extra]


def run_script(args, workdir, nproc=1, env_extra=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if nproc == 1:
        command = [sys.executable, str(SCRIPT), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(SCRIPT), *args]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_log(workdir):
    logs = sorted((Path(workdir) / "logs").glob("*.txt"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


def val_losses(log_text):
    return [(int(s), float(v)) for s, v in re.findall(r"^step:(\d+)/\d+ val_loss:(\d+\.\d+) ", log_text, re.M)]


def check_log_format(log_text):
    script_text = SCRIPT.read_text()
    assert log_text.startswith(script_text)
    rest = log_text[len(script_text):].lstrip("\n").splitlines()
    assert rest[0] == "=" * 100
    assert re.fullmatch(r"Python \d+\.\d+\.\d+", rest[1]) and rest[2].startswith("PyTorch ") and rest[3] == "CUDA none"
    assert "no GPU (CPU run)" in rest[4] and rest[5] == "=" * 100
    assert rest[6].startswith("Hyperparameters(")
    train_lines = [line for line in rest if re.fullmatch(r"step:\d+/\d+ train_time:\d+ms step_avg:\d+\.\d\dms", line)]
    assert [int(line.split("/")[0][5:]) for line in train_lines] == list(range(1, STEPS + 1))
    val_lines = [line for line in rest if "val_loss" in line]
    assert re.fullmatch(r"step:0/8 val_loss:\d+\.\d{4} train_time:0ms step_avg:nanms", val_lines[0])
    for line in val_lines[1:]:
        assert re.fullmatch(r"step:\d+/8 val_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d\dms", line)
    assert val_lines[-1].startswith(f"step:{STEPS}/{STEPS} ")
    assert any(re.fullmatch(r"tokens_per_s:\d+ ms_per_step:\d+\.\d\d mfu:n/a", line) for line in rest)
    assert re.search(r"^peak memory: max RSS \d+ MiB", log_text, re.M)


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory):
    """The tiny preset as 1 process x 2 micro-steps, as torchrun 2 processes x 1 micro-step, and without warm-up."""
    runs = {}
    for name, nproc, extra in [("single", 1, []), ("ddp", 2, []), ("no_warmup", 1, ["--warmup_steps=0"])]:
        workdir = tmp_path_factory.mktemp(name)
        result = run_script(tiny_args(tiny_data, "--save_checkpoint", *extra), workdir, nproc=nproc)
        log_text = read_log(workdir)
        checkpoint = torch.load(next((workdir / "logs").glob("*_final.pt")), weights_only=False)
        runs[name] = dict(stdout=result.stdout, log=log_text, model=checkpoint["model"], checkpoint=checkpoint)
    return runs


# ---- End to end ----

@pytest.mark.parametrize("name", ["single", "ddp"])
def test_tiny_run_logs_and_learns(tiny_runs, name):
    run = tiny_runs[name]
    check_log_format(run["log"])
    losses = val_losses(run["log"])
    assert [s for s, _ in losses] == [0, 4, 8]
    assert losses[0][1] == pytest.approx(np.log(TEST_VOCAB), abs=0.01)  # zero-initialised head: uniform prediction
    assert losses[-1][1] < losses[1][1] < losses[0][1] - 0.1
    assert "step:8/8 val_loss" in run["stdout"]  # rank 0 also prints to stdout
    assert run["checkpoint"]["hyperparameters"]["num_iterations"] == STEPS


def test_one_process_two_micro_steps_equals_two_processes(tiny_runs):
    """Same mean gradient, same Muon updates whichever rank owns a matrix: identical losses and weights."""
    single, ddp = tiny_runs["single"], tiny_runs["ddp"]
    assert val_losses(single["log"]) == val_losses(ddp["log"])
    assert single["model"].keys() == ddp["model"].keys()
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=0, atol=0, msg=key)


def test_warmup_restores_weights_and_optimizer_state(tiny_runs):
    with_warmup, without = tiny_runs["single"], tiny_runs["no_warmup"]
    assert val_losses(with_warmup["log"]) == val_losses(without["log"])
    for key, value in with_warmup["model"].items():
        torch.testing.assert_close(without["model"][key], value, rtol=0, atol=0, msg=key)


def test_world_size_not_dividing_micro_batches_is_an_error(tiny_data, tmp_path):
    result = run_script(tiny_args(tiny_data), tmp_path, env_extra=dict(WORLD_SIZE="3", RANK="0", LOCAL_RANK="0"),
                        check=False)
    assert result.returncode != 0
    assert "world size 3 does not divide micro_batches_per_step=2" in result.stderr


# ---- Configuration ----

def test_parse_args_forms_and_errors():
    args = tg.parse_args(["--preset", "tiny", "--num_iterations=100", "--muon_lr", "0.5", "--save_checkpoint"])
    assert (args.num_iterations, args.muon_lr, args.save_checkpoint, args.model_dim) == (100, 0.5, True, 64)
    assert tg.parse_args(["--save_checkpoint", "false", "--compile=false"]).save_checkpoint is False
    assert tg.parse_args([]).num_iterations == 5690
    with pytest.raises(SystemExit, match="unknown hyperparameter --nope"):
        tg.parse_args(["--nope=1"])
    with pytest.raises(SystemExit, match="not a valid int"):
        tg.parse_args(["--num_layers=x"])
    with pytest.raises(SystemExit, match="unknown preset"):
        tg.parse_args(["--preset", "huge"])


def test_check_config_rejects_impossible_settings():
    full = tg.Hyperparameters()
    for world_size in (1, 2, 4, 8):
        tg.check_config(full, world_size)
    with pytest.raises(SystemExit, match="world size 3 does not divide micro_batches_per_step=8"):
        tg.check_config(full, 3)
    with pytest.raises(SystemExit, match="val_tokens"):
        tg.check_config(tg.Hyperparameters(val_tokens=1000), 1)


def test_layer_layout_reproduces_the_record_for_16_layers():
    layout = tg.layer_layout(16, 5)
    assert layout["value_embed"] == [0, 1, 2, 3, 4] + [None] * 6 + [0, 1, 2, 3, 4]
    assert [i for i, a in enumerate(layout["has_attention"]) if not a] == [7]
    assert "".join("L" if x else "S" for x in layout["long_window"]) == "LSSSLSSSSSSLSSSL"
    assert layout["skips"] == {9: 6, 10: 4, 11: 2}
    tiny = tg.layer_layout(6, 2)
    assert tiny["value_embed"] == [0, 1, None, None, 0, 1] and tiny["skips"] == {4: 1}
    assert tiny["has_attention"] == [True, True, False, True, True, True]


def test_full_model_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters())
    counts = {name: sum(p.numel() for p in params) for name, params in tg.parameter_groups(model).items()}
    assert counts["matrices"] == 15 * 4 * 1024 ** 2 + 16 * 8 * 1024 ** 2  # 197M in the blocks
    assert counts["embeddings"] == 7 * 50304 * 1024  # 360M
    assert counts["head"] == 50304 * 1024  # 52M
    assert counts["scalars"] == 16 * 5 + 3
    assert sum(p.numel() for p in model.parameters()) == sum(counts.values())
    assert 605e6 < sum(counts.values()) < 615e6
    assert all(p.dtype == torch.bfloat16 for p in tg.parameter_groups(model)["matrices"])
    assert model.head.weight.dtype == torch.float32 and model.embed1.weight.dtype == torch.bfloat16


def test_schedules():
    args = tg.Hyperparameters()
    assert tg.window_blocks(args.num_iterations, args) == 27 and tg.window_blocks(0, args) == 1
    assert tg.window_blocks(args.num_iterations // 2, args) == 14  # f(0.5) = 0.5: 1728 tokens = 13.5 blocks
    assert tg.lr_factor(0, args) == 1.0 and tg.lr_factor(int(0.29 * args.num_iterations), args) == 1.0
    assert tg.lr_factor(int(0.65 * args.num_iterations), args) == pytest.approx(0.5, abs=1e-3)
    assert tg.muon_momentum(0, args) == 0.85 and tg.muon_momentum(150, args) == pytest.approx(0.9)
    assert tg.muon_momentum(1000, args) == 0.95


# ---- Attention masks ----

def dense_reference_mask(docs, block_size, window_blocks):
    positions = torch.arange(len(docs))
    q, kv = positions[:, None], positions[None, :]
    return (q >= kv) & (docs[q] == docs[kv]) & (q // block_size - kv // block_size < window_blocks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_masks_equal_dense_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    block, seq_len, eos = 16, 320, 7
    inputs = torch.randint(0, 7, (seq_len,), generator=generator)
    inputs[torch.rand(seq_len, generator=generator) < [0.01, 0.05, 0.2][seed]] = eos
    docs = (inputs == eos).cumsum(0)
    for window in [1, 2, 3, 5, 8, 30]:
        long_mask, short_mask = tg.make_block_masks(inputs, eos, block, torch.tensor(window, dtype=torch.int32))
        assert torch.equal(tg.block_mask_to_dense(long_mask, seq_len), dense_reference_mask(docs, block, window))
        assert torch.equal(tg.block_mask_to_dense(short_mask, seq_len), dense_reference_mask(docs, block, max(window // 2, 1)))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_with_block_mask_matches_dense_attention():
    generator = torch.Generator().manual_seed(0)
    block, seq_len, eos = 32, 256, 5
    inputs = torch.randint(0, 6, (seq_len,), generator=generator)
    long_mask, _ = tg.make_block_masks(inputs, eos, block, torch.tensor(3, dtype=torch.int32))
    q, k, v = torch.randn(3, 1, 2, seq_len, 16, generator=generator)
    flex = tg.flex_attention(q, k, v, block_mask=long_mask, scale=0.12)  # eager FlexAttention (forward works on CPU)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_reference_mask((inputs == eos).cumsum(0), block, 3), scale=0.12)
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_flex_attention_matches_dense_attention_on_gpu():
    generator = torch.Generator(device="cuda").manual_seed(0)
    seq_len, eos = 4096, 50256
    inputs = torch.randint(0, 50257, (seq_len,), device="cuda", generator=generator)
    inputs[torch.rand(seq_len, device="cuda", generator=generator) < 0.002] = eos
    long_mask, short_mask = tg.make_block_masks(inputs, eos, 128, torch.tensor(8, dtype=torch.int32, device="cuda"))
    q, k, v = torch.randn(3, 1, 8, seq_len, 128, device="cuda", generator=generator).bfloat16()
    docs = (inputs == eos).cumsum(0)
    for mask, window in [(long_mask, 8), (short_mask, 4)]:
        flex = torch.compile(tg.flex_attention, dynamic=False)(q, k, v, block_mask=mask, scale=0.12)
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=dense_reference_mask(docs, 128, window), scale=0.12)
        torch.testing.assert_close(flex.float(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_preset_compiled_on_gpu(tiny_data, tmp_path):
    run_script(tiny_args(tiny_data), tmp_path)
    log_text = read_log(tmp_path)
    assert "CUDA none" not in log_text and "peak memory allocated:" in log_text
    losses = val_losses(log_text)
    assert losses[-1][1] < losses[0][1] - 0.1


# ---- Kernel references ----

def naive_softcap_loss(x, weight, targets, cap):
    z = x @ weight.t()
    return torch.nn.functional.cross_entropy(cap * z / torch.sqrt(z * z + cap * cap), targets)


def test_chunked_softcap_ce_matches_autograd_in_float64():
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(37, 24, generator=generator, dtype=torch.float64)).requires_grad_()
    weight = (3 * torch.randn(50, 24, generator=generator, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=generator)
    loss = tg.softcap_cross_entropy(x, weight, targets, 15.0, 8)  # 8 does not divide 37: a ragged last chunk
    (2.5 * loss).backward()
    x_ref, weight_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss_ref = naive_softcap_loss(x_ref, weight_ref, targets, 15.0)
    (2.5 * loss_ref).backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # evaluation path: loss only
        torch.testing.assert_close(tg.softcap_cross_entropy(x, weight, targets, 15.0, 8), loss_ref.detach())


def test_softcap_ce_bf16_activations_close_to_fp32():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=generator).bfloat16().requires_grad_()
    weight = torch.randn(100, 32, generator=generator).requires_grad_()  # fp32 head, like the model
    targets = torch.randint(0, 100, (64,), generator=generator)
    tg.softcap_cross_entropy(x, weight, targets, 15.0, 16).backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    x_ref, w_ref = x.detach().float().requires_grad_(), weight.detach().clone().requires_grad_()
    naive_softcap_loss(x_ref, w_ref, targets, 15.0).backward()
    torch.testing.assert_close(x.grad.float(), x_ref.grad, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(weight.grad, w_ref.grad, rtol=1e-4, atol=1e-6)


def matrix_with_spectrum(rows, cols, singular_values, generator):
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=generator, dtype=torch.float64))
    return (u * singular_values) @ v.T


def test_newton_schulz_singular_values_in_band():
    """After Frobenius normalisation the 5 quintic steps push every singular value above ~1/300 of the norm into a
    band around 1 (not exactly 1, by design of the coefficients), keeping the singular vectors (U V^T)."""
    generator = torch.Generator().manual_seed(0)
    cases = [torch.randn(64, 256, generator=generator), torch.randn(256, 64, generator=generator),
             matrix_with_spectrum(96, 96, torch.logspace(0, -1.5, 96, dtype=torch.float64), generator),
             torch.stack([matrix_with_spectrum(48, 80, torch.logspace(0, -1, 48, dtype=torch.float64), generator)] * 3)]
    for grad in cases:
        out = tg.newton_schulz(grad)
        assert out.shape == grad.shape and out.dtype == torch.bfloat16
        singular_values = torch.linalg.svdvals(out.double())
        assert singular_values.min() > 0.6 and singular_values.max() < 1.2, singular_values
        u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)
        polar = u @ vh
        cosine = (out.double() * polar).sum((-2, -1)) / (out.double().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cosine > 0.98).all(), cosine
    # singular values far below the band stay small: 5 steps amplify by about 500 at most
    tiny_direction = tg.newton_schulz(matrix_with_spectrum(32, 32, torch.tensor([1.0] * 31 + [1e-6], dtype=torch.float64), generator))
    assert torch.linalg.svdvals(tiny_direction.double()).min() < 0.1


def test_xxt_reference_is_x_times_x_transposed():
    x = torch.randn(2, 40, 70, generator=torch.Generator().manual_seed(0)).bfloat16()
    torch.testing.assert_close(tg.xxt_reference(x).float(), (x.double() @ x.double().mT).float(), rtol=1e-2, atol=0.1)


def test_master_weight_halves_roundtrip_and_keep_small_updates():
    master = torch.randn(1000) * 10
    weight = master.bfloat16()
    high, low = tg.split_master(master)
    weight.view(torch.int16).copy_(high)
    assert torch.equal(tg.join_master(weight, low), master)  # exact fp32 master from the two halves
    assert (weight.float() - master).abs().max() <= master.abs().max() * 2 ** -7  # bf16 part is a truncation
    muon_param = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    muon = tg.Muon([muon_param], lr=1e-4, weight_decay=0.0, rank=0, world_size=1)
    for _ in range(100):  # each step is far below bf16 resolution at 1.0; the low half accumulates them
        muon.step({muon_param: torch.eye(4)}, 1.0, 0.0)
    state = muon.state[0]
    assert (tg.join_master(muon_param.data, state["low_bits"]) - (1 - 100 * 1e-4 * torch.eye(4))).abs().max() < 1e-3
    assert muon_param.data.float().min() < 1.0  # the bf16 weight moved too


def test_adamw_matches_torch_adam():
    generator = torch.Generator().manual_seed(0)
    p_ours = torch.nn.Parameter(torch.randn(5, 3, generator=generator))
    p_torch = torch.nn.Parameter(p_ours.detach().clone())
    ours = tg.AdamW([dict(params=[p_ours], lr=0.1)], (0.8, 0.95), 1e-10)
    reference = torch.optim.Adam([p_torch], lr=0.1, betas=(0.8, 0.95), eps=1e-10)
    for _ in range(5):
        grad = torch.randn(5, 3, generator=generator)
        ours.step({p_ours: grad}, 1.0)
        p_torch.grad = grad.clone()
        reference.step()
    torch.testing.assert_close(p_ours.detach(), p_torch.detach(), rtol=1e-6, atol=1e-7)


# ---- Triton kernels (interpreter on CPU, real shapes on GPU) ----

TRITON_INTERPRETER_CHECK = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch, train_gpt as tg
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    logits = (20 * torch.randn(5, 300)).to(dtype)
    targets = torch.randint(0, 300, (5,))
    ref, out = logits.clone(), logits.clone()
    loss_ref = tg.softcap_ce_rows_reference(ref, targets, 15.0, 0.25, True)
    loss = tg.softcap_ce_rows_triton(out, targets, 15.0, 0.25, True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    untouched = logits.clone()
    torch.testing.assert_close(tg.softcap_ce_rows_triton(untouched, targets, 15.0, 1.0, False), loss_ref)
    assert torch.equal(untouched, logits)
# the interpreter's tl.dot does not support bf16, so X @ X^T is checked in fp32 (batched, ragged tiles, strided)
for x in (torch.randn(3, 100, 70), torch.randn(130, 50).mT, torch.randn(64, 64)):
    torch.testing.assert_close(tg.xxt_triton(x, block_m=32, block_k=32), tg.xxt_reference(x), rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_triton_kernels_match_references_in_interpreter():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", TRITON_INTERPRETER_CHECK, str(REPO_ROOT)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_triton_kernels_compile_for_h100_ahead_of_time():
    """Triton compiles to an sm_90 cubin without a GPU: catches type and lowering errors the interpreter cannot."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", 90, 32)
    ce_signature = {"logits_ptr": "*bf16", "row_stride": "i32", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                    "vocab_size": "constexpr", "cap": "fp32", "grad_scale": "fp32", "WRITE_GRAD": "constexpr",
                    "BLOCK_V": "constexpr"}
    for write_grad in (True, False):
        source = ASTSource(tg.softcap_ce_rows_kernel, ce_signature,
                           constexprs={"vocab_size": 50304, "WRITE_GRAD": write_grad, "BLOCK_V": 1024})
        assert "cubin" in triton.compile(source, target=target, options={"num_warps": 8}).asm
    xxt_signature = {"x_ptr": "*bf16", "out_ptr": "*bf16", "rows": "i32", "cols": "constexpr",
                     **{name: "i32" for name in ["stride_xb", "stride_xr", "stride_xc", "stride_ob", "stride_or", "stride_oc"]},
                     "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}
    for cols in (1024, 4096):
        source = ASTSource(tg.xxt_kernel, xxt_signature, constexprs={"cols": cols, "BLOCK_M": 64, "BLOCK_K": 64})
        compiled = triton.compile(source, target=target, options={"num_warps": 4, "num_stages": 4})
        assert "wgmma" in compiled.asm["ptx"]  # Hopper tensor-core instructions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_match_references_on_gpu_at_real_shapes():
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (10 * torch.randn(8192, 50304, device="cuda", generator=generator)).bfloat16()
    targets = torch.randint(0, 50304, (8192,), device="cuda", generator=generator)
    ref, out = logits.clone(), logits.clone()
    loss_ref = tg.softcap_ce_rows_reference(ref, targets, 15.0, 1 / 65536, True)
    loss = tg.softcap_ce_rows_triton(out, targets, 15.0, 1 / 65536, True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-9)
    for shape in [(1024, 4096), (3, 1024, 1024)]:
        x = torch.randn(*shape, device="cuda", generator=generator).bfloat16()
        torch.testing.assert_close(tg.xxt_triton(x).float(), tg.xxt_reference(x).float(), rtol=2e-2, atol=0.5)
    grad = torch.randn(4096, 1024, device="cuda", generator=generator)
    singular_values = torch.linalg.svdvals(tg.newton_schulz(grad).float())
    assert singular_values.min() > 0.55 and singular_values.max() < 1.25


# ---- Data errors ----

def corrupted_copy(good, path, offset=None, value=None, truncate=0):
    data = bytearray(good.read_bytes())
    if offset is not None:
        data[offset:offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data[:len(data) - truncate]))
    return path


@pytest.mark.parametrize("name, corruption, message", [
    ("bad_magic", dict(offset=0, value=1234), "bad_magic.bin: wrong magic number 1234"),
    ("bad_version", dict(offset=4, value=7), "bad_version.bin: unsupported shard version 7"),
    ("truncated", dict(truncate=10), "truncated.bin: corrupt shard, header says 2049 tokens"),
])
def test_corrupt_shards_are_named_with_the_problem(tiny_data, tmp_path, name, corruption, message):
    good = tiny_data / "tiny_val_000000.bin"
    assert tg.shard_token_count(good) == 2049
    with pytest.raises(SystemExit, match=message):
        tg.shard_token_count(corrupted_copy(good, tmp_path / f"{name}.bin", **corruption))


def test_missing_shards_name_the_fetch_command(tmp_path):
    with pytest.raises(SystemExit, match=r"python data/cached_fineweb10B.py N"):
        tg.find_shards(str(tmp_path / "nothing_*.bin"), "train")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_full_configuration_without_a_gpu_is_an_error(tiny_data, tmp_path):
    result = run_script([f"--train_files={tiny_data}/tiny_train_*.bin", f"--val_files={tiny_data}/tiny_val_*.bin"],
                        tmp_path, check=False)
    assert result.returncode != 0
    assert "no CUDA GPU is visible" in result.stderr and "--preset tiny" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_too_few_tokens_are_errors(tiny_data):
    args = tg.parse_args(tiny_args(tiny_data, "--val_tokens=4096"))
    with pytest.raises(SystemExit, match="hold 2049 tokens but val_tokens=4096 needs 4097"):
        tg.load_val_tokens([str(tiny_data / "tiny_val_000000.bin")], args)
    args.num_iterations = STEPS + 1
    with pytest.raises(SystemExit, match=r"hold 8 steps .* `python data/cached_fineweb10B.py 1`"):
        tg.check_train_data([str(tiny_data / "tiny_train_000001.bin")], args)
    args.vocab_size = 512
    with pytest.raises(SystemExit, match="tiny_val_000000.bin: token id 1023 is >= vocab_size=512"):
        tg.load_val_tokens([str(tiny_data / "tiny_val_000000.bin")], tg.parse_args(tiny_args(tiny_data, "--vocab_size=512")))
    with pytest.raises(SystemExit, match="tiny_train_000001.bin: token id 1023 is >= vocab_size=512"):
        next(tg.train_batches([str(tiny_data / "tiny_train_000001.bin")], args, 0, 1, torch.device("cpu")))


def test_train_batches_split_each_step_between_ranks(tiny_data):
    """Rank r of W takes micro-batches r*A .. r*A+A-1 of every step: together the ranks read what 1 process reads."""
    args = tg.parse_args(tiny_args(tiny_data))
    files = [str(tiny_data / "tiny_train_000001.bin")]
    single = list(tg.train_batches(files, args, 0, 1, torch.device("cpu")))
    ranks = [list(tg.train_batches(files, args, rank, 2, torch.device("cpu"))) for rank in (0, 1)]
    assert len(single) == 2 * STEPS and len(ranks[0]) == len(ranks[1]) == STEPS
    tokens = tg.load_shard(files[0])
    for step in range(STEPS):
        for micro, (inputs, targets) in enumerate(single[2 * step:2 * step + 2]):
            other_inputs, other_targets = ranks[micro][step]
            assert torch.equal(inputs, other_inputs) and torch.equal(targets, other_targets)
            start = step * 1024 + micro * 512
            assert torch.equal(inputs, torch.from_numpy(tokens[start:start + 512].astype(np.int32)))
            assert torch.equal(targets, torch.from_numpy(tokens[start + 1:start + 513].astype(np.int64)))
