"""The SFA oracle: plain PyTorch, runs everywhere, defines what every backend must compute.

SFA(q, k, v) is *defined* as dense attention on top-k-masked q and k:
    softmax(mask(q) · mask(k)^T · scale + causal) · v,   scale = 1/sqrt(D) (the full head dim).
With `dense_dims` > 0 (decoupled RoPE) the mask also keeps the first dense_dims coordinates of every
row, so a score is q_r·k_r + q̃_s·k̃_s: a dense (rotary) part plus the SFA overlap of the rest.
A query/key pair with no shared active coordinate scores exactly 0 (it still takes part in the
softmax). Gradients reach q and k only at their selected coordinates (the mask is held fixed);
v gets a dense gradient. Called on fp32 inputs this is the fp32 reference the kernel tests use.

Causal alignment when there are fewer queries than keys (decode, chunked prefill): the queries are
the *last* Nq positions, so query i sees keys j <= i + (Nk - Nq) (as in FlashAttention).

`kv_length` (a device tensor, (B,) or (1,)): only the first kv_length[b] positions of k and v exist, the
rest of a preallocated cache is ignored, and the queries are the last Nq of those positions. It lets a
decode step over a static cache keep one shape at every step (for CUDA graphs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .topk import SparseCode, masked_rows


def causal_mask(n_queries: int, n_keys: int, device) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where a query may attend; queries are the last Nq positions."""
    offset = n_keys - n_queries
    q_pos = torch.arange(n_queries, device=device)[:, None] + offset
    k_pos = torch.arange(n_keys, device=device)[None, :]
    return k_pos <= q_pos


def length_mask(kv_length: torch.Tensor, n_queries: int, n_keys: int, causal: bool) -> torch.Tensor:
    """Boolean (B or 1, 1, Nq, Nk) mask, True where a query may attend when only the first kv_length[b]
    keys exist and the queries are the last Nq of them."""
    length = kv_length.reshape(-1, 1, 1, 1)
    keys = torch.arange(n_keys, device=kv_length.device)
    if not causal:
        return keys < length
    last_visible = length - n_queries + torch.arange(n_queries, device=kv_length.device)[:, None]
    return keys <= last_visible


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    kv_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention through SDPA with GQA by head repetition. q (B,Hq,Nq,D), k/v (B,Hkv,Nk,·)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    n_q, n_k = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if kv_length is not None:
        mask = length_mask(kv_length, n_q, n_k, causal)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if causal and n_q != n_k:
        mask = causal_mask(n_q, n_k, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def attention_math(q, k, v, *, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """The same function written out (scores, mask, softmax, P·V) in the inputs' dtype; used to check
    that the SDPA path above computes exactly the definition (e.g. in float64)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def sfa_attention_reference(
    q: torch.Tensor | SparseCode,
    k: torch.Tensor | SparseCode,
    v: torch.Tensor,
    *,
    topk_q: int,
    topk_k: int,
    causal: bool = True,
    scale: float | None = None,
    dense_dims: int = 0,
    kv_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference backend (arguments already validated by sfa.ops.sfa_attention)."""
    q_masked = masked_rows(q, topk_q, dense_dims)
    k_masked = masked_rows(k, topk_k, dense_dims)
    return dense_attention(q_masked, k_masked, v, causal=causal, scale=scale, kv_length=kv_length)
