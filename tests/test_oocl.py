"""oocl.py: data, bad input, loss weights, the tiny preset, and batched-sweep == single-run."""
import math

import pytest
import torch

import oocl


@pytest.fixture(scope="module")
def tiny():
    """Hyperparameters of the tiny preset (single-run shape)."""
    return oocl.parse_args(["--preset", "tiny"])[1]


def tiny_args(tmp_path, *extra, mode="single"):
    argv = (["sweep"] if mode == "sweep" else []) + ["--preset", "tiny", "--log_dir", str(tmp_path / "logs"),
                                                     "--out_dir", str(tmp_path / "out"), "--quiet", "1", *extra]
    return oocl.parse_args(argv)[1]


# a 2 x 2 sweep grid (two table-1 holdouts, k = (1, 0, 0) and (1, 1, 1)) and a short schedule
GRID = ["--holdout1", "0.3", "0.6", "--k", "1", "0", "0", "1", "1", "1"]
STEPS_40 = ["--steps", "40", "--eval_every", "40"]


# ---- Data ----


def test_vocabulary_and_every_linkage():
    p = 13
    tokens, group = oocl.build_sequences(p)
    assert oocl.vocab_size(p) == 2 * p + 4
    assert tokens.min() >= 0 and tokens.max() == 2 * p + 3  # DEFINE is the last token
    assert tokens.shape == (2 * p * p + p, 4)
    links = tokens[group == oocl.LINKS]
    define, end = oocl.special_tokens(p)["DEFINE"], oocl.special_tokens(p)["END"]
    assert sorted(links[:, 1].tolist()) == list(range(p))
    assert (links[:, 0] == define).all() and (links[:, 2] == end).all() and (links[:, 3] == links[:, 1] + p).all()
    t1, t2 = tokens[group == oocl.TABLE1], tokens[group == oocl.TABLE2]
    assert ((t1[:, 0] ** 2 + t1[:, 1] ** 2) % p == t1[:, 3]).all() and t1[:, :2].max() < p
    assert (t2 - torch.tensor([p, p, 0, p]) == t1).all()  # table 2 is table 1 written with aliases


def test_split_disjoint_complete_independent_deterministic():
    p, h1, h2 = 31, 0.6, 0.7
    _, group = oocl.build_sequences(p)
    split = oocl.make_split(p, h1, h2, seed=3)
    assert torch.equal(split, oocl.make_split(p, h1, h2, seed=3))
    assert not torch.equal(split, oocl.make_split(p, h1, h2, seed=4))
    assert split[group == oocl.LINKS].all()
    n_pairs = p * (p + 1) // 2
    held = []
    for g, h in ((oocl.TABLE1, h1), (oocl.TABLE2, h2)):
        train = split[group == g].view(p, p)
        # a boolean mask is disjoint and complete by construction; check its sizes and the pair symmetry
        assert torch.equal(train, train.T)
        assert (~train).triu().sum().item() == math.floor(h * n_pairs)
        assert 0 < train.sum() < p * p
        held.append((~train).triu())
    # independent draws: the overlap of the held-out pair sets is about h1*h2 of all pairs, not min(h1, h2)
    overlap = (held[0] & held[1]).sum().item() / n_pairs
    assert abs(overlap - h1 * h2) < 0.06, overlap


def test_split_does_not_depend_on_the_other_holdout_or_k():
    p = 23
    _, group = oocl.build_sequences(p)
    a, b = oocl.make_split(p, 0.8, 0.3, seed=1), oocl.make_split(p, 0.8, 0.9, seed=1)
    assert torch.equal(a[group == oocl.TABLE1], b[group == oocl.TABLE1])


# ---- Bad input ----


