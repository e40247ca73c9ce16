"""Loss and perplexity of a model on a prepared split.

The split is read by data.loader.TokenLoader in its evaluation order (shuffle off): consecutive,
non-overlapping windows of seq_len + 1 tokens, the first `max_batches` batches or one full pass.
These are the windows train.py's validation loss reads, so the numbers agree with the training
curves at the same seq_len, and the mean is computed by the same function
(training.validation.token_weighted_loss): over predicted tokens (a shorter last batch counts by its
size, masked targets not at all); perplexity = exp(mean loss). Each window's first token is context
only, and a tail shorter than one window is not read (docs/evaluation.md).
"""

from __future__ import annotations

import math
import time

import torch

from data.format import check_vocab
from data.loader import TokenLoader
from training.validation import token_weighted_loss

from .runtime import autocast


@torch.no_grad()
def evaluate_loss(
    model, data_dir, split: str = "val", *, seq_len: int, batch_size: int, max_batches: int | None = None,
    device=torch.device("cpu"), dtype=torch.float32, progress=None,
) -> dict:  # fmt: skip
    """Token-weighted mean cross-entropy over the split (or its first `max_batches` batches); on data with a
    loss mask, over the unmasked target tokens only (`tokens` counts those)."""
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None (all tokens), got {max_batches!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len!r} must be an int in [1, the model's max_seq_len={model.config.max_seq_len}]")
    loader = TokenLoader(data_dir, split, batch_size=batch_size, seq_len=seq_len, shuffle=False)
    check_vocab(loader.meta, model.config.vocab_size)
    started = time.perf_counter()
    result = token_weighted_loss(model, loader.iter_eval_batches(max_batches), device,
                                 autocast=lambda: autocast(device, dtype), progress=progress)
    seconds = time.perf_counter() - started
    return {
        "loss": result.loss,
        "perplexity": math.exp(result.loss),
        "tokens": result.tokens,
        "batches": result.batches,
        "split_tokens": loader.total_tokens,
        "seconds": seconds,
        "tokens_per_s": result.tokens / seconds if seconds > 0 else float("inf"),
    }
