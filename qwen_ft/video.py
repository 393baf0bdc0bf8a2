"""Reading the frames of a video that a Qwen2-VL sample uses, exactly and without decoding more than needed.

    python -m qwen_ft.video clip.mp4 --fps 2            # one JSON line: frame count, size, sample_fps, timestamps

torchvision's video API is gone, and what it did (decode every frame and convert every frame to RGB, then
keep a few) was up to 200x slower than needed. Here the frames are chosen by time before anything is
decoded (`frame_times`, which a data checker can call to count tokens without decoding), then read with
PyAV: seeking to the keyframe before each wanted frame when that skips work, skipping the frames nothing
refers to, and converting to RGB only the frames returned. Frames are picked by presentation timestamp,
never by frame number, so variable-frame-rate video gives the frame actually on screen at each chosen time.

How many frames (T) follows qwen-vl-utils' `smart_nframes`: duration * fps, clamped to [min_frames,
max_frames] and to the frames in the range, floored to an even count (Qwen's temporal patch is 2 frames).
It is restated here rather than called, because smart_nframes reads total_frames / video_fps as the
duration (we have a time range and maybe a variable frame rate), raises below 2 frames (we repeat the one
frame of a very short range), and lets float noise floor 1.9999999 down to 0.
"""

import argparse
import bisect
import contextlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch
from PIL import ExifTags, Image
from qwen_vl_utils.vision_process import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    VIDEO_MAX_TOKEN_NUM,
    ceil_by_factor,
    floor_by_factor,
    smart_resize,
)
from torchvision.transforms.v2.functional import InterpolationMode, resize
from transformers.video_utils import VideoMetadata

from qwen_ft.data.media import MediaError, check_file, check_pixels, load_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# Float noise in sums of seconds (0.3 - 0.1 = 0.19999999999999998) must not move a count or a pick;
# a microsecond is far below any frame interval.
FLOAT_SLACK = 1e-6


class VideoError(MediaError):
    """A video (or list of frames) that cannot be read as asked; the message names it and says why."""


@dataclass
class VideoInfo:
    path: str  # the file, or the folder or first file of a list of frames
    duration: float | None  # seconds from the first frame to the end of the last; None for a list of frames
    fps: float | None  # average frame rate; None for a list of frames (its rate is the fps it is read at)
    num_frames: int
    height: int
    width: int
    start_time: float = 0.0  # the stream's first timestamp: frame times are counted from here
    frame_files: list[str] | None = None  # the images, in order, when the video is a list of frames


