"""One run at a time in an output folder: an advisory lock on OUTPUT_DIR/.qwen-ft.lock, held for the whole run.

Two runs writing into one folder (a typo, a job submitted twice) would delete each other's half-written
checkpoints, overwrite each other's model and interleave their metrics. The second one stops at once
instead, naming the folder and the run that holds it (pid, host and start time, which the holder writes
into the lock file). The lock is the kernel's (flock): it goes when the process ends, however it ends,
so a killed run never leaves its folder locked (only its file, which the next run takes over). A run
that ends removes the file. Under torchrun, rank 0 takes it for the whole job (run.py).

On NFS, Linux turns flock into a POSIX lock that the server keeps, so runs on different machines see
each other (unless the share is mounted with `nolock`). A filesystem that can't lock at all gets a
warning, and the run goes on unguarded.
"""

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".qwen-ft.lock"
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # what filesystems without locks say

held: set[int] = set()  # the descriptors of the locks this process holds


class FolderInUse(Exception):
    """Another process holds the folder's lock, or it can't be had; str() says which and what to do."""


def close_in_child() -> None:
    """A forked worker (DataLoader's, the token counters') must not keep the lock alive after its parent ends:
    it closes its copy, which leaves the parent's lock as it is."""
    for fd in held:
        os.close(fd)
    held.clear()


os.register_at_fork(after_in_child=close_in_child)


class OutputLock:
    """The lock of one folder; release() lets go of it and removes its file (the end of the process lets go too)."""

    def __init__(self, path: Path, fd: int | None, created: bool = False):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        if self.fd is not None and self.fd in held:
            # Removed while still held: a process that opened the file before sees, once it has the lock,
            # that the file is no longer the one at its path, and takes the new one (take).
            self.path.unlink(missing_ok=True)
            held.discard(self.fd)
            os.close(self.fd)
            if self.created and not any(self.path.parent.iterdir()):  # a run that stopped before writing anything
                self.path.parent.rmdir()
        self.fd = None


def take(folder: str | Path, what: str = "run", instead: str = "pass another --output-dir") -> OutputLock:
    """Lock `folder` (created if needed) for this process, or raise FolderInUse naming the holder. `what`
    says what this process is, for another that finds the folder held; `instead`, what that one can do."""
    path = Path(folder) / LOCK_FILE
    created = not path.parent.exists()
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FolderInUse(f"cannot write into {path.parent}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(fd)
            os.close(fd)
            raise FolderInUse(f"{path.parent} is in use by {holder}: wait for it to end, or {instead}") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKS:
                raise FolderInUse(f"cannot lock {path}: {e.strerror}") from None
            print(
                f"warning: cannot lock {path.parent} ({e.strerror}: its filesystem has no file locks); "
                "nothing stops a second run from writing into it",
                file=sys.stderr,
            )
            return OutputLock(path, None)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder that just let go removed this file: lock the one at the path now
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "what": what,
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    held.add(fd)
    return OutputLock(path, fd, created)


def describe_holder(fd: int) -> str:
    """'a run: pid 1234 on host gpu3, started 2026-01-31T09:12:00+00:00', from what the holder wrote."""
    for _ in range(20):  # the holder writes just after it takes the lock: give it a moment
        try:
            holder = json.loads(os.pread(fd, 65536, 0))
            return f"a {holder['what']}: pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that did not say which"
