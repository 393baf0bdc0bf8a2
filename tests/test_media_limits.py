"""Local media that would hang the check or fill the memory: only regular files are read, at most 64 MiB of
them, and an image is decoded only if it is not far larger than --max-pixels. The header check, the full check
and training's load_image refuse the same files, each with one line."""

import os
import struct
import threading
import warnings
import zlib

import pytest
from helpers import picture, qa, video_qa, write_json
from PIL import Image

from qwen_ft.collate import Collator
from qwen_ft.data import media
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import DataError, read_samples


def check_error(data: str, full: bool = False, max_pixels: int | None = None) -> str:
    with pytest.raises(DataError) as error:
        check_media(read_samples(data), full=full, max_pixels=max_pixels)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    return message


@pytest.mark.parametrize("full", [False, True])
def test_a_fifo_is_refused_not_waited_on(tmp_path, full):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    data = write_json(tmp_path / "data.json", [qa("pipe.png", "q", "a"), video_qa("pipe.png")])

    def unblock():  # if the check opened the pipe, it waits for a writer: give it one, so the test fails, not hangs
        with open(fifo, "wb"):
            pass

    writer = threading.Timer(5, unblock)
    writer.daemon = True
    writer.start()
    try:
        with pytest.raises(DataError) as error:
            check_media(read_samples(data), full=full)
    finally:
        writer.cancel()
    kind = "is a named pipe (FIFO), not a file: only regular files are read as media"
    assert str(error.value).splitlines() == [
        f"{data}: sample 0: image '{fifo}' {kind}",
        f"{data}: sample 1: video '{fifo}' {kind}",
    ]


def test_a_device_and_a_folder_are_refused(tmp_path):
    (tmp_path / "folder.png").mkdir()
    data = write_json(tmp_path / "data.json", [qa("/dev/zero", "q", "a"), qa("folder.png", "q", "a")])
    with pytest.raises(DataError) as error:
        check_media(read_samples(data), full=True)  # the full check would read /dev/zero until the memory ran out
    assert str(error.value).splitlines() == [
        f"{data}: sample 0: image '/dev/zero' is a device, not a file: only regular files are read as media",
        f"{data}: sample 1: image '{tmp_path / 'folder.png'}' is a folder, not a file: only regular files are read "
        "as media",
    ]


def test_a_file_over_64_mib_is_refused_before_it_is_read(tmp_path):
    picture(tmp_path, "padded.png")
    with open(tmp_path / "padded.png", "r+b") as file:
        file.truncate(65 * 2**20)  # a valid PNG padded with zeros; sparse, so nothing is written
    data = write_json(tmp_path / "data.json", [qa("padded.png", "q", "a")])
    for full in (False, True):
        assert check_error(data, full).endswith(
            f"image '{tmp_path / 'padded.png'}' is 65 MiB, larger than the 64 MiB an image may be"
        )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares this size and holds no pixels: what a bomb's header says, without its megabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_far_larger_than_max_pixels_is_refused_by_every_check_alike(tmp_path, monkeypatch, processor):
    # With a floor of 1 Mpx instead of 64, and --max-pixels 65,536: the cap is 16 x 65,536 = 1,048,576 pixels.
    monkeypatch.setattr(media, "PIXEL_CAP_FLOOR", 1_000_000)
    Image.new("RGB", (1024, 1024)).save(tmp_path / "at-the-cap.png")
    Image.new("RGB", (2048, 1024)).save(tmp_path / "over.png")
    fine = write_json(tmp_path / "fine.json", [qa("at-the-cap.png", "q", "a")])
    data = write_json(tmp_path / "data.json", [qa("over.png", "q", "a")])
    expected = (
        f"{data}: sample 0: image '{tmp_path / 'over.png'}' is 2048x1024 (2 Mpx), more than the 1 Mpx decoded "
        "(16 times --max-pixels, at least 1 Mpx): shrink it; it would be resized to at most --max-pixels anyway"
    )
    for full in (False, True):
        check_media(read_samples(fine), full=full, max_pixels=65536)
        assert check_error(data, full, max_pixels=65536) == expected
    # Training's load_image (a file that grew past the cap after the check): left out of the batch, named.
    collator = Collator(processor, 4096)
    collator.max_pixels = 65536
    assert collator(read_samples(data))["bad_samples"] == [expected]


@pytest.mark.parametrize("side", [10_000, 30_000])  # above PIL's warning (89 Mpx), and above its error (179 Mpx)
def test_a_bomb_is_refused_at_the_header_without_pils_warning(tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(png_header(side, side))
    data = write_json(tmp_path / "data.json", [qa("bomb.png", "q", "a")])
    with warnings.catch_warnings(record=True) as shown:  # what the filters in force let through
        message = check_error(data)
    assert f"image '{tmp_path / 'bomb.png'}' is " in message
    assert (
        "10000x10000 (100 Mpx), more than the 64 Mpx decoded" if side == 10_000 else "too large to decode"
    ) in message
    assert not [w for w in shown if issubclass(w.category, Image.DecompressionBombWarning)]
