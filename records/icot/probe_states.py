"""How much of the answer do the teacher states carry? An MLP probe reads all layers' states of a trained teacher
(`--states` scheme) and predicts every answer token; printed: per-token and exact-match accuracy on the valid file.

    python records/icot/probe_states.py TEACHER.pt DATA_DIR line|sum [n_layer]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_icot as icot  # noqa: E402

parser = argparse.ArgumentParser(prog="probe_states.py", description=__doc__.split("\n\n")[0])
parser.add_argument("teacher", help="a teacher checkpoint of train_icot.py")
parser.add_argument("data_dir", help="a folder with train.txt and valid.txt of the teacher's task")
parser.add_argument("scheme", choices=("line", "sum"), help="the --states scheme of the states the probe reads")
parser.add_argument("n_layer", nargs="?", type=int, help="the teacher's layers (read from the checkpoint; if given, "
                                                         "it must match)")
args = parser.parse_args()
teacher_path, data_dir, scheme = args.teacher, args.data_dir, args.scheme
torch.set_num_threads(1)
hp = icot.Hyperparameters(**{**icot.PRESETS["tiny"], "states": scheme})
try:  # train_icot's errors (UserError) end here as one line, not as a silent exit code 2
    teacher = icot.load_checkpoint(teacher_path, hp, kinds=("teacher",)).eval()
    if args.n_layer is not None and args.n_layer != teacher.n_layer:
        icot.die(f"{teacher_path} has {teacher.n_layer} layers, not {args.n_layer}: leave n_layer out (it is read "
                 f"from the checkpoint)")
    hp.n_layer = teacher.n_layer
    train, valid = icot.load_dataset(f"{data_dir}/train.txt", 8000), icot.load_dataset(f"{data_dir}/valid.txt")
    for dataset in (train, valid):  # another task's lines would be read at this teacher's positions
        icot.check_layout(teacher, dataset)
except icot.UserError as error:
    parser.error(error.message)
layout = train.layout
reader = icot.IcotModel("mindread", hp, layout, teacher)  # only its teacher_states() is used
with torch.no_grad():
    x_train, x_valid = (reader.teacher_states(d.tokens).flatten(1) for d in (train, valid))
answer = slice(layout.sep2 + 1, layout.sep2 + 1 + layout.answer_len)
y_train, y_valid = train.tokens[:, answer].long(), valid.tokens[:, answer].long()
torch.manual_seed(0)
probe = torch.nn.Sequential(torch.nn.Linear(x_train.size(1), 512), torch.nn.ReLU(),
                            torch.nn.Linear(512, layout.answer_len * icot.VOCAB_SIZE))
optimizer = torch.optim.Adam(probe.parameters(), 1e-3)
for step in range(2000):
    i = torch.randint(0, len(x_train), (256,))
    loss = F.cross_entropy(probe(x_train[i]).view(-1, icot.VOCAB_SIZE), y_train[i].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
with torch.no_grad():
    right = probe(x_valid).view(-1, layout.answer_len, icot.VOCAB_SIZE).argmax(-1) == y_valid
digits = [j for j in range(layout.answer_len) if y_valid[0, j] != icot.DOLLAR]
print(f"states={scheme} positions={reader.positions}")
print(f"per-token accuracy {[round(v, 3) for v in right.float().mean(0).tolist()]}, mean over digits "
      f"{right[:, digits].float().mean().item():.3f}, exact {right.all(1).float().mean().item():.3f}")
