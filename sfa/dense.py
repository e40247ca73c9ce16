"""Dense attention for the fast paths: the models' dense (and short-baseline) attention and the last step
of the `masked` backend, which attends densely over the masked q̃, k̃.

The oracle is sfa.reference.dense_attention (heads repeated explicitly, no kernel choice); this is the same
function through the fastest SDPA kernel the inputs allow, with grouped heads passed as they are.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .reference import causal_mask

# Dense SDPA kernels in order of preference on CUDA; torch skips any that rejects the inputs (dtype, head
# dim, a mask, GQA) and takes the next. cuDNN leads: the fastest on Hopper, and it takes grouped heads
# (enable_gqa) without repeating K/V (docs/kernels.md "masked backend", docs/bench/results/topk_h200.json).
SDPA_PREFERENCE = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
               scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + causal) v. q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hq a
    multiple of Hkv (GQA); the queries are the last Nq positions of the keys. scale defaults to 1/sqrt(D)."""
    gqa = q.shape[1] != k.shape[1]
    n_q, n_k = q.shape[-2], k.shape[-2]
    if causal and n_q != n_k:
        # SDPA's is_causal aligns top-left; with fewer queries than keys they sit at the end (bottom-right).
        # A single query sees every key (no mask). On CUDA causal_lower_right runs the fused kernels' own
        # bottom-right alignment without an (Nq, Nk) mask in memory (gigabytes for a chunk of a long prompt);
        # elsewhere it would warn and build that mask anyway, so the mask is explicit there.
        if n_q == 1:
            mask = None
        elif q.is_cuda:
            mask = causal_lower_right(n_q, n_k)
        else:
            mask = causal_mask(n_q, n_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    kernels = sdpa_kernel(SDPA_PREFERENCE, set_priority=True) if q.is_cuda else contextlib.nullcontext()
    with kernels:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
