"""Decode over the compressed KV cache: a few query tokens against K as a SparseCode and V dense.

Decode is bandwidth-bound: per key the kernel reads k values + k uint8 indices + Dv values of V,
(3k + 2Dv) bytes in bf16 instead of the dense 2(D + Dv). So:
  * split-KV: the cache length L is cut into chunks, one program per (batch, KV head, chunk), so
    even batch 1 fills the GPU; a second small kernel merges the chunks' partial softmaxes.
  * GQA: all query heads of one KV head (and all T query tokens) are rows of one program, so each
    cache byte is read once, not once per query head.
  * the scores gather the query (dense, top-k masked, L1/L2-resident, a few hundred bytes) at each
    key's k indices: score[r, j] = sum_u q~[r, idx[j, u]] * val[j, u]. No dense key is formed.
    With QUERY_COLUMNS the query arrives transposed, (D, ROWS) per KV head, so the ROWS values one code
    entry needs are adjacent: one vector load per entry instead of ROWS scattered ones (the gather's load
    count grows with the rows, which is what makes many-row programs slow).
  * decoupled codes (decoupled RoPE) add their always-kept leading dims as a plain dot product:
    score[r, j] += sum_{u < DENSE_DIMS} q[r, u] * k_dense[j, u] (2 * DENSE_DIMS more bytes per key).
  * P·V runs on the tensor cores (the query rows are padded to 16, the minimum dot size).
The same kernels are the dense decode step (`dense_decode_attention`, the dense baseline of long-context
generation): with no code (KSEL = 0) the whole key is the dense part, scored by one tensor-core dot per block,
and everything else (n_valid, GQA rows, causal alignment, split plan, combine) is shared. FlashDecoding and
FlashInfer's decode kernels split dense KV the same way.
Causal alignment: the T queries are the last T positions, so query t sees keys j <= L - T + t.
With `n_valid` (a device tensor, one count per sequence) only the first n_valid[b] of the L cached keys
exist: L is then a static cache's capacity, which fixes the grid, and splits past n_valid[b] exit at
once, so a decode step keeps one shape (for CUDA graphs) yet reads only the valid keys.
The cache tensors may be views with arbitrary batch/head/token strides (sfa/cache.py passes
`[:, :, :L]` slices of preallocated buffers); only the last dim must be contiguous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..backends import Capabilities, register_backend
from ..topk import SparseCode
from ._config import KERNEL_DTYPES, LOG2E, dot_precision, interpreting, kernel_can_run_on, next_pow2, num_sms
from .masked import masked_features
from .topk import MAX_DIM, fused_topk_sparsify

MAX_QUERY_ROWS = 64  # (query heads per KV head) x (query tokens) handled in one program
MAX_HEAD_DIM = 256  # D and Dv of dense keys: the widest key and value tiles one program holds
MAX_SPLITS = 1024  # bounds the partials buffer; the combine kernel streams them in COMBINE_BLOCK chunks
COMBINE_BLOCK = 128  # splits merged per loop step of the combine kernel


@triton.jit
def _replicate_rows(x, REP: tl.constexpr):
    """(R, C) -> (REP*R, C), row i of the result = row i % R of x. Pads the few real query rows up to
    the 16 rows tl.dot needs without computing anything for the padding."""
    if REP == 1:
        return x
    return tl.reshape(tl.broadcast_to(x[None, :, :], [REP, x.shape[0], x.shape[1]]), [REP * x.shape[0], x.shape[1]])


@triton.jit
def _decode_split_kernel(
    Q, Q_COLS, K_VAL, K_IDX, K_DENSE, V, O_PART, LSE_PART, N_VALID, stride_nb, stride_cbh,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kl,
    stride_ib, stride_ih, stride_il,
    stride_db, stride_dh, stride_dl,
    stride_vb, stride_vh, stride_vl,
    n_kv_heads, n_keys, n_queries, keys_per_split, n_splits, scale_log2,
    GROUP: tl.constexpr, ROWS: tl.constexpr, KSEL: tl.constexpr, KSEL_PAD: tl.constexpr,
    DENSE_DIMS: tl.constexpr, DENSE_PAD: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_L: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_N_VALID: tl.constexpr, QUERY_COLUMNS: tl.constexpr,
):
    # ROWS = real query rows (heads of this KV head x query tokens), padded to a power of two; the
    # score gather runs on these only. P·V runs on DOT_ROWS = max(16, ROWS) replicated rows.
    # KSEL == 0 is dense attention: K_DENSE holds whole keys (DENSE_DIMS = D) and the scores are a
    # tensor-core dot as well, so the softmax state holds DOT_ROWS rows from the start (the rows past the
    # real ones are zero queries, never stored) and P·V needs no replication (PV_REP = 1).
    # QUERY_COLUMNS: Q_COLS holds this KV head's query rows transposed, (D, ROWS) with zero padding rows
    # (stride_cbh apart per (batch, KV head)); the score gather reads it instead of Q.
    DOT_ROWS: tl.constexpr = 16 if ROWS < 16 else ROWS
    REP: tl.constexpr = DOT_ROWS // ROWS
    DENSE_KEYS: tl.constexpr = KSEL == 0
    PV_REP: tl.constexpr = 1 if DENSE_KEYS else REP
    STATE_ROWS: tl.constexpr = DOT_ROWS if DENSE_KEYS else ROWS
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // n_kv_heads
    h_kv = bh % n_kv_heads
    if HAS_N_VALID:  # keys past this sequence's count are not there (a static cache's free capacity)
        n_valid = tl.load(N_VALID + b * stride_nb).to(tl.int32)
    else:
        n_valid = n_keys

    rows = tl.arange(0, STATE_ROWS)
    row_ok = rows < GROUP * n_queries
    head = h_kv * GROUP + rows // n_queries  # query head of each row
    t = rows % n_queries
    q_base = Q + b.to(tl.int64) * stride_qb
    q_row_off = head * stride_qh + t * stride_qt
    last_visible = n_valid - n_queries + t  # causal: query t sees keys <= this

    sel = tl.arange(0, KSEL_PAD)
    sel_ok = sel < KSEL
    dv = tl.arange(0, DV_PAD)
    dv_ok = dv < DV
    k_val_base = K_VAL + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
    k_idx_base = K_IDX + b.to(tl.int64) * stride_ib + h_kv.to(tl.int64) * stride_ih
    v_base = V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
    q_cols_base = Q_COLS + bh.to(tl.int64) * stride_cbh
    if DENSE_DIMS > 0:  # the query rows' always-kept leading dims, loaded once
        dd = tl.arange(0, DENSE_PAD)
        dd_ok = dd < DENSE_DIMS
        q_dense = tl.load(q_base + q_row_off[:, None] + dd[None, :], mask=row_ok[:, None] & dd_ok[None, :], other=0.0)
        if KSEL > 0:  # dense keys keep the cache dtype: the tensor cores take it
            q_dense = q_dense.to(tl.float32)
        k_dense_base = K_DENSE + b.to(tl.int64) * stride_db + h_kv.to(tl.int64) * stride_dh

    m_i = tl.full([STATE_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([STATE_ROWS], tl.float32)
    acc = tl.zeros([DOT_ROWS, DV_PAD], tl.float32)

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_valid)
    for l0 in range(start, end, BLOCK_L):
        keys = l0 + tl.arange(0, BLOCK_L)
        key_ok = keys < end
        keys64 = keys.to(tl.int64)
        if DENSE_KEYS:
            k_dense = tl.load(
                k_dense_base + keys64[:, None] * stride_dl + dd[None, :], mask=key_ok[:, None] & dd_ok[None, :], other=0.0,
            )
            s = tl.dot(q_dense, tl.trans(k_dense), input_precision=DOT_PRECISION)  # (DOT_ROWS, BLOCK_L)
        else:
            code_ok = key_ok[:, None] & sel_ok[None, :]
            idx = tl.load(k_idx_base + keys64[:, None] * stride_il + sel[None, :], mask=code_ok, other=0).to(tl.int32)
            val = tl.load(k_val_base + keys64[:, None] * stride_kl + sel[None, :], mask=code_ok, other=0.0).to(tl.float32)
            # Gathered from L1 (the query rows are a few hundred bytes). Holding them in registers and using
            # tl.gather measured slower, and crashed Triton 3.6 for 2-row programs (docs/bench/notes_topk_decode.md).
            if QUERY_COLUMNS:  # the ROWS values of one entry are adjacent: one vector load, padding rows are 0
                q_at_idx = tl.load(
                    q_cols_base + (idx[None, :, :] * ROWS + rows[:, None, None]), mask=code_ok[None, :, :], other=0.0,
                ).to(tl.float32)
            else:
                q_at_idx = tl.load(
                    q_base + (q_row_off[:, None, None] + idx[None, :, :]),
                    mask=row_ok[:, None, None] & code_ok[None, :, :], other=0.0,
                ).to(tl.float32)
            s = tl.sum(q_at_idx * val[None, :, :], axis=2)  # (ROWS, BLOCK_L)
            if DENSE_DIMS > 0:
                k_dense = tl.load(
                    k_dense_base + keys64[:, None] * stride_dl + dd[None, :], mask=key_ok[:, None] & dd_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                s += tl.sum(q_dense[:, None, :] * k_dense[None, :, :], axis=2)
        s = s * scale_log2  # log2 units
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= last_visible[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys64[:, None] * stride_vl + dv[None, :], mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        alpha_rep = tl.reshape(_replicate_rows(alpha[:, None], PV_REP), [DOT_ROWS])
        acc = acc * alpha_rep[:, None] + tl.dot(_replicate_rows(p, PV_REP).to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # The PV_REP copies of each row are identical: average them back to ROWS rows (exact: PV_REP is 2^j).
    if PV_REP > 1:
        acc = tl.sum(tl.reshape(acc, [PV_REP, ROWS, DV_PAD]), axis=0) / PV_REP
    # Partials: normalised output and log2-sum-exp per (row, split); -inf marks "no visible key".
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    part_row = ((b * (n_kv_heads * GROUP) + head) * n_queries + t).to(tl.int64) * n_splits + split
    tl.store(LSE_PART + part_row, lse, mask=row_ok)
    tl.store(O_PART + part_row[:, None] * DV + dv[None, :], out, mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _combine_kernel(
    O_PART, LSE_PART, OUT, n_splits,
    DV: tl.constexpr, DV_PAD: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
):
    # One (batch, query head, query token) row. The splits' partials are merged SPLITS_BLOCK at a time with
    # a running max, so any split count fits in registers (holding all at once capped splits at 128).
    row = tl.program_id(0).to(tl.int64)
    dv = tl.arange(0, DV_PAD)
    dv_ok = dv < DV
    m = tl.max(tl.full([SPLITS_BLOCK], float("-inf"), tl.float32), axis=0)
    l = tl.sum(tl.zeros([SPLITS_BLOCK], tl.float32), axis=0)
    acc = tl.zeros([DV_PAD], tl.float32)
    for s0 in range(0, n_splits, SPLITS_BLOCK):
        s = s0 + tl.arange(0, SPLITS_BLOCK)
        s_ok = s < n_splits
        lse = tl.load(LSE_PART + row * n_splits + s, mask=s_ok, other=float("-inf"))  # -inf: no visible key
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # every split so far empty
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        part = tl.load(O_PART + (row * n_splits + s)[:, None] * DV + dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha + tl.sum(part * w[:, None], axis=0)
        l = l * alpha + tl.sum(w, axis=0)
        m = m_new
    out = acc / l  # every row sees key 0, so some split has a finite lse and l >= 1
    tl.store(OUT + row * DV + dv, out.to(OUT.dtype.element_ty), mask=dv_ok)


def _split_plan(batch_heads: int, n_keys: int, block_l: int, device: torch.device, programs_per_sm: int,
                split_cap: int, min_keys_per_split: int, min_programs_per_sm: int = 0):
    """(n_splits, keys_per_split): about `programs_per_sm` programs per SM, at most `split_cap` splits per
    (batch, KV head), chunks of at least `min_keys_per_split` keys and a multiple of the block. The chunk minimum
    never leaves fewer than `min_programs_per_sm` programs per SM (0: no floor): long chunks amortise a program's
    fixed cost (its first loads, its partials) where there are programs to spare, but not where they fill the GPU.

    More splits is not always faster: docs/bench/notes_topk_decode.md measured batch 1 at 128k slower
    with 264 splits than with 128, so the cap and the minimum chunk are launch parameters."""
    if interpreting():
        keys_per_split = 2 * block_l  # several splits even at tiny L, so the combine path is tested
    else:
        sms = num_sms(device)
        want = math.ceil(programs_per_sm * sms / batch_heads)
        by_length = n_keys // max(1, min_keys_per_split)
        by_length = max(by_length, math.ceil(min_programs_per_sm * sms / batch_heads))
        want = max(1, min(MAX_SPLITS, split_cap, want, by_length))
        keys_per_split = max(block_l, math.ceil(math.ceil(n_keys / want) / block_l) * block_l)
    return math.ceil(n_keys / keys_per_split), keys_per_split


# Launch config. GPU: chosen end to end, not by the kernel sweep alone. scripts/bench_decode.py's sweep on the H200
# ranks 3 stages first (with 2048-key chunks and a floor of 4 programs per SM, 5-12% faster than this plan at its
# one-query shapes: docs/bench/results/decode_2026-12-03_h200_f9afebb_split_floor/), yet in the compiled engine
# (scripts/bench_generate.py, Qwen3-0.6B, B = 4, 32k) that plan took 5.47 ms per step against this one's 4.99 in
# the same call, as 3 stages with 128 splits did the day before (4.92 vs 4.78): docs/inference.md, "Launch plan,
# second look".
# The interpreter's is small so the tests cover several splits, a partial block and several (and partial) chunks
# of the combine loop.
GPU_DECODE_CONFIG = dict(BLOCK_L=64, PROGRAMS_PER_SM=16, SPLIT_CAP=64, num_warps=4, num_stages=2)
# For programs of >= 16 query rows (e.g. 4 query heads per KV head x 4 tokens), where the gather is 4x wider.
# The transposed-query gather (QUERY_COLUMNS) measured 3.3x faster with this plan at 16 rows (16 query heads over
# 8 KV heads, 8 tokens: 0.41 against 1.35-1.40 ms at B = 8, 32k) and slower below 16 rows (2x at 2 rows, 1.5x at
# 8: docs/inference.md, "Many query rows"), so only this plan takes it.
GPU_DECODE_CONFIG_WIDE = dict(BLOCK_L=64, PROGRAMS_PER_SM=8, num_warps=4, num_stages=2, QUERY_COLUMNS=True)
# fp32 caches (e.g. fp32 weights under autocast): the 3-stage bf16 pipeline needs ~300 KB of shared memory
# for 4-byte elements, over the 227 KB a block may take on Hopper, so halve the tile and do not pipeline.
GPU_DECODE_CONFIG_FP32 = dict(BLOCK_L=32, PROGRAMS_PER_SM=8, num_warps=4, num_stages=1)
INTERPRETER_DECODE_CONFIG = dict(BLOCK_L=16, PROGRAMS_PER_SM=1, num_warps=4, num_stages=1, COMBINE_BLOCK=2)
# Dense keys (dense_decode_into): 2(D + Dv) bytes per key instead of 3k + 2Dv, so a block moves ~1.7x the bytes
# of SFA's at D = Dv = 128. Start from SFA's measured plans; `scripts/bench_decode.py --dense-sweep` measures
# the alternatives on the GPU.
GPU_DENSE_DECODE_CONFIG = dict(BLOCK_L=64, PROGRAMS_PER_SM=16, SPLIT_CAP=64, num_warps=4, num_stages=2)
GPU_DENSE_DECODE_CONFIG_WIDE = dict(BLOCK_L=64, PROGRAMS_PER_SM=8, num_warps=4, num_stages=2)
GPU_DENSE_DECODE_CONFIG_FP32 = dict(BLOCK_L=32, PROGRAMS_PER_SM=8, num_warps=4, num_stages=1)


def _launch_config(config: dict | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   narrow: dict, wide: dict, fp32: dict) -> dict:
    """A copy of the caller's config, else the interpreter's, else the GPU table that fits the step: `fp32` for
    4-byte caches, `wide` for programs of >= 16 query rows (query heads per KV head x query tokens)."""
    if config:
        return dict(config)
    if interpreting():
        return dict(INTERPRETER_DECODE_CONFIG)
    if v.element_size() > 2 or k.element_size() > 2:
        return dict(fp32)
    rows = next_pow2(q.shape[1] // k.shape[1] * q.shape[2])
    return dict(narrow if rows < 16 else wide)


def decode_into(
    q_masked: torch.Tensor, k_values: torch.Tensor, k_indices: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, *, scale: float, causal: bool, config: dict | None = None, k_dense: torch.Tensor | None = None,
    n_valid: torch.Tensor | None = None,
) -> None:
    """Launch both kernels. q_masked (B, Hq, T, D) dense top-k-masked queries; k_values/k_indices
    (B, Hkv, L, k); k_dense (B, Hkv, L, dense_dims) the keys' always-kept leading dims of a decoupled
    code, or None; v (B, Hkv, L, Dv); out (B, Hq, T, Dv) contiguous, written in place; n_valid (B,) or (1,)
    integer tensor: only the first n_valid[b] keys exist (in [T, L], not checked), or None: all L."""
    cfg = _launch_config(config, q_masked, k_values, v, GPU_DECODE_CONFIG, GPU_DECODE_CONFIG_WIDE, GPU_DECODE_CONFIG_FP32)
    _launch(q_masked, k_values, k_indices, k_dense, v, out, scale=scale, causal=causal, cfg=cfg, n_valid=n_valid)


def dense_decode_into(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, *, scale: float, causal: bool,
    config: dict | None = None, n_valid: torch.Tensor | None = None,
) -> None:
    """Dense attention through the same two kernels: q (B, Hq, T, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), out
    and n_valid as in decode_into. The split kernel's dense-key mode (no code, the whole key as its dense
    part) scores each block with one tensor-core dot."""
    cfg = _launch_config(config, q, k, v, GPU_DENSE_DECODE_CONFIG, GPU_DENSE_DECODE_CONFIG_WIDE,
                         GPU_DENSE_DECODE_CONFIG_FP32)
    _launch(q, None, None, k, v, out, scale=scale, causal=causal, cfg=cfg, n_valid=n_valid)


def _launch(q, k_values, k_indices, k_dense, v, out, *, scale: float, causal: bool, cfg: dict, n_valid) -> None:
    """Both kernels for sparse keys (k_values/k_indices, plus k_dense for a decoupled code) or dense keys
    (k_values None, k_dense the whole keys)."""
    b, hq, n_q, _ = q.shape
    hkv, n_keys = v.shape[1], v.shape[2]
    dv = v.shape[-1]
    group = hq // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    dense_keys = k_values is None
    ksel = 0 if dense_keys else k_values.shape[-1]
    if dense_keys:  # never read in the dense-key mode
        k_values = k_indices = k_dense
    block_l = cfg.pop("BLOCK_L")
    rows = next_pow2(group * n_q)
    query_columns = cfg.pop("QUERY_COLUMNS", False) and not dense_keys
    if query_columns:  # (B, Hkv, D, ROWS): this KV head's query rows as columns, zero past the real ones
        q_rows = q.reshape(b, hkv, group * n_q, q.shape[-1])
        q_cols = F.pad(q_rows, (0, 0, 0, rows - group * n_q)).transpose(2, 3).contiguous()
    else:
        q_cols = q  # never read
    combine_block = cfg.pop("COMBINE_BLOCK", COMBINE_BLOCK)
    n_splits, keys_per_split = _split_plan(
        b * hkv, n_keys, block_l, v.device, cfg.pop("PROGRAMS_PER_SM", 4), cfg.pop("SPLIT_CAP", 128),
        cfg.pop("MIN_KEYS_PER_SPLIT", 0), cfg.pop("MIN_PROGRAMS_PER_SM", 0),
    )
    o_part = torch.empty((b * hq * n_q * n_splits, dv), dtype=torch.float32, device=v.device)
    lse_part = torch.empty((b * hq * n_q * n_splits,), dtype=torch.float32, device=v.device)
    dv_pad = max(16, next_pow2(dv))
    dense_dims = 0 if k_dense is None else k_dense.shape[-1]
    # A dense key is a dot operand: its padded width must reach the 16 a tl.dot needs.
    dense_pad = max(16 if dense_keys else 2, next_pow2(dense_dims))
    dense_arg = k_values if k_dense is None else k_dense  # never read when DENSE_DIMS == 0
    n_valid_arg = lse_part if n_valid is None else n_valid  # never read without HAS_N_VALID
    n_valid_stride = 0 if n_valid is None or n_valid.shape[0] == 1 else n_valid.stride(0)
    _decode_split_kernel[(b * hkv, n_splits)](
        q, q_cols, k_values, k_indices, dense_arg, v, o_part, lse_part, n_valid_arg, n_valid_stride,
        q_cols.stride(1) if query_columns else 0,  # contiguous (B, Hkv, D, ROWS): one (batch, KV head) apart
        q.stride(0), q.stride(1), q.stride(2),
        k_values.stride(0), k_values.stride(1), k_values.stride(2),
        k_indices.stride(0), k_indices.stride(1), k_indices.stride(2),
        dense_arg.stride(0), dense_arg.stride(1), dense_arg.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        hkv, n_keys, n_q, keys_per_split, n_splits, scale * LOG2E.value,
        GROUP=group, ROWS=rows, KSEL=ksel, KSEL_PAD=next_pow2(ksel),
        DENSE_DIMS=dense_dims, DENSE_PAD=dense_pad,
        DV=dv, DV_PAD=dv_pad, BLOCK_L=block_l, CAUSAL=causal,
        DOT_PRECISION=dot_precision(v.dtype), HAS_N_VALID=n_valid is not None, QUERY_COLUMNS=query_columns,
        **cfg,
    )
    _combine_kernel[(b * hq * n_q,)](
        o_part, lse_part, out, n_splits, DV=dv, DV_PAD=dv_pad, SPLITS_BLOCK=combine_block,
    )


def _decode_attention(q_masked, k_values, k_indices, v, scale: float, causal: bool, k_dense=None,
                      n_valid=None) -> torch.Tensor:
    out = torch.empty((*q_masked.shape[:-1], v.shape[-1]), dtype=v.dtype, device=v.device)
    decode_into(q_masked, k_values, k_indices, v, out, scale=scale, causal=causal, k_dense=k_dense, n_valid=n_valid)
    return out


@torch.library.custom_op("sfa::decode_attention", mutates_args=())
def decode_attention_op(
    q_masked: torch.Tensor, k_values: torch.Tensor, k_indices: torch.Tensor, v: torch.Tensor,
    scale: float, causal: bool, k_dense: torch.Tensor | None = None, n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference only (no autograd formula): decode never trains."""
    return _decode_attention(q_masked, k_values, k_indices, v, scale, causal, k_dense, n_valid)


