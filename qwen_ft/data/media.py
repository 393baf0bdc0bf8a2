"""Finding and opening the images a sample names: local paths, file://, http(s):// and data: URLs, and
images stored in a dataset's cells (hf_datasets.py).

What is read is bounded before it is read: a local image must be a regular file (a FIFO would block the
check for good, /dev/zero would fill the memory) of at most MAX_BYTES, as a URL's body must (fetch.py,
which also gives a fetch a deadline), and an image is decoded only if its header says it has at most
pixel_cap(--max-pixels) pixels. The header check, the full check and training's load_image apply the same
limits, so an image that passes the check is one that training can load.
"""

import base64
import io
import os
import stat
import urllib.parse
import warnings
from pathlib import Path

from PIL import ExifTags, Image, ImageOps
from qwen_vl_utils.vision_process import to_rgb

from qwen_ft.data.fetch import MAX_BYTES, FetchError, fetch

DATASET_PREFIX = "dataset:"  # an image inside a dataset's table: hf_datasets.py writes and reads these
NOT_AN_IMAGE = "is not an image PIL can read (another kind of file, or a broken header)"
ROTATED = (5, 6, 7, 8)  # EXIF orientations that turn the picture a quarter: width and height swap
# An image is decoded whole before it is resized to at most --max-pixels, so its cost is its own size: a 13000x13000
# PNG of 493 KB takes about 2 GB. One up to 4 times the sides of the largest the model gets (16 times the pixels)
# is decoded, and any up to 64 Mpx (every camera's photo) whatever --max-pixels is; a larger one is refused.
PIXEL_CAP_FACTOR = 16
PIXEL_CAP_FLOOR = 64_000_000
FILE_KINDS = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISCHR: "a device",
              stat.S_ISBLK: "a device", stat.S_ISSOCK: "a socket"}  # fmt: skip


class MediaError(Exception):
    """A media file that cannot be found, fetched or decoded; the message names it and says why."""


