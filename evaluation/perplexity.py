"""Loss and perplexity of a model on a prepared split.

The split is read by data.loader.TokenLoader in its evaluation order (shuffle off): consecutive,
non-overlapping windows of seq_len + 1 tokens, the first `max_batches` batches or one full pass.
These are the windows train.py's validation loss reads, so the numbers agree with the training
curves at the same seq_len. The mean is over predicted tokens (a shorter last batch counts by its
size); perplexity = exp(mean loss). Each window's first token is context only, and a tail shorter
than one window is not read (docs/evaluation.md).
"""

from __future__ import annotations

import math
import time

import torch

from data.format import check_vocab
from data.loader import TokenLoader

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
    model.eval()
    total_loss, total_tokens, batches = 0.0, 0, 0
    started = time.perf_counter()
    for x, y in loader.iter_eval_batches(max_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            _, loss = model(x, targets=y)
        # The model's loss is the mean over its targets, i.e. the tokens not masked out (y = -1, data with a
        # loss mask such as NIAH's answer-only data); weighting by that count gives the token-weighted mean.
        targets = int((y != -1).sum())
        if targets:
            total_loss += float(loss) * targets
            total_tokens += targets
        batches += 1
        if progress is not None:
            progress(y.numel())
    seconds = time.perf_counter() - started
    mean = total_loss / total_tokens
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "tokens": total_tokens,
        "batches": batches,
        "split_tokens": loader.total_tokens,
        "seconds": seconds,
        "tokens_per_s": total_tokens / seconds if seconds > 0 else float("inf"),
    }
