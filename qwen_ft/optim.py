"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

import math

import torch

from qwen_ft.model import part_of


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device, part_lr: dict[str, float | None]):
    """AdamW over the trainable parameters, one group per part and decay kind.

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
    # The fused kernel updates every parameter in one pass; it exists for CUDA and the CPU.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=device.type in ("cuda", "cpu"))


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
