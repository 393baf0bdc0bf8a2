"""Stopping a run cleanly, whatever phase it is in, and whatever stops it.

SIGTERM and SIGINT (Ctrl-C) are handled for the run's whole length. Before the loop (data checks,
loading) they stop it at once: nothing would be lost. In the loop the first one is noted, so that the
loop finishes its step, saves a checkpoint and returns; during the final save it is noted too, and the
save finishes. A second one stops at once, without a checkpoint (exit code 128 + the signal, as a
shell reports it). Worker processes leave both signals to the main process, and die with it.
"""

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
    """Handles SIGTERM and SIGINT from its creation until restore(). `then` says what a first signal does:
    None (until the loop begins) stops at once; a text ("stopping after this step, with a checkpoint")
    notes it in `received`, for the loop to act on. `kept()` says what a run that stops at once keeps."""

    def __init__(self, kept=lambda: "nothing was saved"):
        self.kept, self.then, self.received = kept, None, False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.then is None:
            raise Interrupted(f"{name}: stopped before training began; nothing to save", signum)
        if self.received:
            raise Interrupted(f"{name} again: stopped at once; {self.kept()}", signum)
        self.received = True
        print(f"\n{name}: {self.then} (a second one stops at once)", file=sys.stderr, flush=True)

    def requested(self, dist: Dist) -> bool:
        """Whether any rank got a signal: they all stop at the same step."""
        flag = torch.tensor(float(self.received), device=dist.device)
        return bool(dist.all_reduce_sum(flag) > 0)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
