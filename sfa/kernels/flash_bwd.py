"""FlashSFA backward: FlashAttention-2-style, atomics-free, over the same masked-dense q̃, k̃ tiles.

Three launches:
  1. preprocess: delta_i = rowsum(dO_i · O_i) (fp32), the softmax-backward correction term.
  2. dK/dV: one program per (key block, batch, kv head) walks every query block of every query head
     of its GQA group, so the group's sum happens in registers (no atomics, no second reduction).
  3. dQ: one program per (query block, batch, query head) walks the key blocks, like the forward.
P is recomputed from the saved LSE. Gradients here are with respect to the masked q̃ and k̃ (dense);
restricting them to the selected coordinates is the expansion's backward (sfa.kernels.flash).
Causal: query/key block pairs wholly on one side of the diagonal skip the mask, as in the forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._config import LOG2E
from .flash_blocks import load_block_pair, scored_pairs


@triton.jit
def flash_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_db, stride_dh, stride_dm,
    n_heads, n_q,
    VALUE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < n_q) & (offs_dv[None, :] < VALUE_DIM)
    o = tl.load(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + batch * stride_db + head * stride_dh + offs_m * stride_dm, tl.sum(o * do, 1), mask=offs_m < n_q)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom, stride_lm, stride_dm,
    start_m, offs_m_base, offs_n, n_q, causal_offset, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One query block's contribution to a key block's dK and dV (all transposed: keys on rows)."""
    offs_m = start_m + offs_m_base
    q, do = load_block_pair(q_ptrs, do_ptrs, stride_qm, stride_dom, start_m, offs_m, n_q,
                            MASKED, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV)
    if MASKED:
        row_ok = offs_m < n_q
        lse = tl.load(lse_ptrs + start_m * stride_lm, mask=row_ok, other=float("inf"))  # -> p = 0
        delta = tl.load(delta_ptrs + start_m * stride_dm, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_ptrs + start_m * stride_lm)
        delta = tl.load(delta_ptrs + start_m * stride_dm)
    # lse is natural-log; scores are taken in base 2 with qk_scale = scale * log2(e), so each score
    # costs one fused multiply-add and one exp2.
    lse2 = lse * LOG2E
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])
    if MASKED:
        allowed = offs_m[None, :] < n_q
        if CAUSAL:
            allowed = allowed & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
        p_t = tl.where(allowed, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_kv_heads, group, n_q, n_k, causal_offset, scale, qk_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_kv_heads
    kv_head = pid_bh % n_kv_heads

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < n_k
    k = tl.load(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn
                + offs_dv[None, :] * stride_vd, mask=key_ok[:, None] & (offs_dv[None, :] < VALUE_DIM), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query blocks [lo, n_q): under causal, the first query row that sees key start_n is start_n - offset;
    # from `full` on, every row of a query block sees every key of this block (no mask needed).
    n_q_floor = (n_q // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        unmasked_lo = tl.maximum(lo, tl.minimum(full, n_q_floor))
    else:
        lo = 0
        unmasked_lo = 0
    tail_lo = tl.maximum(unmasked_lo, n_q_floor)

    for g in range(0, group):
        head = kv_head * group + g
        q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        do_ptrs = DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod
        lse_ptrs = LSE + batch * stride_lb + head * stride_lh + offs_m * stride_lm
        delta_ptrs = DELTA + batch * stride_lb + head * stride_lh + offs_m * stride_lm
        for start_m in range(lo, unmasked_lo, BLOCK_M):  # blocks crossing the diagonal
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom, stride_lm,
                stride_lm, start_m, offs_m, offs_n, n_q, causal_offset, qk_scale,
                True, CAUSAL, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, DOT_PRECISION,
            )
        for start_m in range(unmasked_lo, n_q_floor, BLOCK_M):  # wholly visible, whole blocks
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom, stride_lm,
                stride_lm, start_m, offs_m, offs_n, n_q, causal_offset, qk_scale,
                False, CAUSAL, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, DOT_PRECISION,
            )
        for start_m in range(tail_lo, n_q, BLOCK_M):  # the partial last query block
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, stride_qm, stride_dom, stride_lm,
                stride_lm, start_m, offs_m, offs_n, n_q, causal_offset, qk_scale,
                True, CAUSAL, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, DOT_PRECISION,
            )

    dk = dk * scale
    tl.store(DK + batch * stride_dkb + kv_head * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + batch * stride_dvb + kv_head * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dv[None, :] < VALUE_DIM))


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
    offs_m, offs_n_base, start_n, n_k, causal_offset, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_n = start_n + offs_n_base
    k, v = load_block_pair(k_ptrs, v_ptrs, stride_kn, stride_vn, start_n, offs_n, n_k,
                           MASKED, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(scored_pairs(offs_m, offs_n, n_k, causal_offset, CAUSAL), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_q_heads, group, n_q, n_k, causal_offset, scale, qk_scale,
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
    row_ok = offs_m < n_q
    q = tl.load(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=row_ok[:, None] & (offs_dv[None, :] < VALUE_DIM), other=0.0)
    row_stats = batch * stride_lb + head * stride_lh + offs_m * stride_lm
    lse2 = tl.load(LSE + row_stats, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + row_stats, mask=row_ok, other=0.0)
    k_ptrs = K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        full_end = ((start_m + causal_offset + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(n_k, start_m + BLOCK_M + causal_offset)
    else:
        full_end = (n_k // BLOCK_N) * BLOCK_N
        end = n_k
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, start_n, n_k,
                       causal_offset, qk_scale, False, CAUSAL, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, DOT_PRECISION)
    for start_n in range(full_end, end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, start_n, n_k,
                       causal_offset, qk_scale, True, CAUSAL, HEAD_DIM, VALUE_DIM, BLOCK_D, BLOCK_DV, DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
