"""What a training loop runs inside, whichever loop it is: its output folder locked (lock.py), SIGTERM and
SIGINT handled (stop.py), and the faults that end a run from outside it, a peer process's death and a
full disk, said in one line that names the newest checkpoint, instead of a traceback.

    with guarded_run(cfg.output_dir, dist) as stop:
        ...  # the setup, then stop.begin("stopping after this step, with a checkpoint") and the loop
"""

import contextlib
from functools import partial
from pathlib import Path

from qwen_ft.checkpoint import kept
from qwen_ft.config import ConfigError
from qwen_ft.disk import disk_full
from qwen_ft.dist import Dist
from qwen_ft.lock import FolderInUse, OutputLock, take
from qwen_ft.stop import PeerDied, RunStopped, StopSignal, peer_died


@contextlib.contextmanager
def guarded_run(output_dir: str | Path, dist: Dist):
    """Lock output_dir and handle signals for the block (yielding its StopSignal); a peer's death and a full
    disk in it become PeerDied and RunStopped."""
    out = Path(output_dir)
    lock = lock_output_dir(out, dist)  # a second run into this folder stops here, naming this one
    stop = StopSignal(kept=partial(kept, out))
    try:
        yield stop
    except RuntimeError as e:
        if not peer_died(e, dist):
            raise
        raise PeerDied(
            f"rank {dist.rank}: another process of this job ended (it crashed, was killed or lost its machine), "
            f"so this one stops too, without a checkpoint (that takes every process); {kept(out)}"
        ) from None
    except OSError as e:
        if not disk_full(e):
            raise
        raise RunStopped(f"could not write {e.filename or out}: {e.strerror.lower()}; {kept(out)}") from None
    finally:
        stop.restore()
        if lock:
            lock.release()


def lock_output_dir(output_dir: Path, dist: Dist) -> OutputLock | None:
    """The run's lock on its output folder: rank 0 takes it before the others go on, and if it can't,
    every rank stops with the same message (ConfigError). Returns the lock on rank 0, None on the others."""
    lock, refused = None, None
    if dist.is_main:
        try:
            lock = take(output_dir)
        except FolderInUse as e:
            refused = str(e)
    refused = dist.all_gather_objects(refused)[0]
    if refused:
        raise ConfigError(refused)
    return lock
