"""Start-to-first-step time of finetune.py on a large image dataset: the header check, the full one, the data index.

    python bench/precheck.py [--samples 100000 --images 5000] [--modes default,cached,full] [--baseline REPO]

Writes --images distinct 1280x960 JPEGs (photo-like: gradients, shapes and grain, about 12 ms each to
decode here) and a JSONL file of --samples one-image questions over them, then times `finetune.py
--max-steps 1` on the tiny model from the process's start until the first step is logged in
metrics.jsonl, once per mode:

    default  the header check (the data index removed first)
    cached   the default again, on the index the run before it left beside its output dir
    full     --check-media full: every distinct image decoded (the index removed first)

--baseline REPO times that checkout's finetune.py too (another commit, in a `git worktree`), with the
same data and flags: what the start cost before a change. Each run reports the peak memory of the
main process and of each DataLoader worker's private pages (the pages it copied). Rows for
docs/BENCHMARKS.md go to stdout. --phases also times, in this process, each step of the start that the
data size decides: reading the file, the header check, the full check, counting each sample's tokens.
"""

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1280, 960
INDEX = ".qwen-ft-data-index"


def photo(rng: random.Random) -> Image.Image:
    """A picture that compresses and decodes like a photo: smooth gradients, a few shapes, some grain."""
    x, y = np.arange(WIDTH, dtype=np.float32), np.arange(HEIGHT, dtype=np.float32)[:, None]
    channels = [
        110 + 90 * np.sin(x / rng.uniform(80, 400) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(80, 400))
        for _ in range(3)
    ]
    image = Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))
    shapes(image, rng, 12)
    grain = np.random.default_rng(rng.randrange(2**32)).integers(0, 36, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(image) + grain)


def shapes(image: Image.Image, rng: random.Random, count: int) -> None:
    pen = ImageDraw.Draw(image)
    for _ in range(count):
        x0, y0 = rng.randrange(WIDTH), rng.randrange(HEIGHT)
        box = [x0, y0, x0 + rng.randrange(40, 400), y0 + rng.randrange(40, 300)]
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=tuple(rng.randrange(220) for _ in range(3)))


def write_data(folder: Path, samples: int, images: int) -> Path:
    """The images and data.jsonl, reused when they are already there with these counts."""
    data = folder / f"data-{samples}-{images}.jsonl"
    if data.exists():
        return data
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    bases = [photo(rng) for _ in range(min(images, 50))]  # each file: a base with shapes of its own on it
    for i in range(images):
        path = folder / "images" / f"{i:06d}.jpg"
        if not path.exists():
            image = bases[i % len(bases)].copy()
            shapes(image, rng, 3)
            image.save(path, quality=90)
    questions = ["What is in the picture?", "Which colour is the largest shape?", "How many shapes are there?"]
    with open(data.with_suffix(".tmp"), "w") as file:
        for i in range(samples):
            content = [{"type": "image", "image": f"images/{rng.randrange(images):06d}.jpg"}, rng.choice(questions)]
            answer = f"Answer number {i}."
            file.write(
                json.dumps(
                    {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
                )
                + "\n"
            )
    data.with_suffix(".tmp").rename(data)
    return data


def first_step(repo: Path, model: Path, data: Path, out: Path, flags: list[str]) -> dict:
    """Seconds from the start of finetune.py until metrics.jsonl holds a line, and the peak memory."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, str(repo / "finetune.py"), "--model", str(model), "--data", str(data), "--output-dir", str(out),
        "--max-steps", "1", "--save-every", "0", "--batch-size", "2", "--grad-accum", "1", *flags,
    ]  # fmt: skip
    log = out.with_suffix(".log")
    began = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    watched = psutil.Process(process.pid)
    main_peak, worker_peak = 0, 0
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if process.poll() is not None:
            raise SystemExit(f"{' '.join(command)} failed:\n{log.read_text()[-3000:]}")
        try:
            main_peak = max(main_peak, watched.memory_info().rss)
            for child in watched.children(recursive=True):
                worker_peak = max(worker_peak, child.memory_full_info().uss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - began
    os.killpg(process.pid, signal.SIGKILL)  # its DataLoader workers too, which would load batches on
    process.wait()
    return {
        "seconds": round(seconds, 1),
        "main_gib": round(main_peak / 2**30, 2),
        "worker_gib": round(worker_peak / 2**30, 2),
        "load": round(os.getloadavg()[0], 1),  # the machine's 1-minute load as the run ended
    }


def phases(model: Path, data: Path) -> dict:
    """Seconds of each step of checked_samples (qwen_ft.data.checked), run in this process: where the start goes."""
    sys.path.insert(0, str(REPO))
    from qwen_ft.collate import Collator
    from qwen_ft.data.lengths import measure
    from qwen_ft.data.media_check import check_media
    from qwen_ft.data.read import read_samples
    from qwen_ft.model import load_processor

    collator = Collator(load_processor(str(model)), 4096)
    seconds = {}
    began = time.perf_counter()
    samples = read_samples(data, special_tokens=collator.tokens.all_strings)
    seconds["read"] = time.perf_counter() - began
    for name, full in (("header check", False), ("full check", True)):
        began = time.perf_counter()
        check_media(samples, factor=collator.video_factor, full=full)
        seconds[name] = time.perf_counter() - began
    began = time.perf_counter()
    measure(collator, samples)
    seconds["token counts"] = time.perf_counter() - began
    return {name: round(value, 1) for name, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100_000, help="samples in the data file")
    parser.add_argument("--images", type=int, default=5_000, help="distinct 1280x960 JPEGs they use")
    parser.add_argument("--modes", default="default,cached,full", help="comma list of default, cached, full, in order")
    parser.add_argument("--baseline", type=Path, help="another checkout of qwen-ft to time the same way")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qwen-ft-precheck"), help="data, model and outputs")
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers of each run")
    parser.add_argument("--phases", action="store_true", help="also time each step of the start, in this process")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    data = write_data(args.work, args.samples, args.images)
    model = args.work / "tiny"
    subprocess.run(
        [sys.executable, "-m", "qwen_ft.tiny", str(model), "--reuse"], cwd=REPO, check=True, capture_output=True
    )
    flags = ["--num-workers", str(args.num_workers)]
    runs = {
        "default": (REPO, flags, True),  # (checkout, flags, whether the data index is removed first)
        "full": (REPO, [*flags, "--check-media", "full"], True),
        "cached": (REPO, flags, False),
    }
    results = {}
    for mode in filter(None, args.modes.split(",")):
        repo, mode_flags, fresh = runs[mode]
        if fresh:
            shutil.rmtree(args.work / INDEX, ignore_errors=True)
        results[mode] = first_step(repo, model, data, args.work / "out", mode_flags)
        print(f"{mode}: {results[mode]}", file=sys.stderr)
    if args.baseline:
        results["baseline"] = first_step(args.baseline.resolve(), model, data, args.work / "out-baseline", flags)
        print(f"baseline ({args.baseline}): {results['baseline']}", file=sys.stderr)

    if args.phases:
        print(f"phases of the start, in this process: {phases(model, data)}", file=sys.stderr)
    date = datetime.date.today().isoformat()
    full = results.get("full", {}).get("seconds")
    for mode, result in results.items():
        ratio = f"{result['seconds'] / full:.3f}x" if full else "-"
        print(f"| {date} | {args.samples} / {args.images} | {mode} | {result['seconds']} s | {ratio} | "
              f"{result['main_gib']} GiB | {result['worker_gib']} GiB | {result['load']} |")  # fmt: skip


if __name__ == "__main__":
    main()
