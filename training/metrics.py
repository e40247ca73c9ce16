"""Per-run cost figures (FLOPs per token, KV-cache bytes) and per-step measurements (MFU, peak memory).

Formulas live in docs/metrics.md; the attention terms come from sfa.flops.
"""

from __future__ import annotations

import math
import resource
import sys

import torch
from torch import nn

from sfa.flops import attention_forward_flops_per_token, training_flops_per_token


def matmul_params(model: nn.Module) -> int:
    """Weights that take part in a matmul once per token: every nn.Linear weight, counted per module.

    Counting per module (not per unique parameter) counts a tied LM head as the matmul it executes,
    while the embedding lookups (no FLOPs) are left out. Biases and norms are negligible and left out.
    """
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(model: nn.Module, seq_len: int) -> dict[str, float]:
    """Executed and dense-equivalent training FLOPs per token for `model` on sequences of `seq_len`.

    The dense-equivalent figure is the same model with dense scores (topk = head dim); for dense and
    short-embedding attention both figures are equal.
    """
    dims = model.attention_flops_dims()
    common = dict(
        n_layer=dims["n_layer"], n_head=dims["n_head"], head_dim=dims["head_dim"],
        v_head_dim=dims["v_head_dim"], seq_len=seq_len,
    )
    executed_attn = attention_forward_flops_per_token(
        **common, topk_q=dims.get("topk_q"), topk_k=dims.get("topk_k"), dense_dims=dims.get("dense_dims", 0)
    )
    dense_attn = attention_forward_flops_per_token(**common)
    n = matmul_params(model)
    return {
        "matmul_params": n,
        "flops_per_token": training_flops_per_token(n, executed_attn),
        "dense_equiv_flops_per_token": training_flops_per_token(n, dense_attn),
    }


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_total: float | None) -> float | None:
    """Model FLOP utilisation: executed FLOP/s over the peak of all devices; None without a peak."""
    if not peak_flops_total or not math.isfinite(tokens_per_s):
        return None
    return flops_per_token * tokens_per_s / peak_flops_total


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory since the last reset; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes
