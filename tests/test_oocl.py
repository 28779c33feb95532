"""oocl.py: data and its variants, the diagnostics, the controls, early stopping, bad input and the command
line, batched-sweep == single-run, the sweep's outputs, and the sweep split over 2 processes (gloo)."""
import csv
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import interrupt_when, run_with_closed_console
import torch

import oocl

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    """Hyperparameters of the tiny preset (single-run shape)."""
    return oocl.parse_args(["--preset", "tiny", "--log_dir", "/tmp"])[1]


def tiny_args(tmp_path, *extra, mode="single"):
    argv = (["sweep"] if mode == "sweep" else []) + ["--preset", "tiny", "--log_dir", str(tmp_path / "logs"),
                                                     "--out_dir", str(tmp_path / "out"), "--quiet", *extra]
    return oocl.parse_args(argv)[1]


def perturbed(args, seeds, scale=0.3):
    """Stacked weights of `seeds` with every tensor (also the zero-initialised ones) perturbed."""
    generator = torch.Generator().manual_seed(0)
    params = oocl.stack_params([oocl.init_params(args, seed, torch.device("cpu")) for seed in seeds])
    with torch.no_grad():
        for t in params.values():
            t.add_(scale * torch.randn(t.shape, generator=generator))
    return params


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


def test_links_both_ways_adds_every_reverse_linkage_to_training():
    p = 7
    tokens, group = oocl.build_sequences(p, links_both_ways=True)
    links = tokens[group == oocl.LINKS]
    forward, reverse = links[links[:, 1] < p], links[links[:, 1] >= p]
    assert len(forward) == len(reverse) == p
    assert (reverse[:, 1] == reverse[:, 3] + p).all() and sorted(reverse[:, 3].tolist()) == list(range(p))
    split = oocl.make_split(p, 0.5, 0.5, 0, group)
    weights = oocl.example_weights(oocl.RunSpec(0.5, 0.5, (1.0, 1.0, 1.0), 0), group, split)
    assert (weights[group == oocl.LINKS] == 1 / (2 * p)).all()  # both directions in the k3 mean


def test_meta_learning_groups_tables_and_training_sets():
    """--alias_groups 3: the test group (1) keeps the seed's held-out table; groups 2 and 3 get their whole
    table and their linkages; every group has its own tokens; meta rows count in the k2 / k3 losses."""
    p, G = 7, 3
    tokens, group = oocl.build_sequences(p, alias_groups=G)
    assert oocl.vocab_size(p, G) == (G + 1) * p + 3 + G and tokens.max() == oocl.vocab_size(p, G) - 1
    links = tokens[(group == oocl.LINKS) | (group == oocl.META_LINKS)]
    assert len({tuple(row[:3].tolist()) for row in links}) == G * p  # every linkage prompt has one answer
    t1 = tokens[group == oocl.TABLE1]
    meta = tokens[group == oocl.META_TABLES].view(G - 1, p * p, 4)
    for n, table in enumerate([tokens[group == oocl.TABLE2]] + list(meta)):
        offset = (n + 1) * p
        assert (table - torch.tensor([offset, offset, 0, offset]) == t1).all()
    meta_links = tokens[group == oocl.META_LINKS]
    assert len(meta_links) == (G - 1) * p and set((meta_links[:, 3] - meta_links[:, 1]).tolist()) == {2 * p, 3 * p}
    alias_sets = [set(tokens[group == g][:, :2].flatten().tolist()) for g in (oocl.TABLE1, oocl.TABLE2)]
    alias_sets += [set(m[:, :2].flatten().tolist()) for m in meta]
    assert all(a.isdisjoint(b) for i, a in enumerate(alias_sets) for b in alias_sets[i + 1:])
    split = oocl.make_split(p, 0.5, 0.6, 0, group)
    assert split[group == oocl.META_TABLES].all() and split[group == oocl.META_LINKS].all()
    assert not split[group == oocl.TABLE2].all() and not split[group == oocl.TABLE1].all()
    w100 = oocl.example_weights(oocl.RunSpec(0.5, 0.6, (1.0, 0.0, 0.0), 0), group, split)
    w111 = oocl.example_weights(oocl.RunSpec(0.5, 0.6, (1.0, 1.0, 1.0), 0), group, split)
    assert w100[group >= oocl.TABLE2].sum() == 0
    assert w111[group == oocl.META_TABLES].sum() > 0 and w111[(group == oocl.META_LINKS)].sum() > 0
    for family in ((oocl.TABLE2, oocl.META_TABLES), (oocl.LINKS, oocl.META_LINKS)):
        rows = (group == family[0]) | (group == family[1])
        assert w111[rows].sum().item() == pytest.approx(1.0)


def test_split_disjoint_complete_independent_deterministic():
    p, h1, h2 = 31, 0.6, 0.7
    _, group = oocl.build_sequences(p)
    split = oocl.make_split(p, h1, h2, 3, group)
    assert torch.equal(split, oocl.make_split(p, h1, h2, 3, group))
    assert not torch.equal(split, oocl.make_split(p, h1, h2, 4, group))
    assert split[group == oocl.LINKS].all()
    n_pairs = p * (p + 1) // 2
    held = []
    for g, h in ((oocl.TABLE1, h1), (oocl.TABLE2, h2)):
        train = split[group == g].view(p, p)
        assert torch.equal(train, train.T)
        assert (~train).triu().sum().item() == math.floor(h * n_pairs)
        assert 0 < train.sum() < p * p
        held.append((~train).triu())
    # independent draws: the overlap of the held-out pair sets is about h1*h2 of all pairs, not min(h1, h2)
    overlap = (held[0] & held[1]).sum().item() / n_pairs
    assert abs(overlap - h1 * h2) < 0.06, overlap


def test_no_loss_weight_falls_on_a_held_out_row():
    """Held-out rows are what out-of-context learning is measured on: training on them would be a leak."""
    _, group = oocl.build_sequences(11)
    split = oocl.make_split(11, 0.5, 0.5, 0, group)
    weights = oocl.example_weights(oocl.RunSpec(0.5, 0.5, (1.0, 1.0, 1.0), 0), group, split)
    for table in (oocl.TABLE1, oocl.TABLE2):
        held_out = (group == table) & ~split
        assert held_out.any() and weights[held_out].sum() == 0 and weights[(group == table) & split].min() > 0


