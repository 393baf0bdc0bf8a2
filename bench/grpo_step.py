"""Where a GRPO step's time goes: sampling the answers against the policy update, on a published Qwen VL shape.

    python bench/grpo_step.py --size 2b --mode lora [--prompts 2 --generations 8 --max-new-tokens 128] [-- FLAGS]

Builds the model from its published shapes with random weights (`python -m qwen_ft.tiny --size`, nothing
downloaded), writes prompts of one square image of --image-tokens tokens and a question, and runs
finetune_grpo.py on them for --steps steps of --prompts prompts, each answered --generations times. A random
model rarely emits <|im_end|>, so nearly every answer runs to --max-new-tokens: the generation measured is
that many tokens a row. Flags after `--` go to finetune_grpo.py as they are. It prints, from metrics.jsonl,
the medians over the steps after the first --warmup of generation_s, train_s, generation's share of the two,
the answer tokens generated per second, and the peak memory of the run, as a row for docs/BENCHMARKS.md.
"""

import argparse
import datetime
import json
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
from qwen_ft.tiny import FAMILIES, SIZES, build  # noqa: E402

MODES = {"full": [], "lora": ["--lora"], "qlora": ["--qlora"]}


def write_prompts(folder: Path, prompts: int, image_tokens: int, pixels_per_token: int) -> Path:
    side = int(image_tokens**0.5)
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens must be a square number (a square image), got {image_tokens}")
    samples = []
    for i in range(prompts):
        Image.new("RGB", (side * pixels_per_token,) * 2, (40 * i % 256, 128, 200)).save(folder / f"image-{i}.png")
        question = [{"type": "image", "image": f"image-{i}.png"}, {"type": "text", "text": "Describe the image."}]
        samples.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "a"}]})
    (folder / "data.json").write_text(json.dumps(samples))
    return folder / "data.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--family", choices=list(FAMILIES), default="qwen2-vl", help="model family")
    parser.add_argument("--size", choices=["tiny", *SIZES], default="2b", help="model shapes (one the family has)")
    parser.add_argument("--mode", choices=list(MODES), default="lora", help="full fine-tune, LoRA or QLoRA")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (--batch-size)")
    parser.add_argument("--generations", type=int, default=8, help="answers per prompt (--num-generations)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer")
    parser.add_argument("--image-tokens", type=int, default=256, help="tokens of each prompt's image")
    parser.add_argument("--steps", type=int, default=6, help="steps to run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen-ft-bench",
                        help="where the model (built once per size) and the runs go")  # fmt: skip
    args, grpo_flags = parser.parse_known_args()
    grpo_flags = [f for f in grpo_flags if f != "--"]

    if args.size != "tiny" and args.size not in FAMILIES[args.family].sizes:
        parser.error(f"{args.family} has no size {args.size}: {', '.join(FAMILIES[args.family].sizes)}")
    name = args.size if args.family == "qwen2-vl" else f"{args.family}-{args.size}"
    model = args.work_dir / f"{args.family}-{args.size}"
    print(f"{args.family} {args.size} with random weights in {model} (built unless already there)", flush=True)
    build(model, family=args.family, size=args.size, reuse=True)
    run = args.work_dir / f"grpo-{name}-{args.mode}-{args.prompts}x{args.generations}-{args.max_new_tokens}"
    run.mkdir(parents=True, exist_ok=True)
    pixels_per_token = FAMILIES[args.family].patch_size * 2  # one image token is a 2x2 group of patches
    image_pixels = args.image_tokens * pixels_per_token**2
    data = write_prompts(run, args.prompts, args.image_tokens, pixels_per_token)
    command = [
        sys.executable, str(REPO / "finetune_grpo.py"), "--model", str(model), "--data", str(data),
        "--output-dir", str(run / "out"), "--max-steps", str(args.steps), "--batch-size", str(args.prompts),
        "--grad-accum", "1", "--num-generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
        "--min-pixels", str(image_pixels), "--max-pixels", str(image_pixels), "--reward", "contains",
        "--warmup-steps", "0", "--save-every", "0", "--num-workers", "1", *MODES[args.mode], *grpo_flags,
    ]  # fmt: skip
    metrics = run / "out" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    finished = subprocess.run(command, cwd=REPO).returncode == 0
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [row for row in rows if "loss" in row]
    if not finished or len(rows) <= args.warmup:
        raise SystemExit(f"the run stopped after {len(rows)} steps; nothing to report")
    timed = rows[args.warmup :]
    generation_s = statistics.median(row["generation_s"] for row in timed)
    train_s = statistics.median(row["train_s"] for row in timed)
    tokens_per_s = statistics.median(row["generation_tokens_per_s"] for row in timed)
    length = statistics.mean(row["completion_length"] for row in timed)
    peak = max(row["peak_memory_gib"] or 0 for row in rows) or None

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    flags = " ".join(grpo_flags) or "-"
    print(
        "\n| device | date | size | mode | prompts x answers | answer tokens (mean) | finetune_grpo.py flags "
        "| generation s | training s | generation share | generated tokens/s | peak memory |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {device} | {datetime.date.today()} | {name} | {args.mode} | {args.prompts} x {args.generations} "
        f"| {args.max_new_tokens} ({length:.0f}) | {flags} | {generation_s:.2f} | {train_s:.2f} "
        f"| {generation_s / (generation_s + train_s):.0%} | {tokens_per_s:.0f} | "
        f"{f'{peak:.2f} GiB' if peak else 'n/a (CPU)'} |"
    )
    print(f"\nCommand: python bench/{Path(__file__).name} {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
