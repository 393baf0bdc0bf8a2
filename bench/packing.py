"""Tokens/s of finetune.py on samples of mixed lengths: padded micro-batches against --packing --max-tokens.

    python bench/packing.py [--size 2b --llm-layers 2] [--samples 96] [--shortest 20 --longest 1500] [-- FLAGS]

Writes text-only samples whose lengths are spread evenly between --shortest and --longest tokens
(with the same short answer, so the loss costs the same on both sides), and trains on all of them for
one epoch, alternating three ways with about --batch-size samples' tokens per optimizer step:
padded micro-batches of --batch-size samples in random order; the same grouped by length
(--max-tokens without packing); and packed rows of at most the longest sample's tokens, accumulated
(--packing --max-tokens, no padding). It reports, from finetune.py's metrics.jsonl, the tokens/s over the
epoch (real tokens over the summed step times, the first --warmup steps left out) and the share of
computed positions that were padding, as rows for docs/BENCHMARKS.md. Flags after `--` go to every run.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # qwen_ft from this checkout, installed or not
from qwen_ft.collate import Collator  # noqa: E402
from qwen_ft.data.lengths import token_ids  # noqa: E402
from qwen_ft.data.read import read_samples  # noqa: E402
from qwen_ft.model import load_processor  # noqa: E402
from qwen_ft.tiny import build  # noqa: E402

ANSWER = "no"


def write_samples(folder: Path, processor, lengths: list[int]) -> Path:
    """A data file of text-only samples of exactly these lengths in tokens (padded out with '~')."""
    collator = Collator(processor, max_length=max(lengths) + 1)

    def sample(filler: str) -> dict:
        # An empty system message (the template's default one is 10 tokens), and only filler as the question.
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": filler}]
        return {"messages": [*messages, {"role": "assistant", "content": ANSWER}]}

    probe = folder / "probe.json"
    probe.write_text(json.dumps([sample("")]))
    base = len(token_ids(collator, read_samples(str(probe))[0]))
    if base > min(lengths):
        raise SystemExit(f"--shortest must be at least {base} tokens, the length of a sample with no filler")
    # "~" is in no merge of the tiny tokenizer, so n of them are n tokens (checked below).
    samples = [sample("~" * (length - base)) for length in lengths]
    data = folder / "data.json"
    data.write_text(json.dumps(samples))
    measured = [len(token_ids(collator, s)) for s in read_samples(str(data))]
    if measured != lengths:
        raise SystemExit("the samples did not come out at the asked lengths: this tokenizer merges '~'")
    return data


def run(model: Path, data: Path, out: Path, flags: list[str]) -> list[dict]:
    command = [
        sys.executable, str(REPO / "finetune.py"), "--model", str(model), "--data", str(data),
        "--output-dir", str(out), "--epochs", "1", "--warmup-steps", "0",
        "--save-every", "0", "--num-workers", "0", "--max-length", "8192", *flags,
    ]  # fmt: skip
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "2b"], default="2b", help="model widths")
    parser.add_argument("--llm-layers", type=int, default=2, help="LLM layers (0: the size's own)")
    parser.add_argument("--samples", type=int, default=96, help="samples, all trained on once per run")
    parser.add_argument("--shortest", type=int, default=20, help="tokens of the shortest sample")
    parser.add_argument("--longest", type=int, default=1500, help="tokens of the longest sample")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per padded micro-batch")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternated; medians reported")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each run left out")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen-ft-bench",
                        help="where the model (built once per size) and the runs go")  # fmt: skip
    args, extra = parser.parse_known_args()
    extra = [f for f in extra if f != "--"]

    layers = args.llm_layers or None
    model_name = f"qwen2-vl-{args.size}" + (f"-{layers}-layers" if layers else "")
    model = build(args.work_dir / model_name, size=args.size, reuse=True, llm_layers=layers)
    folder = args.work_dir / f"packing-{args.size}"
    folder.mkdir(parents=True, exist_ok=True)
    step = (args.longest - args.shortest) / max(1, args.samples - 1)
    lengths = [round(args.shortest + i * step) for i in range(args.samples)]
    data = write_samples(folder, load_processor(str(model)), lengths)
    # About batch_size samples' tokens per optimizer step every way. Packed rows are kept to the longest
    # sample: with sdpa or eager a packed row's attention is one masked (row x row) block, so a row
    # of the whole step's tokens would cost far more attention than it saves padding.
    accumulate = max(1, round(args.batch_size * statistics.mean(lengths) / args.longest))
    grouped = ["--max-tokens", str(args.batch_size * args.longest), "--batch-size", str(args.batch_size)]
    packed = ["--packing", "--max-tokens", str(args.longest), "--batch-size", "64"]
    ways = {
        "padded": ["--batch-size", str(args.batch_size), "--grad-accum", "1"],
        "grouped": [*grouped, "--grad-accum", "1"],
        "packed": [*packed, "--grad-accum", str(accumulate)],
    }
    results = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, flags in ways.items():
            rows = run(model, data, folder / name, [*flags, *extra])[args.warmup :]
            seconds = sum(row["tokens"] / row["tokens_per_s"] for row in rows)
            tokens, padded = sum(row["tokens"] for row in rows), sum(row["padded_tokens"] for row in rows)
            results[name].append((tokens / seconds, padded / (tokens + padded), len(rows)))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print("\n| device | date | model | samples (tokens) | way | finetune.py flags | steps | padding | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, flags in ways.items():
        speed = statistics.median(r[0] for r in results[name])
        padding, steps = results[name][0][1], results[name][0][2]
        print(
            f"| {device} | {datetime.date.today()} | {model_name} | {args.samples} ({args.shortest}-{args.longest}) "
            f"| {name} | {' '.join([*flags, *extra])} | {steps} | {padding:.1%} | {speed:.0f} |"
        )
    padded = statistics.median(r[0] for r in results["padded"])
    for name in ("grouped", "packed"):
        ratio = statistics.median(r[0] for r in results[name]) / padded
        print(f"{name} / padded tokens/s: {ratio:.2f}x (medians of {args.repeats} runs each, alternated)")
    print(f"Command: python bench/{Path(__file__).name} {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
