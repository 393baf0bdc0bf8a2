"""What holds the memory at finetune.py's peak: PyTorch's profiler, by category of tensor.

    python bench/memory_profile.py [--steps 2] -- FINETUNE_FLAGS      # e.g. --model DIR --data F --lora

Runs finetune.py's train() for --steps optimizer steps under torch.profiler (memory, shapes and
stacks recorded) and reads its memory timeline: the bytes of live tensors, by category (parameters,
gradients, optimizer state, activations, temporaries, inputs, autograd's own buffers), over time,
and prints them when training starts (the loaded model) and at the peak of training. On a GPU it
reads the CUDA device, else the CPU.

The profiler does not see every tensor that loading frees: loading a model in 4 bits on the CPU leaves
about 2 GiB of them "alive" in its timeline on the 2B widths that the model does not hold. So the last line
counts the loaded model from its own tensors instead (each storage once, a 4-bit weight with its scales)
and adds what training added on top of it, in the profiler's view: the peak that bench/memory_plan.py
holds the plan's prediction against.
"""

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # finetune.py and qwen_ft from this checkout
import finetune  # noqa: E402
from qwen_ft.config import parse_config  # noqa: E402
from qwen_ft.dist import single_device  # noqa: E402

GIB = 2**30


def stored_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage once; a 4-bit weight with its scales."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        quant_state = getattr(tensor, "quant_state", None)
        extra = [] if quant_state is None else [quant_state.absmax, quant_state.code, quant_state.offset]
        if quant_state is not None and quant_state.state2 is not None:
            extra += [quant_state.state2.absmax, quant_state.state2.code]
        for t in [tensor, *extra]:
            if torch.is_tensor(t):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps to profile")
    args, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]
    out = Path(tempfile.mkdtemp(prefix="qwen-ft-memory-"))
    cfg = parse_config([*flags, "--max-steps", str(args.steps), "--save-every", "0", "--output-dir", str(out)])
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    # A save at the end would add its own peak (the output's one-dtype copy); the training's is wanted.
    finetune.save_model = lambda *args, **kwargs: None
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        model = finetune.train(cfg, single_device())
    timeline = out / "memory.json.gz"
    prof.export_memory_timeline(str(timeline), device=device)
    times, sizes = json.loads(gzip.decompress(timeline.read_bytes()))
    # Column i + 1 of each row holds the bytes of category i in the profiler's own order; column 0 is 0.
    names = ["unknown" if category is None else category.name.lower() for category in _CATEGORY_TO_INDEX]
    rows = [row[1:] for row in sizes]
    # Training begins with the first activation; loading the model has its own, earlier peak.
    start = next(i for i, row in enumerate(rows) if row[names.index("activation")] > 0)
    peak = max(range(start, len(rows)), key=lambda i: sum(rows[i]))
    print(f"live tensors on {device} (GiB)  when training starts  at the training peak")
    for name, before, at_peak in zip(names, rows[start], rows[peak]):
        print(f"  {name:<28} {before / GIB:17.2f} {at_peak / GIB:19.2f}")
    print(f"  {'total':<28} {sum(rows[start]) / GIB:17.2f} {sum(rows[peak]) / GIB:19.2f}")
    held = stored_bytes(model)
    print(f"The loaded model's own tensors: {held / GIB:.2f} GiB; the peak with them and what training added: "
          f"{(held + sum(rows[peak]) - sum(rows[start])) / GIB:.2f} GiB")  # fmt: skip
    print(f"Command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