def test_split_does_not_depend_on_the_other_holdout_or_k():
    p = 23
    _, group = oocl.build_sequences(p)
    a, b = oocl.make_split(p, 0.8, 0.3, 1, group), oocl.make_split(p, 0.8, 0.9, 1, group)
    assert torch.equal(a[group == oocl.TABLE1], b[group == oocl.TABLE1])


def test_covered_and_uncovered_partition_the_held_out_table_1_pairs():
    p = 13
    _, group = oocl.build_sequences(p)
    split = oocl.make_split(p, 0.6, 0.4, 2, group)
    covered = oocl.covered_rows(p, split, group)
    held1, train2 = ~split[group == oocl.TABLE1], split[group == oocl.TABLE2]
    pairs = [(x, y) for x in range(p) for y in range(p)]
    expected = [held1[x * p + y] and train2[x * p + y] for x, y in pairs]
    assert covered.tolist() == expected and 0 < covered.sum() < held1.sum()
    # the evaluation: held-out accuracy is the covered/uncovered mixture, and the two subsets are as counted
    args = oocl.parse_args(["--preset", "tiny", "--p", "13", "--holdout1", "0.6", "--holdout2", "0.4", "--log_dir", "/tmp"])[1]
    group_of_runs = oocl.RunGroup(args, [oocl.RunSpec(0.6, 0.4, (1.0, 1.0, 1.0), 2)], torch.device("cpu"))
    with torch.no_grad():
        for t in group_of_runs.params.values():
            t.add_(0.5 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())))
    m = group_of_runs.evaluate()[0]
    n_cov, n_held = covered.sum().item(), held1.sum().item()
    mixture = (n_cov * m["op1_covered_acc"] + (n_held - n_cov) * m["op1_uncovered_acc"]) / n_held
    assert m["op1_test_acc"] == pytest.approx(mixture)
    assert m["op1_covered_acc"] != m["op1_uncovered_acc"]


# ---- Bad input and the command line ----


