"""train_icot.py on CPU: vocabulary and line checking, the teacher-state diagonal on hand-made examples, state
injection, and the whole tiny pipeline (every stage, eval, predict) end to end."""

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_icot as icot

REPO_ROOT = Path(__file__).resolve().parents[1]
LINE_4X4 = ("9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 ( 1 3 9 7 9 2 1 ) "
            "+ 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1")
LINE_2X2_K2 = "1 7 * 1 3 $ 6 2 * 6 3||1 7 0 + 0 3 1 2 $ 6 5 1 + 0 8 7 0 #### 1 0 2 2 $ 6 3 9 0"


def layout_of(line):
    problems, n, m = icot.check_line(line)
    return icot.layout_of(icot.encode(line), n, m, len(problems))


def tiny_hp(**overrides):
    return icot.Hyperparameters(**{**icot.PRESETS["tiny"], **overrides})


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


def test_command_line_errors():
    with pytest.raises(SystemExit, match="sub-command"):
        icot.parse_args(["train"])
    with pytest.raises(SystemExit, match="unknown option --lrr"):
        icot.parse_args(["teacher", "--lrr=1"])
    with pytest.raises(SystemExit, match="not a valid int"):
        icot.parse_args(["teacher", "--n_layer", "many"])
    with pytest.raises(SystemExit, match="needs --ckpt"):
        icot.parse_args(["predict", "12*34"])
    command, hp, positional = icot.parse_args(["predict", "--preset", "tiny", "--ckpt=x.pt", "--show_cot", "12*34"])
    assert (command, hp.show_cot, hp.ckpt, hp.task, positional) == ("predict", True, "x.pt", "2x2", ["12*34"])


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


def test_compile_traces_one_graph_with_eager_gradients():
    """torch.compile (the GPU path) captures the closure-based layer hooks (emulator read/predict/write-back, student
    injection) as ONE graph (fullgraph) and gives the eager gradients. aot_eager checks tracing and autograd on CPU
    without code generation (every kind also matched eager through inductor on CPU when checked by hand)."""
    hp = tiny_hp(n_layer=3)
    layout = layout_of(LINE_4X4)
    torch.manual_seed(0)
    model = icot.IcotModel("couple", hp, layout)
    tokens = torch.tensor([icot.encode(icot.format_line([(1234 + 7 * i, 9876 - 5 * i)], 4, 4)) for i in range(8)])
    gradients = []
    for module in (torch.compile(model, backend="aot_eager", fullgraph=True), model):
        module(tokens).backward()
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
    assert len(gradients[0]) == len(gradients[1]) > 10
    for compiled, eager in zip(*gradients):
        torch.testing.assert_close(compiled, eager)


# ---- The tiny pipeline end to end ----

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("icot")
    dirs = {name: root / name for name in ("data", "ckpt", "logs", "records")}
    args = [f"--data_dir={dirs['data']}", f"--ckpt_dir={dirs['ckpt']}", f"--log_dir={dirs['logs']}"]
    run = subprocess.run([sys.executable, REPO_ROOT / "train_icot.py", "all", "--preset", "tiny", *args,
                          f"--records_dir={dirs['records']}"], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return dirs, args, run.stdout


def table_rows(markdown):
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] not in ("model", "---"):
            rows[cells[0]] = cells
    return rows


