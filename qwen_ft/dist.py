"""What the training loop needs to know about processes: rank, device, and the few collective steps.

With one process (finetune.py) every helper here is a no-op. finetune_distributed.py sets up a
process group (init_distributed) so that the same loop runs data-parallel: the model wrapped in
DistributedDataParallel, or sharded with FSDP2 (fully_shard) when it doesn't fit one GPU.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def load_device(self) -> torch.device:
        """Where the weights load: the CPU under FSDP, which then moves only each rank's shard."""
        return torch.device("cpu") if self.fsdp else self.device

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def peak_memory_gib(self) -> float | None:
        """The most GPU memory tensors have held at once since the run began (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, obj) -> list:
        """Every rank's obj (any picklable value), in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def wrap(self, model, compute_dtype: torch.dtype = torch.bfloat16):
        """The model as the loop drives it: itself, in DDP, or sharded with FSDP2 over all ranks
        (computing in compute_dtype, reducing gradients in fp32)."""
        if self.world_size == 1 and not self.fsdp:
            return model
        if not self.fsdp:
            return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        # Each decoder layer and vision block is its own unit, gathered just before it runs and
        # freed after, so only one is ever whole in memory.
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for unit in [*model.model.visual.blocks, *model.model.language_model.layers, model]:
            fully_shard(unit, mp_policy=policy)
        # generate runs the vision tower before the model's forward: as a forward method of its own, it gathers
        # the root unit's weights (patch embedding, merger, embeddings, output head) first.
        register_fsdp_forward_method(model, "generate")
        return model.to(self.device)

    def unwrap(self, model):
        """The transformers (or peft) model inside the wrapper, for save_pretrained."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    def no_sync(self, model, sync: bool):
        """Skip the gradient all-reduce on accumulation micro-steps; reduce once, on the last."""
        if self.world_size == 1 or sync:
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(model)
        return model.no_sync()

    def full_state_dict(self, model) -> dict | None:
        """Under FSDP, the whole model's weights gathered on rank 0's CPU (every rank must call this);
        otherwise None, and save_pretrained takes the weights from the model itself."""
        if not self.fsdp:
            return None
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def single_device() -> Dist:
    return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def init_distributed(fsdp: bool = False) -> Dist:
    """Join the process group torchrun set up: one GPU per process with NCCL, or CPU processes with gloo."""
    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch_dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        torch_dist.init_process_group("gloo")
    return Dist(device=device, rank=rank, world_size=world_size, fsdp=fsdp)
