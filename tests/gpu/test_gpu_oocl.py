"""oocl.py on a CUDA GPU at the size of the p = 113 sweep: the torch.compile'd batched loss against the eager
one, and the CUDA path against the CPU path (same weights, same examples; real, non-zero gradients)."""
import pytest
import torch

import oocl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_size_group(device, *extra):
    args = oocl.parse_args(["sweep", "--p", "113", "--model_dim", "128", "--mlp_dim", "512", "--num_heads", "4",
                            "--holdout1", "0.8", "--holdout2", "0.3", "--k", "1", "0", "0", "1", "1", "1",
                            "--seeds", "0", "1", "--compile", "false", "--log_dir", "/tmp/oocl_gpu_test", *extra])[1]
    group = oocl.RunGroup(args, oocl.grid(args), device)  # 8 runs, the controls included (one hard-wired)
    with torch.no_grad():  # the output layers start at zero: perturb them so every weight has a gradient
        for t in group.params.values():
            t.add_(0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())).to(device))
    return args, group


def loss_and_grads(args, group, loss_fn):
    loss = loss_fn(group.params, group.train_inputs, group.train_targets, group.train_weights, args.num_layers,
                   args.num_heads, args.p, group.hardwired)
    grads = torch.autograd.grad(loss, list(group.params.values()), allow_unused=True)
    return loss, {name: g for name, g in zip(group.params, grads) if g is not None}


@pytest.mark.parametrize("extra", [[], ["--num_layers", "2", "--tied_embeddings", "--alias_groups", "3"]])
def test_compiled_loss_matches_eager_on_cuda(extra, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 sums; restored for the next tests
    args, group = gpu_size_group(torch.device("cuda"), *extra)
    eager_loss, eager = loss_and_grads(args, group, oocl.weighted_loss)
    compiled_loss, compiled = loss_and_grads(args, group, torch.compile(oocl.weighted_loss))
    assert eager_loss.item() > 0 and all(g.abs().max() > 0 for g in eager.values())
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=2e-3, atol=1e-5, msg=name)


def test_cuda_path_matches_cpu_path(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    args, gpu = gpu_size_group(torch.device("cuda"))
    _, cpu = gpu_size_group(torch.device("cpu"))
    gpu_loss, gpu_grads = loss_and_grads(args, gpu, oocl.weighted_loss)
    cpu_loss, cpu_grads = loss_and_grads(args, cpu, oocl.weighted_loss)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-4)
    for name, g in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name].cpu(), g, rtol=2e-3, atol=1e-5, msg=name)
    gpu_metrics, cpu_metrics = gpu.evaluate(), cpu.evaluate()
    for a, b in zip(gpu_metrics, cpu_metrics):
        assert a["op1_test_acc"] == pytest.approx(b["op1_test_acc"], abs=2e-3)