@pytest.mark.parametrize("argv, message", [
    (["--p", "12"], "prime"),
    (["--holdout1", "1.0"], "[0, 1)"),
    (["--holdout2", "-0.1"], "[0, 1)"),
    (["--k", "0", "0", "0"], "all zero"),
    (["--k", "1", "1"], "three loss weights"),
    (["sweep", "--k", "1", "0", "0", "1"], "three loss weights"),
    (["--holdout1", "0.5", "0.6"], "sweep"),
    (["--stepz", "3"], "unknown option"),
])
def test_bad_input_is_one_clear_error(argv, message):
    with pytest.raises(SystemExit) as err:
        oocl.parse_args(argv)
    assert message in str(err.value) and "error" in str(err.value)


def test_cli_parsing(tiny):
    mode, args = oocl.parse_args(["sweep", "--holdout1", "0.5", "0.9", "--k", "1", "0", "0", "1", "1", "1",
                                  "--seeds", "0", "1", "2", "--steps=7"])
    assert mode == "sweep" and args.steps == 7 and len(oocl.grid(args)) == 2 * 1 * 2 * 3
    assert tiny.p == 11 and tiny.seeds == [0]
    assert oocl.run_name(113, oocl.RunSpec(0.8, 0.8, (1.0, 1.0, 1.0), 0)) == "oocl_ssq_113_0.8_0.8_1_1_1"


# ---- Loss weights ----


def test_zero_weight_removes_that_loss_from_the_gradient(tiny):
    """With k = (1, 0, 1) the gradient equals that of k1*loss_op1 + k3*loss_links exactly, and table 2 adds
    a non-zero gradient as soon as k2 > 0."""
    spec = lambda k: oocl.RunSpec(0.5, 0.5, k, 0)
    torch.manual_seed(0)

    def grads(k):
        group = oocl.RunGroup(tiny, [spec(k)], torch.device("cpu"))
        # perturb the zero-initialised output layers so every loss has a gradient everywhere
        with torch.no_grad():
            for name, t in group.params.items():
                t.add_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(name))))
        loss = oocl.weighted_loss(group.params, group.train_inputs, group.train_targets, group.train_weights,
                                  tiny.num_layers, tiny.num_heads)
        return torch.autograd.grad(loss, list(group.params.values()))

    def close(a, b):
        return all(torch.allclose(x, y, atol=1e-6, rtol=1e-5) for x, y in zip(a, b))

    g_101 = grads((1.0, 0.0, 1.0))
    g_100, g_001, g_010 = grads((1.0, 0.0, 0.0)), grads((0.0, 0.0, 1.0)), grads((0.0, 1.0, 0.0))
    assert close(g_101, [a + b for a, b in zip(g_100, g_001)])
    assert not close(g_101, [a + b + c for a, b, c in zip(g_100, g_001, g_010)])
    # alias input embeddings are read only by table-2 rows: no gradient at all unless k2 > 0
    alias_rows = slice(tiny.p, 2 * tiny.p)
    assert g_101[0][0, alias_rows].abs().max() == 0
    assert g_010[0][0, alias_rows].abs().max() > 0


# ---- Training ----


def test_tiny_preset_reaches_full_train_accuracy(tmp_path):
    args = tiny_args(tmp_path)
    result = oocl.train_runs(args, oocl.grid(args))[0]
    final = result["final"]
    assert final["op1_train_acc"] == 1.0 and final["op2_train_acc"] == 1.0 and final["link_acc"] == 1.0
    log = open(result["log"]).read()
    assert "oocl_ssq_11_0.5_0.5_1_1_1" in result["log"] and "oocl_ssq_11_0.5_0.5_1_1_1" in log
    assert f"step:{args.steps}/{args.steps} val_loss:" in log and "peak memory" in log
    assert log.startswith(open(oocl.__file__).read())