@pytest.mark.parametrize("argv, message", [
    (["--p", "12"], "prime"),
    (["--holdout1", "1.0"], "[0, 1)"),
    (["--holdout2", "-0.1"], "[0, 1)"),
    (["--holdout1", "0"], "--holdout1 0 holds out no table-1 pair"),
    (["--k", "0", "0", "0"], "all zero"),
    (["--k", "1", "1"], "three loss weights"),
    (["sweep", "--k", "1", "0", "0", "1"], "three loss weights"),
    (["--holdout1", "0.5", "0.6"], "sweep"),
    (["--lr", "-0.001"], "--lr > 0"),
    (["--lr=-1e-3"], "--lr > 0"),
    (["--warmup_steps", "-5"], "--warmup_steps must be >= 0"),
    (["--patience", "-1"], "--patience must be >= 0"),
    (["--alias_groups", "0"], "--alias_groups must be >= 1"),
    (["sweep", "--hardwired"], "--controls"),
    (["--stepz", "3"], "unrecognized arguments: --stepz"),
    (["--steps", "3", "--steps", "4"], "argument --steps: given twice"),
    (["--steps", "3", "--steps=4"], "argument --steps: given twice"),
    (["--model_dim", "3", "--model-dim", "4"], "argument --model_dim: given twice"),
    (["--quiet", "--no-quiet"], "argument --quiet: given twice"),
    (["--steps", "ten"], "argument --steps"),
    (["--compile", "1"], "argument --compile"),
    (["--quiet", "1"], "unrecognized arguments: 1"),  # a flag never swallows the next argument
    (["--preset", "tiny", "sweep"], "`sweep` must come first: python oocl.py sweep [flags]"),
    (["--num_heads", "0"], "--num_heads must be >= 1, got 0"),  # not a ZeroDivisionError
    (["--p", "11", "--holdout1", "0.01"], "--holdout1 0.01 holds out 0 of the 66 pairs {x, y} of table 1 at --p 11"),
    (["--p", "11", "--holdout2", "0.01"], "--holdout2 0.01 holds out 0 of the 66 pairs {x, y} of table 2 at --p 11"),
    (["--k", "nan", "1", "1"], "loss weights must be finite and >= 0"),
    (["--k", "1", "inf", "1"], "loss weights must be finite and >= 0"),
    (["--lr", "inf"], "finite --lr > 0"),
    (["--weight_decay", "inf"], "finite --weight_decay >= 0"),
    (["sweep", "--k", "1", "0", "0", "1", "0", "0", "--seeds", "0", "0"], "--k lists 1 0 0 twice"),
    (["sweep", "--seeds", "0", "0"], "--seeds lists 0 twice"),
    (["sweep", "--holdout1", "0.5", "0.50"], "--holdout1 lists 0.5 twice"),
    (["sweep", "--holdout2", "0.3", "0.3"], "--holdout2 lists 0.3 twice"),
])
def test_bad_input_is_one_clear_error(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        oocl.parse_args(argv + ["--log_dir", str(tmp_path)] if "--log_dir" not in argv else argv)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "error" in stderr and "Traceback" not in stderr


def test_model_dimensions_are_checked_in_one_error_listing_each_problem(capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        oocl.parse_args(["--num_layers", "0", "--model_dim", "10", "--num_heads", "4", "--mlp_dim", "0",
                         "--log_dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1
    for problem in ("--num_layers must be >= 1", "--mlp_dim must be >= 1",
                    "--model_dim 10 must be divisible by --num_heads 4"):
        assert problem in lines[0]


def test_a_holdout_is_accepted_exactly_when_its_split_holds_out_a_pair(tmp_path):
    """p = 11 has 66 pairs {x, y}: the check counts them as the split does (floor(holdout * 66))."""
    p = 11
    group = oocl.build_sequences(p)[1]
    for h in (0.01, 0.015, 0.0151, 1 / 66, 0.0152, 0.02, 0.5, 0.99):
        held = (~oocl.make_split(p, h, h, 0, group)[group == oocl.TABLE1]).sum().item()
        argv = ["--p", str(p), "--holdout1", repr(h), "--holdout2", repr(h), "--log_dir", str(tmp_path)]
        if held:
            oocl.parse_args(argv)
        else:
            with pytest.raises(SystemExit):
                oocl.parse_args(argv)
    oocl.parse_args(["--p", str(p), "--holdout2", "0", "--log_dir", str(tmp_path)])  # 0: train on all of table 2


def test_output_path_that_is_a_file_is_reported_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for argv, message in ((["sweep", "--out_dir", str(blocker)], f"--out_dir {blocker} is a file"),
                          (["--log_dir", str(blocker)], f"--log_dir {blocker} is a file"),
                          (["--log_dir", str(blocker / "sub")], "--log_dir " + str(blocker / "sub") + " cannot be created")):
        with pytest.raises(SystemExit) as err:
            oocl.main(["--preset", "tiny"] + argv if argv[0] != "sweep" else ["sweep", "--preset", "tiny"] + argv[1:])
        assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_cli_spellings_booleans_presets_and_help(capsys):
    mode, args = oocl.parse_args(["sweep", "--holdout1", "0.5", "0.9", "--k", "1", "0", "0", "1", "1", "1",
                                  "--seeds", "0", "1", "2", "--steps=7", "--model-dim", "64", "--links-both-ways",
                                  "--no_controls", "--log_dir", "/tmp"])
    assert mode == "sweep" and args.steps == 7 and args.model_dim == 64 and args.links_both_ways and not args.controls
    assert len(oocl.grid(args)) == 2 * 1 * 2 * 3
    assert oocl.parse_args(["--no-tied-embeddings", "--log_dir", "/tmp"])[1].tied_embeddings is False
    assert oocl.parse_args(["--tied_embeddings", "--log_dir", "/tmp"])[1].tied_embeddings is True
    tiny = oocl.parse_args(["--preset", "tiny", "--steps", "5", "--seed", "3", "--log_dir", "/tmp"])[1]
    assert tiny.p == 11 and tiny.steps == 5 and tiny.seeds == [3]  # preset first, explicit flags override it
    assert oocl.run_name(113, oocl.RunSpec(0.8, 0.8, (1.0, 1.0, 1.0), 0)) == "oocl_ssq_113_0.8_0.8_1_1_1"
    with pytest.raises(SystemExit) as err:
        oocl.parse_args(["--help"])
    assert err.value.code == 0
    help_text = capsys.readouterr().out
    for f in oocl.dataclasses.fields(oocl.Hyperparameters):
        assert f"--{f.name}" in help_text
    assert "--no-links_both_ways" in help_text and "(default: 0)" in help_text  # patience's default


def test_sweep_grid_adds_the_controls_to_every_cell(tmp_path):
    args = tiny_args(tmp_path, *GRID, "--seeds", "0", "1", mode="sweep")
    specs = oocl.grid(args)
    arms = {(s.k, s.hardwired) for s in specs}
    assert arms == {((1.0, 0.0, 0.0), False), ((1.0, 1.0, 1.0), False), ((1.0, 1.0, 0.0), False), ((1.0, 1.0, 1.0), True)}
    assert len(specs) == 2 * 4 * 2
    assert len(oocl.grid(tiny_args(tmp_path, *GRID, "--no-controls", mode="sweep"))) == 2 * 2


# ---- Loss weights ----


def test_zero_weight_removes_that_loss_from_the_gradient(tiny):
    """With k = (1, 0, 1) the gradient equals that of k1*loss_op1 + k3*loss_links exactly, and table 2 adds
    a non-zero gradient as soon as k2 > 0."""
    spec = lambda k: oocl.RunSpec(0.5, 0.5, k, 0)

    def grads(k):
        group = oocl.RunGroup(tiny, [spec(k)], torch.device("cpu"))
        # perturb the zero-initialised output layers so every loss has a gradient everywhere
        with torch.no_grad():
            for name, t in group.params.items():
                t.add_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(len(name))))
        loss = oocl.weighted_loss(group.params, group.train_inputs, group.train_targets, group.train_weights,
                                  tiny.num_layers, tiny.num_heads, tiny.p)
        return torch.autograd.grad(loss, [group.params["embed00"]])

    close = lambda a, b: all(torch.allclose(x, y, atol=1e-6, rtol=1e-5) for x, y in zip(a, b))
    g_101 = grads((1.0, 0.0, 1.0))
    g_100, g_001, g_010 = grads((1.0, 0.0, 0.0)), grads((0.0, 0.0, 1.0)), grads((0.0, 1.0, 0.0))
    assert close(g_101, [a + b for a, b in zip(g_100, g_001)])
    assert not close(g_101, [a + b + c for a, b, c in zip(g_100, g_001, g_010)])
    # alias input embeddings are read only by table-2 rows: no gradient at all unless k2 > 0
    alias_rows = slice(tiny.p, 2 * tiny.p)
    assert g_101[0][0, alias_rows].abs().max() == 0
    assert g_010[0][0, alias_rows].abs().max() > 0


# ---- Model, its variants and the diagnostics ----


def reference_forward(params, tokens, num_layers, num_heads, tied=False):
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
        d = x.size(-1)
        head = oocl.norm(w["embed00"]).T / math.sqrt(d) if tied else w["head"]
        outputs.append(oocl.norm(x[:, -1]) @ head)
    return torch.stack(outputs)


def test_each_seed_draws_its_own_initial_weights(tiny):
    """Seeds vary the weights, not only the split: the spread over seeds is the spread of training runs."""
    cpu = torch.device("cpu")
    first, again, other = (oocl.init_params(tiny, seed, cpu) for seed in (0, 0, 1))
    for name in ("embed00", "embed01", "qkv0", "mlp_in0"):
        assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name]), name


