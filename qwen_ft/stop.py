"""Stopping a run cleanly, whatever phase it is in, and whatever stops it.

SIGTERM and SIGINT (Ctrl-C) are handled for the run's whole length. Before the loop (data checks,
loading) they stop it at once: nothing would be lost. In the loop the first one is noted, so that the
loop finishes its step, saves a checkpoint and returns; during the final save it is noted too, and the
save finishes. A second one stops at once, without a checkpoint (exit code 128 + the signal, as a
shell reports it). Worker processes leave both signals to the main process, and die with it.
"""

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as torch_dist

from qwen_ft.dist import Dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunStopped(Exception):
    """The run can't go on (repeated non-finite steps, out of memory); str() says why and what to do."""


class PeerDied(RunStopped):
    """Another process of a distributed job ended: this one stops too (each rank says so)."""


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run at once; str() says what was kept, exit_code is what a shell reports."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignal:
    """Handles SIGTERM and SIGINT from its creation until restore(). What a first signal does is set by
    begin(then): until the loop begins it stops the run at once; after, it is noted in `received` for
    the loop to act on, and `then` says what will happen. `kept()` says what a run stopped at once keeps."""

    def __init__(self, kept=lambda: "nothing was saved"):
        self.kept, self.then, self.received, self.pending = kept, None, False, None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.then is None:
            self.pending = Interrupted(f"{name}: stopped before training began; nothing to save", signum)
        elif self.received:
            self.pending = Interrupted(f"{name} again: stopped at once; {self.kept()}", signum)
        else:
            self.received = True
            print(f"\n{name}: {self.then} (a second one stops at once)", file=sys.stderr, flush=True)
            return
        # Python runs a handler wherever the main thread is: in a fork's callbacks or a finalizer, the
        # exception is printed and dropped. It is kept in `pending`, for begin() and requested() to raise.
        raise self.pending

    def begin(self, then: str) -> None:
        """From now on a first signal is noted, and `then` happens (e.g. "stopping after this step, with a
        checkpoint"); a signal whose stop at once was lost stops the run here."""
        if self.pending:
            raise self.pending
        self.then = then

    def requested(self, dist: Dist) -> bool:
        """Whether any rank got a signal: they all stop at the same step."""
        if self.pending:
            raise self.pending
        flag = torch.tensor(float(self.received), device=dist.device)
        return bool(dist.all_reduce_sum(flag) > 0)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred():
    """SIGTERM and SIGINT are noted while the block runs and delivered (to the handler before) after it.
    For code that starts or stops worker processes: an exception raised there by a handler is lost in
    a fork's callbacks, or leaves a pool whose workers wait for work for ever."""
    caught = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            signal.raise_signal(signum)


def ignore_signals(worker_id: int = 0) -> None:
    """DataLoader workers leave SIGINT and SIGTERM to the main process, which stops cleanly (Ctrl-C
    reaches the whole process group)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def die_with_parent(parent: int) -> None:
    """Make this forked worker end when its parent process does, however that ends (kill -9 too), rather
    than live on, adopted by init: it ignores SIGTERM, so nothing else would end it. On Linux the kernel
    sends it SIGKILL (PR_SET_PDEATHSIG); elsewhere a thread watches for a new parent."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it ended before the request was made
            os._exit(1)
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def peer_died(error: BaseException, dist: Dist) -> bool:
    """Whether a collective failed because another process of the job is gone: gloo says "Connection
    reset (or closed) by peer", NCCL raises a DistBackendError."""
    if dist.world_size == 1 or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, torch_dist.DistError) or "by peer" in str(error) or "gloo" in str(error)


def out_of_memory(step: int) -> RunStopped:
    return RunStopped(
        f"the GPU ran out of memory at step {step}. To use less: --gradient-checkpointing; a smaller "
        "--batch-size with a larger --grad-accum (the same global batch); a lower --max-pixels, "
        "--video-total-pixels or --max-length; --lora or --qlora; or --fsdp over several GPUs"
    )
