"""AdamW (torch's, or bitsandbytes' with 8-bit states), weight decay on matrices only, and the warm-up + cosine
learning-rate schedule."""

import math

import bitsandbytes
import bitsandbytes.functional
import torch

from qwen_ft.config import ConfigError
from qwen_ft.model import part_of

# bitsandbytes quantizes its 8-bit states in blocks of this many values, each with its own fp32 scale.
STATE_BLOCK = 256
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep fp32 states
# Its CPU update dequantizes a tensor's states to fp32 as a whole (about 16 bytes a value at once: 3.7 GB
# for a 2B model's embedding), so tensors larger than this are updated this many values at a time.
CPU_SLICE = STATE_BLOCK * 4096


def check_optimizer(name: str, device: torch.device) -> None:
    """ConfigError, before anything loads, for an optimizer that can't run on this device."""
    if name == "paged-adamw8bit" and device.type != "cuda":
        raise ConfigError(
            "--optim paged-adamw8bit pages the optimizer's states between GPU and CPU memory, so it needs "
            f"CUDA (this run is on the {device.type}): use --optim adamw8bit"
        )


def make_optimizer(
    model, lr: float, weight_decay: float, device: torch.device, part_lr: dict[str, float | None], name="adamw"
):
    """AdamW over the trainable parameters, one group per part and decay kind: torch's (name "adamw"), or
    bitsandbytes' with 8-bit states ("adamw8bit", "paged-adamw8bit").

    part_lr gives a part ("vision", "merger") its own peak lr; the LLM, LoRA adapters and any part
    without one use lr. The schedule scales every group's lr by the same factor.
    """
    groups = []
    for part in ("llm", "lora", "vision", "merger"):  # the first group's lr is the one logged
        params = [p for name, p in model.named_parameters() if p.requires_grad and part_of(name) == part]
        part_peak = part_lr.get(part) or lr
        groups += [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr": part_peak},
            # Biases and norm scales are 1-D: decaying them towards 0 only hurts.
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": part_peak},
        ]
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        # The fused kernel updates every parameter in one pass; it exists for CUDA and the CPU.
        return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cuda", "cpu"))
    # bitsandbytes' own kernels (fused on CUDA); tensors under 4,096 values keep fp32 states.
    return AdamW8bit(groups, lr=lr, is_paged=name == "paged-adamw8bit", min_8bit_size=MIN_8BIT_SIZE)


class AdamW8bit(bitsandbytes.optim.AdamW8bit):
    """bitsandbytes' AdamW with 8-bit states (each moment a byte per value, plus an fp32 scale per block of
    256), which on the CPU updates a large tensor a slice of whole blocks at a time: each block is
    quantized on its own, so the result is the same, bit for bit, and the fp32 copies its CPU kernel makes
    are of one slice instead of the whole tensor."""

    @torch.no_grad()
    def update_step(self, group, p, gindex, pindex):
        state = self.state[p]
        if p.device.type != "cpu" or state["state1"].dtype != torch.uint8 or p.numel() <= CPU_SLICE:
            return super().update_step(group, p, gindex, pindex)
        p.data, p.grad = p.data.contiguous(), p.grad.contiguous()  # as bitsandbytes' own update_step
        config = self.get_config(gindex, pindex, group)
        state["step"] += 1
        values = [t.view(-1) for t in (p.grad, p.data, state["state1"], state["state2"])]
        for start in range(0, p.numel(), CPU_SLICE):
            blocks = slice(start // STATE_BLOCK, (start + CPU_SLICE) // STATE_BLOCK)
            grad, param, state1, state2 = (t[start : start + CPU_SLICE] for t in values)
            bitsandbytes.functional.optimizer_update_8bit_blockwise(
                self.optimizer_name, grad, param, state1, state2, config["betas"][0], config["betas"][1], 0.0,
                0.0, config["eps"], state["step"], config["lr"], state["qmap1"], state["qmap2"],
                state["absmax1"][blocks], state["absmax2"][blocks], config["weight_decay"],
                skip_zeros=config["skip_zeros"],
            )  # fmt: skip


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr for the optimizer step after `step` steps have been taken.

    Linear warm-up reaches the peak at step warmup_steps, then a cosine decays it towards 0;
    unlike the common off-by-one, the first step already moves the weights.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, min(warmup_steps, total_steps), total_steps)
    )