@contextlib.contextmanager
def open_video(path: str):
    """The container and its first video stream, with FFmpeg's errors turned into one-line VideoErrors."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"'{path}' has no video stream")
            yield container, container.streams.video[0]
    except av.FFmpegError as e:
        raise VideoError(f"'{path}' cannot be decoded: {e.strerror or e}") from None


def frame_files(video) -> list[str] | None:
    """The image files of a video given as a list of images or a folder of them; None for a video file."""
    if isinstance(video, (list, tuple)):
        return [str(file) for file in video]
    if not Path(video).is_dir():
        return None
    # Natural order, so frame_2 comes before frame_10 even without zero-padding.
    files = sorted(
        (file for file in Path(video).iterdir() if file.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda file: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", file.name)],
    )
    if not files:
        raise VideoError(f"'{video}' is a folder with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [str(file) for file in files]


def image_size(file: str) -> tuple[int, int]:
    """(width, height) of an image as load_image returns it, from its header only."""
    try:
        check_file(file)  # what load_image, which reads the frames, will refuse
        with Image.open(file) as image:
            check_pixels(file, image, None)
            width, height = image.size
            quarter_turn = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    except MediaError as e:
        raise VideoError(str(e)) from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise VideoError(f"'{file}' is not an image PIL can read: {e}") from None
    return (height, width) if quarter_turn else (width, height)


def video_info(video) -> VideoInfo:
    """Size, length and frame count from the container's metadata, or the images' headers; no decoding."""
    files = frame_files(video)
    if files is not None:
        if not files:
            raise VideoError("a list of frames is empty")
        sizes = [image_size(file) for file in files]
        for file, size in zip(files, sizes):
            if size != sizes[0]:
                raise VideoError(f"'{file}' is {size[0]}x{size[1]}, but the first frame is {sizes[0][0]}x{sizes[0][1]}")
        name = files[0] if isinstance(video, (list, tuple)) else str(video)
        width, height = sizes[0]
        return VideoInfo(name, None, None, len(files), height, width, frame_files=files)
    path = str(video)
    if not Path(path).exists():
        raise VideoError(f"'{path}' not found")
    try:
        check_file(path, max_bytes=None)  # a FIFO would block FFmpeg for good
    except MediaError as e:
        raise VideoError(str(e)) from None
    with open_video(path) as (container, stream):
        time_base = stream.time_base
        start_time = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
        duration = float(stream.duration * time_base) if stream.duration else (container.duration or 0) / av.time_base
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        num_frames = stream.frames or round(duration * fps)  # Matroska and WebM keep no frame count
        if not num_frames:  # nor a duration or rate: count the packets (one per frame), reading but not decoding
            num_frames = sum(1 for packet in container.demux(stream) if packet.pts is not None)
        duration = duration or (num_frames / fps if fps else 0.0)
        fps = fps or (num_frames / duration if duration else 0.0)
        if not num_frames or not duration:
            raise VideoError(f"'{path}' has no frames" if not num_frames else f"'{path}' has no frame rate or duration")
        height, width = stream.codec_context.height, stream.codec_context.width
        return VideoInfo(path, duration, fps, num_frames, height, width, start_time)


def time_range(info: VideoInfo, start: float | None, end: float | None) -> tuple[float, float]:
    """[start, end] in seconds, checked to lie inside the video."""
    begin = 0.0 if start is None else start
    finish = info.duration if end is None else end
    if not 0 <= begin < finish <= info.duration + FLOAT_SLACK:
        raise VideoError(
            f"'{info.path}' cannot be cut from start={begin:g} s to end={finish:g} s: it lasts {info.duration:.3f} s"
        )
    return begin, finish


def frame_list_indices(info: VideoInfo, max_frames: int) -> list[int]:
    """Which images of a list of frames to use: all, padded to an even count by repeating the last (as
    qwen-vl-utils does), or, when there are more than max_frames, max_frames spread evenly."""
    limit = floor_by_factor(max_frames, FRAME_FACTOR)
    if info.num_frames > limit:  # the middle image of each of `limit` equal slices, in exact integer arithmetic
        return [(2 * part + 1) * info.num_frames // (2 * limit) for part in range(limit)]
    padded = ceil_by_factor(info.num_frames, FRAME_FACTOR)
    return list(range(info.num_frames)) + [info.num_frames - 1] * (padded - info.num_frames)


def frame_times(
    info: VideoInfo,
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    start: float | None = None,
    end: float | None = None,
) -> list[float]:
    """The times (seconds from the video's start) of the frames read_video returns for these arguments.

    The range is cut into T equal slices and each frame is the one on screen at the middle of its slice:
    evenly spaced, all different while T <= the frames in the range, and exactly 1 / sample_fps apart.
    A list of frames is a clip recorded at `fps` (image i at i / fps); min_frames does not apply to it.
    """
    if fps <= 0 or max_frames < FRAME_FACTOR:
        raise ValueError(f"need fps > 0 and max_frames >= {FRAME_FACTOR}, got fps={fps}, max_frames={max_frames}")
    if info.frame_files is not None:
        if start is not None or end is not None:
            raise VideoError(f"'{info.path}' is a list of frames: start and end apply to video files only")
        return [index / fps for index in frame_list_indices(info, max_frames)]
    begin, finish = time_range(info, start, end)
    span = finish - begin
    frames_in_range = max(1, math.floor(span / info.duration * info.num_frames + FLOAT_SLACK))
    count = min(
        max(span * fps, ceil_by_factor(min_frames, FRAME_FACTOR)),
        floor_by_factor(max_frames, FRAME_FACTOR),
        frames_in_range,
    )
    count = max(floor_by_factor(count + FLOAT_SLACK, FRAME_FACTOR), FRAME_FACTOR)
    return [begin + (part + 0.5) * span / count for part in range(count)]


def scan_packets(path: str) -> tuple[Fraction, list[int], list[int]]:
    """The time base, every frame's presentation timestamp and every keyframe's (ascending), from the
    packets: read, not decoded. Container indexes are no substitute: MP4's holds decode times, Matroska's
    only some keyframes."""
    with open_video(path) as (container, stream):
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(stream) if packet.pts is not None]
        if stream.frames and len(packets) < stream.frames:
            raise VideoError(f"'{path}' is truncated: {len(packets)} of its {stream.frames} frames are in the file")
        return stream.time_base, sorted(pts for pts, _ in packets), sorted(pts for pts, key in packets if key)


def decode_wanted(path: str, wanted: list[int], keyframes: list[int]) -> dict[int, np.ndarray] | None:
    """RGB arrays of the frames with the wanted timestamps (ascending), decoding as little as possible.

    The stream is walked in order; when a keyframe lies between one wanted frame and the next, decoding on
    would pass through it anyway, so we seek there instead. Frames that no other frame refers to (most
    B-frames) are skipped unless wanted. None when a wanted frame does not come out: a container whose
    seeking is inexact (MPEG-TS seeks by decode time), a decoder that ignores per-frame skipping, or
    packets whose timestamps differ from their frames'.
    """

    def keyframe_between(earlier: float, later: int) -> bool:
        following = bisect.bisect_right(keyframes, earlier)
        return following < len(keyframes) and keyframes[following] <= later

    seeks = [keyframe_between(earlier, pts) for earlier, pts in zip([-math.inf, *wanted], wanted)]
    found, wanted_set, latest = {}, set(wanted), -math.inf
    with open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        codec, packets = stream.codec_context, iter(())
        for pts, seek, seek_next in zip(wanted, seeks, [*seeks[1:], True]):
            if seek:
                container.seek(pts, stream=stream, backward=True, any_frame=False)  # to the keyframe before
                packets = container.demux(stream)
            while pts not in found:
                packet = next(packets, None)
                if packet is None or latest > pts:  # the stream ended, or frames after the wanted one came out
                    return None
                codec.skip_frame = "DEFAULT" if packet.pts in wanted_set else "NONREF"
                frames = codec.decode(packet)
                last_before_seek = packet.pts == pts and seek_next
                if last_before_seek:  # drain the decoder, rather than feed it frames we would throw away
                    frames += codec.decode(None)
                for frame in frames:
                    latest = frame.pts
                    if frame.pts in wanted_set and frame.pts not in found:  # only returned frames go to RGB
                        found[frame.pts] = frame.to_ndarray(format="rgb24")
                if last_before_seek and pts not in found:
                    return None  # a drained decoder takes nothing more until the next seek
    return found


def decode_in_order(path: str, targets: list[float]) -> list[np.ndarray]:
    """RGB arrays of the frames on screen at the target times (stream seconds, ascending), by decoding every
    frame in order and picking by the decoded frames' own timestamps: slow, but exact for any stream."""
    pictures = []
    with open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        frames = container.decode(stream)
        shown, upcoming = None, next(frames, None)  # the last frame at or before the target, the one after it
        for target in targets:
            while upcoming is not None and upcoming.time <= target + FLOAT_SLACK:
                shown, upcoming = upcoming, next(frames, None)
            chosen = shown if shown is not None else upcoming  # a target before the first frame gets the first
            if chosen is None:
                raise VideoError(f"'{path}' has no frames that can be decoded")
            pictures.append(chosen.to_ndarray(format="rgb24"))
    return pictures


def decode_at(path: str, targets: list[float]) -> list[np.ndarray]:
    """RGB arrays of the frames on screen at the target times (stream seconds, ascending)."""
    time_base, frame_pts, keyframes = scan_packets(path)
    if not frame_pts:
        raise VideoError(f"'{path}' has no frames")
    # The frame on screen at t is the last one shown at or before t (or the first, for t before it).
    wanted = [frame_pts[max(bisect.bisect_right(frame_pts, (t + FLOAT_SLACK) / time_base) - 1, 0)] for t in targets]
    found = decode_wanted(path, sorted(set(wanted)), keyframes)
    return [found[pts] for pts in wanted] if found is not None else decode_in_order(path, targets)


def read_video(
    video,
    fps: float = FPS,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    start: float | None = None,
    end: float | None = None,
) -> tuple[torch.Tensor, float]:
    """The frames at frame_times(...) as uint8 [T, 3, H, W] RGB at the video's own size, and the rate they
    represent (T / the range's duration, which is Qwen's nframes / total_frames * video_fps)."""
    info = video_info(video)
    times, sample_fps = timing(info, fps, min_frames, max_frames, start, end)
    return decode_frames(info, times, max_frames), sample_fps


def timing(info: VideoInfo, fps: float, min_frames: int, max_frames: int, start: float | None, end: float | None):
    """The times of the frames read_video returns (seconds from the video's start) and the rate they represent."""
    times = frame_times(info, fps, min_frames, max_frames, start, end)
    if info.frame_files is not None:
        return times, fps * min(1.0, len(times) / info.num_frames)
    begin, finish = time_range(info, start, end)
    return times, len(times) / (finish - begin)


def decode_frames(info: VideoInfo, times: list[float], max_frames: int) -> torch.Tensor:
    """The frames at these times as uint8 [T, 3, H, W] RGB at the video's own size."""
    if info.frame_files is not None:
        files = [info.frame_files[index] for index in frame_list_indices(info, max_frames)]
        images = [load_frame(file) for file in files]
        for file, image in zip(files, images):
            if image.shape[:2] != (info.height, info.width):  # the header said otherwise: a file changed or lied
                raise VideoError(f"'{file}' is {image.shape[1]}x{image.shape[0]}, not {info.width}x{info.height}")
    else:
        images = decode_at(info.path, [info.start_time + t for t in times])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # [T, H, W, 3] -> [T, 3, H, W]


def load_frame(file: str) -> np.ndarray:
    try:
        return np.asarray(load_image(file))  # upright (EXIF) RGB, as images are everywhere else
    except MediaError as e:
        raise VideoError(str(e)) from None


@dataclass(frozen=True)
class VideoSettings:
    """How a video becomes model input: which frames (fps, counts, range) and at what size.

    A sample's video part may override any of these with its own keys: fps, min_frames, max_frames,
    min_pixels, max_pixels, total_pixels, video_start and video_end.
    """

    fps: float = FPS
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    min_pixels: int = 56 * 56  # per frame
    max_pixels: int = VIDEO_MAX_TOKEN_NUM * 28 * 28  # per frame
    total_pixels: int = 2048 * 28 * 28  # all frames of the video together: at most 2048 tokens
    start: float | None = None
    end: float | None = None

    def for_part(self, part: dict) -> "VideoSettings":
        keys = {"video_start": "start", "video_end": "end"}
        overrides = {keys.get(k, k): v for k, v in part.items() if keys.get(k, k) in self.__dataclass_fields__}
        return replace(self, **overrides)


def frame_size(height: int, width: int, frames: int, settings: VideoSettings, factor: int = 28) -> tuple[int, int]:
    """Qwen's video resize: each frame may use its share of the video's total pixel budget (two frames
    make one temporal patch), within [min_pixels, max_pixels], in multiples of factor (patch x merge)."""
    share = settings.total_pixels / frames * FRAME_FACTOR
    max_pixels = max(min(settings.max_pixels, share), int(settings.min_pixels * 1.05))
    return smart_resize(height, width, factor, min_pixels=settings.min_pixels, max_pixels=max_pixels)


class VideoPlan(NamedTuple):
    """A video as model input, known from its metadata alone."""

    frames: int
    height: int
    width: int
    times: tuple[float, ...]  # of each frame read, seconds from the video's start
    sample_fps: float  # the rate the frames represent


def clip_metadata(times: list[float] | tuple[float, ...], sample_fps: float) -> VideoMetadata:
    """What the processors read about a clip: Qwen2.5-VL its rate (second_per_grid_ts = 2 / sample fps),
    Qwen3-VL each frame's time, which it writes into the text. transformers computes a frame's time as
    frames_indices / fps, so the indices are the reader's times in units of the sample rate: the real
    times, also for a variable frame rate or a range that starts late."""
    return VideoMetadata(total_num_frames=len(times), fps=sample_fps, frames_indices=[t * sample_fps for t in times])


def plan_video(video, settings: VideoSettings, factor: int = 28) -> VideoPlan:
    """The video as model input, from metadata alone; VideoError when it can't be read as asked (missing,
    unreadable, truncated, no frames, a range outside the video)."""
    info = video_info(video)
    times, sample_fps = timing(
        info, settings.fps, settings.min_frames, settings.max_frames, settings.start, settings.end
    )
    if info.frame_files is None:
        scan_packets(info.path)  # reads every packet: a truncated or broken container fails here
    height, width = frame_size(info.height, info.width, len(times), settings, factor)
    return VideoPlan(len(times), height, width, tuple(times), sample_fps)


def load_video(video, settings: VideoSettings, factor: int = 28) -> tuple[torch.Tensor, VideoMetadata]:
    """The frames read_video picks, resized as plan_video says: uint8 [T, 3, H, W], and their metadata."""
    info = video_info(video)
    times, sample_fps = timing(
        info, settings.fps, settings.min_frames, settings.max_frames, settings.start, settings.end
    )
    frames = decode_frames(info, times, settings.max_frames)
    height, width = frame_size(frames.shape[2], frames.shape[3], frames.shape[0], settings, factor)
    resized = resize(frames, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return resized, clip_metadata(times, sample_fps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("video", nargs="+", help="a video file, a folder of frames, or several frame images")
    parser.add_argument("--fps", type=float, default=FPS, help="frames per second to sample")
    parser.add_argument("--min-frames", type=int, default=FPS_MIN_FRAMES, help="fewest frames to return")
    parser.add_argument("--max-frames", type=int, default=FPS_MAX_FRAMES, help="most frames to return")
    parser.add_argument("--start", type=float, help="start of the range, seconds (None: the beginning)")
    parser.add_argument("--end", type=float, help="end of the range, seconds (None: the end)")
    args = parser.parse_args(argv)

    video = args.video[0] if len(args.video) == 1 else args.video
    try:
        began = time.perf_counter()
        frames, sample_fps = read_video(video, args.fps, args.min_frames, args.max_frames, args.start, args.end)
        seconds = time.perf_counter() - began
        times = frame_times(video_info(video), args.fps, args.min_frames, args.max_frames, args.start, args.end)
    except VideoError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = {
        "frames": frames.shape[0],
        "height": frames.shape[2],
        "width": frames.shape[3],
        "sample_fps": sample_fps,
        "timestamps": [round(t, 3) for t in times],
        "seconds": round(seconds, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
