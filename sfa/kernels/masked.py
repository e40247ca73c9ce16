"""The `masked` backend: fused top-k to masked dense q~, k~, then the fastest dense SDPA kernel.

Random top-k supports cover nearly all D within a tile (docs/design.md), so once q and k are masked the
best a kernel can do is dense tensor-core attention on q~, k~ -- which cuDNN/FlashAttention already
are. The top-k pass writes q~ and k~ once (the expansion happens per tensor, never per tile visit).
Backward is straight-through by construction: the top-k custom op sends dq~ (dk~) back to q (k) only
at the selected coordinates; SDPA's own backward gives dq~, dk~ and a dense dv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..reference import dense_attention
from ..topk import SparseCode, masked_rows
from .topk import fused_topk_masked

# Dense SDPA kernels in order of preference on CUDA; torch skips any that rejects the inputs (e.g.
# dtype, head dim, or GQA for a backend without it) and takes the next. cuDNN leads: fastest on
# Hopper (docs/bench/topk_decode.md "masked backend", docs/bench/results/topk_h200.json).
SDPA_PREFERENCE = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
# GQA: pass the grouped heads to SDPA (enable_gqa) instead of materialising repeated K/V heads.
# Set from the measurement in scripts/bench_topk.py (section "masked GQA"); see docs/kernels.md.
EXPAND_KV_HEADS_FOR_GQA = False


def _fused_masked(rows: torch.Tensor, topk: int) -> torch.Tensor:
    return fused_topk_masked(rows, topk)[1]


def masked_features(x: torch.Tensor | SparseCode, topk: int, dense_dims: int = 0) -> torch.Tensor:
    """Dense top-k-masked rows through the fused kernel (sfa.topk.masked_rows), differentiable
    straight-through; the first `dense_dims` coordinates are kept (x itself when nothing is dropped)."""
    return masked_rows(x, topk, dense_dims, tail_masked=_fused_masked)


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None) -> torch.Tensor:
    """Dense attention with the fastest SDPA kernel on CUDA; the reference's SDPA call elsewhere."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if not q.is_cuda:
        return dense_attention(q, k, v, causal=causal, scale=scale)
    group = q.shape[1] // k.shape[1]
    if group > 1 and EXPAND_KV_HEADS_FOR_GQA:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        group = 1
    if causal and n_q != n_k:
        # Queries at the end (a prefill chunk over a cache): bottom-right causal through FlashAttention's own
        # alignment, never an (Nq, Nk) mask in memory (gigabytes for a chunk of a long prompt).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n_q, n_k), scale=scale,
                                              enable_gqa=group > 1)
    with sdpa_kernel(SDPA_PREFERENCE, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=group > 1)


def masked_sfa_attention(q, k, v, *, topk_q: int, topk_k: int, causal: bool = True, scale: float | None = None,
                         dense_dims: int = 0):
    """The `masked` backend (arguments already checked by sfa.sfa_attention)."""
    q_masked = masked_features(q, topk_q, dense_dims)
    k_masked = masked_features(k, topk_k, dense_dims)
    return dense_sdpa(q_masked, k_masked, v, causal=causal, scale=scale)
