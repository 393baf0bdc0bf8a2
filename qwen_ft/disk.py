"""Writing to a disk that may fill up: a failed save says why in one line, and what it left half written
never looks complete.

The libraries that write a checkpoint say a full disk each in their own words: safetensors "I/O error:
No space left on device (os error 28)", torch.save's zip writer only "unexpected pos 998400 vs 998292".
torch_save below hands back the OSError itself, and failed_write turns any of them into one line:
the folder, what went wrong ("no space left on device"), what was free and roughly what the save needed.
"""

import errno
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from qwen_ft.stop import RunStopped

WRITE_ERRORS = (OSError, SafetensorError)  # what a failed write raises, once torch.save goes through torch_save
FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota on it
MODEL_MARKERS = ("config.json", "adapter_config.json")  # what makes from_pretrained take a folder for a model


class SaveFailed(RunStopped):
    """A checkpoint or the model could not be written; str() says where, why and what is kept."""


def error_number(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)", str(error))  # safetensors' words for it
    return int(found[1]) if found else None


def disk_full(error: BaseException) -> bool:
    return error_number(error) in FULL


def size(n: float) -> str:
    """1536 -> '1.5 KB': decimal units, as df -H and file managers show them."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def free_space(folder: Path) -> int:
    """Bytes free to this user where folder is (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def failed_write(what: str, folder: Path, error: BaseException, needed: int) -> str:
    """'could not save checkpoint step-00000008 in /out/checkpoints: no space left on device (1.2 MB free, the
    save needs about 40.1 MB)': one line for any of the errors in WRITE_ERRORS."""
    number = error_number(error)
    if number is not None:
        reason = os.strerror(number).lower()
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return (
        f"could not save {what} in {folder}: {reason} ({size(free_space(folder))} free, "
        f"the save needs about {size(needed)})"
    )


class RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write, which torch's zip writer replaces
    with a RuntimeError that doesn't say why."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def torch_save(obj, path: Path) -> None:
    """torch.save that raises the OSError of a failed write (ENOSPC for a full disk)."""
    with open(path, "wb") as f:
        writer = RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


def fsync_tree(folder: Path) -> None:
    """Flush every file of the folder to disk, so that a rename after it publishes complete files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def publish(partial: Path, folder: Path) -> None:
    """Move a model written whole into `partial` into `folder` (which holds other files too, so it can't
    be renamed itself). The files that make it look like a model go last, and their old versions are
    removed first: a crash halfway leaves a folder that doesn't look like a model, never a mix that does."""
    fsync_tree(partial)
    markers = [path.name for path in partial.iterdir() if path.name in MODEL_MARKERS]
    for marker in markers:
        (folder / marker).unlink(missing_ok=True)
    for path in sorted(partial.iterdir(), key=lambda p: p.name in markers):
        if (folder / path.name).is_dir():
            shutil.rmtree(folder / path.name)
        path.replace(folder / path.name)
    partial.rmdir()