@pytest.mark.parametrize("num_layers, tied", [(1, False), (2, False), (1, True)])
def test_forward_matches_plain_reference(tiny, num_layers, tied):
    """`forward` computes block 0 per vocabulary entry and the last block on one position; the result must
    equal the plain per-position network (with tied embeddings: logits read off the normed input embeddings)."""
    args = oocl.dataclasses.replace(tiny, num_layers=num_layers, tied_embeddings=tied)
    params = perturbed(args, (0, 1))
    assert ("head" in params) != tied
    tokens = oocl.build_sequences(args.p)[0][:, :3]
    tokens = torch.stack([tokens[:50], tokens[-50:]])
    expected = reference_forward(params, tokens, num_layers, args.num_heads, tied)
    torch.testing.assert_close(oocl.forward(params, tokens, num_layers, args.num_heads, args.p), expected,
                               atol=1e-5, rtol=1e-4)


def test_hardwired_aliases_read_and_write_as_their_originals(tiny):
    """A hard-wired run with zero group vectors answers a table-2 row exactly as the table-1 row, with alias
    columns equal to the originals' columns; its own alias rows and columns are never used. A plain run
    in the same batch is unaffected."""
    args = oocl.dataclasses.replace(tiny, alias_groups=2)
    params = perturbed(args, (0, 1))
    with torch.no_grad():
        for name in ("alias_in00", "alias_in01", "alias_out"):
            params[name].zero_()
    tokens, group = oocl.build_sequences(args.p, alias_groups=2)
    t1, t2, meta = (tokens[group == g][:40, :3] for g in (oocl.TABLE1, oocl.TABLE2, oocl.META_TABLES))
    wired = torch.tensor([1.0, 0.0])
    run = lambda rows: oocl.forward(params, torch.stack([rows, rows]), 1, args.num_heads, args.p, wired)
    out1, out2, out3 = run(t1), run(t2), run(meta)
    p = args.p
    torch.testing.assert_close(out2[0], out1[0])
    torch.testing.assert_close(out3[0], out1[0])
    torch.testing.assert_close(out1[0][:, p:2 * p], out1[0][:, :p])
    assert not torch.allclose(out2[1], out1[1], atol=1e-3)  # the plain run: aliases are their own tokens
    plain = oocl.forward(params, torch.stack([t2, t2]), 1, args.num_heads, args.p)
    torch.testing.assert_close(out2[1], plain[1])
    loss = run(t2)[0].logsumexp(-1).sum()
    grad = torch.autograd.grad(loss, params["embed00"])[0]
    assert grad[0, p:3 * p].abs().max() == 0 and grad[0, :p].abs().max() > 0
    # the group vectors are what tells the tables apart
    with torch.no_grad():
        params["alias_in00"].add_(1.0)
    assert not torch.allclose(run(t2)[0], out1[0], atol=1e-3)


def test_alias_cosines_measure_i_against_its_alias(tiny):
    args = oocl.dataclasses.replace(tiny)
    params = perturbed(args, (0, 1))
    p = args.p
    with torch.no_grad():  # run 0: alias i+p is a copy of i in every table; run 1: untouched random weights
        for name in ("embed00", "embed01"):
            params[name][0, p:2 * p] = params[name][0, :p]
        params["head"][0, :, p:2 * p] = 2 * params["head"][0, :, :p]
    cos = oocl.alias_cosines(params, p)
    assert cos["cos_in"][0].item() == pytest.approx(1.0, abs=1e-5)
    assert cos["cos_out"][0].item() == pytest.approx(1.0, abs=1e-5)
    assert cos["cos_in_other"][0].item() < 0.5 and cos["cos_out_other"][0].item() < 0.5
    assert abs(cos["cos_in"][1].item()) < 0.5 and abs(cos["cos_out"][1].item()) < 0.5
    # by hand for run 1: block 0's input is (l0 + l1) * norm(embed00) + l2 * norm(embed01)
    lam = params["lambdas"][1, 0]
    x_in = (lam[0] + lam[1]) * oocl.norm(params["embed00"][1]) + lam[2] * oocl.norm(params["embed01"][1])
    by_hand = torch.nn.functional.cosine_similarity(x_in[:p], x_in[p:2 * p], dim=-1).mean()
    assert cos["cos_in"][1].item() == pytest.approx(by_hand.item(), abs=1e-5)


# ---- Training ----


def test_tiny_preset_reaches_full_train_accuracy(tmp_path):
    args = tiny_args(tmp_path)
    result = oocl.train_runs(args, oocl.grid(args, "single"))[0]
    final = result["final"]
    assert final["op1_train_acc"] == 1.0 and final["op2_train_acc"] == 1.0 and final["link_acc"] == 1.0
    log = open(result["log"]).read()
    assert "oocl_ssq_11_0.5_0.5_1_1_1" in result["log"] and "oocl_ssq_11_0.5_0.5_1_1_1" in log
    assert f"step:{args.steps}/{args.steps} val_loss:" in log and "peak memory" in log and "cos_in:" in log
    # the log's val_loss (what records/ttest.py and plot.py read) is the held-out table-1 loss
    val_loss = re.findall(rf"^step:{args.steps}/{args.steps} val_loss:(\S+) ", log, re.M)[-1]
    assert float(val_loss) == pytest.approx(final["op1_test_loss"], abs=1e-4)
    assert final["op1_test_loss"] != pytest.approx(final["op1_train_loss"], abs=1e-3)  # the two can be told apart
    assert log.startswith(open(oocl.__file__).read())


def test_step_time_counts_the_training_steps_after_the_first_and_no_evaluation(tmp_path, monkeypatch):
    """Steps 1.. are timed in windows between evaluations (no wait for the GPU around each step): ms_per_step is their
    time, not that of step 0 (compilation) nor of the evaluations."""
    real_step, real_evaluate = oocl.RunGroup.train_step, oocl.RunGroup.evaluate
    monkeypatch.setattr(oocl.RunGroup, "train_step", lambda self, step: time.sleep(1.0 if step == 0 else 0.02)
                        or real_step(self, step))
    monkeypatch.setattr(oocl.RunGroup, "evaluate", lambda self: time.sleep(0.3) or real_evaluate(self))
    args = tiny_args(tmp_path, "--steps", "10", "--eval_every", "3")
    log = open(oocl.train_runs(args, [oocl.RunSpec(0.5, 0.5, (1.0, 1.0, 1.0), 0)])[0]["log"]).read()
    ms_per_step = float(re.search(r"^ms_per_step:(\S+) ", log, re.M).group(1))
    assert 20 <= ms_per_step < 80  # 9 steps of 20 ms and their work; not step 0's 1 s (> 100 ms a step), nor the
    # 5 evaluations' 1.5 s
    train_ms, step_avg = re.search(r"^step:10/10 val_loss:\S+ train_time:(\d+)ms step_avg:(\S+)ms", log, re.M).groups()
    assert float(step_avg) == pytest.approx(int(train_ms) / 9, abs=0.6) == pytest.approx(ms_per_step, abs=0.6)