def test_all_writes_every_stage_table_logs_plots(tiny_run):
    dirs, _, stdout = tiny_run
    stages = ["teacher", "nocot", "mindread", "emulator", "couple", "stepwise"]
    assert sorted(p.stem for p in dirs["ckpt"].glob("*.pt")) == sorted(stages)
    assert {p.name for p in dirs["data"].iterdir()} == {"train.txt", "valid.txt", "test.txt"}
    (table_path,) = dirs["records"].glob("results_2x2_k1_*.md")
    rows = table_rows(table_path.read_text())
    assert table_path.read_text() in stdout
    assert len(rows) == 6 and rows["thought emulator"][1].startswith("quasi ")
    teacher_test_accuracy = float(rows["teacher (explicit CoT)"][1])
    assert teacher_test_accuracy >= 0.1, rows  # chance: ~1e-4 (a 4-digit answer)
    for stage in stages:
        (log,) = dirs["logs"].glob(f"icot_{stage}_2x2_k1_*.txt")
        text = log.read_text()
        assert text.startswith("# Implicit chain of thought") and "=" * 100 in text
        steps = int(re.search(r"step:0/(\d+) val_loss:", text)[1])
        assert re.search(rf"^step:{steps}/{steps} val_loss:\d+\.\d{{4}} train_time:\d+ms step_avg:\d+\.\d\dms$",
                         text, re.M)
        assert re.search(rf"^step:1/{steps} train_time:\d+ms step_avg:\d+\.\d\dms$", text, re.M)
        assert "mfu:n/a" in text and "peak memory" in text
        assert log.with_suffix(".png").stat().st_size > 1000
    stepwise_log = next(dirs["logs"].glob("icot_stepwise_*.txt")).read_text()
    phases = re.findall(r"^step:(\d+)/\d+ phase: removed_cot:(\d+) of 8, optimizer reset$", stepwise_log, re.M)
    assert phases == [("0", "0"), ("15", "4"), ("30", "8")]


def test_eval_and_predict_commands(tiny_run, capsys, monkeypatch, tmp_path):
    dirs, args, _ = tiny_run  # in-process: the same main() as the command line, without a torch start-up per call

    def run(*extra):
        result = icot.main([*extra, "--preset", "tiny", *args])
        return result, capsys.readouterr().out

    metrics, out = run("eval", f"--ckpt={dirs['ckpt'] / 'teacher.pt'}", f"--data={dirs['data'] / 'valid.txt'}")
    assert re.search(r"teacher on .*valid.txt: loss:\S+ ppl:\S+ accuracy:\S+ problems_per_s:\S+ lines:200", out)
    assert metrics["lines"] == 200 and 0 <= metrics["accuracy"] <= 1 and metrics["ppl"] >= 1
    _, out = run("eval", f"--ckpt={dirs['ckpt'] / 'emulator.pt'}")
    assert re.search(r"emulator on .*test.txt: loss:\S+ quasi_accuracy:\S+ lines:200", out)
    couple = dirs["ckpt"] / "couple.pt"
    outputs, _ = run("predict", f"--ckpt={couple}", "--show_cot", "37*49", "12*34")
    assert len(outputs) == 2
    assert re.fullmatch(r"couple: 37\*49 = \S+ \((right|wrong, true 1813)\)\nteacher CoT: [0-9+() $]+", outputs[0])
    monkeypatch.setattr(sys, "stdin", io.StringIO("37*49\n3*4\n\n"))
    _, out = run("predict", f"--ckpt={dirs['ckpt'] / 'teacher.pt'}")
    assert "teacher: 37*49 = " in out and "error: 3*4: this model multiplies 2-digit by 2-digit" in out
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


def test_data_parallel_run_on_cpu(tiny_run, tmp_path):
    """torchrun with 2 processes (gloo on CPU): the manual gradient all-reduce keeps the ranks in sync and the
    evaluation shards add up to all lines."""
    dirs, _, _ = tiny_run
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          REPO_ROOT / "train_icot.py", "mindread", "--preset", "tiny", f"--data_dir={dirs['data']}",
                          f"--teacher={dirs['ckpt'] / 'teacher.pt'}", f"--ckpt_dir={tmp_path / 'ckpt'}",
                          f"--log_dir={tmp_path / 'logs'}", "--mindread_steps=4", "--eval_every=2", "--eval_lines=51"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (log,) = (tmp_path / "logs").glob("icot_mindread_*.txt")  # rank 0 only
    text = log.read_text()
    assert "2 process(es) on cpu" in text and "ranks in sync: weight checksum" in text
    assert re.search(r"^step:4/4 removed_cot:8 val_loss:\S+ .* lines:51$", text, re.M)
    assert (tmp_path / "ckpt" / "mindread.pt").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_bf16_loss_matches_eager():
    hp = tiny_hp()
    layout = layout_of(LINE_4X4)
    model = icot.IcotModel("teacher", hp, layout).cuda()
    tokens = torch.tensor([icot.encode(LINE_4X4)] * 8, device="cuda")
    eager = model(tokens)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = torch.compile(model)(tokens)
    torch.testing.assert_close(compiled.float(), eager, rtol=2e-2, atol=2e-2)
