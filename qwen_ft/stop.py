"""Stopping a run cleanly: SIGTERM or SIGINT ends it after the current step, with a checkpoint."""

import signal
import sys

import torch

from qwen_ft.dist import Dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run can't go on (repeated non-finite steps, out of memory); str() says why and what to do."""


class StopSignal:
    """Notes SIGTERM and SIGINT instead of dying, so that the loop can finish its step and save.
    A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.received = False
        self.previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}

    def handle(self, signum, frame) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint", file=sys.stderr)

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


def out_of_memory(step: int) -> RunStopped:
    return RunStopped(
        f"the GPU ran out of memory at step {step}. To use less: --gradient-checkpointing; a smaller "
        "--batch-size with a larger --grad-accum (the same global batch); a lower --max-pixels, "
        "--video-total-pixels or --max-length; --lora or --qlora; or --fsdp over several GPUs"
    )
