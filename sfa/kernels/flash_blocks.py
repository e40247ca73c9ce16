"""Pieces the FlashSFA kernels share: loading a block of rows from two row-aligned tensors (k and v in the
forward and dQ kernels, q and dO in the dK/dV kernel) and the mask of the (query, key) pairs a block may
score. Triton inlines @triton.jit helpers, so sharing them costs nothing."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_block_pair(
    a_ptrs, b_ptrs, stride_a, stride_b, start, offs, n_rows,
    MASKED: tl.constexpr, A_DIM: tl.constexpr, B_DIM: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Rows [start, start + block) of two row-aligned tensors (a: A_DIM wide, b: B_DIM wide). MASKED guards
    the sequence tail; otherwise only dims padded up to a power of two need a mask (none when they are one)."""
    offs_a = tl.arange(0, BLOCK_A)
    offs_b = tl.arange(0, BLOCK_B)
    if MASKED:
        a = tl.load(a_ptrs + start * stride_a, mask=(offs[:, None] < n_rows) & (offs_a[None, :] < A_DIM), other=0.0)
        b = tl.load(b_ptrs + start * stride_b, mask=(offs[:, None] < n_rows) & (offs_b[None, :] < B_DIM), other=0.0)
    else:
        if BLOCK_A == A_DIM:
            a = tl.load(a_ptrs + start * stride_a)
        else:
            a = tl.load(a_ptrs + start * stride_a, mask=offs_a[None, :] < A_DIM, other=0.0)
        if BLOCK_B == B_DIM:
            b = tl.load(b_ptrs + start * stride_b)
        else:
            b = tl.load(b_ptrs + start * stride_b, mask=offs_b[None, :] < B_DIM, other=0.0)
    return a, b


@triton.jit
def scored_pairs(offs_m, offs_n, n_k, causal_offset, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of the pairs that take part: keys inside the sequence and, under causal,
    at or before the query's position (queries are the last rows: key j <= query i + causal_offset)."""
    allowed = offs_n[None, :] < n_k
    if CAUSAL:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return allowed
