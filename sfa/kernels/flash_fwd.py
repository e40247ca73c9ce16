"""FlashSFA forward: FlashAttention-2-style tiled attention over top-k-masked q and k.

Why masked-dense tiles and not the codes themselves: random top-k supports cover nearly every
feature of a 64-key tile, so a tile's QKᵀ cannot shrink its tensor-core K dimension, and scoring on
CUDA cores measured 60-70x slower (docs/design.md "Kernel design notes"). The codes are expanded once
per tensor (the top-k pass) and this kernel runs QKᵀ and P·V on tensor cores.

One program owns BLOCK_M query rows of one (batch, query head) and streams the key/value blocks of
its kv head (GQA: kv head = query head // group). Softmax runs online in base 2 with the scale
folded into log2(e) (one exp2 per score). The log-sum-exp of every row (natural log, fp32) is saved
for the backward. Causal: key blocks wholly below the diagonal run without any masking; only the
blocks that cross the diagonal or the sequence end pay for the mask.

Queries are the last N_Q of N_K positions (decode / chunked prefill), so query row i sees keys
j <= i + (N_K - N_Q), as in sfa.reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._config import LOG2E
from .flash_blocks import load_block_pair, scored_pairs


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
    offs_m, offs_n_base, start_n, n_k, causal_offset, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block: scores, online-softmax update, P·V. MASKED adds the causal/tail masks."""
    offs_n = start_n + offs_n_base
    k, v = load_block_pair(k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_n, n_k,
                           MASKED, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASKED:
        s = tl.where(scored_pairs(offs_m, offs_n, n_k, causal_offset, CAUSAL), s, float("-inf"))
    # The scale is positive, so it commutes with max; applying it inside exp2's argument makes the
    # per-score work one fused multiply-add and one exp2.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    n_q_heads, group, n_q, n_k, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Causal work grows with the query block, so launch the longest rows first: the short ones then
    # fill the tail of the grid instead of one long block running alone at the end.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_q_heads
    head = pid_bh % n_q_heads
    kv_head = head // group

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_ptrs = K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Key blocks every row of this query block sees in full need no mask at all.
    if CAUSAL:
        full_end = ((start_m + causal_offset + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(n_k, start_m + BLOCK_M + causal_offset)
    else:
        full_end = (n_k // BLOCK_N) * BLOCK_N
        end = n_k
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, start_n, n_k, causal_offset,
            qk_scale, False, CAUSAL, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )
    # The diagonal and the sequence tail.
    for start_n in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, start_n, n_k, causal_offset,
            qk_scale, True, CAUSAL, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, DOT_PRECISION,
        )

    acc = acc / l_i[:, None]
    # Natural-log LSE of the *scaled* scores: m_i and log2(l_i) are in base 2.
    lse = (m_i + tl.math.log2(l_i)) / LOG2E
    row_ok = offs_m < n_q
    o_ptrs = O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < VALUE_DIM))
    tl.store(LSE + batch * stride_lb + head * stride_lh + offs_m * stride_lm, lse, mask=row_ok)
