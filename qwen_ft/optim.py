"""AdamW with weight decay on matrices only, and the warm-up + cosine learning-rate schedule."""

import math

import torch


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        # Biases and norm scales are 1-D: decaying them towards 0 only hurts.
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type == "cuda")


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
