"""How much faster qwen_ft.video.read_video is than decoding a whole video, on a 60 s 720p clip.

    python bench/video_decode.py [--out DIR] [--repeats N]

Reads the same 16 evenly spaced frames of a 60 s, 1280x720, 30 fps H.264 video (a keyframe every 2 s)
several ways and prints the median time of each:
  read_video          qwen_ft.video: seek to the keyframe before each frame, convert only the 16 to RGB
  decode+convert all  decode every frame and convert every frame to RGB, keep 16 (torchvision's old read_video,
                      which also stacked all 1800 frames, 5 GB, into one tensor: it was slower still)
  decode all          decode every frame, convert only the 16 to RGB
  torchcodec          VideoDecoder.get_frames_played_at, when torchcodec is installed and loads
All ways must return the same pixels; the script checks that. The project's targets: read_video at least
20x faster than "decode+convert all" and at least 2x faster than "decode all".
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # qwen_ft from this checkout, installed or not
from qwen_ft.video import FLOAT_SLACK, frame_times, read_video, video_info  # noqa: E402

SECONDS, FPS, WIDTH, HEIGHT, KEYFRAME_EVERY_S = 60, 30, 1280, 720, 2
FRAMES_WANTED = 16
CODEC = "libx264" if "libx264" in av.codec.codecs_available else "mpeg4"


def write_clip(path: Path) -> None:
    """A gradient scrolling sideways under a square moving across it: every pixel changes every frame."""
    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH]
    gradient = np.stack([columns * 255 // WIDTH, rows * 255 // HEIGHT, (rows + columns) % 256], -1).astype(np.uint8)
    side = HEIGHT // 6
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODEC, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.gop_size = KEYFRAME_EVERY_S * FPS
        if CODEC == "libx264":  # a fixed GOP: no extra keyframes at scene cuts
            keyint = KEYFRAME_EVERY_S * FPS
            stream.options = {"preset": "veryfast", "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
        for index in range(SECONDS * FPS):
            picture = np.roll(gradient, 4 * index, axis=1)
            left, top = (7 * index) % (WIDTH - side), (3 * index) % (HEIGHT - side)
            picture[top : top + side, left : left + side] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_everything(path: str, targets: list[float], convert_all: bool) -> torch.Tensor:
    """Walk every frame; keep the one on screen at each target. convert_all: RGB-convert every frame on the way."""
    pictures, shown, shown_rgb = [], None, None
    remaining = iter(targets)
    target = next(remaining)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24") if convert_all else None
            while target is not None and frame.time > target + FLOAT_SLACK:
                pictures.append(shown_rgb if convert_all else shown.to_ndarray(format="rgb24"))
                target = next(remaining, None)
            shown, shown_rgb = frame, rgb
        while target is not None:  # targets after the last frame get the last frame
            pictures.append(shown_rgb if convert_all else shown.to_ndarray(format="rgb24"))
            target = next(remaining, None)
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2)


def torchcodec_way(path: str, times: list[float]):
    """The torchcodec reader, or the reason it cannot run here."""
    try:
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(path)
    except Exception as e:  # ImportError, or an OSError when the system FFmpeg libraries are missing
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    return lambda: VideoDecoder(path, device="cpu").get_frames_played_at(seconds=times).data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "qwen_ft_bench"), help="cache folder")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way; the median is reported")
    args = parser.parse_args()

    path = Path(args.out) / f"clip_{SECONDS}s_{WIDTH}x{HEIGHT}_{FPS}fps_{CODEC}.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} with {CODEC} ...", flush=True)
        partial = path.with_suffix(".partial.mp4")
        write_clip(partial)
        partial.rename(path)
    info = video_info(str(path))
    times = frame_times(info, min_frames=FRAMES_WANTED, max_frames=FRAMES_WANTED)
    targets = [info.start_time + t for t in times]
    print(
        f"{path.name}: {info.num_frames} frames, {info.width}x{info.height}, {info.duration:.1f} s, codec {CODEC}; "
        f"reading {len(times)} frames; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the runs"
    )

    ways = {
        "read_video": lambda: read_video(str(path), min_frames=FRAMES_WANTED, max_frames=FRAMES_WANTED)[0],
        "decode+convert all": lambda: decode_everything(str(path), targets, convert_all=True),
        "decode all": lambda: decode_everything(str(path), targets, convert_all=False),
    }
    torchcodec = torchcodec_way(str(path), targets)
    if callable(torchcodec):
        ways["torchcodec"] = torchcodec

    medians, reference = {}, None
    for name, way in ways.items():
        seconds = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            frames = way()
            seconds.append(time.perf_counter() - began)
        medians[name] = statistics.median(seconds)
        if reference is None:
            reference = frames
        same = frames.shape == reference.shape and bool((frames == reference).all())
        print(f"{name:>20}: {medians[name]:8.3f} s   (runs: {', '.join(f'{s:.3f}' for s in seconds)})"
              f"{'' if same else '   FRAMES DIFFER from read_video'}")  # fmt: skip
    if not callable(torchcodec):
        print(f"{'torchcodec':>20}: {torchcodec}")

    fast = medians["read_video"]
    for name, target in [("decode+convert all", 20), ("decode all", 2)]:
        ratio = medians[name] / fast
        verdict = "meets" if ratio >= target else "MISSES"
        print(f"read_video is {ratio:5.1f}x faster than {name} ({verdict} the {target}x target)")


if __name__ == "__main__":
    main()