def test_early_stopping_ends_a_run_after_its_patience_window(tmp_path):
    """lr so small that held-out accuracy never improves after step 0: with patience 30 the run stops at step
    30 with a frozen result; the run beside it without improvement limit... trains to --steps."""
    common = ["--lr", "1e-9", "--steps", "100", "--eval_every", "10", "--warmup_steps", "0"]
    stopped = oocl.train_runs(tiny_args(tmp_path, *common, "--patience", "30"), [oocl.RunSpec(0.5, 0.5, (1.0, 1.0, 1.0), 0)])[0]
    assert stopped["stop_step"] == 30 and stopped["history"][-1]["step"] == 30 and len(stopped["history"]) == 4
    assert "stopped at step 30" in open(stopped["log"]).read()
    full = oocl.train_runs(tiny_args(tmp_path, *common), [oocl.RunSpec(0.5, 0.5, (1.0, 1.0, 1.0), 0)])[0]
    assert full["stop_step"] == 100 and full["history"][-1]["step"] == 100


@pytest.mark.parametrize("k, loss", [(("0", "1", "1"), "op2_train_loss"), (("0", "0", "1"), "link_loss"),
                                     (("1", "0", "0"), "op1_train_loss")])
def test_a_diverged_run_is_one_error_whatever_it_trains_and_its_log_says_so(k, loss, tmp_path, capsys):
    """--lr 1e8 makes every loss NaN: the run stops with one error naming the loss, also without table 1 (k1 = 0),
    and its log ends with that error instead of stopping mid-run."""
    with pytest.raises(SystemExit) as err:
        oocl.main(["--preset", "tiny", "--lr", "1e8", "--steps", "10", "--eval_every", "5", "--k", *k, "--quiet",
                   "--log_dir", str(tmp_path)])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(stderr) == 1
    assert f"the training loss {loss} is nan at step 5; lower --lr" in stderr[0]
    (log,) = tmp_path.iterdir()
    assert log.read_text().splitlines()[-1] == stderr[0]


def test_trained_losses_include_the_meta_groups_when_they_are_trained(tiny):
    meta = oocl.dataclasses.replace(tiny, alias_groups=2)
    assert oocl.trained_losses(meta, oocl.RunSpec(0.5, 0.5, (1.0, 0.0, 1.0), 0)) == ["op1_train_loss", "link_loss",
                                                                                     "meta_loss"]
    assert oocl.trained_losses(meta, oocl.RunSpec(0.5, 0.5, (1.0, 0.0, 0.0), 0)) == ["op1_train_loss"]
    assert oocl.trained_losses(tiny, oocl.RunSpec(0.5, 0.5, (0.0, 1.0, 1.0), 0)) == ["op2_train_loss", "link_loss"]


def test_batched_sweep_matches_single_runs(tmp_path):
    """Runs with different splits, weights, seeds and controls trained together end where each ends alone."""
    sweep = tiny_args(tmp_path, *GRID, "--holdout2", "0.5", "--seeds", "0", "1", "--max_runs_per_batch", "5",
                      *STEPS_40, mode="sweep")
    specs = oocl.grid(sweep)
    assert len(specs) == 16
    batched = oocl.train_runs(sweep, specs)
    picked = [i for i, s in enumerate(specs) if s.hardwired][:1] + list(range(0, 16, 5))
    for i in picked:
        spec = specs[i]
        single = tiny_args(tmp_path, "--holdout1", str(spec.holdout1), "--holdout2", str(spec.holdout2),
                           "--k", *map(str, spec.k), "--seed", str(spec.seed), *STEPS_40,
                           *(["--hardwired"] if spec.hardwired else []))
        alone = oocl.train_runs(single, oocl.grid(single, "single"))[0]
        for key in oocl.METRIC_KEYS:
            if not math.isnan(alone["final"][key]):
                assert batched[i]["final"][key] == pytest.approx(alone["final"][key], abs=1e-4), (spec, key)
    assert len({round(batched[i]["final"]["op1_train_loss"], 6) for i in range(16)}) == 16


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_table_row_holds_means_over_seeds_and_effects_paired_by_seed():
    """Held-out accuracy of the baseline (1, 0, 0): 0.2 and 0.6 for seeds 0 and 1; of the arm (1, 1, 1): 0.3 and
    0.8 (listed seed 1 first). Means 0.4 and 0.55; paired effects +0.1 and +0.2 (unpaired they could be -0.3)."""
    def result(k, seed, acc):
        final = {key: 0.5 for key in oocl.METRIC_KEYS} | {"op1_test_acc": acc}
        return dict(spec=oocl.RunSpec(0.5, 0.5, k, seed), final=final, history=[dict(step=10, **final)], stop_step=10)

    rows = oocl.summarise([result((1.0, 0.0, 0.0), 0, 0.2), result((1.0, 0.0, 0.0), 1, 0.6),
                           result((1.0, 1.0, 1.0), 1, 0.8), result((1.0, 1.0, 1.0), 0, 0.3)])
    baseline, arm = rows
    assert (baseline["arm"], arm["arm"]) == ("1 0 0", "1 1 1") and baseline["effect_mean"] is None
    assert baseline["op1_test_acc_mean"] == pytest.approx(0.4) and arm["op1_test_acc_mean"] == pytest.approx(0.55)
    assert arm["op1_test_acc_std"] == pytest.approx(math.sqrt(0.125))  # sample std of 0.3 and 0.8
    assert arm["effect_mean"] == pytest.approx(0.15) and arm["effect_std"] == pytest.approx(math.sqrt(0.005))
    assert arm["effect_wins"] == "2/2" and arm["seeds"] == 2


