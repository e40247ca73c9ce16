"""Pieces the FlashSFA forward and dQ kernels share: loading one key/value block and the mask of the
(query, key) pairs it may score. Triton inlines @triton.jit helpers, so sharing them costs nothing."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_block(
    k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_n, n_k,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """The key block starting at start_n and its values. MASKED guards the sequence tail; otherwise only
    head dims padded up to a power of two need a mask (none when they already are one)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if MASKED:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(offs_n[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(offs_n[:, None] < n_k) & (offs_dv[None, :] < VALUE_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs + start_n * stride_kn)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        if BLOCK_DV == VALUE_DIM:
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_dv[None, :] < VALUE_DIM, other=0.0)
    return k, v


@triton.jit
def scored_pairs(offs_m, offs_n, n_k, causal_offset, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the pairs that take part: keys inside the sequence and, under causal,
    at or before the query's position (queries are the last rows: key j <= query i + causal_offset)."""
    allowed = offs_n[None, :] < n_k
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return allowed