def shorten(ref: str, limit: int = 80) -> str:
    """A reference short enough for a one-line message (data: URLs can be megabytes long), its start and its
    end kept: a dataset's image reference ends with its row and column."""
    return ref if len(ref) <= limit else ref[: limit // 2] + "..." + ref[-(limit // 2 - 3) :]


def is_url(ref: str) -> bool:
    return ref.startswith(("http://", "https://", "data:"))


def resolve(ref: str, data_dir: Path, media_root: Path) -> str:
    """Turn a media reference into an absolute path or a URL.

    A relative path is looked up beside the data file first, then under media_root, so that
    both `images/1.png` (beside the data) and `train_data/1.png` (from the repo root) work.
    """
    if is_url(ref) or ref.startswith(DATASET_PREFIX):
        return ref
    path = Path(urllib.parse.unquote(ref[len("file://") :])) if ref.startswith("file://") else Path(ref)
    candidates = [path] if path.is_absolute() else [data_dir / path, media_root / path]
    for candidate in candidates:
        if candidate.exists():  # a folder too: a video may be a folder of frames
            return str(candidate.resolve())
    raise MediaError(f"'{ref}' not found (looked for {' and '.join(str(c) for c in candidates)})")


def pixel_cap(max_pixels: int | None) -> int:
    """The most pixels an image may have to be decoded, when it will be resized to at most max_pixels."""
    return max(PIXEL_CAP_FLOOR, PIXEL_CAP_FACTOR * (max_pixels or 0))


def check_file(path: str, max_bytes: int | None = MAX_BYTES) -> None:
    """MediaError unless path is a regular file (following links) of at most max_bytes, from its metadata alone."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"'{path}' not found") from None
    except OSError as e:
        raise MediaError(f"'{path}' cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((kind for test, kind in FILE_KINDS.items() if test(info.st_mode)), "not a regular file")
        raise MediaError(f"'{path}' is {kind}, not a file: only regular files are read as media")
    if max_bytes is not None and info.st_size > max_bytes:
        raise MediaError(
            f"'{path}' is {info.st_size / 2**20:.0f} MiB, larger than the {max_bytes // 2**20} MiB an image may be"
        )


def hide_pil_size_warning() -> None:
    """pixel_cap replaces PIL's own guard, whose warning (from 89 Mpx) would only repeat it, in the middle of the
    check's output; its error (from 179 Mpx) still stops what is larger, and becomes a MediaError. Warning filters
    are the process's: this is called before the check's threads or training's DataLoader workers start."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_pixels(ref: str, image: Image.Image, max_pixels: int | None) -> None:
    """MediaError if the image (opened, not yet decoded) has more pixels than pixel_cap(max_pixels)."""
    width, height = image.size
    cap = pixel_cap(max_pixels)
    if width * height > cap:
        raise MediaError(
            f"'{shorten(ref)}' is {width}x{height} ({width * height / 1e6:.0f} Mpx), more than the {cap / 1e6:.0f} Mpx "
            f"decoded ({PIXEL_CAP_FACTOR} times --max-pixels, at least {PIXEL_CAP_FLOOR / 1e6:.0f} Mpx): shrink it; it "
            "would be resized to at most --max-pixels anyway"
        )


def read_bytes(ref: str) -> bytes:
    """The raw bytes behind a resolved reference; URLs are fetched within a deadline, and a URL's body and a
    local file are at most MAX_BYTES."""
    if ref.startswith(DATASET_PREFIX):
        from qwen_ft.data.hf_datasets import cell_bytes  # which imports this module

        return cell_bytes(ref)
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        if not header.endswith(";base64"):
            raise MediaError(f"'{shorten(ref)}' is not a base64 data URL")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError as e:
            raise MediaError(f"'{shorten(ref)}' has invalid base64: {e}") from None
    if ref.startswith(("http://", "https://")):
        try:
            return fetch(ref)
        except FetchError as e:
            raise MediaError(f"'{shorten(ref)}' cannot be fetched: {e}") from None
    check_file(ref)
    try:
        return Path(ref).read_bytes()
    except OSError as e:
        raise MediaError(f"'{ref}' cannot be read: {e.strerror}") from None


def image_header(ref: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of an image as load_image returns it (upright), from its header: no pixel is decoded.
    MediaError for an image that load_image would refuse for its size (pixel_cap(max_pixels)) too."""
    local = not (is_url(ref) or ref.startswith(DATASET_PREFIX))
    if local:
        check_file(ref)
    try:
        with Image.open(ref if local else io.BytesIO(read_bytes(ref))) as image:
            check_pixels(ref, image, max_pixels)
            width, height = image.size
            # Image.getexif, not PNG's own, which decodes the whole image to look for EXIF after the pixels.
            orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        raise MediaError(f"'{shorten(ref)}' {NOT_AN_IMAGE}") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"'{shorten(ref)}' is too large to decode: {e}") from None
    except OSError as e:
        if e.errno is not None:  # the file system's error, not PIL's
            raise MediaError(f"'{shorten(ref)}' cannot be read: {e.strerror}") from None
        raise MediaError(f"'{shorten(ref)}' has a broken header: {e}") from None
    except Exception as e:  # PIL raises many types for a corrupt header
        raise MediaError(f"'{shorten(ref)}' has a broken header: {e}") from None
    return (width, height) if orientation in ROTATED else (height, width)


def load_image(ref: str, max_pixels: int | None = None) -> Image.Image:
    """Decode an image fully, upright (EXIF orientation applied) and in RGB; MediaError if it can't be, or if its
    header says it has more pixels than pixel_cap(max_pixels) (max_pixels: what it will be resized to)."""
    try:
        image = Image.open(io.BytesIO(read_bytes(ref)))
        check_pixels(ref, image, max_pixels)
        image.load()
        image = ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        raise MediaError(f"'{shorten(ref)}' {NOT_AN_IMAGE}") from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"'{shorten(ref)}' is too large to decode: {e}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise MediaError(f"'{shorten(ref)}' cannot be decoded: {e}") from None
    return to_rgb(image)
