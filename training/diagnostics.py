"""Opt-in attention diagnostics (`train.diagnostics_every`): per layer, how much of q's and k's energy the
top-k keeps, the largest logit and the attention entropy, on one fixed validation micro-batch. They make
the mechanism behind a quality gap visible in the curves (e.g. whether RoPE's rotation spreads energy over
coordinates the top-k then drops) instead of guessed."""

from __future__ import annotations

import torch

from models.attention import collect_attention_stats
from training.distributed import unwrap

STATS = ("q_energy_kept", "k_energy_kept", "max_logit", "entropy")


@torch.no_grad()
def attention_diagnostics(model: torch.nn.Module, input_ids: torch.Tensor, autocast) -> dict[str, float]:
    """Metrics `attn/<stat>_L<i>` per layer and `attn/<stat>` (their mean over layers) for one forward of
    `input_ids` (only its first sequence is scored). `autocast` is the loop's autocast context factory."""
    # Eagerly on the plain model: the compiled graph never sees the statistics path, and DDP's gradient
    # hooks stay out of it (it runs under no_grad).
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        with collect_attention_stats() as layers, autocast():
            inner(input_ids)
    finally:
        inner.train(was_training)
    record = {}
    for name in STATS:
        values = [layer[name] for layer in layers]
        record[f"attn/{name}"] = sum(values) / len(values)
        record.update({f"attn/{name}_L{i}": v for i, v in enumerate(values)})
    return record