def test_sweep_writes_table_csvs_and_plots_with_untrained_columns_blank(tmp_path):
    args = tiny_args(tmp_path, *GRID, "--holdout2", "0.3", "0.6", "--steps", "5", "--eval_every", "5", mode="sweep")
    results = oocl.train_runs(args, oocl.grid(args))
    table = oocl.write_sweep_outputs(args, [results[i] for i in range(len(results))], "python oocl.py sweep ...")
    out = tmp_path / "out"
    assert (out / "heatmap.png").stat().st_size > 1000 and (out / "curves.png").stat().st_size > 1000
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 2 * 2 * 4
    for row in runs:
        untrained = row["k2"] == "0.0", row["k3"] == "0.0"
        assert (row["op2_test_acc"] == "") == untrained[0] and (row["link_acc"] == "") == untrained[1]
        assert row["op1_covered_acc"] != "" and row["cos_in"] != ""
    assert len(read_csv(out / "history.csv")) == 16 * 2
    line_100 = next(line for line in table.splitlines() if line.startswith("| 0.3 | 0.6 | 1 0 0 |"))
    line_110 = next(line for line in table.splitlines() if line.startswith("| 0.3 | 0.6 | 1 1 0 |"))
    cells_100, cells_110 = line_100.split("|"), line_110.split("|")
    assert cells_100[13].strip() == "" and cells_100[14].strip() == "" and cells_100[8].strip() == ""  # op2, link, effect
    assert cells_110[13].strip() != "" and cells_110[14].strip() == "" and cells_110[8].strip() != ""
    assert table.count("hard-wired") == 4


def test_sweep_writes_under_logs_by_default_never_into_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    oocl.main(["sweep", "--preset", "tiny", "--steps", "2", "--eval_every", "2", "--no-controls", "--quiet"])
    table = tmp_path / "logs" / "oocl_sweep" / "table.md"
    assert table.exists() and not (tmp_path / "records").exists()
    # the original names itself as the committed tables do, wherever it runs from
    assert "Command: `python oocl.py sweep --preset tiny --steps 2" in table.read_text()


def test_a_second_sweep_into_one_out_dir_is_refused_before_training_unless_overwrite(tmp_path, monkeypatch, capsys):
    """Two parts of a sweep split by seed into one --out_dir: the second would replace the first's runs.csv."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "D").mkdir()  # a folder without a sweep's outputs is fine (a part stopped before it wrote them)
    sweep = ["sweep", "--preset", "tiny", "--k", "1", "0", "0", "1", "1", "1", "--no-controls", "--steps", "2",
             "--eval_every", "2", "--quiet", "--out_dir", "D"]
    oocl.main(sweep + ["--seeds", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        oocl.main(sweep + ["--seeds", "1"])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(stderr) == 1
    for part in ("--out_dir D already holds the outputs of another sweep", "runs.csv", "another --out_dir",
                 "delete those files", "--overwrite"):
        assert part in stderr[0]
    assert len(os.listdir("logs")) == 2  # the refused sweep trained nothing
    assert {row["seed"] for row in read_csv(tmp_path / "D" / "runs.csv")} == {"0"}
    oocl.main(sweep + ["--seeds", "1", "--overwrite"])
    assert {row["seed"] for row in read_csv(tmp_path / "D" / "runs.csv")} == {"1"}
    # --overwrite changes no result: it stays out of the logged settings, which records/ttest.py compares
    assert "overwrite" not in repr(oocl.parse_args(sweep + ["--overwrite", "--log_dir", "logs"])[1])


def test_merged_parts_of_a_sweep_split_by_seed_give_the_whole_sweeps_outputs(tmp_path, monkeypatch, capsys):
    """p = 113 runs one seed per 10-minute GPU call; `merge` must give the table one sweep over all seeds gives."""
    monkeypatch.chdir(tmp_path)
    sweep = ["sweep", "--preset", "tiny", *GRID, "--steps", "20", "--eval_every", "10", "--quiet"]
    oocl.main(sweep + ["--seeds", "0", "1", "--out_dir", "whole"])
    for seed in "012":
        oocl.main(sweep + ["--max_runs_per_batch", "3", "--seeds", seed, "--out_dir", f"seed{seed}"])
    oocl.main(["merge", "--out_dir", "merged", "seed0", "seed1"])
    whole, merged = tmp_path / "whole", tmp_path / "merged"
    assert (whole / "table.md").read_text().split("Command:")[0] == (merged / "table.md").read_text().split("Commands")[0]
    assert read_csv(whole / "history.csv") == read_csv(merged / "history.csv")
    without_log = lambda rows: [{k: v for k, v in row.items() if k != "log"} for row in rows]
    assert without_log(read_csv(whole / "runs.csv")) == without_log(read_csv(merged / "runs.csv"))
    for a, b in zip(read_csv(whole / "summary.csv"), read_csv(merged / "summary.csv"), strict=True):
        assert a.keys() == b.keys()
        for key in a:  # the parts' CSVs hold 6 decimals
            try:
                assert float(b[key]) == pytest.approx(float(a[key]), abs=2e-6), key
            except ValueError:
                assert a[key] == b[key], key
    commands = (merged / "table.md").read_text().split("merge that wrote this table):\n")[1].splitlines()
    assert [c.split("--out_dir ")[-1] for c in commands] == ["seed0`", "seed1`", "merged seed0 seed1`"]
    assert commands[2] == "- `python oocl.py merge --out_dir merged seed0 seed1`"
    assert (merged / "heatmap.png").stat().st_size > 1000 and (merged / "curves.png").stat().st_size > 1000
    # a merged sweep is a part like any other: a third seed joins it
    oocl.main(["merge", "--out_dir", "three", "merged", "seed2"])
    assert "| 0.3 | 0.5 | 1 1 1 | 3 |" in (tmp_path / "three" / "table.md").read_text()
    assert len((tmp_path / "three" / "table.md").read_text().split("table):\n")[1].splitlines()) == 5
    assert {row["seed"] for row in read_csv(tmp_path / "three" / "runs.csv")} == {"0", "1", "2"}


# a part of a short sweep: its seeds and --out_dir added; K_100_111 the grid's loss weights
PART = ["sweep", "--preset", "tiny", "--no-controls", "--steps", "2", "--eval_every", "2", "--quiet"]
K_100_111 = ["--k", "1", "0", "0", "1", "1", "1"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Parts of a short sweep (seeds 0 and 1), a part with another lr, one with seed 0 again, one with the grid's
    k triples in the other order, and damaged copies."""
    folder = tmp_path_factory.mktemp("parts")
    for name, extra in (("s0", K_100_111 + ["--seeds", "0"]), ("s1", K_100_111 + ["--seeds", "1"]),
                        ("lr", K_100_111 + ["--seeds", "2", "--lr", "2e-3"]),
                        ("again0", K_100_111 + ["--seeds", "0", "--threads", "2"]),
                        ("reordered", ["--k", "1", "1", "1", "1", "0", "0", "--seeds", "3"])):
        oocl.main(PART + extra + ["--log_dir", str(folder / "logs"), "--out_dir", str(folder / name)])
    (folder / "stopped").mkdir()  # a part stopped before it wrote its outputs
    shutil.copy(folder / "s1" / "runs.csv", folder / "stopped" / "runs.csv")
    shutil.copytree(folder / "s1", folder / "cut")
    history = (folder / "cut" / "history.csv").read_text().splitlines()
    (folder / "cut" / "history.csv").write_text("\n".join(line for line in history if "_1_1_1," not in line) + "\n")
    shutil.copytree(folder / "s1", folder / "truncated")  # its last run's last evaluation lost (`head -n -1`)
    (folder / "truncated" / "history.csv").write_text("\n".join(history[:-1]) + "\n")
    shutil.copytree(folder / "s1", folder / "broken")
    (folder / "broken" / "sweep.json").write_text("{")
    return folder


