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


def check_frames(path, known_times, **settings):
    frames, sample_fps = read_video(path, **settings)
    times = frame_times(video_info(path), **settings)
    assert frames.dtype == torch.uint8 and frames.shape[1:] == (3, HEIGHT, WIDTH)
    assert frames.shape[0] == len(times) and len(times) % 2 == 0
    assert [picture_index(frame) for frame in frames] == [on_screen(known_times, t) for t in times]
    return frames, sample_fps, times


@pytest.mark.parametrize(
    "settings, count",
    [
        (dict(fps=1), 6),
        (dict(fps=2), 12),
        (dict(fps=5), 30),  # slice middles fall exactly on frame boundaries
        (dict(fps=2, start=1.3, end=4.2), 4),  # 5.8 floored to even
        (dict(fps=5, max_frames=7), 6),  # max_frames floored to even
        (dict(fps=1, min_frames=20), 20),
        (dict(fps=1, min_frames=9), 10),  # min_frames rounded up to even
        (dict(fps=30), FRAMES),  # more than the video has: every frame
        (dict(fps=5, start=0.05, end=0.25), 2),  # two frames in range: never fewer than 2
    ],
)
def test_frames_are_the_ones_on_screen_at_the_chosen_times(clip, settings, count):
    path, known_times = clip
    frames, sample_fps, times = check_frames(path, known_times, **settings)
    assert len(times) == count
    span = settings.get("end", FRAMES / RATE) - settings.get("start", 0.0)
    assert sample_fps == pytest.approx(count / span)
    assert all(settings.get("start", 0) <= t <= settings.get("end", FRAMES / RATE) for t in times)
    assert np.allclose(np.diff(times), 1 / sample_fps)


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
    known_times = write_video(path, list(range(20)))
    assert video_info(str(path)).num_frames == 20
    check_frames(str(path), known_times, fps=3)


def test_variable_frame_rate_frames_are_picked_by_timestamp(tmp_path):
    path = tmp_path / "vfr.mp4"
    pts = np.cumsum([0] + [1, 3] * 20)[:40].tolist()  # gaps of 1 and 3 thirtieths of a second, alternately
    known_times = write_video(path, pts, time_base=Fraction(1, 30))
    for settings in (dict(fps=2), dict(fps=7), dict(fps=4, start=0.5, end=2.0)):
        check_frames(str(path), known_times, **settings)
    # Picking by frame number would be off: 7 fps over a 10 fps average takes frames the index rule misses.
    _, _, times = check_frames(str(path), known_times, fps=7)
    info = video_info(str(path))
    assert [on_screen(known_times, t) for t in times] != [int(t * info.fps) for t in times]


def test_one_frame_video_gives_two(tmp_path):
    path = tmp_path / "still.mp4"
    known_times = write_video(path, [0])
    frames, _, _ = check_frames(str(path), known_times)
    assert frames.shape[0] == 2


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


def test_video_without_frames_is_refused(tmp_path):
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODEC, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match=re.escape(f"'{path}' ")):
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
    assert summary["timestamps"] == [round(t, 3) for t in frame_times(video_info(path), fps=1, start=1, end=5)]
    assert summary["sample_fps"] == pytest.approx(1.0)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.mp4")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: '{tmp_path / 'missing.mp4'}' not found\n"