@decode_attention_op.register_fake
def _(q_masked, k_values, k_indices, v, scale, causal, k_dense=None, n_valid=None):
    return q_masked.new_empty((*q_masked.shape[:-1], v.shape[-1]), dtype=v.dtype)


def _dense_decode_attention(q, k, v, scale: float, causal: bool, n_valid=None) -> torch.Tensor:
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype, device=v.device)
    dense_decode_into(q, k, v, out, scale=scale, causal=causal, n_valid=n_valid)
    return out


@torch.library.custom_op("sfa::dense_decode_attention", mutates_args=())
def dense_decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, n_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inference only (no autograd formula), like sfa::decode_attention."""
    return _dense_decode_attention(q, k, v, scale, causal, n_valid)


@dense_decode_attention_op.register_fake
def _(q, k, v, scale, causal, n_valid=None):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


def dense_decode_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why dense_decode_attention cannot take these inputs, or None when it can: the kernel's limits, stated once
    (the models' static step asks this before choosing it over masked SDPA)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-d (B, H, T, D); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    b, hq, n_q, d = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[0] != b or v.shape[1:3] != k.shape[1:3] or k.shape[3] != d or hq % hkv:
        return (f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together: need q (B, Hq, T, D), "
                "k (B, Hkv, L, D), v (B, Hkv, L, Dv) with Hq a multiple of Hkv")
    if not q.dtype == k.dtype == v.dtype or v.dtype not in KERNEL_DTYPES:
        return f"q, k, v must share one dtype of {', '.join(map(str, KERNEL_DTYPES))}; got {q.dtype}, {k.dtype}, {v.dtype}"
    if (hq // hkv) * n_q > MAX_QUERY_ROWS:
        return (f"(query heads per KV head) x (queries) = {hq // hkv} x {n_q} exceeds {MAX_QUERY_ROWS}; use "
                "sfa.dense.dense_sdpa for prefill")
    if max(d, v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims D={d}, Dv={v.shape[-1]} must be <= {MAX_HEAD_DIM} (one program's key and value tiles)"
    if n_q > n_keys:
        return f"{n_q} queries but only {n_keys} keys: the queries are the last positions of the keys"
    if not (q.device == k.device == v.device and kernel_can_run_on(v)):
        return f"needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got devices {q.device}, {k.device}, {v.device}"
    return None


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                           scale: float | None = None, kv_length: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + causal) v for a few queries (the last T positions) over a KV cache, split across
    the SMs: the dense decode step. q (B, Hq, T, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv), any batch/head/token
    strides; kv_length (B,) or (1,) integer device tensor: only the first kv_length[b] keys exist (a static
    cache's capacity L, of which only the valid keys are read), or None: all L. scale defaults to 1/sqrt(D).
    Inference only."""
    reason = dense_decode_refusal(q, k, v)
    if reason is not None:
        raise ValueError(f"dense_decode_attention: {reason}")
    if kv_length is not None and (kv_length.dim() != 1 or kv_length.shape[0] not in (1, q.shape[0])
                                  or kv_length.dtype not in (torch.int32, torch.int64) or kv_length.device != v.device):
        raise ValueError(f"dense_decode_attention: kv_length must be an integer tensor of shape ({q.shape[0]},) or (1,) "
                         f"on {v.device}; got {kv_length.dtype} {tuple(kv_length.shape)} on {kv_length.device}")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if torch.compiler.is_compiling():
        return dense_decode_attention_op(q, k, v, scale, causal, kv_length)
    return _dense_decode_attention(q, k, v, scale, causal, kv_length)  # eager: skip the dispatcher, as below


