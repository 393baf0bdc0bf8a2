"""qwen_ft.video against videos whose every frame shows its own index, so the frames returned can be checked."""

import bisect
import json
import os
import re
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image
from qwen_vl_utils.vision_process import smart_nframes

from qwen_ft.video import (
    VideoError,
    decode_in_order,
    decode_wanted,
    frame_times,
    main,
    read_video,
    scan_packets,
    video_info,
)

WIDTH, HEIGHT = 128, 96
COLUMNS, ROWS = 4, 2  # 8 blocks of 32x48 px, one bit of the frame index each: survives lossy compression
CODEC = "libx264" if "libx264" in av.codec.codecs_available else "mpeg4"
RATE = 10
FRAMES = 60
GOP = 8  # several keyframes in the video, so reading it seeks


def index_picture(index: int) -> np.ndarray:
    """An RGB picture of index in binary: block b is white when bit b is set."""
    bits = np.array([(index >> bit) & 1 for bit in range(COLUMNS * ROWS)], np.uint8).reshape(ROWS, COLUMNS)
    blocks = np.kron(bits * 255, np.ones((HEIGHT // ROWS, WIDTH // COLUMNS), np.uint8))
    return np.repeat(blocks[:, :, None], 3, axis=2)


def picture_index(frame: torch.Tensor) -> int:
    """Read back the index from a [3, H, W] frame by thresholding the middle of each block."""
    block_h, block_w = frame.shape[1] // ROWS, frame.shape[2] // COLUMNS
    index = 0
    for bit in range(COLUMNS * ROWS):
        row, column = divmod(bit, COLUMNS)
        block = frame[:, row * block_h : (row + 1) * block_h, column * block_w : (column + 1) * block_w]
        middle = block[:, block_h // 4 : -block_h // 4, block_w // 4 : -block_w // 4]
        index |= int(middle.float().mean() > 128) << bit
    return index


def write_video(path, pts: list[int], time_base: Fraction = Fraction(1, RATE), gop: int = GOP) -> list[float]:
    """Write frame i showing i at pts[i] (in time_base units); return the frames' times in seconds."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODEC, rate=round(1 / time_base))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.time_base = time_base
        stream.gop_size = gop
        for index, frame_pts in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(index_picture(index), format="rgb24")
            frame.pts, frame.time_base = frame_pts, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return [float(p * time_base) for p in pts]


def on_screen(known_times: list[float], t: float) -> int:
    """The index of the frame displayed at t: the last one shown at or before it."""
    return max(bisect.bisect_right(known_times, t + 1e-6) - 1, 0)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 6 s, 10 fps video with a keyframe every 0.8 s."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    return str(path), write_video(path, list(range(FRAMES)))


def middles(start: float, end: float, count: int) -> list[float]:
    """The middle of each of count equal slices of [start, end]: where the reader is to take its frames."""
    width = (end - start) / count
    return [start + width / 2 + k * width for k in range(count)]


def check_frames(path, frames: list[int], times: list[float], **settings):
    """read_video returns the frames shown (the index painted in each) and frame_times the times worked out
    in the test."""
    got, sample_fps = read_video(path, **settings)
    assert got.dtype == torch.uint8 and got.shape[1:] == (3, HEIGHT, WIDTH)
    assert [picture_index(frame) for frame in got] == frames
    assert frame_times(video_info(path), **settings) == pytest.approx(times, abs=1e-9)
    return sample_fps


# The clip shows frame i from i / 10 s to (i + 1) / 10 s, for 6 s; the frames expected are worked out by hand
# from the middles of the slices.
@pytest.mark.parametrize(
    "settings, frames",
    [
        (dict(fps=1), [5, 15, 25, 35, 45, 55]),  # 6 slices of 1 s, middles 0.5, 1.5, ... 5.5 s
        (dict(fps=2), list(range(2, 60, 5))),  # 12 slices of 0.5 s, middles 0.25, 0.75, ... on frames 2, 7, ...
        (dict(fps=5), list(range(1, 60, 2))),  # 30 slices of 0.2 s: middles 0.1, 0.3, ... fall exactly on frames
        (dict(fps=2, start=1.3, end=4.2), [16, 23, 31, 38]),  # 5.8 floored to 4 slices of 0.725 s: 1.6625, 2.3875 ...
        (dict(fps=5, max_frames=7), [5, 15, 25, 35, 45, 55]),  # max_frames floored to 6: slices of 1 s
        (dict(fps=1, min_frames=20), list(range(1, 60, 3))),  # 20 slices of 0.3 s, middles 0.15, 0.45, ...
        (dict(fps=1, min_frames=9), list(range(3, 60, 6))),  # rounded up to 10 slices of 0.6 s: 0.3, 0.9, ...
        (dict(fps=30), list(range(FRAMES))),  # more than the video has: every frame, at the middle of its 0.1 s
        (dict(fps=5, start=0.05, end=0.25), [1, 2]),  # two frames in range, never fewer than 2: 0.1 and 0.2 s
    ],
)
def test_frames_are_the_ones_on_screen_at_the_middles_of_equal_slices(clip, settings, frames):
    path, _ = clip
    start, end = settings.get("start", 0.0), settings.get("end", FRAMES / RATE)
    sample_fps = check_frames(path, frames, middles(start, end, len(frames)), **settings)
    assert sample_fps == pytest.approx(len(frames) / (end - start))


@pytest.mark.parametrize(
    "fps, min_frames, max_frames", [(1, 4, 768), (2, 4, 768), (0.3, 4, 768), (5, 4, 10), (3, 24, 40)]
)
def test_frame_count_and_sample_fps_match_qwen_on_whole_videos(clip, fps, min_frames, max_frames):
    path, _ = clip
    info = video_info(path)
    settings = dict(fps=fps, min_frames=min_frames, max_frames=max_frames)
    expected = smart_nframes(settings, total_frames=info.num_frames, video_fps=info.fps)
    frames, sample_fps = read_video(path, **settings)
    assert len(frame_times(info, **settings)) == frames.shape[0] == expected
    assert sample_fps == pytest.approx(expected / info.num_frames * info.fps)  # Qwen's sample_fps


@pytest.mark.parametrize("container", ["mp4", "mkv"])
@pytest.mark.parametrize("gaps", [[1], [1, 3]], ids=["constant", "variable"])
def test_seeking_and_skipping_give_what_decoding_every_frame_gives(tmp_path, container, gaps):
    path = str(tmp_path / f"clip.{container}")
    write_video(path, np.cumsum([0] + gaps * FRAMES)[:FRAMES].tolist(), time_base=Fraction(1, 30))
    time_base, frame_pts, keyframes = scan_packets(path)
    assert len(frame_pts) == FRAMES and 1 < len(keyframes) < FRAMES
    for stride in (1, 5, 13):  # reading on, and seeking to frames one or more keyframes ahead
        wanted = frame_pts[stride // 2 :: stride]
        found = decode_wanted(path, wanted, keyframes)
        assert found is not None, "the fast path gave up on a plain file"
        reference = decode_in_order(path, [float(pts * time_base) for pts in wanted])
        assert all(np.array_equal(found[pts], picture) for pts, picture in zip(wanted, reference))


def test_fast_path_gives_up_when_a_wanted_frame_does_not_come_out(clip):
    path, _ = clip
    _, frame_pts, keyframes = scan_packets(path)
    between_frames = (frame_pts[20] + frame_pts[21]) // 2
    assert decode_wanted(path, [frame_pts[3], between_frames], keyframes) is None


def test_all_frames_of_a_video_come_back_in_order(clip):
    path, _ = clip
    frames, _ = read_video(path, fps=RATE, max_frames=FRAMES)
    assert [picture_index(frame) for frame in frames] == list(range(FRAMES))


def test_video_info_reads_the_metadata(clip):
    path, _ = clip
    info = video_info(path)
    assert (info.num_frames, info.height, info.width) == (FRAMES, HEIGHT, WIDTH)
    assert info.fps == pytest.approx(RATE) and info.duration == pytest.approx(FRAMES / RATE)


def test_video_info_without_a_frame_count_counts_from_duration(tmp_path):
    # Matroska records no frame count.
    path = tmp_path / "clip.mkv"
    write_video(path, list(range(20)))
    assert video_info(str(path)).num_frames == 20
    # 2 s at 3 fps: 6 slices of 1/3 s, whose middles 1/6, 1/2, 5/6, ... s show these frames.
    check_frames(str(path), [1, 5, 8, 11, 15, 18], middles(0, 2, 6), fps=3)


def test_variable_frame_rate_frames_are_picked_by_timestamp(tmp_path):
    path = tmp_path / "vfr.mp4"
    pts = np.cumsum([0] + [1, 3] * 20)[:40].tolist()  # gaps of 1 and 3 thirtieths of a second, alternately
    known_times = write_video(path, pts, time_base=Fraction(1, 30))
    # Even frames 2k at 4k/30 s, odd ones at (4k + 1)/30 s; the last (39) at 77/30 s ends the video at 2.6 s.
    # 2 fps: 4 slices of 0.65 s, middles at 9.75/30, 29.25/30, 48.75/30 and 68.25/30 s, which fall in the
    # frames shown from 9/30 (frame 5), 29/30 (15), 48/30 (24) and 68/30 s (34).
    check_frames(str(path), [5, 15, 24, 34], middles(0, 2.6, 4), fps=2)
    # 1.5 s at 4 fps from 0.5 s: middles at 18.75/30, 26.25/30, ... 56.25/30 s.
    check_frames(str(path), [9, 13, 17, 21, 24, 28], middles(0.5, 2.0, 6), fps=4, start=0.5, end=2.0)
    # 7 fps: 18 slices (18.2 floored to even); the frame on screen at each middle.
    times = middles(0, 2.6, 18)
    check_frames(str(path), [on_screen(known_times, t) for t in times], times, fps=7)
    # Picking by frame number would be off: 7 fps over a 15 fps average takes frames the index rule misses.
    info = video_info(str(path))
    assert [on_screen(known_times, t) for t in times] != [int(t * info.fps) for t in times]


def test_one_frame_video_gives_two(tmp_path):
    path = tmp_path / "still.mp4"
    write_video(path, [0])  # shown for 0.1 s
    check_frames(str(path), [0, 0], [0.025, 0.075])


def write_pictures(folder, names):
    folder.mkdir(exist_ok=True)
    for index, name in enumerate(names):
        Image.fromarray(index_picture(index)).save(folder / name)
    return [str(folder / name) for name in names]


def test_list_of_frames_is_padded_to_even(tmp_path):
    files = write_pictures(tmp_path, [f"{i}.png" for i in range(5)])
    frames, sample_fps = read_video(files, fps=2)
    assert [picture_index(frame) for frame in frames] == [0, 1, 2, 3, 4, 4]
    assert sample_fps == 2
    assert frame_times(video_info(files), fps=2) == [0, 0.5, 1, 1.5, 2, 2]


def test_folder_of_frames_in_natural_order_and_thinned_to_max_frames(tmp_path):
    write_pictures(tmp_path / "frames", [f"frame_{i}.png" for i in range(10)])
    (tmp_path / "frames" / "notes.txt").write_text("not a frame")
    frames, sample_fps = read_video(str(tmp_path / "frames"), fps=2, max_frames=4)
    assert [picture_index(frame) for frame in frames] == [1, 3, 6, 8]  # middles of 4 slices of 10
    assert sample_fps == pytest.approx(2 * 4 / 10)
    assert len(frame_times(video_info(str(tmp_path / "frames")), fps=2, max_frames=4)) == 4


def test_frames_of_different_sizes_are_refused(tmp_path):
    files = write_pictures(tmp_path, ["a.png", "b.png"])
    Image.fromarray(index_picture(1)).resize((64, 48)).save(files[1])
    with pytest.raises(VideoError, match="b.png' is 64x48"):
        read_video(files)


def test_errors_name_the_file(tmp_path, clip):
    missing = tmp_path / "missing.mp4"
    random_bytes = tmp_path / "noise.mp4"
    random_bytes.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(clip[0], "rb").read()[: os.path.getsize(clip[0]) // 2])
    for path, problem in [
        (missing, "not found"),
        (random_bytes, "cannot be decoded"),
        (truncated, "cannot be decoded"),
    ]:
        with pytest.raises(VideoError, match=re.escape(f"'{path}' {problem}")):
            read_video(str(path))


def test_truncated_file_with_its_index_first_is_refused(tmp_path):
    # With the index ("moov") at the front, the file opens; the missing frames must still be noticed.
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(CODEC, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(FRAMES):
            for packet in stream.encode(av.VideoFrame.from_ndarray(index_picture(index), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(VideoError, match=re.escape(f"'{path}' is truncated")):
        read_video(str(path))


def test_file_without_video_is_refused(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    with pytest.raises(VideoError, match=re.escape(f"'{path}' has no video stream")):
        read_video(str(path))


# AVI keeps a video stream that holds no frame; MP4 leaves the empty stream out of the file.
@pytest.mark.parametrize("name, problem", [("empty.avi", "has no frames"), ("empty.mp4", "has no video stream")])
def test_video_without_frames_is_refused(tmp_path, name, problem):
    path = tmp_path / name
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODEC, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match=re.escape(f"'{path}' {problem}")):
        read_video(str(path))


@pytest.mark.parametrize("start, end", [(-1, None), (None, 7.5), (3, 3), (4, 2)])
def test_range_outside_the_video_is_refused(clip, start, end):
    path, _ = clip
    with pytest.raises(VideoError, match=re.escape(f"'{path}' cannot be cut") + ".* it lasts 6.000 s"):
        frame_times(video_info(path), start=start, end=end)
    with pytest.raises(VideoError):
        read_video(path, start=start, end=end)


def test_cli_prints_one_json_object(clip, capsys):
    path, known_times = clip
    main([path, "--fps", "1", "--start", "1", "--end", "5"])
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"frames", "height", "width", "sample_fps", "timestamps", "seconds"}
    assert (summary["frames"], summary["height"], summary["width"]) == (4, HEIGHT, WIDTH)
    assert summary["timestamps"] == [1.5, 2.5, 3.5, 4.5]
    assert summary["sample_fps"] == pytest.approx(1.0)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.mp4")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: '{tmp_path / 'missing.mp4'}' not found\n"
