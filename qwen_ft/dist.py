"""What the training loop needs to know about processes: rank, device, and the few collective steps.

With one process (finetune.py) every helper here is a no-op; finetune_distributed.py fills in
a process group so that the same loop runs data-parallel.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def no_sync(self, model, sync: bool):
        """Skip DDP's gradient all-reduce on accumulation micro-steps; reduce once, on the last."""
        if self.world_size > 1 and not sync:
            return model.no_sync()
        return contextlib.nullcontext()


def single_device() -> Dist:
    return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
