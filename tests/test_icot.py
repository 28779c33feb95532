"""train_icot.py on CPU: vocabulary and line checking, the teacher-state diagonal on hand-made examples, state
injection, and the whole tiny pipeline (every stage, eval, predict) end to end."""

import dataclasses
import gc
import importlib.util
import io
import math
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import interrupt_when, run_with_closed_console
import torch

import train_icot as icot

torch.set_num_threads(1)  # small models: one thread is as fast and leaves the other cores to the other tests

REPO_ROOT = Path(__file__).resolve().parents[1]
LINE_4X4 = ("9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 ( 1 3 9 7 9 2 1 ) "
            "+ 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1")
LINE_2X2_K2 = "1 7 * 1 3 $ 6 2 * 6 3||1 7 0 + 0 3 1 2 $ 6 5 1 + 0 8 7 0 #### 1 0 2 2 $ 6 3 9 0"


def layout_of(line):
    problems, n, m = icot.check_line(line)
    return icot.layout_of(icot.encode(line), n, m, len(problems))


def tiny_hp(**overrides):
    return icot.Hyperparameters(**{**icot.PRESETS["tiny"], **overrides})


def test_cpu_tests_run_the_cpu_path_also_on_a_gpu_machine():
    """conftest hides CUDA from every test outside tests/gpu, in this process and in the subprocesses a test
    starts: on a GPU machine these tests still run (and specify) the CPU path."""
    assert icot.DEVICE == torch.device("cpu") and not torch.cuda.is_available()
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
                           capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "''"


# ---- Vocabulary and line checking ----

def test_tokens_round_trip_and_layout():
    tokens = icot.encode(LINE_4X4)
    assert len(tokens) == 66 and max(tokens) < icot.VOCAB_SIZE
    assert icot.decode(tokens) == LINE_4X4
    layout = layout_of(LINE_4X4)
    assert (layout.sep1, layout.sep2, layout.cot_len, layout.answer_len) == (9, 56, 46, 8)
    layout2 = layout_of(LINE_2X2_K2)
    assert layout2.spans == [(11, 20), (20, 29)]  # '||' .. '$' and '$' .. '####' around each problem's CoT
    assert icot.decode(icot.encode(LINE_2X2_K2)[layout2.sep1 + 1:layout2.spans[0][1]]) == "1 7 0 + 0 3 1 2"
    assert icot.format_line([(3719, 3349)], 4, 4) == LINE_4X4
    assert icot.format_line([(71, 31), (26, 36)], 2, 2) == LINE_2X2_K2


@pytest.mark.parametrize("corrupt, message", [
    (lambda line: line.replace("*", "x", 1), "outside the vocabulary"),
    (lambda line: line.replace("+ 0 6", "+ 0 7", 1), "the CoT is wrong for 3719\\*3349"),
    (lambda line: line[:-1] + "2", "the answer is wrong for 3719\\*3349"),
    (lambda line: line.replace(" #### ", " ### "), "INPUT\\|\\|COT #### ANSWER"),
])
def test_invalid_line_rejected_with_its_number(tmp_path, corrupt, message):
    path = tmp_path / "data.txt"
    path.write_text(f"{LINE_4X4}\n{LINE_4X4}\n{corrupt(LINE_4X4)}\n")
    with pytest.raises(SystemExit, match=rf"data.txt:3: invalid line: .*{message}"):
        icot.load_dataset(str(path))


