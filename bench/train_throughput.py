"""Tokens/s and peak GPU memory of finetune.py on the published Qwen VL architectures, with random weights.

    python bench/train_throughput.py --size 2b --mode lora [--family qwen3-vl --tokens 2048] [-- FLAGS]

Builds the model from its published shapes (`python -m qwen_ft.tiny --size`, nothing downloaded; speed
and memory depend on the shapes, not on the weights' values), writes samples of exactly --tokens tokens
of which --image-tokens are one image's, and runs finetune.py on them for --steps optimizer steps of one
sample each. Flags after `--` go to finetune.py as they are (--gradient-checkpointing, --precision, ...).
It prints what finetune.py logged in metrics.jsonl: the median tokens/s of the steps after the first
--warmup (which include CUDA's and the allocator's start-up) and the peak memory of the whole run, as a
row for docs/BENCHMARKS.md, with the memory plan's prediction for the same flags beside it
(python -m qwen_ft.plan, made before the run from the config and the data alone).
"""

import argparse
import datetime
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # qwen_ft from this checkout, installed or not
from qwen_ft.collate import Collator  # noqa: E402
from qwen_ft.data.read import read_samples  # noqa: E402
from qwen_ft.model import load_processor  # noqa: E402
from qwen_ft.tiny import FAMILIES, SIZES, build  # noqa: E402

MODES = {"full": [], "lora": ["--lora"], "qlora": ["--qlora"]}


def write_sample(folder: Path, processor, tokens: int, image_tokens: int) -> Path:
    """A data file of one sample, a square image of image_tokens tokens and an answer long enough that
    the whole conversation is exactly `tokens` tokens."""
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens must be a square number (a square image), got {image_tokens}")
    pixels_per_token = processor.image_processor.patch_size * processor.image_processor.merge_size
    Image.new("RGB", (side * pixels_per_token,) * 2, "teal").save(folder / "image.png")
    collator = Collator(processor, max_length=tokens + 1)

    def data_file(answer: str) -> tuple[Path, int]:
        """The data file with this answer, and its sample's length in tokens."""
        messages = [
            {"role": "user", "content": [{"type": "image", "image": "image.png"}, "Describe the image."]},
            {"role": "assistant", "content": answer},
        ]
        data = folder / "data.json"
        data.write_text(json.dumps([{"messages": messages}]))
        samples = read_samples(str(data), str(folder), collator.tokens.all_strings)
        input_ids = collator(samples)["input_ids"]
        assert (input_ids == collator.tokens.image_pad).sum() == image_tokens
        return data, input_ids.shape[1]

    # "~" is in no merge of the (tiny) tokenizer, so n of them are n tokens
    data, length = data_file("~" * (tokens - data_file("")[1]))
    if length != tokens:
        raise SystemExit(f"could not make a sample of {tokens} tokens with {image_tokens} image tokens ({length})")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--family", choices=list(FAMILIES), default="qwen2-vl", help="model family")
    parser.add_argument("--size", choices=["tiny", *SIZES], default="2b", help="model shapes (one the family has)")
    parser.add_argument("--mode", choices=list(MODES), default="full", help="full fine-tune, LoRA or QLoRA")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sample")
    parser.add_argument("--image-tokens", type=int, default=1024, help="of which image tokens (a square number)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps to run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    parser.add_argument("--launch", choices=["python", "ddp", "fsdp"], default="python",
                        help="finetune.py, or finetune_distributed.py in one process with DDP or FSDP2")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen-ft-bench",
                        help="where the model (built once per size) and the runs go")  # fmt: skip
    args, finetune_flags = parser.parse_known_args()
    finetune_flags = [f for f in finetune_flags if f != "--"]

    if args.size != "tiny" and args.size not in FAMILIES[args.family].sizes:
        parser.error(f"{args.family} has no size {args.size}: {', '.join(FAMILIES[args.family].sizes)}")
    name = args.size if args.family == "qwen2-vl" else f"{args.family}-{args.size}"
    model = args.work_dir / f"{args.family}-{args.size}"
    print(f"{args.family} {args.size} with random weights in {model} (built unless already there)", flush=True)
    build(model, family=args.family, size=args.size, reuse=True)
    run = args.work_dir / f"run-{name}-{args.mode}-{args.tokens}-{args.launch}"
    run.mkdir(parents=True, exist_ok=True)
    pixels_per_token = FAMILIES[args.family].patch_size * 2  # one image token is a 2x2 group of patches
    image_pixels = args.image_tokens * pixels_per_token**2
    data = write_sample(run, load_processor(str(model), image_pixels, image_pixels), args.tokens, args.image_tokens)

    launch = {
        "python": [sys.executable, str(REPO / "finetune.py")],
        # One process through finetune_distributed.py: the DDP or FSDP2 wiring, at world size 1.
        "ddp": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                str(REPO / "finetune_distributed.py")],
    }  # fmt: skip
    launch["fsdp"] = [*launch["ddp"], "--fsdp"]
    command = [
        *launch[args.launch], "--model", str(model), "--data", str(data),
        "--output-dir", str(run / "out"), "--max-steps", str(args.steps), "--batch-size", "1", "--grad-accum", "1",
        "--max-length", str(args.tokens), "--min-pixels", str(image_pixels), "--max-pixels", str(image_pixels),
        "--warmup-steps", "0", "--save-every", "0", "--num-workers", "1", *MODES[args.mode], *finetune_flags,
    ]  # fmt: skip
    plan = subprocess.run(
        [sys.executable, "-m", "qwen_ft.plan", *command[len(launch[args.launch]) :], "--json"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    predicted = json.loads(plan.stdout)["peak_bytes"] / 2**30 if plan.returncode == 0 else None
    metrics = run / "out" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    finished = subprocess.run(command, cwd=REPO).returncode == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not finished or len(rows) <= args.warmup:
        raise SystemExit(f"the run stopped after {len(rows)} steps; nothing to report")
    assert all(row["tokens"] == args.tokens for row in rows), "finetune.py saw other samples than written"
    tokens_per_s = statistics.median(row["tokens_per_s"] for row in rows[args.warmup :])
    peak = max(row["peak_memory_gib"] or 0 for row in rows) or None

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    flags = " ".join(finetune_flags) or "-"
    mode = args.mode if args.launch == "python" else f"{args.mode}, {args.launch} in 1 process"
    print("\n| device | date | size | mode | tokens (image) | finetune.py flags | tokens/s | peak memory | plan |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {device} | {datetime.date.today()} | {name} | {mode} | {args.tokens} ({args.image_tokens}) "
        f"| {flags} | {tokens_per_s:.0f} | {f'{peak:.2f} GiB' if peak else 'n/a (CPU)'} "
        f"| {f'{predicted:.2f} GiB' if predicted else 'failed'} |"
    )
    print(f"\nCommand: python bench/{Path(__file__).name} {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
