"""Finding and opening the images a sample names: local paths, file://, http(s):// and data: URLs, and
images stored in a dataset's cells (hf_datasets.py)."""

import base64
import io
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import ExifTags, Image, ImageOps
from qwen_vl_utils.vision_process import to_rgb

URL_TIMEOUT_S = 30
URL_MAX_BYTES = 64 * 1024 * 1024
DATASET_PREFIX = "dataset:"  # an image inside a dataset's table: hf_datasets.py writes and reads these
NOT_AN_IMAGE = "is not an image PIL can read (another kind of file, or a broken header)"
ROTATED = (5, 6, 7, 8)  # EXIF orientations that turn the picture a quarter: width and height swap


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


def read_bytes(ref: str) -> bytes:
    """The raw bytes behind a resolved reference; URLs are fetched with a timeout and a size limit."""
    if ref.startswith(DATASET_PREFIX):
        from qwen_ft.hf_datasets import cell_bytes  # which imports this module

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
            with urllib.request.urlopen(ref, timeout=URL_TIMEOUT_S) as response:
                data = response.read(URL_MAX_BYTES + 1)
        except OSError as e:
            raise MediaError(f"'{ref}' cannot be fetched: {e}") from None
        if len(data) > URL_MAX_BYTES:
            raise MediaError(f"'{ref}' is larger than {URL_MAX_BYTES // 2**20} MiB")
        return data
    try:
        return Path(ref).read_bytes()
    except OSError as e:
        raise MediaError(f"'{ref}' cannot be read: {e.strerror}") from None


def image_header(ref: str) -> tuple[int, int]:
    """(height, width) of an image as load_image returns it (upright), from its header: no pixel is decoded."""
    try:
        local = not (is_url(ref) or ref.startswith(DATASET_PREFIX))
        with Image.open(ref if local else io.BytesIO(read_bytes(ref))) as image:
            width, height = image.size
            # Image.getexif, not PNG's own, which decodes the whole image to look for EXIF after the pixels.
            orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        raise MediaError(f"'{shorten(ref)}' {NOT_AN_IMAGE}") from None
    except OSError as e:
        if e.errno is not None:  # the file system's error, not PIL's
            raise MediaError(f"'{shorten(ref)}' cannot be read: {e.strerror}") from None
        raise MediaError(f"'{shorten(ref)}' has a broken header: {e}") from None
    except Exception as e:  # PIL raises many types for a corrupt header
        raise MediaError(f"'{shorten(ref)}' has a broken header: {e}") from None
    return (width, height) if orientation in ROTATED else (height, width)


def load_image(ref: str) -> Image.Image:
    """Decode an image fully, upright (EXIF orientation applied) and in RGB."""
    try:
        image = Image.open(io.BytesIO(read_bytes(ref)))
        image.load()
        image = ImageOps.exif_transpose(image)
    except MediaError:
        raise
    except Image.UnidentifiedImageError:
        raise MediaError(f"'{shorten(ref)}' {NOT_AN_IMAGE}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise MediaError(f"'{shorten(ref)}' cannot be decoded: {e}") from None
    return to_rgb(image)