@pytest.mark.parametrize("argv, message", [
    (["s0", "lr"], "the parts are not one sweep: --lr 0.003 in s0 but 0.002 in lr"),
    (["s0", "s1", "again0"], "seed 0 is in two parts, s0 and again0"),
    (["s0", "stopped"], "stopped holds no sweep.json or history.csv: pass the --out_dir of a finished `oocl.py sweep`"),
    (["s0", "cut"], "no results of run oocl_ssq_11_0.5_0.5_1_1_1 seed 1 in the parts"),
    (["s0", "truncated"], "truncated: run oocl_ssq_11_0.5_0.5_1_1_1 seed 1 stopped at step 2 (runs.csv) but its "
                          "history.csv ends at step 0: the part is incomplete"),
    (["s0", "broken"], "broken: its sweep.json, runs.csv or history.csv cannot be read"),
    (["s0", "missing"], "missing is not a folder"),
    (["s0", "s0"], "s0 is given twice"),
    (["--out_dir", "s1", "s0", "s1"], "--out_dir s1 is one of the parts"),
    (["--out_dir", "./s0/", "s0", "s1"], "--out_dir ./s0/ is one of the parts"),
    (["--out_dir", "lr", "s0", "s1"], "--out_dir lr already holds the outputs of another sweep"),
])
def test_merge_refuses_parts_that_are_not_one_sweep(parts, argv, message, monkeypatch, capsys):
    monkeypatch.chdir(parts)
    before = sorted(os.listdir(parts))
    with pytest.raises(SystemExit) as err:
        oocl.main(["merge"] + (argv if argv[0] == "--out_dir" else ["--out_dir", "merged"] + argv))
    stderr = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(stderr) == 1 and stderr[0].startswith("oocl.py: error: ")
    assert message in stderr[0]
    assert sorted(os.listdir(parts)) == before  # nothing written


@pytest.mark.parametrize("name, value", [("steps", 4), ("p", 13), ("weight_decay", 0.5), ("patience", 100),
                                         ("links_both_ways", True), ("model_dim", 64)])
def test_merge_refuses_parts_whose_training_settings_differ(parts, name, value, monkeypatch, capsys, tmp_path):
    """Settings that change a run's result must be the same in every part (a part's sweep.json says what it ran)."""
    other = tmp_path / "other"
    shutil.copytree(parts / "s1", other)
    saved = json.loads((other / "sweep.json").read_text())
    assert saved["hyperparameters"][name] != value
    saved["hyperparameters"][name] = value
    (other / "sweep.json").write_text(json.dumps(saved))
    monkeypatch.chdir(parts)
    with pytest.raises(SystemExit):
        oocl.main(["merge", "--out_dir", str(tmp_path / "merged"), "s0", str(other)])
    assert f"the parts are not one sweep: --{name} " in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_merge_under_torchrun_writes_once_on_rank_0(parts, monkeypatch):
    monkeypatch.chdir(parts)
    monkeypatch.setenv("RANK", "1")
    assert oocl.main(["merge", "--out_dir", "by_rank_1", "s0", "s1"]) is None and not (parts / "by_rank_1").exists()
    monkeypatch.setenv("RANK", "0")
    assert len(oocl.main(["merge", "--out_dir", "by_rank_0", "s0", "s1"])) == 4
    shutil.rmtree(parts / "by_rank_0")  # the module's parts folder is shared by the tests that follow


def test_merge_takes_the_grid_in_any_order_and_names_paths_as_a_shell_reads_them(parts, monkeypatch):
    monkeypatch.chdir(parts)
    results = oocl.main(["merge", "--out_dir", "any order", "s0", "reordered"])
    assert sorted({r["spec"].seed for r in results}) == [0, 3] and len(results) == 4
    assert "- `python oocl.py merge --out_dir 'any order' s0 reordered`" in (parts / "any order" / "table.md").read_text()
    shutil.rmtree(parts / "any order")


def test_an_unfinished_rewrite_of_a_sweeps_outputs_is_no_part_to_merge(parts, monkeypatch):
    """sweep.json is written last, and removed first when a sweep's outputs are written again (--overwrite): a rewrite
    stopped half-way leaves no sweep.json beside the new runs.csv, so merge refuses the folder."""
    monkeypatch.chdir(parts)
    shutil.copytree(parts / "s1", parts / "rewritten")

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(oocl, "plot_heatmap", stopped)
    with pytest.raises(KeyboardInterrupt):
        oocl.main(PART + K_100_111 + ["--seeds", "1", "--log_dir", "logs", "--out_dir", "rewritten", "--overwrite"])
    assert not (parts / "rewritten" / "sweep.json").exists() and (parts / "rewritten" / "runs.csv").exists()
    shutil.rmtree(parts / "rewritten")


