"""AdamW with nanoGPT's parameter groups, its warm-up + cosine learning-rate schedule as a LambdaLR, and
gradient clipping that leaves its numbers on the device."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    """Weight decay on matrices (>= 2 dims: linears, embeddings), none on biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    # initial_lr is the schedule's base (LambdaLR sets it too); present from the start, the fresh groups
    # have the same keys as a checkpoint's, which torch.distributed.checkpoint requires to load into them.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim_cfg.weight_decay, "initial_lr": optim_cfg.lr},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "initial_lr": optim_cfg.lr},
    ]
    # fused: one kernel per step, and it honours `optimizer.found_inf` (GradScaler's protocol): a step with
    # found_inf = 1 leaves weights and moments untouched, decided on the device (training/faults.py).
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                             fused=True)


def clip_gradients(parameters, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale the gradients to a global L2 norm of at most `max_norm` (inf: leave them), as
    clip_grad_norm_ does. Returns (the global norm before clipping, each gradient's norm), both on the
    device and, under FSDP2, over all shards; the per-gradient norms name the culprits of a non-finite step."""
    parameters = [p for p in parameters if p.grad is not None]
    # clip_grad_norm_'s own first step (torch.nn.utils.get_total_norm), kept so the per-tensor norms stay.
    norms = torch.stack(torch._foreach_norm([p.grad for p in parameters]))
    total = torch.linalg.vector_norm(norms)  # FSDP2: a DTensor reduced over the shards
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
    if hasattr(total, "full_tensor"):
        total, norms = total.full_tensor(), norms.full_tensor()
    return total, norms


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


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, warmup: int, decay_steps: int,
                    step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of the current config, positioned at `step` (optimizer steps done).

    A resumed run builds its scheduler this way, after loading the optimizer state, instead of loading
    the saved scheduler: LambdaLR's saved state would bring back the old horizon, and extending a run
    (train.max_steps, optim.decay_steps) must change it."""
    schedule = WarmupCosine(warmup, decay_steps, optim_cfg.min_lr / optim_cfg.lr)
    if step == 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # last_epoch = step - 1: the constructor takes one step itself, landing on `step`.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=step - 1)
