"""The validation loss: the mean cross-entropy per target token over a set of batches.

One implementation for the training loop's `val_loss` and for evaluation/perplexity.py, so the two agree
on every data set. The models return the mean over a batch's targets (tokens whose target is not -1, the
loss mask); weighting each batch by its target count gives the mean per token, which a plain mean of the
batch means is not once batches hold different numbers of targets (a loss mask, a short last batch).
Across processes the sums are added before dividing, so the result is the mean over every rank's tokens.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class ValLoss:
    loss: float  # mean cross-entropy per target token (nats)
    tokens: int  # target tokens counted, all processes together
    batches: int  # batches read by this process


@torch.no_grad()
def token_weighted_loss(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ValLoss:
    """Mean loss per target token of `model` over `batches` of (x, y), with the model in eval mode (its
    previous mode is restored). `all_reduce_sum` adds a tensor over processes (None: one process);
    `progress` is called with each batch's token count. The sums stay on the device until the end: one
    device-to-host read per call."""
    was_training = model.training
    model.eval()
    try:
        # float64 sums: the same result as adding the batch losses in Python floats, whatever the count.
        total = torch.zeros((), dtype=torch.float64, device=device)
        targets = torch.zeros((), dtype=torch.float64, device=device)
        n_batches = 0
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                _, loss = model(x, y)
            count = (y != -1).sum()
            # A batch whose targets are all masked has a NaN mean and adds nothing.
            total += torch.where(count > 0, loss.double() * count, 0.0)
            targets += count
            n_batches += 1
            if progress is not None:
                progress(y.numel())
    finally:
        model.train(was_training)
    sums = torch.stack([total, targets])
    if all_reduce_sum is not None:
        sums = all_reduce_sum(sums)
    total_loss, total_targets = sums.tolist()
    if total_targets == 0:
        raise ValueError("no target tokens to evaluate on (every target is masked, or there were no batches)")
    return ValLoss(loss=total_loss / total_targets, tokens=int(total_targets), batches=n_batches)
