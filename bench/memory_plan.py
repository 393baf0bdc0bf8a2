"""The memory plan (python -m qwen_ft.plan) against the measured peak of live tensors (bench/memory_profile.py).

    python bench/memory_plan.py [--cases full,lora,qlora,video-full,video-lora] [--work-dir DIR]

On compare_trl.py's model (Qwen2-VL with the 2B model's widths, 4 LLM layers, random weights) and its data
(one 448x448 image and a 24-word answer a sample), and on a video sample (a 448x448 clip of 16 s read at
2 frames/s: 2,048 video tokens), it runs each case twice: the plan's prediction (--json), and the run
itself under bench/memory_profile.py, whose peak of live tensors is what the plan predicts (on a GPU the
same as torch.cuda.max_memory_allocated). It prints a row per case for docs/BENCHMARKS.md: predicted,
measured, and their ratio (the goal: within 20%). Each case is a subprocess of its own; fp32 on the CPU,
bf16-mixed on a GPU.
"""

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from compare_trl import build_model, device_name, write_data  # noqa: E402

GIB = 2**30
IMAGE = ["--min-pixels", "200704", "--max-pixels", "200704"]  # 448x448: 256 image tokens, as compare_trl.py
VIDEO = ["--video-fps", "2", "--video-max-pixels", "200704"]  # and the default budget: at most 2,048 tokens
COMMON = ["--batch-size", "1", "--grad-accum", "1", "--no-shuffle", "--num-workers", "0"]
CASES = {
    "full": IMAGE,
    "lora": [*IMAGE, "--lora"],
    "qlora": [*IMAGE, "--qlora"],
    "video-full": VIDEO,
    "video-lora": [*VIDEO, "--lora"],
}


def write_video_data(folder: Path, seconds: int = 16, side: int = 448, fps: int = 8) -> Path:
    """One sample about a clip of coloured squares moving across a grey field, twice (memory_profile's 2 steps)."""
    folder.mkdir(parents=True, exist_ok=True)
    clip = folder / "clip.mp4"
    if not clip.exists():
        colours = np.random.default_rng(0).integers(0, 256, (4, 3), dtype=np.uint8)
        with av.open(str(clip), "w") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codec.codecs_available else "mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = side, side, "yuv420p"
            for t in range(seconds * fps):
                frame = np.full((side, side, 3), 128, np.uint8)
                for k, colour in enumerate(colours):
                    x = (t * 3 + k * 100) % (side - 64)
                    frame[k * 100 : k * 100 + 64, x : x + 64] = colour
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    content = [{"type": "video", "video": clip.name}, {"type": "text", "text": "What moves in the video, and how?"}]
    answer = "Four coloured squares move from left to right across a grey field, one above the other."
    sample = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
    data = folder / "video.json"
    data.write_text(json.dumps([sample, sample]))
    return data


def run(command: list[str]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--precision", default="fp32" if not torch.cuda.is_available() else "bf16-mixed",
                        help="finetune.py's --precision (fp32 on the CPU, bf16-mixed on a GPU)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "qwen-ft-compare-trl",
                        help="where the model (built once) and the data go (compare_trl.py's by default)")  # fmt: skip
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or set(cases) - set(CASES):
        parser.error(f"--cases takes {', '.join(CASES)}")
    model = build_model(args.work_dir, "2b", 4)
    image_data, _ = write_data(args.work_dir / "data", 8, 448, 24)
    video_data = write_video_data(args.work_dir / "video")
    rows = []
    for case in cases:
        data = video_data if case.startswith("video") else image_data
        flags = ["--model", str(model), "--data", str(data), "--precision", args.precision, *COMMON, *CASES[case]]
        out = tempfile.mkdtemp(prefix="qwen-ft-plan-")
        plan = json.loads(run([sys.executable, "-m", "qwen_ft.plan", *flags, "--output-dir", out, "--json"]))
        profile = run([sys.executable, "bench/memory_profile.py", "--steps", "2", "--", *flags])
        measured = float(re.search(r"what training added: ([\d.]+) GiB", profile).group(1)) * GIB
        predicted = plan["peak_bytes"]
        parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in plan["parts"].items())
        rows.append(f"| {device_name()} | {datetime.date.today()} | {case} | {predicted / GIB:.2f} GiB | "
                    f"{measured / GIB:.2f} GiB | {predicted / measured:.2f} | {parts} |")  # fmt: skip
        print(rows[-1], flush=True)
    print("\n| device | date | case | predicted | measured (live tensors) | ratio | the plan's parts (GiB) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"Command: {shlex.join(['python', 'bench/memory_plan.py', *sys.argv[1:]])}; load average "
          f"{os.getloadavg()[0]:.1f} at the end")  # fmt: skip


if __name__ == "__main__":
    main()