def test_batched_sweep_matches_single_runs(tmp_path):
    """Four runs with different splits, weights and seeds trained together end where each ends alone."""
    sweep = tiny_args(tmp_path, *GRID, "--holdout2", "0.5", "--seeds", "0", "1", "--max_runs_per_batch", "3", *STEPS_40,
                      mode="sweep")
    specs = oocl.grid(sweep)
    assert len(specs) == 8
    batched = oocl.train_runs(sweep, specs)
    for spec, together in list(zip(specs, batched))[::3]:  # 3 of the 8 (different holdout, k and seed)
        single = tiny_args(tmp_path, "--holdout1", str(spec.holdout1), "--holdout2", str(spec.holdout2),
                           "--k", *map(str, spec.k), "--seed", str(spec.seed), *STEPS_40)
        alone = oocl.train_runs(single, oocl.grid(single))[0]
        for key in oocl.METRIC_KEYS:
            assert together["final"][key] == pytest.approx(alone["final"][key], abs=1e-4), (spec, key)
    # different runs really are different
    assert len({round(r["final"]["op1_train_loss"], 6) for r in batched}) == len(batched)


def test_sweep_writes_table_csv_and_heatmap(tmp_path):
    args = tiny_args(tmp_path, *GRID, "--holdout2", "0.3", "0.6", "--steps", "5", "--eval_every", "5", mode="sweep")
    results = oocl.train_runs(args, oocl.grid(args))
    table = oocl.write_sweep_outputs(args, results, "python oocl.py sweep ...")
    out = tmp_path / "out"
    assert (out / "heatmap.png").stat().st_size > 1000
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 8
    assert table.count("| 0.3 | 0.6 | 1 0 0 |") == 1 and (out / "table.md").read_text().startswith("Final")


# ---- Model ----


def reference_forward(params, tokens, num_layers, num_heads):
    """The same network written plainly (every block on every position, causal SDPA, run by run)."""
    outputs = []
    for r in range(tokens.size(0)):
        w = {name: t[r] for name, t in params.items()}
        x00, x01 = oocl.norm(w["embed00"][tokens[r]]), oocl.norm(w["embed01"][tokens[r]])  # [N, T, d]
        x = x00
        for layer in range(num_layers):
            l0, l1, l2 = w["lambdas"][layer]
            x = l0 * x + l1 * x00 + l2 * x01
            q, k, v = oocl.norm((x @ w[f"qkv{layer}"]).unflatten(-1, (3 * num_heads, -1)).transpose(1, 2)).chunk(3, 1)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.12)
            x = x + y.transpose(1, 2).flatten(-2) @ w[f"attn_out{layer}"]
            x = x + torch.relu(oocl.norm(x) @ w[f"mlp_in{layer}"]).square() @ w[f"mlp_out{layer}"]
        outputs.append(oocl.norm(x[:, -1]) @ w["head"])
    return torch.stack(outputs)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_matches_plain_reference(tiny, num_layers):
    """`forward` computes block 0 per vocabulary entry and the last block on one position; the result must
    equal the plain per-position network."""
    args = oocl.dataclasses.replace(tiny, num_layers=num_layers)
    generator = torch.Generator().manual_seed(0)
    params = oocl.stack_params([oocl.init_params(args, seed, torch.device("cpu")) for seed in (0, 1)])
    with torch.no_grad():
        for t in params.values():  # non-trivial mixing scalars and output layers
            t.add_(0.3 * torch.randn(t.shape, generator=generator))
    tokens = oocl.build_sequences(args.p)[0][:, :3]
    tokens = torch.stack([tokens[:50], tokens[-50:]])
    expected = reference_forward(params, tokens, num_layers, args.num_heads)
    torch.testing.assert_close(oocl.forward(params, tokens, num_layers, args.num_heads), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cuda_sweep_matches_eager(tmp_path):
    """The GPU path: the torch.compile'd batched loss ends where the eager one does."""
    finals = []
    for compile_flag in ("0", "1"):
        args = tiny_args(tmp_path, *GRID, *STEPS_40, "--compile", compile_flag, mode="sweep")
        finals.append([r["final"] for r in oocl.train_runs(args, oocl.grid(args))])
    for eager, compiled in zip(*finals):
        for key in oocl.METRIC_KEYS:
            assert compiled[key] == pytest.approx(eager[key], abs=0.03), key  # TF32 and fused kernels round differently
