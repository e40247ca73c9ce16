"""AdamW with nanoGPT's parameter groups, and its warm-up + cosine learning-rate schedule as a LambdaLR."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    """Weight decay on matrices (>= 2 dims: linears, embeddings), none on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)


class WarmupCosine:
    """lr multiplier at scheduler step s: linear warm-up to 1 over `warmup` steps, cosine down to
    min_lr / lr at `decay_steps`, flat after. A class (not a lambda) so LambdaLR can save its state."""

    def __init__(self, warmup: int, decay_steps: int, min_ratio: float):
        self.warmup, self.decay_steps, self.min_ratio = warmup, decay_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if step >= self.decay_steps:
            return self.min_ratio
        progress = (step - self.warmup) / max(1, self.decay_steps - self.warmup)
        return self.min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    decay_steps = optim_cfg.decay_steps if optim_cfg.decay_steps is not None else max_steps
    schedule = WarmupCosine(optim_cfg.warmup_steps, decay_steps, optim_cfg.min_lr / optim_cfg.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
