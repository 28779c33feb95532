"""Does a trained emulator use its mixture components (--emulator_mixtures K > 1)? For each layer, over the lines of
a file: the mean softmax weight of each component, the mean largest weight (1.0: every line picks one component
outright) and the share of lines whose largest weight is on each component.

    python records/icot/mixture_usage.py EMULATOR_OR_COUPLE.pt DATA_FILE
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_icot as icot  # noqa: E402

parser = argparse.ArgumentParser(prog="mixture_usage.py", description=__doc__.split("\n\n")[0])
parser.add_argument("checkpoint", help="an emulator or couple checkpoint of train_icot.py")
parser.add_argument("data_file", help="lines of the checkpoint's task (digit size and problems per line)")
args = parser.parse_args()
checkpoint, data_file = args.checkpoint, args.data_file
torch.set_num_threads(1)
try:  # train_icot's errors (UserError) end here as one line, not as a silent exit code 2
    # only these two stages have an emulator, whose mixture this reads
    model = icot.load_checkpoint(checkpoint, icot.Hyperparameters(**icot.PRESETS["tiny"]),
                                 kinds=("emulator", "couple")).eval()
    lines = icot.load_dataset(data_file)
    icot.check_layout(model, lines)  # another task's lines would be read with this model's positions
except icot.UserError as error:
    parser.error(error.message)
emulator = model.emulator
choices = []  # per layer: the raw states its prediction MLP reads (the first half of its input)
hooks = [mlp.register_forward_pre_hook(lambda module, args: choices.append(args[0].chunk(2, dim=-1)[0]))
         for mlp in emulator.predict]
with torch.no_grad():
    emulator(lines.tokens[:, :model.layout.sep1 + 1].long())
    for hook in hooks:
        hook.remove()
    print(f"{checkpoint}: {emulator.mixture.size(0)} components, temperature {emulator.mixture_temperature}, "
          f"{len(lines.tokens)} lines of {data_file}")
    for layer, raw in enumerate(choices):
        weights = emulator.mixture_choice(raw)
        picked = torch.bincount(weights.argmax(-1), minlength=weights.size(1)) / len(weights)
        print(f"layer {layer}: mean weight {' '.join(f'{w:.3f}' for w in weights.mean(0))}  "
              f"mean largest {weights.amax(-1).mean():.3f}  picked {' '.join(f'{p:.3f}' for p in picked)}")