def test_mixed_digit_sizes_rejected(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text(LINE_4X4 + "\n" + icot.format_line([(12, 34)], 2, 2) + "\n")
    with pytest.raises(SystemExit, match="mixed.txt:2: 2x2 .* use one digit size and K per file"):
        icot.load_dataset(str(path))


def test_command_line(capsys):
    command, hp, positional = icot.parse_args(["predict", "--preset", "tiny", "--ckpt=x.pt", "--show-cot", "12*34"])
    assert (command, hp.show_cot, hp.ckpt, hp.task, positional) == ("predict", True, "x.pt", "2x2", ["12*34"])
    _, hp, _ = icot.parse_args(["teacher", "--n-layer", "5", "--model_dim=32", "--no_show_cot", "--preset=tiny",
                                "--stages", "teacher", "nocot", "--compile", "true", "--lr", "0.01"])
    assert (hp.n_layer, hp.model_dim, hp.show_cot, hp.stages, hp.compile, hp.lr) == (5, 32, False,
                                                                                     ("teacher", "nocot"), "true", 0.01)
    assert (hp.teacher_steps, hp.batch_size) == (icot.PRESETS["tiny"]["teacher_steps"], 64)  # preset, then flags
    _, hp, _ = icot.parse_args(["teacher", "--show_cot", "--lr", "0.5"])  # a flag never swallows the next argument
    assert hp.show_cot and hp.lr == 0.5
    errors = [([], "a command is needed first: one of teacher, nocot, "), (["--lr=1"], "a command is needed first"),
              (["train"], "invalid choice: 'train'"), (["teacher", "--lrr=1"], "unrecognized arguments: --lrr=1"),
              (["teacher", "--n_layer", "many"], "argument --n_layer/--n-layer: invalid int value: 'many'"),
              (["teacher", "--lr=1", "--lr=2"], "argument --lr: given twice"),
              (["teacher", "--show-cot", "--no_show_cot"], "argument --show_cot: given twice"),
              (["teacher", "--n_lay=3"], "unrecognized arguments"),  # no abbreviations
              (["teacher", "--compile=yes"], "argument --compile: invalid choice: 'yes'"),
              (["teacher", "--show_cot=true"], "ignored explicit argument")]
    for argv, message in errors:
        with pytest.raises(SystemExit) as exit_info:
            icot.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    for argv, message in [(["predict", "12*34"], "needs --ckpt"), (["teacher", "--per_line=0"], "--per_line must be")]:
        with pytest.raises(SystemExit, match=message) as exit_info:
            icot.parse_args(argv)
        assert exit_info.value.code == 2
    help_text = icot.build_parser().format_help()
    for field in icot.dataclasses.fields(icot.Hyperparameters):
        assert f"--{field.name}" in help_text, field.name
    assert "--no-show-cot" in help_text and "(default: 0.0006)" in help_text


def test_user_errors_exit_2_with_one_line_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(icot, "run_stage", lambda *args: pytest.fail("training started"))
    for argv, message in [(["teacher", f"--log_dir={blocker / 'logs'}"], "--log_dir="),
                          (["teacher", "--ckpt_dir", str(blocker), f"--log_dir={tmp_path}"], "--ckpt_dir="),
                          (["nocot", "--resume"], "--resume continues a stepwise stage"),
                          (["emulator", "--emulator_mixtures=0"], "--emulator_mixtures=0 must be >= 1"),
                          (["emulator", "--emulator_mixture_temperature=0"],
                           "--emulator_mixture_temperature=0.0 must be > 0"),
                          # out of range: named before anything divides by it or hands it to torch
                          (["teacher", "--n_head=0"], "--n_head=0 must be >= 1"),
                          (["teacher", "--model_dim=0"], "--model_dim=0 must be >= 1"),
                          (["teacher", "--beta1=2"], "--beta1=2.0 must be in \\[0, 1\\)"),
                          (["teacher", "--cpu_threads=0"], "--cpu_threads=0 must be >= 1"),
                          (["teacher", "--warmup_steps=-5"], "--warmup_steps=-5 must be >= 0"),
                          (["teacher", "--grad_clip=-1"], "--grad_clip=-1.0 must be > 0"),
                          (["teacher", "--cooldown_frac=2"], "--cooldown_frac=2.0 must be in \\[0, 1\\]"),
                          (["teacher", "--stage_minutes=nan"], "--stage_minutes=nan must be a finite number"),
                          (["teacher", "--lr=inf"], "--lr=inf must be a finite number"),
                          (["teacher", "--task=4x4", f"--paper_dir={tmp_path / 'typo'}"],
                           f"--paper_dir='{tmp_path / 'typo'}' is not a folder .* or --paper_dir='' to go without"),
                          (["teacher", "--task=2x2", f"--data_dir={blocker}", f"--log_dir={tmp_path}",
                            f"--ckpt_dir={tmp_path}"], "--data_dir=.* is not a writable directory")]:
        with pytest.raises(SystemExit, match=message) as exit_info:
            icot.main(argv + ["--paper_dir="] * ("--task=4x4" not in argv))  # needs no papers' files
        assert exit_info.value.code == 2
    run = subprocess.run([sys.executable, REPO_ROOT / "train_icot.py", "teacher", "--task=2x2",
                          f"--log_dir={blocker / 'logs'}"],
                         capture_output=True, text=True, cwd=tmp_path)  # the command line: one line, status 2
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: --log_dir=") and "not a writable" in run.stderr


# ---- Teacher states: the diagonal of icot.md ----

def test_diagonal_positions_hand_made():
    assert icot.diagonal_positions(2, 9, 4) == [2, 4, 7, 9]  # 2 + l*7/3 = 2, 4.33, 6.67, 9
    layout = layout_of(LINE_4X4)
    positions = icot.state_positions(layout, 12, "line")
    # round(9 + l*47/11), l = 0..11: from '||' (9) to '####' (56)
    assert [p for (p,) in positions] == [9, 13, 18, 22, 26, 30, 35, 39, 43, 47, 52, 56]
    tokens = icot.encode(LINE_4X4)
    assert (tokens[9], tokens[56]) == (icot.SEP1, icot.SEP2)
    layout2 = layout_of(LINE_2X2_K2)  # sum scheme: one diagonal per problem's own CoT span
    assert icot.state_positions(layout2, 3, "sum") == [[11, 20], [16, 25], [20, 29]]  # 15.5 and 24.5 round up
    assert icot.state_positions(layout2, 3, "line") == [[11], [20], [29]]


@pytest.mark.parametrize("scheme", ["line", "sum"])
def test_teacher_states_read_the_diagonal(scheme):
    hp = tiny_hp(n_layer=3, states=scheme)
    layout = layout_of(LINE_2X2_K2)
    torch.manual_seed(0)
    teacher = icot.IcotModel("teacher", hp, layout)
    for p in teacher.parameters():  # random non-zero weights everywhere so every layer changes the stream
        torch.nn.init.normal_(p, std=0.3)
    student = icot.IcotModel("mindread", hp, layout, teacher)
    tokens = torch.tensor([icot.encode(LINE_2X2_K2), icot.encode(icot.format_line([(12, 34), (56, 78)], 2, 2))])
    recorded = []
    teacher.lm(tokens, lambda layer, x: recorded.append(x) or x)
    expected = []
    for layer, positions in enumerate(icot.state_positions(layout, 3, scheme)):
        state = sum(icot.standardise(recorded[layer][:, p]) for p in positions)
        expected.append(icot.standardise(state) if scheme == "sum" else state)
    states = student.teacher_states(tokens)
    torch.testing.assert_close(states, torch.stack(expected, dim=1), rtol=1e-4, atol=1e-4)
    assert states.shape == (2, 3, hp.model_dim)
    torch.testing.assert_close(states.mean(-1), torch.zeros(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(states.std(-1), torch.ones(2, 3), atol=1e-3, rtol=0)


def test_student_reads_states_only_at_the_separator():
    hp = tiny_hp(n_layer=3)
    layout = layout_of(LINE_4X4)
    torch.manual_seed(0)
    student = icot.IcotModel("mindread", hp, layout)
    for p in student.lm.parameters():
        torch.nn.init.normal_(p, std=0.3)
    seq = icot.drop_cot(torch.tensor([icot.encode(LINE_4X4)]), layout, layout.cot_len)
    assert icot.decode(seq[0].tolist()) == "9 1 7 3 * 9 4 3 3||#### 1 3 9 4 5 4 2 1"
    states = torch.randn(1, 3, hp.model_dim)
    hidden_a = student.hidden(seq, states)
    hidden_b = student.hidden(seq, states + torch.randn_like(states))
    same = (hidden_a - hidden_b).abs().amax(-1)[0] < 1e-6
    assert same[:layout.sep1].all() and not same[layout.sep1:].any()  # causal: from '||' on, everything reads them


def trained_couple(hp, layout, steps=30):
    """A couple model after a few AdamW steps, so that the head, the zero-initialised projections and every gradient
    are non-trivial."""
    torch.manual_seed(0)
    model = icot.IcotModel("couple", hp, layout)
    tokens = torch.tensor([icot.encode(icot.format_line([(1234 + 7 * i, 9876 - 5 * i)], 4, 4)) for i in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, tokens


def test_compile_traces_one_graph_with_eager_gradients():
    """torch.compile (the GPU path) captures the closure-based layer hooks (emulator read/predict/LSTM/attention/
    write-back, student injection) as ONE graph (fullgraph) and gives the eager gradients, on a model trained for a
    few steps (at initialisation the zero head makes most gradients exactly zero). aot_eager checks tracing and
    autograd on CPU without code generation."""
    hp = tiny_hp(n_layer=2, model_dim=32)
    model, tokens = trained_couple(hp, layout_of(LINE_4X4), steps=10)
    gradients = []
    for module in (torch.compile(model, backend="aot_eager", fullgraph=True), model):
        module(tokens).backward()
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
    nonzero = [g.abs().sum() > 0 for g in gradients[1]]
    assert len(gradients[0]) == len(nonzero) > 30 and sum(nonzero) >= len(nonzero) - 2, f"{sum(nonzero)} non-zero"
    for compiled, eager in zip(*gradients):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_logits_are_soft_capped_at_15_with_tanh():
    """The form the committed checkpoints of records/icot were trained with."""
    torch.manual_seed(0)
    gpt = icot.GPT(tiny_hp(n_layer=1, model_dim=32))
    torch.nn.init.normal_(gpt.lm_head.weight, std=10)
    hidden = torch.randn(4, 32)
    raw = gpt.lm_head(hidden)
    assert raw.abs().max() > 30  # far into the cap
    torch.testing.assert_close(gpt.logits(hidden), 15 * torch.tanh(raw / 15))


# ---- Exact match, stepwise removal, optimizer reset, best checkpoint ----

def test_exact_match_needs_eos_after_the_answer():
    layout = layout_of(LINE_4X4)
    tokens = torch.tensor([icot.encode(LINE_4X4)])
    right = tokens[:, layout.sep1 + 1:]
    exact, per_position = icot.answer_scores(right, tokens, layout)
    assert (exact, per_position) == (1, [1] * 8)
    no_eos = right.clone()
    no_eos[0, -1] = icot.TOKEN_ID["7"]  # answer right, then a digit instead of <eos>
    assert icot.answer_scores(no_eos, tokens, layout) == (0, [1] * 8)
    wrong_digit = right.clone()
    wrong_digit[0, layout.sep2 - layout.sep1 + 2] = (wrong_digit[0, layout.sep2 - layout.sep1 + 2] + 1) % 10
    assert icot.answer_scores(wrong_digit, tokens, layout) == (0, [1, 1, 0] + [1] * 5)
    cut = right[:, :-3]  # the generation ends inside the answer
    assert icot.answer_scores(cut, tokens, layout) == (0, [1] * 6 + [0, 0])


def test_stepwise_schedule_follows_the_epoch_rate():
    layout = layout_of(LINE_4X4)  # 46 CoT tokens
    hp = tiny_hp(batch_size=32, stepwise_remove=1, stepwise_remove_per_epoch=8)
    schedule = icot.stepwise_schedule(hp, layout, train_lines=3200)  # 100 steps per epoch: one token every 12.5
    assert list(schedule.items())[:3] == [(0, 1), (12, 2), (24, 3)] and schedule[45 * 12] == 46 and len(schedule) == 46
    hp = tiny_hp(batch_size=32, stepwise_remove=8, stepwise_remove_per_epoch=8)  # 8 tokens once per epoch
    assert icot.stepwise_schedule(hp, layout, train_lines=3200) == {0: 8, 100: 16, 200: 24, 300: 32, 400: 40, 500: 46}


def test_lr_warms_up_holds_then_decays_to_zero():
    assert [icot.lr_factor(step, 10, 60, 100) for step in (0, 9, 59, 80, 99)] == pytest.approx([0.1, 1, 1, 0.5, 0.025])
    assert icot.lr_factor(0, 0, 60, 100) == 1.0  # no warmup


def test_stages_sized_in_epochs_count_steps_of_their_batch_size():
    hp = tiny_hp(mindread_steps=0, mindread_epochs=2.0, emulator_steps=0, emulator_epochs=1.5, batch_size=64)
    assert icot.stage_steps("mindread", hp, 3200) == 100 and icot.stage_steps("emulator", hp, 3200) == 75
    assert icot.stage_steps("mindread", icot.dataclasses.replace(hp, mindread_steps=7), 3200) == 7  # steps win


def test_removal_smoothing_distribution():
    generator = torch.Generator().manual_seed(0)
    offsets = icot.removal_offsets(200000, 1.0, generator, max_offset=3)
    frequencies = torch.bincount(offsets, minlength=4).double() / len(offsets)
    decay = math.exp(-1.0)
    expected = torch.tensor([1 - decay, (1 - decay) * decay, (1 - decay) * decay**2, decay**3], dtype=torch.double)
    torch.testing.assert_close(frequencies, expected, atol=4e-3, rtol=0)  # P(o) ~ exp(-o), the tail on the last
    paper = icot.removal_offsets(200000, 4.0, generator)
    assert abs((paper == 0).double().mean().item() - (1 - math.exp(-4))) < 2e-3 and paper.max() <= 100


def test_drop_cot_rows_shifts_each_line_by_its_own_count():
    layout = layout_of(LINE_4X4)
    tokens = torch.tensor([icot.encode(LINE_4X4)] * 3)
    seq, real = icot.drop_cot_rows(tokens, layout, torch.tensor([2, 5, 46]))
    assert seq.shape == (3, layout.seq_len - 2)
    for row, removed in enumerate([2, 5, 46]):
        expected = icot.drop_cot(tokens[row:row + 1], layout, removed)[0]
        assert torch.equal(seq[row, :len(expected)], expected) and real[row].sum() == len(expected)
        assert (seq[row, len(expected):] == icot.EOS).all()


def test_kept_positions_leave_a_gap_where_the_cot_was():
    layout = layout_of(LINE_4X4)
    tokens = torch.tensor([icot.encode(LINE_4X4)] * 2)
    seq, real = icot.drop_cot_rows(tokens, layout, torch.tensor([2, 5]))
    positions = icot.kept_positions(seq.size(1), layout, torch.tensor([2, 5]), seq.device)
    assert positions[:, :layout.sep1 + 1].tolist() == [list(range(layout.sep1 + 1))] * 2
    assert positions[:, layout.sep1 + 1].tolist() == [layout.sep1 + 3, layout.sep1 + 6]
    # every kept token sits at its teacher-layout position
    assert torch.equal(tokens.gather(1, positions.clamp(max=layout.seq_len - 1))[real], seq[real])


def test_stepwise_keep_positions_in_training_decoding_and_checkpoints(tmp_path, monkeypatch):
    """--stepwise_keep_positions: rotary sees the teacher-layout positions (a gap where the CoT was) in the loss and
    in greedy decoding alike, and the checkpoint remembers it."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_keep_positions=True)
    contiguous = icot.IcotModel("stepwise", hp_plain := icot.dataclasses.replace(hp, stepwise_keep_positions=False),
                                train_set.layout)
    torch.manual_seed(1)
    for parameter in model.parameters():  # nothing zero, so positions change the outputs
        torch.nn.init.normal_(parameter, std=0.3)
    contiguous.load_state_dict(model.state_dict())
    layout, batch = train_set.layout, train_set.tokens[:16]
    assert torch.allclose(model(batch), contiguous(batch))  # nothing removed: the same model
    model.removed = contiguous.removed = 3
    assert not torch.allclose(model(batch), contiguous(batch))
    seen, real_rotary = [], icot.Rotary.forward
    monkeypatch.setattr(icot.Rotary, "forward", lambda self, n, positions=None: seen.append(positions) or
                        real_rotary(self, n, positions))
    rows = torch.tensor([3, 4] * 8)
    model(batch, removed_rows=rows)
    assert torch.equal(seen[-1], icot.kept_positions(layout.seq_len - 4, layout, rows, seen[-1].device))
    seen.clear()
    generated = model.generate(batch)  # the prefix in one pass, then one token per pass (KV cache)
    assert torch.equal(torch.cat(seen, dim=1), icot.kept_positions(layout.seq_len - 4, layout, 3, seen[-1].device))
    # decoding and the teacher-forced pass agree on the positions: argmax of the full pass = the greedy tokens
    full = torch.cat([batch[:, :layout.sep1 + 1].long(), generated], dim=1)
    assert torch.equal(model.lm.logits(model.hidden(full[:, :-1], None, 3)[:, layout.sep1:]).argmax(-1), generated)
    icot.save_checkpoint(str(tmp_path / "stepwise.pt"), model)
    assert icot.load_checkpoint(str(tmp_path / "stepwise.pt"), hp_plain).keep_positions
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    icot.save_checkpoint(str(tmp_path / "ckpt" / "stepwise.pt"), model)
    with pytest.raises(icot.UserError, match="stepwise_keep_positions=True"):
        icot.build_stage_model("stepwise", icot.dataclasses.replace(hp_plain, resume=True), layout)


@pytest.mark.parametrize("kind", ["teacher", "nocot", "mindread", "couple", "stepwise"])
def test_decoding_with_the_kv_cache_is_greedy_decoding_of_one_full_pass(kind):
    """generate decodes with a KV cache. Teacher-forced on its own output, one full pass without a cache must predict
    every generated token: the states injected at '||', the rotary positions (with the gap of the removed CoT for
    stepwise) and the attention of the one-token passes are those of training."""
    hp = tiny_hp(n_layer=3, stepwise_keep_positions=True)
    layout = layout_of(LINE_4X4)
    torch.manual_seed(0)
    teacher = icot.IcotModel("teacher", hp, layout)
    model = icot.IcotModel(kind, hp, layout, teacher)
    for parameter in [*teacher.parameters(), *model.parameters()]:  # nothing zero: every part changes the output
        torch.nn.init.normal_(parameter, std=0.3)
    model.removed = 7 if kind == "stepwise" else model.removed
    tokens = torch.tensor([icot.encode(icot.format_line([(1234 + 7 * i, 9876 - 5 * i)], 4, 4)) for i in range(16)])
    generated = model.generate(tokens)
    assert generated.shape == (16, model.seq_len - layout.sep1 - 1)
    assert len(set(generated.flatten().tolist())) > 3  # not one token repeated
    full = torch.cat([tokens[:, :layout.sep1 + 1], generated], dim=1)
    logits = model.lm.logits(model.hidden(full[:, :-1], model.student_states(tokens))[:, layout.sep1:])
    assert torch.equal(logits.argmax(-1), generated)


def stepwise_setup(tmp_path, **overrides):
    lines = [icot.format_line([(10 + i % 90, 10 + (7 * i) % 90)], 2, 2) for i in range(256)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    train_set = icot.load_dataset(str(tmp_path / "train.txt"))
    hp = tiny_hp(log_dir=str(tmp_path / "logs"), ckpt_dir=str(tmp_path / "ckpt"), eval_lines=8, eval_batch=8,
                 n_layer=2, model_dim=32, **overrides)
    torch.manual_seed(0)
    return hp, icot.IcotModel("stepwise", hp, train_set.layout), train_set


def test_the_loss_counts_each_lines_tokens_after_the_separator_and_no_padding(tmp_path):
    """With the head at zero every prediction is uniform, so a summed loss is ln(vocabulary) times the number of
    tokens it counts: the tokens after '||' (the CoT a line still has, '####', the answer, <eos>), never the input
    and never the padding after a line that smoothing shortened more than the others."""
    hp, model, train_set = stepwise_setup(tmp_path)
    layout, batch = train_set.layout, train_set.tokens[:4]
    torch.nn.init.zeros_(model.lm.lm_head.weight)
    log_vocab = math.log(model.lm.lm_head.out_features)
    after_separator = layout.seq_len - layout.sep1 - 1
    assert model(batch, reduction="sum").item() == pytest.approx(4 * after_separator * log_vocab, rel=1e-5)
    removed = torch.tensor([1, 3, layout.cot_len, 5])
    expected = sum(after_separator - r for r in removed.tolist()) * log_vocab
    assert model(batch, reduction="sum", removed_rows=removed).item() == pytest.approx(expected, rel=1e-5)


def test_a_training_step_takes_the_padded_width_from_the_host(tmp_path, monkeypatch):
    """Training pads the lines to the model's own removal count, which every line's count is at or above and which
    the host knows: removed_rows.min() would wait for the GPU in every step and break the compiled graph. The loss
    is that of the exact width (the padding carries none)."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=1, stepwise_remove_per_epoch=4, eval_every=100,
                                          stepwise_max_steps=8, stepwise_decay_steps=1)
    calls, real_drop = [], icot.drop_cot_rows
    monkeypatch.setattr(icot, "drop_cot_rows", lambda tokens, layout, removed, fewest=None: calls.append(
        (int(removed.min()), fewest)) or real_drop(tokens, layout, removed, fewest))
    icot.train_stage(hp, "stepwise", model, train_set, train_set)
    assert calls and all(isinstance(fewest, int) and fewest <= least for least, fewest in calls), calls
    torch.manual_seed(1)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    batch, rows = train_set.tokens[:4], torch.tensor([4, 5, 4, 6])
    padded = model(batch, reduction="sum", removed_rows=rows, fewest_removed=2).item()
    assert padded == pytest.approx(model(batch, reduction="sum", removed_rows=rows).item())


def test_a_stepwise_stage_compiles_two_graphs_from_its_first_increment_to_its_no_cot_phase(tmp_path, monkeypatch):
    """On the GPU every compile of the training step costs seconds of the stage's budget: the first graph, one more
    once the padded width is taken as dynamic, and none after, also not when no CoT is left (the eager backend
    counts the graphs here without generating code)."""
    hp, model, train_set = stepwise_setup(tmp_path, compile="true", stepwise_remove=2, stepwise_remove_per_epoch=64,
                                          eval_every=100, stepwise_max_steps=40, stepwise_decay_steps=5)
    real_compile = torch.compile
    monkeypatch.setattr(icot.torch, "compile", lambda module: real_compile(module, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, end, _ = icot.train_stage(hp, "stepwise", model, train_set, train_set)
    assert model.removed == train_set.layout.cot_len and end == 40
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_removal_smoothing_never_removes_more_than_the_cot(tmp_path, monkeypatch):
    """Offsets drawn past the end of the CoT stop at it: '####' and the answer are never removed from a line."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=1, stepwise_remove_per_epoch=4, eval_every=100,
                                          stepwise_max_steps=8, stepwise_decay_steps=1)
    monkeypatch.setattr(icot, "removal_offsets", lambda count, *args, **kwargs: torch.full((count,), 100))
    most_removed, real_drop = [], icot.drop_cot_rows
    monkeypatch.setattr(icot, "drop_cot_rows", lambda tokens, layout, removed, *fewest: most_removed.append(
        int(removed.max())) or real_drop(tokens, layout, removed, *fewest))
    icot.train_stage(hp, "stepwise", model, train_set, train_set)
    assert most_removed and max(most_removed) == train_set.layout.cot_len


def test_stepwise_resets_the_optimizer_at_each_increment(tmp_path, monkeypatch):
    # 256 lines / 64 per batch = 4 steps per epoch, 4 tokens per epoch -> one of the 8 CoT tokens every step
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=1, stepwise_remove_per_epoch=4, eval_every=5,
                                          stepwise_patience=1, stepwise_decay_steps=2, stepwise_max_steps=40)
    optimizers, real_make = [], icot.make_optimizer
    monkeypatch.setattr(icot, "make_optimizer", lambda *args: optimizers.append(real_make(*args)) or optimizers[-1])
    _, end, _ = icot.train_stage(hp, "stepwise", model, train_set, train_set)
    assert len(optimizers) == 8  # one per increment (1..8 tokens removed at steps 0..7)
    adam_steps = [int(next(iter(o.state.values()))["step"]) if o.state else 0 for o in optimizers]
    assert adam_steps == [1] * 7 + [end - 7]  # each optimizer trained only its own increment
    log = next((tmp_path / "logs").glob("*.txt")).read_text()
    assert re.findall(r"increment: removed_cot:(\d+) of 8, optimizer reset", log) == [str(i) for i in range(1, 9)]
    assert model.removed == 8


def test_stage_minutes_then_resume_continues_the_removal(tmp_path, capsys):
    """A stepwise stage cut by --stage_minutes saves its weights with the CoT tokens removed so far, and its log and
    `eval` say that the model still reads CoT; --resume goes on from that increment (what a GPU run split into
    10-minute commands needs)."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=1, stepwise_remove_per_epoch=4, eval_every=50,
                                          stage_minutes=1e-9, stepwise_max_steps=40)
    icot.train_stage(hp, "stepwise", model, train_set, train_set)  # stops after the first step
    saved = torch.load(tmp_path / "ckpt" / "stepwise.pt")
    assert saved["removed"] == 1
    unfinished = "(unfinished: 1 of 8 CoT tokens removed; it generates the rest before its answer"
    assert unfinished in next((tmp_path / "logs").glob("*.txt")).read_text()
    capsys.readouterr()
    icot.run_eval_command(dataclasses.replace(hp, ckpt=str(tmp_path / "ckpt" / "stepwise.pt"), data=train_set.path))
    assert capsys.readouterr().out.startswith(f"stepwise {unfinished}")
    saved["removed"], saved["progress"]["increment_steps"] = 5, 0  # as if cut later, as 5 tokens were removed
    torch.save(saved, tmp_path / "ckpt" / "stepwise.pt")
    resumed = icot.build_stage_model("stepwise", icot.dataclasses.replace(hp, resume=True), train_set.layout)
    assert resumed.removed == 5 and torch.equal(resumed.state_dict()["lm.lm_head.weight"],
                                                saved["model"]["lm.lm_head.weight"])
    hp = icot.dataclasses.replace(hp, stage_minutes=0.0, stepwise_patience=1, stepwise_decay_steps=1)
    icot.train_stage(hp, "stepwise", resumed, train_set, train_set)
    log = max((tmp_path / "logs").glob("*.txt"), key=lambda path: path.stat().st_mtime).read_text()
    assert re.findall(r"^step:(\d+)/\d+ increment: removed_cot:(\d+) of 8", log, re.M) == [
        ("0", "5"), ("1", "6"), ("2", "7"), ("3", "8")]


def test_resume_goes_on_from_the_step_reached_in_the_increment(tmp_path):
    """A stage cut inside an increment goes on with that increment's remaining steps, one cut at its end with the
    next increment: --resume neither repeats the steps it trained nor skips an increment."""
    # 256 lines / 64 per batch = 4 steps per epoch, 1 token per epoch: an increment every 4 steps
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=1, stepwise_remove_per_epoch=1, eval_every=3,
                                          stage_minutes=1e-9, stepwise_max_steps=40)
    increments = []
    for run in range(3):  # each run stops at its first evaluation after step 0
        log_dir = tmp_path / f"logs{run}"
        run_hp = dataclasses.replace(hp, resume=run > 0, log_dir=str(log_dir))
        if run:
            model = icot.build_stage_model("stepwise", run_hp, train_set.layout)
        icot.train_stage(run_hp, "stepwise", model, train_set, train_set)
        log = next(log_dir.glob("*.txt")).read_text()
        increments.append(re.findall(r"^step:(\d+)/\d+ increment: removed_cot:(\d+) of 8", log, re.M))
        progress = torch.load(tmp_path / "ckpt" / "stepwise.pt")["progress"]
        increments[-1].append(progress["increment_steps"])
    # run 0: cut at step 3, 3 steps into the first increment; run 1: its last step, then cut before the second
    # increment (an evaluation); run 2: the second increment from its start
    assert increments == [[("0", "1"), 3], [("0", "1"), 4], [("0", "2"), 3]]
    assert "resumed with 1 of 8 CoT tokens removed, 3 steps into that increment" in (
        next((tmp_path / "logs1").glob("*.txt")).read_text())


def test_an_interrupted_stepwise_stage_saves_its_progress_and_resume_goes_on_from_it(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM (`timeout`) in a stepwise stage (hours on a CPU) saves stepwise.pt with the step reached:
    --resume goes on from there, with batches drawn anew (its first seed would replay the first part's). A run
    stopped before it trained a step, and the other stages (not resumable), leave the checkpoints as they are; a
    stage stopped after it saved its checkpoint (while plotting) says that it did."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=1, stepwise_remove_per_epoch=1, eval_every=100,
                                          stepwise_max_steps=40)  # an increment every 4 steps
    real_lr_factor, real_offsets, seeds = icot.lr_factor, icot.removal_offsets, set()
    stop_at = {"step": 6}

    def stop_at_step(step, *args):
        if step == stop_at["step"]:
            raise KeyboardInterrupt
        return real_lr_factor(step, *args)

    monkeypatch.setattr(icot, "lr_factor", stop_at_step)
    monkeypatch.setattr(icot, "removal_offsets", lambda *a: seeds.add(a[2].initial_seed()) or real_offsets(*a))
    with pytest.raises(KeyboardInterrupt) as stop:
        icot.train_stage(hp, "stepwise", model, train_set, train_set)
    checkpoint = tmp_path / "ckpt" / "stepwise.pt"
    assert stop.value.args == (f"saved {checkpoint}: stepwise --resume goes on from it",)  # the last line
    saved = torch.load(checkpoint)
    assert saved["removed"] == 2 and saved["progress"] == {"increment_steps": 2, "stale_evals": 0, "finished": False,
                                                          "trained_steps": 6}
    assert "step:6 interrupted: saved" in next((tmp_path / "logs").glob("*.txt")).read_text()
    stop_at["step"] = 0
    for kind, steps in (("stepwise", None), ("teacher", 10)):
        with pytest.raises(KeyboardInterrupt) as stop:
            icot.train_stage(dataclasses.replace(hp, log_dir=str(tmp_path / f"{kind}_logs")), kind,
                             icot.IcotModel(kind, hp, train_set.layout), train_set, train_set, steps)
        assert stop.value.args == ()
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["stepwise.pt"] and torch.load(checkpoint)["removed"] == 2
    monkeypatch.setattr(icot, "lr_factor", real_lr_factor)
    seeds.clear()
    resumed_hp = dataclasses.replace(hp, resume=True, log_dir=str(tmp_path / "resumed"), stepwise_max_steps=4)
    icot.train_stage(resumed_hp, "stepwise", icot.build_stage_model("stepwise", resumed_hp, train_set.layout),
                     train_set, train_set)
    log = next((tmp_path / "resumed").glob("*.txt")).read_text()
    assert "resumed with 2 of 8 CoT tokens removed, 2 steps into that increment" in log
    assert re.findall(r"^step:(\d+)/\d+ increment: removed_cot:(\d+) of 8", log, re.M) == [("0", "2"), ("2", "3")]
    assert seeds == {hp.seed + 1_000_003 * 6} and torch.load(checkpoint)["progress"]["trained_steps"] == 6 + 4

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(icot, "plot_run", ctrl_c)  # after the stage saved its checkpoint: the last line says so
    with pytest.raises(KeyboardInterrupt) as stop:
        icot.train_stage(dataclasses.replace(hp, log_dir=str(tmp_path / "plot_logs")), "teacher",
                         icot.IcotModel("teacher", hp, train_set.layout), train_set, train_set, 2)
    assert stop.value.args == (f"the stage had ended and saved {tmp_path / 'ckpt' / 'teacher.pt'} (its plot was not "
                               "drawn)",)


def test_a_nan_loss_ends_the_stage_and_its_log_says_why_and_an_oversized_batch_is_refused(tmp_path):
    hp, model, train_set = stepwise_setup(tmp_path, eval_every=2)
    with pytest.raises(SystemExit, match=r"--batch_size=257 is more than the 256 lines of .*train.txt: give a smaller"):
        icot.train_stage(dataclasses.replace(hp, batch_size=257), "teacher", model, train_set, train_set, 4)
    with torch.no_grad():
        model.lm.lm_head.weight.fill_(float("nan"))
    with pytest.raises(SystemExit, match=r"teacher: the training loss is nan at step 2: lower --lr"):
        icot.train_stage(hp, "teacher", model, train_set, train_set, 4)
    log = next((tmp_path / "logs").glob("icot_teacher_*.txt")).read_text()
    assert log.endswith("stopped: teacher: the training loss is nan at step 2: lower --lr (now 0.01) or "
                        "--embed_lr_mult\n")


def test_a_cut_stage_evaluates_its_last_step_once(tmp_path):
    """--stage_minutes stops right after an evaluation (the training clock moves only there): that evaluation is the
    stage's last, not made twice (a second one of the same weights counted as one more without improvement)."""
    hp, _, train_set = stepwise_setup(tmp_path, eval_every=5, stage_minutes=1e-9)
    _, end, _ = icot.train_stage(hp, "nocot", icot.IcotModel("nocot", hp, train_set.layout), train_set, train_set, 100)
    log = next((tmp_path / "logs").glob("*.txt")).read_text()
    assert end == 5 and re.findall(r"^step:(\d+)/\d+ removed_cot:", log, re.M) == ["0", "5"]


def test_a_resumed_no_cot_phase_keeps_its_best_and_its_patience(tmp_path, monkeypatch):
    """Resumed with no CoT left (a cut in the final phase), the saved weights (the best so far) compete with the new
    evaluations and patience counts on from the evaluations made after them; a finished stage resumed is a new no-CoT
    phase (records/icot/README.md: `--resume` for more no-CoT steps), its patience from 0."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=8, stepwise_remove_per_epoch=1000, eval_every=3,
                                          stepwise_patience=2, stepwise_decay_steps=4, stepwise_max_steps=30,
                                          resume=True)
    model.removed = 8
    icot.save_checkpoint(str(tmp_path / "ckpt" / "stepwise.pt"), model,
                         progress={"increment_steps": 9, "stale_evals": 1, "finished": False})
    resumed = icot.build_stage_model("stepwise", hp, train_set.layout)
    saved_head = resumed.lm.lm_head.weight.detach().clone()
    accuracies = iter([0.5, 0.4, 0.45, 0.45])  # steps 0 (the resumed weights), 3, 6 and 7
    monkeypatch.setattr(icot, "evaluate", lambda *args, **kwargs: {
        "loss": 1.0, "ppl": 2.7, "accuracy": next(accuracies, 0.3), "digit_accuracy": [0.5] * 4, "problems_per_s": 1.0,
        "lines": 8})
    best, end, _ = icot.train_stage(hp, "stepwise", resumed, train_set, train_set)
    assert best["step"] == 0 and best["accuracy"] == 0.5
    assert end == 3 + 4  # 1 evaluation without improvement before the cut, 1 after (step 3): decay over 4 steps
    saved = torch.load(tmp_path / "ckpt" / "stepwise.pt")
    assert torch.equal(saved["model"]["lm.lm_head.weight"], saved_head)
    assert saved["progress"]["finished"] and saved["progress"]["stale_evals"] == 4
    accuracies = iter([0.5])  # the finished stage resumed: no better at steps 3 and 6, then the decay
    _, end, _ = icot.train_stage(hp, "stepwise", icot.build_stage_model("stepwise", hp, train_set.layout), train_set,
                                 train_set)
    assert end == 6 + 4


def test_an_interrupted_save_keeps_the_older_checkpoint(tmp_path, monkeypatch):
    """A checkpoint is written beside and renamed: a run stopped while saving (Ctrl-C, `timeout`'s SIGTERM) leaves
    the older file whole."""
    hp, model, _ = stepwise_setup(tmp_path)
    path = str(tmp_path / "stepwise.pt")
    icot.save_checkpoint(path, model)

    def interrupted_save(obj, file):
        Path(file).write_bytes(b"the first bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(icot.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        icot.save_checkpoint(path, model)
    assert icot.load_checkpoint(path, hp).kind == "stepwise"


def test_best_checkpoint_and_patience(tmp_path, monkeypatch):
    """Scripted validation accuracies: the saved weights are those of the best no-CoT evaluation, and after
    `stepwise_patience` evaluations without a better accuracy the final decay starts."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=8, stepwise_remove_per_epoch=1000, eval_every=3,
                                          stepwise_patience=2, stepwise_decay_steps=4, stepwise_max_steps=100)
    accuracies = iter([0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2, 0.2])  # step 0 is the teacher layout (not a candidate)
    weights_at = {}

    def scripted_evaluate(model, dataset, batch_size, max_lines=None):
        weights_at[len(weights_at) * 3] = model.lm.lm_head.weight.detach().clone()
        return {"loss": 1.0, "ppl": 2.7, "accuracy": next(accuracies), "digit_accuracy": [0.5] * 4,
                "problems_per_s": 1.0, "lines": 8}

    monkeypatch.setattr(icot, "evaluate", scripted_evaluate)
    best, end, _ = icot.train_stage(hp, "stepwise", model, train_set, train_set)
    assert best["accuracy"] == 0.5 and best["step"] == 6
    assert end == 12 + 4  # no better than 0.5 at steps 9 and 12: decay over 4 more steps
    saved = torch.load(tmp_path / "ckpt" / "stepwise.pt")
    assert torch.equal(saved["model"]["lm.lm_head.weight"], weights_at[6])
    assert not torch.equal(weights_at[6], model.lm.lm_head.weight)


def test_a_tie_in_accuracy_goes_to_the_lower_loss_and_does_not_reset_patience(tmp_path, monkeypatch):
    """Accuracy on a finite validation set ties often (at 1.0 above all): the lower loss breaks the tie for the
    saved weights, but an equal accuracy is no improvement, or a run at 1.0 would never end its no-CoT phase."""
    hp, model, train_set = stepwise_setup(tmp_path, stepwise_remove=8, stepwise_remove_per_epoch=1000, eval_every=3,
                                          stepwise_patience=2, stepwise_decay_steps=4, stepwise_max_steps=60)
    scripted = iter([(0.9, 1.0), (0.5, 2.0), (0.5, 0.5), (0.4, 0.1)] + [(0.1, 3.0)] * 20)  # (accuracy, loss)

    def scripted_evaluate(model, dataset, batch_size, max_lines=None):
        accuracy, loss = next(scripted)
        return {"loss": loss, "ppl": math.exp(loss), "accuracy": accuracy, "digit_accuracy": [0.5] * 4,
                "problems_per_s": 1.0, "lines": 8}

    monkeypatch.setattr(icot, "evaluate", scripted_evaluate)
    best, end, _ = icot.train_stage(hp, "stepwise", model, train_set, train_set)
    assert best["step"] == 6 and best["loss"] == 0.5  # 0.5 at step 3 and at step 6: the lower loss wins
    assert end == 9 + 4  # improved at step 3 only: steps 6 and 9 are the patience of 2, then the decay


def test_per_step_tensors_are_released_as_each_window_closes(tmp_path, monkeypatch):
    """Each step's loss and gradient norm are kept as tensors only until their timing window closes (at the next
    evaluation): a stage of 99000 steps that kept them all grew to 14 GiB on CPU. The plot still gets every loss."""
    hp, _, train_set = stepwise_setup(tmp_path, eval_every=40)
    live_scalars, real_evaluate = [], icot.evaluate

    def counting_evaluate(*args, **kwargs):
        gc.collect()
        # type(), not isinstance(): isinstance reads __class__, which torch.distributed's deprecated reduce_op warns on
        scalars = [obj for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor) and obj.dim() == 0]
        live_scalars.append(len(scalars))
        return real_evaluate(*args, **kwargs)

    plotted = []
    monkeypatch.setattr(icot, "evaluate", counting_evaluate)
    monkeypatch.setattr(icot, "plot_run", lambda path, title, losses, *rest: plotted.append(losses))
    icot.train_stage(hp, "nocot", icot.IcotModel("nocot", hp, train_set.layout), train_set, train_set, 160)
    assert len(live_scalars) == 5  # steps 0, 40, 80, 120, 160
    assert max(live_scalars) - min(live_scalars[1:]) < 20  # 2 tensors per step kept would add 80 per window
    assert len(plotted[0]) == 160 and all(isinstance(loss, float) and math.isfinite(loss) for loss in plotted[0])


# ---- Emulator: the paper's module, teacher initialisation, strict loading ----

def test_emulator_writes_back_its_output_and_attends_over_earlier_layers():
    hp = tiny_hp(n_layer=4)
    torch.manual_seed(0)
    emulator = icot.Emulator(hp)
    for p in emulator.parameters():
        torch.nn.init.normal_(p, std=0.3)
    prefix = torch.tensor([icot.encode(LINE_4X4)[:10], icot.encode(icot.format_line([(1234, 5678)], 4, 4))[:10]])
    entering = []
    hooks = [block.register_forward_pre_hook(lambda module, args: entering.append(args[0][:, -1].detach()))
             for block in emulator.gpt.blocks]
    lstm_outputs = []
    hooks.append(emulator.lstm.register_forward_hook(lambda module, args, result: lstm_outputs.append(result[0])))
    outputs = emulator(prefix)
    for hook in hooks:
        hook.remove()
    assert outputs.shape == (2, 4, hp.model_dim)
    with torch.no_grad():  # output_l = out([h_l, sum_j<l softmax_j(key(h_j) . query(h_l) / sqrt(dim)) h_j])
        for layer, current in enumerate(lstm_outputs):
            earlier = torch.stack(lstm_outputs[:layer] or [torch.zeros_like(current)], dim=1)
            scores = torch.einsum("bjd,bd->bj", emulator.key(earlier), emulator.query(current)) / math.sqrt(hp.model_dim)
            attended = torch.einsum("bj,bjd->bd", scores.softmax(-1), earlier) if layer else torch.zeros_like(current)
            torch.testing.assert_close(outputs[:, layer], emulator.out(torch.cat([current, attended], -1)))
    for layer in range(4):  # what enters block l at '||' is the emulated state of layer l (not the MLP prediction)
        torch.testing.assert_close(entering[layer].float(), outputs[:, layer])
    with torch.no_grad():
        emulator.key.weight.mul_(3.0)  # changes only the attention over earlier layers
    changed = (emulator(prefix) - outputs).abs().amax(dim=(0, 2))
    assert changed[0] == changed[1] == 0 and (changed[2:] > 1e-4).all()  # layers 0, 1: nothing to weigh


def test_emulator_loss_sums_the_squared_error_over_the_state_dimension():
    hp = tiny_hp(n_layer=3)
    layout = layout_of(LINE_4X4)
    torch.manual_seed(0)
    teacher = icot.IcotModel("teacher", hp, layout)
    emulator = icot.IcotModel("emulator", hp, layout, teacher)
    tokens = torch.tensor([icot.encode(LINE_4X4), icot.encode(icot.format_line([(1234, 5678)], 4, 4))])
    error = emulator.emulator_error(tokens)
    torch.testing.assert_close(emulator(tokens), error.square().sum(-1).mean())
    torch.testing.assert_close(emulator(tokens, reduction="sum"), error.square().sum(-1).mean(1).sum())


def test_emulator_mixture_is_a_softmax_choice_of_components_by_the_state():
    prefix = torch.tensor([icot.encode(LINE_4X4)[:10], icot.encode(icot.format_line([(1234, 5678)], 4, 4))[:10]])
    for components, temperature in ((3, 0.5), (1, 1.0)):
        hp = tiny_hp(n_layer=3, emulator_mixtures=components, emulator_mixture_temperature=temperature)
        torch.manual_seed(0)
        emulator = icot.Emulator(hp)
        for p in emulator.parameters():
            torch.nn.init.normal_(p, std=0.3)
        torch.nn.init.normal_(emulator.mixture, std=0.003)  # states have norms of ~300 here: keep the softmax soft
        read = []  # what each layer's prediction MLP reads: [raw state, mixture embedding]
        hooks = [mlp.register_forward_pre_hook(lambda module, args: read.append(args[0])) for mlp in emulator.predict]
        emulator(prefix).square().sum().backward()
        for hook in hooks:
            hook.remove()
        vectors = emulator.mixture.detach()
        assert vectors.shape == (components, hp.model_dim)
        for layer_input in read:
            raw, mixed = layer_input.detach().chunk(2, dim=-1)
            torch.testing.assert_close(mixed, (raw @ vectors.T / temperature).softmax(-1) @ vectors)
        if components == 1:
            torch.testing.assert_close(read[0][:, hp.model_dim:].detach(), vectors.expand(2, -1))
        else:  # past layer 0 (where '||' is one embedding for all) two lines mix differently; all components learn
            assert (read[-1][0, hp.model_dim:] - read[-1][1, hp.model_dim:]).abs().max() > 1e-3
            assert (emulator.mixture.grad.abs().sum(-1) > 0).all()


def test_mixture_components_travel_with_the_checkpoint(tmp_path):
    hp = tiny_hp(n_layer=3, ckpt_dir=str(tmp_path))
    layout = layout_of(LINE_4X4)
    torch.manual_seed(1)
    teacher = icot.IcotModel("teacher", hp, layout)
    icot.save_checkpoint(str(tmp_path / "teacher.pt"), teacher)
    icot.save_checkpoint(str(tmp_path / "mindread.pt"), icot.build_stage_model("mindread", hp, layout),
                         str(tmp_path / "teacher.pt"))
    mixed = tiny_hp(n_layer=3, ckpt_dir=str(tmp_path), emulator_mixtures=3, emulator_mixture_temperature=0.5)
    emulator = icot.build_stage_model("emulator", mixed, layout)
    icot.save_checkpoint(str(tmp_path / "emulator.pt"), emulator, str(tmp_path / "teacher.pt"))
    loaded = icot.load_checkpoint(str(tmp_path / "emulator.pt"), hp)  # hp says 1 component: the checkpoint wins
    assert torch.equal(loaded.emulator.mixture, emulator.emulator.mixture)
    assert loaded.emulator.mixture_temperature == 0.5
    couple = icot.build_stage_model("couple", hp, layout)  # takes the emulator's 3 components
    assert torch.equal(couple.emulator.mixture.cpu(), emulator.emulator.mixture)
    assert couple.config["emulator_mixtures"] == 3
    lines = tmp_path / "lines.txt"
    lines.write_text(f"{LINE_4X4}\n{icot.format_line([(1234, 5678)], 4, 4)}\n")
    usage = subprocess.run([sys.executable, REPO_ROOT / "records" / "icot" / "mixture_usage.py",
                            tmp_path / "emulator.pt", lines], capture_output=True, text=True, cwd=REPO_ROOT)
    layers = re.findall(r"layer \d: mean weight ([\d. ]+?)  mean largest", usage.stdout)
    assert "3 components, temperature 0.5, 2 lines" in usage.stdout and len(layers) == 3, usage.stdout + usage.stderr
    assert all(abs(sum(map(float, weights.split())) - 1) < 2e-3 for weights in layers)
    # a checkpoint from before the option: the mixture was one vector and the config did not name it
    saved = torch.load(tmp_path / "emulator.pt", weights_only=False)
    saved["model"]["emulator.mixture"] = saved["model"]["emulator.mixture"][0]
    del saved["config"]["emulator_mixtures"], saved["config"]["emulator_mixture_temperature"]
    torch.save(saved, tmp_path / "old.pt")
    old = icot.load_checkpoint(str(tmp_path / "old.pt"), mixed)
    assert old.emulator.mixture.shape == (1, hp.model_dim) and old.emulator.mixture_temperature == 1.0
    torch.testing.assert_close(old.emulator.mixture[0], emulator.emulator.mixture[0])
    with pytest.raises(SystemExit, match=r"does not fit this model: \['emulator.mixture \(3, 64\) vs \(2, 64\)"):
        icot.load_weights(icot.IcotModel("emulator", tiny_hp(n_layer=3, emulator_mixtures=2), layout),
                          torch.load(tmp_path / "emulator.pt", weights_only=False)["model"], "emulator.pt")
    wider = icot.dataclasses.replace(hp, state_mlp_mult=2)  # a student whose state MLPs the emulator's cannot join
    icot.save_checkpoint(str(tmp_path / "mindread.pt"), icot.build_stage_model("mindread", wider, layout),
                         str(tmp_path / "teacher.pt"))
    with pytest.raises(SystemExit, match=r"mindread.pt and .*emulator.pt were trained with other sizes "
                                         r"\(state_mlp_mult=2 vs 1\): train both with the same ones"):
        icot.build_stage_model("couple", wider, layout)


def test_students_start_from_the_teacher_and_loading_is_strict(tmp_path):
    hp = tiny_hp(n_layer=3, ckpt_dir=str(tmp_path))
    layout = layout_of(LINE_4X4)
    torch.manual_seed(1)
    teacher = icot.IcotModel("teacher", hp, layout)
    for p in teacher.parameters():
        torch.nn.init.normal_(p, std=0.3)
    icot.save_checkpoint(str(tmp_path / "teacher.pt"), teacher)
    for kind in ("mindread", "emulator", "stepwise"):
        student = icot.build_stage_model(kind, hp, layout)
        gpt = student.emulator.gpt if kind == "emulator" else student.lm
        for name, value in teacher.lm.state_dict().items():
            assert torch.equal(gpt.state_dict()[name], value), (kind, name)
    mindread = icot.build_stage_model("mindread", hp, layout)
    state = mindread.state_dict()
    state["lm.blocks.0.renamed.weight"] = state.pop("lm.blocks.0.attn.qkv.weight")
    icot.save_checkpoint(str(tmp_path / "mindread.pt"), mindread, str(tmp_path / "teacher.pt"), state)
    with pytest.raises(SystemExit, match=r"mindread.pt does not fit this model: missing \['lm.blocks.0.attn.qkv"):
        icot.load_checkpoint(str(tmp_path / "mindread.pt"), hp)
    with pytest.raises(SystemExit, match="does not fit this model"):
        icot.build_stage_model("couple", hp, layout)
    state = mindread.state_dict()
    state["lm.blocks.3.lambdas"] = torch.zeros(3)  # a weight this model does not have (a deeper model's)
    icot.save_checkpoint(str(tmp_path / "mindread.pt"), mindread, str(tmp_path / "teacher.pt"), state)
    with pytest.raises(SystemExit, match=r"missing \[\], unexpected \['lm.blocks.3.lambdas'\]"):
        icot.load_checkpoint(str(tmp_path / "mindread.pt"), hp)


def test_a_student_is_used_only_with_the_teacher_it_was_trained_against(tmp_path):
    """The mind-reading student and the emulator read their teacher's states: a teacher retrained in the same place
    (another run), two students of different teachers coupled, and a teacher moved away are errors, not other
    numbers."""
    hp = tiny_hp(n_layer=3, ckpt_dir=str(tmp_path))
    layout = layout_of(LINE_4X4)
    teacher, first, second = icot.IcotModel("teacher", hp, layout), tmp_path / "teacher.pt", tmp_path / "other.pt"
    icot.save_checkpoint(str(first), teacher, run_id="run_a")
    icot.save_checkpoint(str(second), teacher, run_id="run_b")
    icot.save_checkpoint(str(tmp_path / "mindread.pt"), icot.build_stage_model("mindread", hp, layout), str(first))
    assert icot.load_checkpoint(str(tmp_path / "mindread.pt"), hp).teacher_run == "run_a"
    emulator = icot.build_stage_model("emulator", icot.dataclasses.replace(hp, teacher=str(second)), layout)
    icot.save_checkpoint(str(tmp_path / "emulator.pt"), emulator, str(second))
    with pytest.raises(SystemExit, match=r"mindread.pt and .*emulator.pt were trained against different teachers "
                                         r"\(runs run_a and run_b\)"):
        icot.build_stage_model("couple", hp, layout)
    recorded = (tmp_path / "mindread.pt").read_bytes()
    older = torch.load(tmp_path / "mindread.pt", weights_only=False)
    del older["teacher_run"]  # saved before checkpoints recorded it: nothing to compare
    torch.save(older, tmp_path / "mindread.pt")
    assert icot.build_stage_model("couple", hp, layout).kind == "couple"
    (tmp_path / "mindread.pt").write_bytes(recorded)
    icot.save_checkpoint(str(first), teacher, run_id="run_c")  # retrained in its place
    with pytest.raises(SystemExit, match=r"mindread.pt was trained against the teacher of run run_a, but .*teacher.pt "
                                         r"is now that of run run_c: give the teacher it was trained against"):
        icot.load_checkpoint(str(tmp_path / "mindread.pt"), hp)
    first.unlink()
    with pytest.raises(SystemExit, match=r"mindread.pt reads the states of its teacher .*teacher.pt, which is not "
                                         r"there: give that teacher with --teacher PATH"):
        icot.load_checkpoint(str(tmp_path / "mindread.pt"), hp)
    icot.save_checkpoint(str(tmp_path / "moved.pt"), teacher, run_id="run_a")
    assert icot.load_checkpoint(str(tmp_path / "mindread.pt"), hp, str(tmp_path / "moved.pt")).kind == "mindread"


def test_a_teacher_of_another_task_size_or_kind_a_resumed_model_of_another_size_a_corrupt_checkpoint_fail(tmp_path):
    """The students are built from the flags and start from the teacher's weights: a teacher that does not match
    them must not be used (same-shaped weights would load without complaint)."""
    hp = tiny_hp(n_layer=3, ckpt_dir=str(tmp_path))
    layout = layout_of(LINE_4X4)
    icot.save_checkpoint(str(tmp_path / "teacher.pt"), icot.IcotModel("teacher", hp, layout))
    other_task = icot.Layout(**{**icot.dataclasses.asdict(layout), "n": 3, "m": 3})
    with pytest.raises(SystemExit, match=r"teacher.pt was trained on 4x4 with 1 per line, but the data is 3x3 with 1"):
        icot.build_stage_model("stepwise", hp, other_task)
    with pytest.raises(SystemExit, match=r"teacher.pt has another architecture: --n_head=4 \(the checkpoint's: 2\): "
                                         "give its sizes"):
        icot.build_stage_model("stepwise", icot.dataclasses.replace(hp, n_head=4), layout)
    icot.save_checkpoint(str(tmp_path / "stepwise.pt"), icot.build_stage_model("stepwise", hp, layout))
    resume = icot.dataclasses.replace(hp, resume=True, model_dim=128)  # would train the saved size, log the flags'
    with pytest.raises(SystemExit, match=r"stepwise.pt has another architecture: --model_dim=128 \(the checkpoint's: "):
        icot.build_stage_model("stepwise", resume, layout)
    assert icot.build_stage_model("stepwise", icot.dataclasses.replace(hp, resume=True), layout).removed == 0
    icot.save_checkpoint(str(tmp_path / "nocot.pt"), icot.IcotModel("nocot", hp, layout))
    with pytest.raises(SystemExit, match="nocot.pt is a nocot checkpoint, but a teacher checkpoint is needed here"):
        icot.build_stage_model("mindread", icot.dataclasses.replace(hp, teacher=str(tmp_path / "nocot.pt")), layout)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "teacher.pt").read_bytes()[:1000])
    for name in ("text.pt", "cut.pt"):
        with pytest.raises(SystemExit, match=f"{name}: not a readable checkpoint"):
            icot.load_checkpoint(str(tmp_path / name), hp)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match="foreign.pt: not a checkpoint of train_icot.py"):
        icot.load_checkpoint(str(tmp_path / "foreign.pt"), hp)


# ---- Paths: the papers' files from the working directory ----

def test_an_empty_paper_dir_goes_without_the_papers_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, hp, _ = icot.parse_args(["teacher", "--task=4x4", "--paper_dir="])
    icot.resolve_paths(hp)
    assert hp.test_file == os.path.join("data", "icot", "4x4_k1", "test.txt") and icot.paper_folders(hp) == []
    assert [name for name, _ in icot.report_sets(hp)] == ["test", "valid"]

def test_copied_script_finds_the_paper_files_from_the_working_directory(tmp_path, monkeypatch):
    """A copy of the script under records/ (another folder than the repository's) finds the papers' files from the
    repository root (cwd): it evaluates on their test set and excludes them from the training data. Run from its own
    folder, its default outputs would go into records/: refused before any folder is made."""
    root = tmp_path / "work" / "repo"
    copy = root / "records" / "icot" / "some_run" / "train_icot.py"
    copy.parent.mkdir(parents=True)
    copy.write_text((REPO_ROOT / "train_icot.py").read_text())
    (root / "data").mkdir()
    (root / "data" / "multiplication.py").write_text("")
    for folder in ("4_by_4_mult", "stepwise/4_by_4_mult"):
        (tmp_path / "work" / "shared" / "icot" / folder).mkdir(parents=True)
        for name in ("valid.txt", "test_bigbench.txt"):
            (tmp_path / "work" / "shared" / "icot" / folder / name).write_text(LINE_4X4 + "\n")
    spec = importlib.util.spec_from_file_location("copied_icot", copy)
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    monkeypatch.chdir(root)
    hp = copied.Hyperparameters(task="4x4")
    copied.resolve_paths(hp)
    assert hp.test_file == os.path.join("..", "shared", "icot", "4_by_4_mult", "test_bigbench.txt")
    assert [name for name, _ in copied.report_sets(hp)] == ["test", "valid", "stepwise test", "stepwise valid"]
    commands = []
    monkeypatch.setattr(copied.subprocess, "run", lambda command: commands.append(command) or
                        subprocess.CompletedProcess(command, 0))
    copied.generate_data(hp)
    (command,) = commands
    assert command[1] == os.path.join("data", "multiplication.py")
    excluded = command[command.index("--exclude") + 1:]
    assert len(excluded) == 4 and all(os.path.isfile(path) for path in excluded)
    copied.check_defaults_outside_records(copied.Hyperparameters())  # from the root: the defaults go there
    monkeypatch.chdir(copy.parent)  # from the copy's own folder they would go into records/
    with pytest.raises(SystemExit, match=rf"run from the repository root \({root}\), not from inside its records/: the "
                                         "default --data_dir, --ckpt_dir, --log_dir would write there"):
        copied.main(["teacher", "--paper_dir="])
    assert not {"data", "checkpoints", "logs"} & set(os.listdir(copy.parent))  # refused before making them
    copied.check_defaults_outside_records(copied.Hyperparameters(data_dir="d", ckpt_dir="c", log_dir="l"))  # given


# ---- Data and checkpoints: what a run trains on is what it says ----

def write_problems(path, problems, n=2, m=2, per_line=1):
    path.write_text("".join(icot.format_line(problems[i:i + per_line], n, m) + "\n"
                            for i in range(0, len(problems), per_line)))
    return str(path)


def problem_files(folder, shared=()):
    """Disjoint 2x2 train/valid/test files (the test file also holding the `shared` training problems)."""
    folder.mkdir(exist_ok=True)
    train = [(a, b) for a in range(10, 100) for b in range(10, 13)]
    return {"train_file": write_problems(folder / "train.txt", train),
            "val_file": write_problems(folder / "valid.txt", [(a, 20) for a in range(10, 60)]),
            "test_file": write_problems(folder / "test.txt", [(a, 30) for a in range(10, 40)] + list(shared))}


def flags(**paths):
    return [f"--{k}={v}" for k, v in paths.items()]


def test_a_data_folder_is_reused_only_with_the_settings_that_made_it(tmp_path, monkeypatch, capsys):
    """A generated folder records its settings; a run asking for other ones is one error before training, naming
    what differs; a folder without them (made by data/multiplication.py) and files named with --train_file/--val_file
    are used as they are; a folder holding some of the default files but not all is an error (generating would
    overwrite them)."""
    monkeypatch.chdir(REPO_ROOT)  # data/multiplication.py; every output goes under tmp_path
    trained = []
    monkeypatch.setattr(icot, "run_stage", lambda kind, hp: trained.append(hp))
    data = tmp_path / "data"
    base = ["teacher", "--preset=tiny", "--paper_dir=", *flags(data_dir=data, ckpt_dir=tmp_path / "ckpt",
                                                              log_dir=tmp_path / "logs")]
    icot.main(base + ["--train_lines=300"])
    settings = icot.json.loads((data / "settings.json").read_text())
    assert settings == {"task": "2x2", "per_line": 1, "train_lines": 300, "val_lines": 200, "test_lines": 200,
                        "data_seed": 0, "excluded": []}
    icot.main(base + ["--train_lines=300"])  # the same settings: reused
    assert len(trained) == 2
    for extra, message in [(["--train_lines=600", "--data_seed=7"], r"train_lines=300 \(this run: 600\), "
                             r"data_seed=0 \(this run: 7\)"),
                            (["--train_lines=300", "--task=3x3"], r"task='2x2' \(this run: '3x3'\)")]:
        with pytest.raises(SystemExit, match=rf"{data} was generated with other settings: {message}: delete {data} "
                                             r"\(a training command generates it again\) or give another --data_dir"
                           ) as exit_info:
            icot.main(base + extra)
        assert exit_info.value.code == 2
    (data / "settings.json").unlink()  # as a folder written by data/multiplication.py or by an older version
    capsys.readouterr()
    icot.main(base + ["--train_lines=600"])  # used as it is (the records' recipes make their folders so), with a note
    assert len(trained) == 3 and f"note: {data} has no settings.json" in capsys.readouterr().out
    icot.main(base + flags(train_file=f"{data}/./train.txt", val_file=f"{data}/./valid.txt"))  # as they are
    assert len(trained) == 4
    (data / "test.txt").unlink()  # a hand-made folder without a test split: generating would overwrite the others
    kept = (data / "train.txt").read_bytes()
    with pytest.raises(SystemExit, match=rf"{data} has {data}/train.txt, {data}/valid.txt but not {data}/test.txt: "):
        icot.main(base + ["--train_lines=600"])
    assert (data / "train.txt").read_bytes() == kept and len(trained) == 4
    own_test = write_problems(tmp_path / "own_test.txt", [(99, 98)])  # a test file elsewhere: the folder is generated
    icot.main(base[:3] + flags(data_dir=tmp_path / "fresh", ckpt_dir=tmp_path / "ckpt", log_dir=tmp_path / "logs",
                               test_file=own_test) + ["--train_lines=300"])
    assert len(trained) == 5 and (tmp_path / "fresh" / "train.txt").is_file()


def test_a_task_with_too_few_problems_for_its_splits_names_the_flags_to_change(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # data/multiplication.py; every output goes under tmp_path
    monkeypatch.setattr(icot, "run_stage", lambda *args: pytest.fail("training started"))
    with pytest.raises(SystemExit, match=r"failed \(see the message above\): 1x1 has only 81 distinct problems, and "
                                         r"the splits share none .*: give fewer --train_lines, --val_lines and"):
        icot.main(["teacher", "--preset=tiny", "--task=1x1", *flags(data_dir=tmp_path / "data",
                                                                   ckpt_dir=tmp_path / "ckpt", log_dir=tmp_path)])


def test_training_data_sharing_problems_with_an_evaluation_set_is_refused(tmp_path, monkeypatch):
    """However the files were made: the papers' test file (when used), the test and validation files."""
    monkeypatch.setattr(icot, "train_stage", lambda *args: pytest.fail("training started"))
    paper = tmp_path / "papers"
    files = {k: write_problems(tmp_path / f"{k[:-5]}.txt", problems, 4, 4) for k, problems in (
        ("train_file", [(1000 + i, 3349) for i in range(40)] + [(3719, 3349)]),
        ("val_file", [(2000 + i, 3349) for i in range(10)]))}
    for folder in ("4_by_4_mult", "stepwise/4_by_4_mult"):  # LINE_4X4 (3719*3349) in the paper's test file
        (paper / folder).mkdir(parents=True)
        write_problems(paper / folder / "valid.txt", [(5000, 1234)], 4, 4)
        (paper / folder / "test_bigbench.txt").write_text(f"{icot.format_line([(5001, 1234)], 4, 4)}\n{LINE_4X4}\n")
    argv = ["teacher", "--preset=tiny", "--task=4x4", *flags(paper_dir=paper, ckpt_dir=tmp_path / "ckpt",
                                                             log_dir=tmp_path / "logs", **files)]
    with pytest.raises(SystemExit, match=rf"train.txt holds 1 problem\(s\) of {paper}/4_by_4_mult/test_bigbench.txt, "
                                         rf"1 problem\(s\) of {paper}/stepwise/4_by_4_mult/test_bigbench.txt: a model "
                                         r"trained on them is not tested on them. Remove them from it") as exit_info:
        icot.main(argv)
    assert exit_info.value.code == 2
    # 2x2, two problems per line: the shared problems are found in either position of a line
    k2 = tmp_path / "k2"
    k2.mkdir()
    problems = [(a, b) for a in range(10, 100) for b in range(10, 13)]
    files = {"train_file": write_problems(k2 / "train.txt", problems, per_line=2),
             "val_file": write_problems(k2 / "valid.txt", [(a, 20) for a in range(10, 60)], per_line=2),
             "test_file": write_problems(k2 / "test.txt", [(a, 30) for a in range(10, 40)] + [(99, 12), (10, 11)],
                                         per_line=2)}
    hp = tiny_hp(per_line=2, paper_dir="", data_dir=str(k2), **files)
    with pytest.raises(SystemExit, match=r"k2/train.txt holds 2 problem\(s\) of .*k2/test.txt: .* Delete "):
        icot.load_training_data(hp)
    write_problems(Path(files["test_file"]), [(a, 30) for a in range(10, 42)], per_line=2)
    train_set, _ = icot.load_training_data(hp)  # no shared problem: loads
    assert len(train_set.tokens) == len(problems) // 2


def test_data_of_another_task_or_k_is_refused(tmp_path, monkeypatch):
    """--task 3x3 on 2x2 files would train a 2x2 model filed and logged as 3x3."""
    monkeypatch.setattr(icot, "train_stage", lambda *args: pytest.fail("training started"))
    files = problem_files(tmp_path / "data")
    argv = ["teacher", "--preset=tiny", "--paper_dir=", *flags(ckpt_dir=tmp_path / "ckpt", log_dir=tmp_path / "logs",
                                                               **files)]
    for extra, asked in ((["--task=3x3"], "--task=3x3 --per_line=1"), (["--per_line=2"], "--task=2x2 --per_line=2")):
        with pytest.raises(SystemExit, match=rf"valid.txt is 2x2 with 1 per line, but {asked}: give this task's data "
                                             r".* or --task=2x2 --per_line=1") as exit_info:
            icot.main(argv + extra)
        assert exit_info.value.code == 2
    write_problems(Path(files["train_file"]), [(123, 456)], 3, 3)  # the validation file right, the training file not
    with pytest.raises(SystemExit, match=r"train.txt is 3x3 with 1 per line, but --task=2x2 --per_line=1"):
        icot.main(argv)


def test_a_stage_starts_only_from_checkpoints_trained_on_its_data(tmp_path):
    """Each checkpoint records its training data and run; a teacher (or mind-reading student, emulator, resumed
    stepwise) found in --ckpt_dir that was trained on other data is refused, one given by --teacher is used; each
    checkpoint a stage starts from is logged."""
    hp = tiny_hp(paper_dir="", ckpt_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "logs"), teacher_steps=2,
                 stepwise_max_steps=2, stepwise_decay_steps=1, eval_every=1, eval_lines=8, eval_batch=8,
                 **problem_files(tmp_path / "data"))
    icot.run_stage("teacher", hp)
    saved = torch.load(tmp_path / "ckpt" / "teacher.pt", weights_only=False)
    assert saved["data"]["train_file"] == hp.train_file and saved["data"]["lines"] == 270
    assert saved["trained"].startswith("icot_teacher_2x2_k1_")
    icot.run_stage("stepwise", hp)
    log = max((tmp_path / "logs").glob("icot_stepwise_*.txt"), key=lambda path: path.stat().st_mtime).read_text()
    assert re.search(rf"^teacher: {tmp_path}/ckpt/teacher.pt \(trained {saved['trained']} on {hp.train_file}, "
                     r"sha256 [0-9a-f]{12}\)$", log, re.M)
    other = dataclasses.replace(hp, **problem_files(tmp_path / "other"))
    write_problems(Path(other.train_file), [(a, b) for a in range(10, 100) for b in range(13, 16)])
    for kind in ("stepwise", "mindread"):
        with pytest.raises(SystemExit, match=rf"ckpt/teacher.pt was trained on {hp.train_file} \(270 lines\), not "
                                             rf"on this run's {other.train_file} \(270 lines\): .*another --ckpt_dir.*"
                                             r"--teacher PATH"):
            icot.run_stage(kind, other)
    train_set, val_set = icot.load_training_data(other)
    data = icot.data_identity(train_set)
    explicit = icot.build_stage_model("stepwise", dataclasses.replace(other, teacher=str(tmp_path / "ckpt" /
                                                                                         "teacher.pt")),
                                      val_set.layout, data)  # given by --teacher: used as given, logged
    assert explicit.loaded[0].startswith(f"teacher: {tmp_path}/ckpt/teacher.pt (trained {saved['trained']}")
    with pytest.raises(SystemExit, match="stepwise.pt was trained on .*train.txt"):
        icot.build_stage_model("stepwise", dataclasses.replace(other, resume=True), val_set.layout, data)
    for kind in ("mindread", "emulator"):
        icot.save_checkpoint(str(tmp_path / "ckpt" / f"{kind}.pt"), icot.build_stage_model(kind, hp, val_set.layout),
                             str(tmp_path / "ckpt" / "teacher.pt"), data=icot.data_identity(icot.load_dataset(
                                 hp.train_file)))
    with pytest.raises(SystemExit, match="mindread.pt was trained on"):
        icot.build_stage_model("couple", other, val_set.layout, data)
    del saved["data"]  # a checkpoint of an older version
    torch.save(saved, tmp_path / "ckpt" / "teacher.pt")
    with pytest.raises(SystemExit, match=r"teacher.pt was trained on data it does not record \(an older train_icot"):
        icot.build_stage_model("stepwise", hp, val_set.layout, data)


# ---- The tiny pipeline end to end ----

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("icot")
    dirs = {name: root / name for name in ("data", "ckpt", "logs")}
    args = [f"--data_dir={dirs['data']}", f"--ckpt_dir={dirs['ckpt']}", f"--log_dir={dirs['logs']}"]
    run = subprocess.run([sys.executable, REPO_ROOT / "train_icot.py", "all", "--preset", "tiny", *args],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return dirs, args, run.stdout


@pytest.mark.parametrize("stages, nocot_steps", [
    (("teacher", "stepwise", "mindread", "emulator", "couple", "nocot"), 10 + 3 + 3 + 3),  # the longer chain
    (("teacher", "stepwise", "nocot"), 10 + 7),
])
def test_all_gives_the_no_cot_baseline_the_steps_of_the_longest_chain(stand_in_all, stages, nocot_steps):
    stand_in_all.run(stages=stages, nocot_steps=0)
    assert stand_in_all.given["nocot"] == nocot_steps and stand_in_all.given["teacher"] is None


@pytest.fixture
def stand_in_all(tmp_path, monkeypatch):
    """run_all with stages that only record their steps (teacher 10, stepwise 7, the distillation stages 3 each) on
    64 lines of 4x4 (with one token per increment, 64 per epoch: a token a step, the last of 46 at step 45)."""
    steps_of = {"teacher": 10, "stepwise": 7, "mindread": 3, "emulator": 3, "couple": 3}
    given = {}

    def stand_in_stage(kind, hp, train_set, val_set, steps=None):
        given[kind] = steps
        return {}, steps or steps_of[kind], 0.0

    train_set = icot.Dataset("train.txt", torch.zeros(64, 1), layout_of(LINE_4X4))
    monkeypatch.setattr(icot, "load_training_data", lambda hp: (train_set, None))
    monkeypatch.setattr(icot, "report_sets", lambda hp: [])
    monkeypatch.setattr(icot, "load_dataset", lambda path, max_lines=None: icot.Dataset(path, torch.zeros(1, 1), None))
    monkeypatch.setattr(icot, "run_stage", stand_in_stage)
    monkeypatch.setattr(icot, "load_checkpoint", lambda path, *args, **kwargs: types.SimpleNamespace(kind=""))
    monkeypatch.setattr(icot, "evaluate", lambda *args, **kwargs: {})
    monkeypatch.setattr(icot, "results_table", lambda *args, **kwargs: "")
    run = lambda **flags: icot.run_all(tiny_hp(**{"log_dir": str(tmp_path), "ckpt_dir": str(tmp_path), **flags}), [])
    return types.SimpleNamespace(given=given, run=run)


def test_all_refuses_stages_it_cannot_finish_before_training(stand_in_all, tmp_path):
    """A stage whose checkpoints are neither trained in this run nor there, and a stepwise schedule longer than
    --stepwise_max_steps (the model would still read CoT, and `all` has no --resume): errors before any stage."""
    for stages, missing in [(("teacher", "couple"), "mindread"), (("stepwise",), "teacher")]:
        with pytest.raises(SystemExit, match=rf"--stages has {stages[-1]} but not {missing}, and {tmp_path}/{missing}"
                                             rf".pt is not there: add {missing} to --stages"):
            stand_in_all.run(stages=stages)
    token_a_step = {"stepwise_remove": 1, "stepwise_remove_per_epoch": 64}
    with pytest.raises(SystemExit, match=r"removes its last CoT tokens at step 45, but --stepwise_max_steps=45 ends "
                                         r"the stage before: raise --stepwise_max_steps, or remove faster "
                                         r"\(--stepwise_remove, the tokens"):  # a token a step: the rate cannot help
        stand_in_all.run(stages=("teacher", "stepwise"), stepwise_max_steps=45, **token_a_step)
    with pytest.raises(SystemExit, match=r"at step 90, .* remove faster \(--stepwise_remove_per_epoch or "):
        stand_in_all.run(stages=("teacher", "stepwise"), stepwise_max_steps=45, stepwise_remove=1,
                         stepwise_remove_per_epoch=0.5)  # a token every 2 steps (an epoch is 1 step)
    assert stand_in_all.given == {}
    stand_in_all.run(stages=("teacher", "stepwise"), stepwise_max_steps=46, **token_a_step)
    (tmp_path / "teacher.pt").touch()  # trained before: its own checks come when it is loaded
    stand_in_all.run(stages=("stepwise",), stepwise_max_steps=46, **token_a_step)
    assert stand_in_all.given == {"teacher": None, "stepwise": None}


def test_a_stage_command_writes_missing_data_first(tmp_path):
    """Not only `all`: a single stage on an empty --data_dir writes the default files (the papers' problems
    excluded) before it trains, so a sweep of single stages needs no data step of its own."""
    data = tmp_path / "data"
    run = subprocess.run([sys.executable, REPO_ROOT / "train_icot.py", "teacher", "--preset", "tiny",
                          f"--data_dir={data}", f"--ckpt_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}",
                          "--teacher_steps=2", "--train_lines=300", "--eval_lines=20"],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "generating data:" in run.stdout and "--splits train=300," in run.stdout
    assert len((data / "train.txt").read_text().splitlines()) == 300 and (data / "valid.txt").is_file()
    assert (tmp_path / "ckpt" / "teacher.pt").is_file()


STAND_IN_STAGE = """
import os, sys
stage, args = sys.argv[1], sys.argv[2:]
log_dir = next(a.split("=", 1)[1] for a in args if a.startswith("--log_dir="))
with open(os.environ["CALLS"], "a") as calls:
    calls.write(" ".join(sys.argv[1:]) + "\\n")
if "--lr=" + os.environ.get("FAIL_LR", "none") in args:
    sys.exit("error: stopped")
os.makedirs(log_dir)
with open(os.path.join(log_dir, "icot_run.txt"), "w") as log:
    log.write(f"stage {stage} done: 2 steps\\n")
print(f"stage {stage} done: 2 steps")
"""


def test_sweep_runs_each_setting_once_with_the_callers_arguments(tmp_path):
    """records/icot/sweep.sh: one run per (stage, lr, embedding-lr multiplier, weight decay), its log folder named
    after them; a finished run is skipped, so a sweep stopped by a failure or a time limit goes on where it stopped."""
    stand_in, calls = tmp_path / "stage.py", tmp_path / "calls.txt"
    stand_in.write_text(STAND_IN_STAGE)
    env = {**os.environ, "SCRIPT": str(stand_in), "CALLS": str(calls), "STAGES": "teacher nocot", "LRS": "1e-3 3e-3",
           "MULTS": "10", "WDS": "0 0.1"}
    sweep = lambda **extra: subprocess.run([REPO_ROOT / "records" / "icot" / "sweep.sh", tmp_path / "sweep",
                                            "--task=4x4", "--teacher_steps=2"], env={**env, **extra},
                                           capture_output=True, text=True, cwd=REPO_ROOT)
    result = sweep(FAIL_LR="3e-3")  # the first teacher run at 3e-3 fails: the sweep stops there
    assert result.returncode != 0 and "error: stopped" in result.stderr
    assert len(calls.read_text().splitlines()) == 3
    result = sweep()
    assert result.returncode == 0, result.stderr
    runs = calls.read_text().splitlines()[3:]
    assert runs[0] == (f"teacher --task=4x4 --teacher_steps=2 --lr=3e-3 --embed_lr_mult=10 --weight_decay=0 "
                       f"--log_dir={tmp_path}/sweep/logs/teacher_lr3e-3_emb10_wd0")
    assert len(runs) == 6 and [r.split()[0] for r in runs] == ["teacher"] * 2 + ["nocot"] * 4
    assert result.stdout.count("done already: ") == 2
    assert sorted(p.name for p in (tmp_path / "sweep" / "logs").iterdir()) == sorted(
        f"{stage}_lr{lr}_emb10_wd{wd}" for stage in ("teacher", "nocot") for lr in ("1e-3", "3e-3") for wd in ("0", "0.1"))
    assert sweep().stdout.count("done already: ") == 8 and len(calls.read_text().splitlines()) == 9
    for log in (tmp_path / "sweep" / "logs").glob("*/*.txt"):  # committed logs are gzipped: still finished runs
        subprocess.run(["gzip", str(log)], check=True)
    assert sweep().stdout.count("done already: ") == 8 and len(calls.read_text().splitlines()) == 9

def table_rows(markdown):
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] not in ("model", "---"):
            rows[cells[0]] = cells
    return rows


def test_all_writes_every_stage_table_logs_plots(tiny_run):
    dirs, args, stdout = tiny_run
    stages = ["teacher", "nocot", "mindread", "emulator", "couple", "stepwise"]
    assert sorted(p.stem for p in dirs["ckpt"].glob("*.pt")) == sorted(stages)
    assert {p.name for p in dirs["data"].iterdir()} == {"train.txt", "valid.txt", "test.txt", "settings.json"}
    (table_path,) = dirs["logs"].glob("results_2x2_k1_*.md")  # under --log_dir, not records/
    rows = table_rows(table_path.read_text())
    assert table_path.read_text() in stdout
    command = "python train_icot.py all --preset tiny " + " ".join(args)  # the script as run, from the root
    assert f"\nCommand: `{command}` (seed 0)\n" in table_path.read_text()
    assert len(rows) == 6 and rows["thought emulator"][2].startswith("quasi ")
    evaluations = re.findall(r"^evaluating (\w+) on (\w[\w ]*): (\d+) lines of ", stdout, re.M)
    assert [(stage, name) for stage, name, _ in evaluations[:3]] == [("teacher", "test"), ("teacher", "valid"),
                                                                     ("teacher", "train")]
    assert len(evaluations) == 3 * len(stages)  # each stage, each set, said before it runs
    teacher = rows["teacher (explicit CoT)"]
    assert float(teacher[2]) >= 0.1 and float(teacher[3]) >= 0.1, rows  # test, valid; chance ~1e-4
    assert len(teacher[5].split()) == 4  # per answer token
    for stage in stages:
        (log,) = dirs["logs"].glob(f"icot_{stage}_2x2_k1_*.txt")
        text = log.read_text()
        assert text.startswith("# Implicit chain of thought") and "=" * 100 in text
        steps = int(re.search(r"step:0/(\d+) val_loss:", text)[1]) if stage != "stepwise" else int(rows[
            "stepwise internalisation"][1])
        assert re.search(rf"^step:{steps}/{steps} val_loss:\d+\.\d{{4}} train_time:\d+ms step_avg:\d+\.\d\dms$",
                         text, re.M)
        assert re.search(rf"^step:1/\d+ train_time:\d+ms step_avg:\d+\.\d\dms$", text, re.M)
        assert re.search(r"mfu:n/a grad_norm:\d+\.\d+ clipped:[01]\.\d{3}$", text, re.M) and "peak memory" in text
        assert re.search(r"^best checkpoint: step \d+ of \d+, val_loss:", text, re.M)
        assert log.with_suffix(".png").stat().st_size > 1000
    stepwise_log = next(dirs["logs"].glob("icot_stepwise_*.txt")).read_text()
    increments = re.findall(r"^step:(\d+)/\d+ increment: removed_cot:(\d+) of 8, optimizer reset$", stepwise_log, re.M)
    assert increments == [("0", "2"), ("1", "4"), ("2", "6"), ("3", "8")]  # 3000 lines / 64 = 47 steps / 64 tokens


def test_eval_and_predict_commands(tiny_run, capsys, monkeypatch, tmp_path):
    dirs, args, _ = tiny_run  # in-process: the same main() as the command line, without a torch start-up per call

    def run(*extra):
        result = icot.main([*extra, "--preset", "tiny", *args])
        return result, capsys.readouterr().out

    metrics, out = run("eval", f"--ckpt={dirs['ckpt'] / 'teacher.pt'}", f"--data={dirs['data'] / 'valid.txt'}")
    assert re.search(r"teacher on .*valid.txt: loss:\S+ ppl:\S+ accuracy:\S+ digit_accuracy:[0-9.,]+ "
                     r"problems_per_s:\S+ lines:200", out)
    assert metrics["lines"] == 200 and 0 <= metrics["accuracy"] <= 1 and metrics["ppl"] >= 1
    _, out = run("eval", f"--ckpt={dirs['ckpt'] / 'emulator.pt'}")
    assert re.search(r"emulator on .*test.txt: loss:\S+ quasi_accuracy:\S+ lines:200", out)
    couple = dirs["ckpt"] / "couple.pt"
    outputs, _ = run("predict", f"--ckpt={couple}", "--show_cot", "37*49", "12*34")
    assert len(outputs) == 2
    assert re.fullmatch(r"couple: 37\*49 = \S+ \((right|wrong, true 1813)\)\nteacher CoT: [0-9+() $]+", outputs[0])
    monkeypatch.setattr(sys, "stdin", io.StringIO("37*49\n3*4\n\n12*34\n"))  # piped: every line, then the count
    with pytest.raises(SystemExit, match=r"1 input line\(s\) were not problems \(the errors above\); the others"):
        run("predict", f"--ckpt={dirs['ckpt'] / 'teacher.pt'}")
    out = capsys.readouterr().out
    assert "teacher: 37*49 = " in out and "error: 3*4: this model multiplies 2-digit by 2-digit" in out
    assert "teacher: 12*34 = " in out and "type e.g." not in out
    terminal = io.StringIO("37*49\n3*4\n\n12*34\n")
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", terminal)  # typed: a typo is reported, an empty line quits
    _, out = run("predict", f"--ckpt={dirs['ckpt'] / 'teacher.pt'}")
    assert "type e.g. 3719*3349" in out and "error: 3*4" in out and "teacher: 37*49 = " in out and "12*34" not in out
    with pytest.raises(SystemExit, match=r"is not a problem like 3719\*3349"):
        run("predict", f"--ckpt={couple}", "1*2*3")
    with pytest.raises(SystemExit, match="takes 1 problem"):
        run("predict", f"--ckpt={couple}", "12*34 $ 56*78")
    other_task = tmp_path / "3x3.txt"
    other_task.write_text(icot.format_line([(123, 456)], 3, 3) + "\n")
    with pytest.raises(SystemExit, match="3x3 with 1 per line, but the model was trained on 2x2 with 1 per line"):
        run("eval", f"--ckpt={couple}", f"--data={other_task}")
    with pytest.raises(SystemExit, match="checkpoint not found"):
        run("eval", f"--ckpt={tmp_path / 'none.pt'}")
    three = layout_of(icot.format_line([(123, 456)], 3, 3))
    icot.save_checkpoint(str(tmp_path / "teacher3x3.pt"), icot.IcotModel("teacher", tiny_hp(), three))
    with pytest.raises(SystemExit, match=r"teacher3x3.pt is a teacher of 3x3 with 1 per line, the model's task is 2x2 "
                                         r"with 1: give this task's teacher with --teacher PATH"):
        run("predict", f"--ckpt={dirs['ckpt'] / 'nocot.pt'}", "--show_cot", f"--teacher={tmp_path / 'teacher3x3.pt'}",
            "12*34")
    _, out = run("predict", f"--ckpt={dirs['ckpt'] / 'nocot.pt'}", "--show_cot", "12*34")  # the teacher beside it
    assert "\nteacher CoT: " in out


def test_data_parallel_all_writes_once_on_rank_0(tiny_run, tmp_path):
    """torchrun with 2 processes (gloo on CPU) runs `all`: one log per stage, one checkpoint each and one results
    table (rank 0), the ranks in sync (manual gradient all-reduce), the evaluation shards adding up to all lines,
    and the no-CoT baseline trained for as many steps as the longest implicit chain."""
    dirs, _, _ = tiny_run
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          REPO_ROOT / "train_icot.py", "all", "--preset", "tiny", f"--data_dir={dirs['data']}",
                          f"--ckpt_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}", "--teacher_steps=4",
                          "--mindread_steps=2", "--emulator_steps=2", "--couple_steps=2", "--nocot_steps=0",
                          "--stepwise_max_steps=6", "--stepwise_decay_steps=1", "--eval_every=2", "--eval_lines=51",
                          "--train_eval_lines=9"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    logs = sorted((tmp_path / "logs").iterdir())
    assert len([p for p in logs if p.suffix == ".txt"]) == 6 and len([p for p in logs if p.suffix == ".png"]) == 6
    assert len([p for p in logs if p.suffix == ".md"]) == 1
    assert len(list((tmp_path / "ckpt").glob("*.pt"))) == 6
    assert run.stdout.count("results table:") == 1 and run.stdout.count("stage teacher: ") == 1
    text = next((tmp_path / "logs").glob("icot_mindread_*.txt")).read_text()
    assert "2 process(es), rank devices: cpu, cpu" in text and "ranks in sync: weight checksum" in text
    assert re.search(r"^step:2/2 removed_cot:8 val_loss:\S+ .* lines:51$", text, re.M)
    rows = table_rows(next((tmp_path / "logs").glob("*.md")).read_text())
    chain = int(rows["teacher (explicit CoT)"][1]) + max(int(rows["stepwise internalisation"][1]), 2 + 2 + 2)
    assert int(rows["no CoT baseline"][1]) == chain


def test_ranks_stop_a_stage_together(tmp_path):
    """--stage_minutes: each rank times its own steps, so one may be past the budget at an evaluation where another
    is not; stopping alone would leave the other waiting in a collective. any_rank makes it one decision."""
    script = tmp_path / "agree.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\nimport train_icot as icot\n"
                      "icot.setup_distributed()\n"
                      "answers = icot.any_rank(icot.RANK == 1), icot.any_rank(False)\n"
                      "open(f'rank{icot.RANK}.txt', 'w').write(repr(answers))\n"
                      "icot.dist.barrier()\nicot.dist.destroy_process_group()\n")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    # (the answers, not the exit code: gloo's teardown aborts a few % of two-process CPU runs at exit, see oocl.py)
    answers = [(tmp_path / f"rank{rank}.txt") for rank in (0, 1)]
    assert all(a.exists() for a in answers), run.stderr[-2000:]
    assert [a.read_text() for a in answers] == ["(True, False)"] * 2


def test_a_closed_console_does_not_stop_a_stage(tmp_path):
    """The console's reader gone (`| head`, or `| tee` stopped by the same Ctrl-C): the stage goes on, its log file
    keeps every line."""
    command = [sys.executable, str(REPO_ROOT / "train_icot.py"), "teacher", "--preset=tiny", "--teacher_steps=3",
               "--eval_every=2", "--train_lines=300", "--eval_lines=20", f"--data_dir={tmp_path}/data",
               f"--ckpt_dir={tmp_path}/ckpt", f"--log_dir={tmp_path}/logs"]
    subprocess.run(command, check=True, capture_output=True, cwd=REPO_ROOT)  # writes the data (its own prints)
    code, stderr = run_with_closed_console(command, REPO_ROOT)
    assert code == 0, stderr[-2000:]
    logs = sorted((tmp_path / "logs").glob("*.txt"), key=os.path.getmtime)
    assert len(logs) == 2 and "stage teacher done" in logs[-1].read_text()


def test_a_log_line_is_in_the_file_before_it_is_printed(tmp_path, monkeypatch):
    """A run stopped right after printing a line (Ctrl-C on seeing it) must still have that line in its log."""
    logger = icot.Logger(tiny_hp(log_dir=str(tmp_path)), "order")
    in_file_when_printed = []
    monkeypatch.setattr("builtins.print", lambda line, **kwargs: in_file_when_printed.append(
        open(logger.path).read().endswith(line + "\n")))
    logger.log("step:1/2 train_time:1ms")
    assert in_file_when_printed == [True]


def test_each_rank_uses_its_own_gpu():
    assert icot.rank_device(3, cuda_available=True) == torch.device("cuda:3")
    assert icot.rank_device(3, cuda_available=False) == torch.device("cpu")


def test_sweep_table_reads_the_logs_of_the_folder_it_is_given(tmp_path):
    """records/icot/sweep_tiny/table.py: its own sweep by default, another sweep's folder when named; the last
    evaluation of each run, best validation loss first."""
    table = REPO_ROOT / "records" / "icot" / "sweep_tiny" / "table.py"
    for name, loss in (("nocot_lr3e-3_emb10_wd0.1", 0.78), ("nocot_lr1e-2_emb1_wd0", 1.22)):
        (tmp_path / "logs" / name).mkdir(parents=True)
        (tmp_path / "logs" / name / "run.txt").write_text(
            "step:1500/3000 removed_cot:24 val_loss:0.5 ppl:1.6 accuracy:0.5\n"
            f"step:3000/3000 removed_cot:24 val_loss:{loss} ppl:2.2 accuracy:0.015 digit_accuracy:1.0\n"
            "stage nocot done: 3000 steps, wall time 9.0s, train time 8.0s\n")
    # a run cut short by a time limit, beside its finished rerun: left out, and named; one that --stage_minutes
    # stopped is finished: its last evaluation counts
    (tmp_path / "logs" / "nocot_lr1e-2_emb1_wd0" / "cut.txt").write_text(
        "step:1500/3000 removed_cot:24 val_loss:0.5 ppl:1.6 accuracy:0.5\n")
    (tmp_path / "logs" / "nocot_lr1e-3_emb1_wd0").mkdir()
    (tmp_path / "logs" / "nocot_lr1e-3_emb1_wd0" / "run.txt").write_text(
        "step:1500/3000 removed_cot:24 val_loss:0.9 ppl:1.6 accuracy:0.25\n"
        "step:1500 the --stage_minutes=2.0 budget is spent: stopping here\nstage nocot done: 1500 steps\n")
    done = subprocess.run([sys.executable, table, tmp_path], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[2:] == ["| nocot | 0.003 | 10 | 0.1 | 3000 | 0.7800 | 0.015 |",
                                            "| nocot | 0.001 | 1 | 0 | 1500 | 0.9000 | 0.250 |",
                                            "| nocot | 0.01 | 1 | 0 | 3000 | 1.2200 | 0.015 |"]
    assert "left out 1 log(s) with no final evaluation" in done.stderr and "cut.txt" in done.stderr
    own = subprocess.run([sys.executable, table], capture_output=True, text=True, check=True).stdout
    assert len(own.splitlines()) == 2 + 24 and "| teacher | 0.01 | 10 | 0.1 | 250 | 0.4429 | 0.028 |" in own


def test_each_stage_trains_at_its_own_lr(tmp_path, monkeypatch):
    """--nocot_lr and --stepwise_lr set those stages' lr (0: --lr); the other stages train at --lr."""
    hp, _, train_set = stepwise_setup(tmp_path, lr=1e-2, nocot_lr=3e-3, stepwise_lr=1e-3, stepwise_max_steps=3)
    lrs, real_make = [], icot.make_optimizer
    monkeypatch.setattr(icot, "make_optimizer", lambda model, hp: lrs.append(hp.lr) or real_make(model, hp))
    for kind, steps in (("teacher", 2), ("nocot", 2), ("stepwise", None)):
        icot.train_stage(hp, kind, icot.IcotModel(kind, hp, train_set.layout), train_set, train_set, steps)
    assert sorted(set(lrs)) == [1e-3, 3e-3, 1e-2] and lrs[:2] == [1e-2, 3e-3] and set(lrs[2:]) == {1e-3}
    lrs.clear()
    default = dataclasses.replace(hp, nocot_lr=0.0)
    icot.train_stage(default, "nocot", icot.IcotModel("nocot", default, train_set.layout), train_set, train_set, 2)
    assert lrs == [1e-2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; `timeout` and `kill`
def test_ctrl_c_ends_a_stage_with_one_line(tmp_path, sig):
    code, stderr = interrupt_when([sys.executable, str(REPO_ROOT / "train_icot.py"), "teacher", "--preset=tiny",
                                   "--teacher_steps=100000", f"--data_dir={tmp_path}/data", f"--ckpt_dir={tmp_path}/ckpt",
                                   f"--log_dir={tmp_path}/logs"], "step:1/", REPO_ROOT, sig=sig)
    assert code == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("train_icot.py: interrupted: the stage's log so far is kept")
    assert "step:1/" in next((tmp_path / "logs").glob("*.txt")).read_text()  # the log is kept