@pytest.fixture
def copy_in_records(tmp_path):
    """oocl.py copied into records/oocl/attempt/ of a checkout (tmp_path/repo), imported as a module of its own."""
    folder = tmp_path / "repo" / "records" / "oocl" / "attempt"
    folder.mkdir(parents=True)
    shutil.copy(oocl.__file__, folder / "oocl.py")
    spec = importlib.util.spec_from_file_location("oocl_copy", folder / "oocl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_copys_table_names_the_copy_it_ran(copy_in_records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "repo")
    copy_in_records.main(["sweep", "--preset", "tiny", "--steps", "2", "--eval_every", "2", "--no-controls", "--quiet",
                          "--out_dir", str(tmp_path / "out")])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Command: `python records/oocl/attempt/oocl.py sweep --preset tiny --steps 2" in table


def test_default_outputs_of_a_run_inside_records_are_refused_explicit_ones_allowed(copy_in_records, tmp_path,
                                                                                  monkeypatch, capsys):
    """A copy run from its own folder: the default logs/ and logs/oocl_sweep/ would land inside records/."""
    folder = tmp_path / "repo" / "records" / "oocl" / "attempt"
    monkeypatch.chdir(folder)
    for argv, flags in ((["sweep"], "pass --log_dir and --out_dir"), ([], "pass --log_dir"),
                        (["sweep", "--log_dir", str(tmp_path / "logs")], "pass --out_dir")):
        with pytest.raises(SystemExit) as err:
            copy_in_records.main(argv + ["--preset", "tiny", "--steps", "2", "--quiet"])
        stderr = capsys.readouterr().err
        assert err.value.code == 2 and "would write into the repository's records/" in stderr
        assert "run from the repository root" in stderr and stderr.strip().endswith(flags)
    assert sorted(os.listdir(folder)) == ["oocl.py"]  # nothing written, nothing trained
    copy_in_records.parse_args(["sweep", "--preset", "tiny", "--log_dir", "logs", "--out_dir", "out"])
    assert (folder / "logs").is_dir() and (folder / "out").is_dir()  # pointed there on purpose: allowed


# ---- Under torchrun: the sweep split over ranks ----


def torchrun(tmp_path, name, nproc, *argv):
    out = tmp_path / name
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO_ROOT / "oocl.py"), *argv, "--preset", "tiny", "--log_dir", str(out / "logs"), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_two_process_sweep_equals_one_process_sweep_and_trains_each_run_once(tmp_path, capsys):
    sweep = ["sweep", *GRID, "--seeds", "0", "1", "--steps", "20", "--eval_every", "10", "--max_runs_per_batch", "4"]
    outputs = {1: tmp_path / "n1"}
    oocl.main(sweep + ["--preset", "tiny", "--log_dir", str(tmp_path / "n1" / "logs"), "--quiet",
                       "--out_dir", str(tmp_path / "n1" / "out")])
    outputs[2], stdout = torchrun(tmp_path, "n2", 2, *sweep, "--out_dir", str(tmp_path / "n2" / "out"))
    for nproc, out in outputs.items():
        logs = os.listdir(out / "logs")
        assert len(logs) == 16  # 2 holdouts x 4 arms x 2 seeds, each trained (and logged) once
        ranks = {line.split(" of")[0] for name in logs for line in open(out / "logs" / name) if line.startswith("rank ")}
        assert ranks == {f"rank {r}" for r in range(nproc)}  # both ranks trained a share
    assert "progress: rank 0/2" in stdout and "progress: rank 1/2" in stdout
    runs = [{(r["run_name"], r["seed"]): r for r in read_csv(outputs[n] / "out" / "runs.csv")} for n in (1, 2)]
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 16
    for key, row in runs[0].items():
        assert [row[m] for m in oocl.METRIC_KEYS] == [runs[1][key][m] for m in oocl.METRIC_KEYS], key
    table = [(outputs[n] / "out" / "table.md").read_text().split("Command:")[0] for n in (1, 2)]
    assert table[0] == table[1]


def test_two_process_single_run_trains_once(tmp_path):
    out, stdout = torchrun(tmp_path, "single", 2, "--steps", "5", "--eval_every", "5")
    assert len(os.listdir(out / "logs")) == 1
    assert "rank 1 of 2: a single run trains on rank 0 only" in stdout


@pytest.mark.parametrize("mode", ["single", "sweep"])
def test_a_closed_console_does_not_stop_a_run_or_a_sweep(tmp_path, mode):
    """The console's reader gone (`| head`, or `| tee` stopped by the same Ctrl-C): the run goes on to its end, its log
    keeps every line; a sweep writes its table."""
    code, stderr = run_with_closed_console([sys.executable, str(REPO_ROOT / "oocl.py"), *(["sweep"] * (mode == "sweep")),
                                            "--preset=tiny", "--steps=4", "--eval_every=2", "--no-controls",
                                            f"--log_dir={tmp_path}/logs", f"--out_dir={tmp_path}/sweep"], tmp_path)
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]
    logs = [log.read_text() for log in (tmp_path / "logs").glob("*.txt")]
    assert logs and all("step:4/4" in log for log in logs)
    assert (mode == "sweep") == (tmp_path / "sweep" / "table.md").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; `timeout` and `kill`
def test_ctrl_c_ends_a_run_with_one_line(tmp_path, sig):
    code, stderr = interrupt_when([sys.executable, str(REPO_ROOT / "oocl.py"), "--preset=tiny", "--steps=100000",
                                   f"--log_dir={tmp_path}/logs"], "step:1/", tmp_path, sig=sig)
    assert code == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("oocl.py: interrupted: the run logs so far are kept")
    assert "step:1/" in next((tmp_path / "logs").glob("*.txt")).read_text()  # the log is kept