def decode_sfa_attention(q, k, v, *, topk_q: int, topk_k: int, causal: bool = True, scale: float | None = None,
                         dense_dims: int = 0, kv_length: torch.Tensor | None = None):
    """The `decode` backend: few queries (Hq/Hkv x Nq <= 64 rows per KV head) against a compressed cache.

    k is normally a SparseCode (the cache); a dense k is sparsified first (a full pass over the keys,
    so only worth it when the same keys serve many steps -- `auto` never picks decode for dense k).
    """
    hq, n_q, d = q.shape[1], q.shape[2], q.shape[3]
    hkv = k.shape[1]
    if (hq // hkv) * n_q > MAX_QUERY_ROWS:
        raise ValueError(
            f"decode backend: (query heads per KV head) x (queries) = {hq // hkv} x {n_q} exceeds "
            f"{MAX_QUERY_ROWS}; use backend='masked' or 'flash' for prefill"
        )
    if d > MAX_DIM:
        raise ValueError(f"decode backend: head dim D={d} > {MAX_DIM} is not supported (uint8 indices)")
    if not kernel_can_run_on(v):
        raise ValueError(f"decode backend: needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {v.device}")
    if v.stride(-1) != 1:
        v = v.contiguous()
    code = k if isinstance(k, SparseCode) else fused_topk_sparsify(k, topk_k, dense_dims)
    values, indices, k_dense = code.values, code.indices, code.dense
    if values.stride(-1) != 1 or indices.stride(-1) != 1:
        values, indices = values.contiguous(), indices.contiguous()
    if k_dense is not None and k_dense.stride(-1) != 1:
        k_dense = k_dense.contiguous()
    q_masked = masked_features(q, topk_q, dense_dims).to(v.dtype)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if torch.compiler.is_compiling():
        return decode_attention_op(q_masked, values, indices, v, scale, causal, k_dense, kv_length)
    # Eager: skip the custom-op dispatcher (tens of microseconds a call, a visible share of a decode step).
    return _decode_attention(q_masked, values, indices, v, scale, causal, k_dense, kv_length)


# First choice of auto over a compressed cache: the only backend that reads the codes without expanding them,
# 1.23-1.27x faster than cuDNN dense decode at 32k-128k on the H200 (docs/benchmarks.md, docs/bench/topk_decode.md).
register_backend(
    "decode", decode_sfa_attention,
    Capabilities(devices=("cuda",), dtypes=KERNEL_DTYPES, max_head_dim=MAX_DIM, max_query_rows=MAX_QUERY_ROWS,
                 key_code_only=True, kv_length=True),
    priority=20,
)
