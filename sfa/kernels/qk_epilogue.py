"""Fused QK epilogue: per (token, head) row, RMSNorm -> RoPE -> (optionally) top-k mask, in one pass.

A Qwen3-style model normalises q and k per head (RMSNorm with a weight), rotates them (RoPE, "rotate half"
layout: dims i and i + R/2 of the first R dims form a pair) and, under SFA's `masked` backend, keeps the
top-k |value| coordinates of each row (the first `dense_dims` always kept). Eager PyTorch runs each of
those steps as its own elementwise kernel, plus the separate top-k pass writing masked copies q~, k~. This
kernel reads the projection rows once and writes the rows attention scores with (masked or not) once.

Selection: on the output rows as rounded to the output dtype, with the packed-key trick and tie rule of
sfa/kernels/topk.py (larger |value| first, then the lower column), so the kept coordinates are exactly
`sfa.topk_sparsify`'s on the unfused path's rows when both round the same values.

Backward (straight-through, exact): the forward records its selection as a bitmask (one bit per column,
D/8 bytes per row: 16 at D = 128, a sixteenth of a 16-bit row's 2·D) and the backward applies that record.
Recomputing the mask from x instead would cost no memory, but a separately compiled kernel may round an entry
one 16-bit ulp differently and resolve a near tie the other way, putting gradient on a coordinate the forward
dropped. The output gradient is zeroed off the mask, then pulled back through RoPE (the transpose of the
rotation) and RMSNorm; the norm weight's gradient is reduced in fp32 from one partial row per program.

Layout: x (B, T, H, D), any strides with the last one 1 (e.g. a view of the projection's output);
cos/sin (T, R) (RotaryEmbedding's cached tables, any float dtype); output (B, T, H, D) contiguous. Every
step computes in fp32. Reference: models/qwen3.py (RMSNorm, apply_rope) followed by sfa.topk.masked_rows;
tests/test_kernels_qk_epilogue.py compares against it in fp64.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._config import KERNEL_DTYPES, interpreting, kernel_can_run_on, next_pow2, num_sms
from .topk import MAX_DIM, keep_top_k


@triton.jit
def _rows(rows, cols, n_rows, T, H, D: tl.constexpr, R: tl.constexpr):
    """Masks, (batch, position, head) of each row (rows run over B, T, H in that order), and the RoPE
    partner column of each column (i <-> i + R/2 below R, itself past R)."""
    row_ok = rows < n_rows
    col_ok = cols < D
    rows64 = rows.to(tl.int64)
    h = rows64 % H
    t = (rows64 // H) % T
    b = rows64 // (H * T)
    half = R // 2
    partner = tl.where(cols < half, cols + half, tl.where(cols < R, cols - half, cols))
    return row_ok, col_ok, rows64, b, t, h, partner


@triton.jit
def _normed_rotated(X, W, COS, SIN, base, t, cols, partner, row_ok, col_ok, s_cos, eps,
                    D: tl.constexpr, R: tl.constexpr):
    """fp32 (n = x / rms(x), z = RoPE(n * w)) of a block of rows, and what the backward needs of them."""
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    n = x * r[:, None]
    if R > 0:
        xp = tl.load(X + base[:, None] + partner[None, :], mask=ok, other=0.0).to(tl.float32)
        wp = tl.load(W + partner, mask=col_ok, other=0.0).to(tl.float32)
        rot = row_ok[:, None] & (cols < R)[None, :]
        trig = t[:, None] * s_cos + cols[None, :]
        c = tl.load(COS + trig, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(SIN + trig, mask=rot, other=0.0).to(tl.float32)
        ss = tl.where((cols < R // 2)[None, :], -s, s)  # rotate_half: (-x2, x1)
        z = n * w[None, :] * c + ss * (xp * r[:, None] * wp[None, :])
    else:
        z = n * w[None, :]
    return x, r, n, w, z


@triton.jit
def _keep(zo, cols, col_ok, D: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, DENSE: tl.constexpr,
          KEY64: tl.constexpr):
    """The top-k mask of rows zo (already in the output dtype) past the first DENSE columns, which are kept:
    sfa/kernels/topk.py's selection, so ties go to the lower column exactly as there."""
    return keep_top_k(zo, cols, col_ok & (cols >= DENSE), D, K, K_PAD, KEY64) | (cols < DENSE)[None, :]


@triton.jit
def _store_bits(BITS, keep, rows64, row_ok, NB: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """keep (BLOCK_R, D_PAD) as NB bytes per row: bit j of byte c is column 8c + j."""
    weights = 1 << (tl.arange(0, D_PAD) % 8)
    packed = tl.sum(tl.reshape(tl.where(keep, weights[None, :], 0), (BLOCK_R, D_PAD // 8, 8)), axis=2)
    byte_cols = tl.arange(0, D_PAD // 8)
    tl.store(BITS + rows64[:, None] * NB + byte_cols[None, :], packed.to(tl.uint8),
             mask=row_ok[:, None] & (byte_cols < NB)[None, :])


@triton.jit
def _load_bits(BITS, rows64, at_cols, ok, NB: tl.constexpr):
    """The recorded keep mask at columns at_cols (BLOCK_R, D_PAD) of each row."""
    byte = tl.load(BITS + rows64[:, None] * NB + (at_cols // 8)[None, :], mask=ok, other=0).to(tl.int32)
    return ((byte >> (at_cols % 8)[None, :]) & 1) != 0


@triton.jit
def _fwd_kernel(
    X, W, COS, SIN, OUT, BITS, n_rows, T, H, sx_b, sx_t, sx_h, s_cos, eps,
    D: tl.constexpr, D_PAD: tl.constexpr, R: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    DENSE: tl.constexpr, KEY64: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    row_ok, col_ok, rows64, b, t, h, partner = _rows(rows, cols, n_rows, T, H, D, R)
    base = b * sx_b + t * sx_t + h * sx_h
    _, _, _, _, z = _normed_rotated(X, W, COS, SIN, base, t, cols, partner, row_ok, col_ok, s_cos, eps, D, R)
    zo = z.to(OUT.dtype.element_ty)
    if K > 0:
        keep = _keep(zo, cols, col_ok, D, K, K_PAD, DENSE, KEY64)
        zo = tl.where(keep, zo, 0.0)
        _store_bits(BITS, keep, rows64, row_ok, NB, D_PAD, BLOCK_R)
    tl.store(OUT + rows64[:, None] * D + cols[None, :], zo, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_kernel(
    X, W, COS, SIN, BITS, GO, GX, GW_PART, n_rows, T, H, sx_b, sx_t, sx_h, sg_b, sg_t, sg_h, s_cos, eps,
    D: tl.constexpr, D_PAD: tl.constexpr, R: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    DENSE: tl.constexpr, KEY64: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, D_PAD)
    dw = tl.zeros([D_PAD], dtype=tl.float32)
    for start in range(pid * BLOCK_R, n_rows, n_programs * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok, col_ok, rows64, b, t, h, partner = _rows(rows, cols, n_rows, T, H, D, R)
        ok = row_ok[:, None] & col_ok[None, :]
        base = b * sx_b + t * sx_t + h * sx_h
        x, r, n, w, z = _normed_rotated(X, W, COS, SIN, base, t, cols, partner, row_ok, col_ok, s_cos, eps, D, R)
        g_base = b * sg_b + t * sg_t + h * sg_h
        gz = tl.load(GO + g_base[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if K > 0:  # straight-through: the gradient passes at the coordinates the forward kept only
            gz = tl.where(_load_bits(BITS, rows64, cols, ok, NB), gz, 0.0)
        if R > 0:
            # The transpose of the rotation: gy_j = gz_j c_j + ss_p gz_p (p the partner of j, ss the signed
            # sine). gz_p is loaded again at the partner columns, masked by the record at those columns.
            rot = row_ok[:, None] & (cols < R)[None, :]
            trig = t[:, None] * s_cos + cols[None, :]
            trig_p = t[:, None] * s_cos + partner[None, :]
            c = tl.load(COS + trig, mask=rot, other=1.0).to(tl.float32)
            sp = tl.load(SIN + trig_p, mask=rot, other=0.0).to(tl.float32)
            ssp = tl.where((cols < R // 2)[None, :], sp, -sp)  # the partner's signed sine
            gzp = tl.load(GO + g_base[:, None] + partner[None, :], mask=ok, other=0.0).to(tl.float32)
            if K > 0:
                gzp = tl.where(_load_bits(BITS, rows64, partner, ok, NB), gzp, 0.0)
            gy = gz * c + ssp * gzp
        else:
            gy = gz
        dw += tl.sum(gy * n, axis=0)
        gn = gy * w[None, :]
        gx = r[:, None] * (gn - n * (tl.sum(gn * n, axis=1) / D)[:, None])
        tl.store(GX + rows64[:, None] * D + cols[None, :], gx.to(GX.dtype.element_ty), mask=ok)
    tl.store(GW_PART + pid * D + cols, dw, mask=cols < D)


# Rows per program on the GPU; the interpreter pays per op, not per element, so it takes one big block.
_GPU_CONFIGS = [triton.Config({"BLOCK_R": br}, num_warps=w) for br, w in ((4, 4), (8, 4), (16, 4), (16, 8), (32, 8))]
_INTERPRETER_BLOCK_R = 16
_BWD_PROGRAMS_PER_SM = 4  # the backward loops over rows: a fixed grid, so few weight-gradient partials
_tuned = {}


def _launch(kernel, grid_rows, *args, **meta):
    if interpreting():
        grid = (grid_rows(_INTERPRETER_BLOCK_R),)
        kernel[grid](*args, BLOCK_R=_INTERPRETER_BLOCK_R, **meta)
        return
    if kernel not in _tuned:
        _tuned[kernel] = triton.autotune(_GPU_CONFIGS, key=["D_PAD", "R", "K_PAD", "DENSE", "KEY64"])(kernel)
    grid = lambda cfg: (grid_rows(cfg["BLOCK_R"]),)  # noqa: E731
    _tuned[kernel][grid](*args, **meta)


def selection_bytes(d: int) -> int:
    """Bytes per row of the forward's recorded selection (one bit per column)."""
    return triton.cdiv(d, 8)


def _meta(d: int, rotary_dims: int, topk: int, dense_dims: int, out_dtype: torch.dtype) -> dict:
    # D_PAD >= 8: the selection is packed eight columns to a byte
    return dict(D=d, D_PAD=max(8, next_pow2(d)), R=rotary_dims, K=topk, K_PAD=max(1, next_pow2(topk)),
                DENSE=dense_dims, KEY64=out_dtype == torch.float32, NB=selection_bytes(d))


def _new_selection(x: torch.Tensor, topk: int) -> torch.Tensor:
    """(B, T, H, D/8) uint8 for the forward to record its top-k in; empty without top-k (nothing to record)."""
    b, t, h, d = x.shape
    return torch.empty((b, t, h, selection_bytes(d) if topk else 0), dtype=torch.uint8, device=x.device)


def _tables(x: torch.Tensor, cos, sin):
    """The cos/sin pointers and row stride (x itself stands in when there is no RoPE: never read)."""
    if cos is None:
        return x, x, 0, 0
    cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0), cos.shape[-1]


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels step rows by strides but read each row as D consecutive elements (a cotangent may come
    expanded, with stride 0)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x, weight, cos, sin, eps: float, topk: int, dense_dims: int, out_dtype: torch.dtype):
    x = _unit_last_stride(x)
    b, t, h, d = x.shape
    out = torch.empty((b, t, h, d), dtype=out_dtype, device=x.device)
    selection = _new_selection(x, topk)
    n_rows = b * t * h
    if n_rows == 0:
        return out, selection
    cos, sin, s_cos, rotary = _tables(x, cos, sin)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch(_fwd_kernel, lambda br: triton.cdiv(n_rows, br),
                x, weight, cos, sin, out, selection if topk else out, n_rows, t, h, x.stride(0), x.stride(1),
                x.stride(2), s_cos, eps, **_meta(d, rotary, topk, dense_dims, out_dtype))
    return out, selection


def _backward(grad, x, weight, cos, sin, selection, eps: float, topk: int, dense_dims: int):
    x, grad = _unit_last_stride(x), _unit_last_stride(grad)
    if topk and selection.shape != (*x.shape[:-1], selection_bytes(x.shape[-1])):
        raise ValueError(f"qk_norm_rope backward: the recorded selection has shape {tuple(selection.shape)}, "
                         f"expected {(*x.shape[:-1], selection_bytes(x.shape[-1]))} (the forward's)")
    b, t, h, d = x.shape
    gx = torch.empty((b, t, h, d), dtype=x.dtype, device=x.device)
    n_rows = b * t * h
    if n_rows == 0:
        return gx, torch.zeros_like(weight)
    cos, sin, s_cos, rotary = _tables(x, cos, sin)
    programs = min(num_sms(x.device) * _BWD_PROGRAMS_PER_SM, triton.cdiv(n_rows, 4))
    partials = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch(_bwd_kernel, lambda br: programs,
                x, weight, cos, sin, selection.contiguous() if topk else x, grad, gx, partials, n_rows, t, h,
                x.stride(0), x.stride(1), x.stride(2), grad.stride(0), grad.stride(1), grad.stride(2), s_cos, eps,
                **_meta(d, rotary, topk, dense_dims, grad.dtype))
    return gx, partials.sum(0).to(weight.dtype)


# ---- custom ops: opaque to torch.compile, with fake kernels and the backward as an op of its own.
# Not yet kernel_op (sfa/kernels/_config.py) like the top-k: inductor's recompiling of these kernels as user
# kernels has not run on a GPU (the flash kernels' failed there, likely on `eps`'s kind of argument: a Python
# float, which inductor passes as fp64), and tests/test_kernels_qk_epilogue.py's compiled GPU test should decide.


@torch.library.custom_op("sfa::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                    eps: float, topk: int, dense_dims: int, out_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows and the recorded selection (see _new_selection)."""
    return _forward(x, weight, cos, sin, eps, topk, dense_dims, out_dtype)


@qk_norm_rope_op.register_fake
def _(x, weight, cos, sin, eps, topk, dense_dims, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), _new_selection(x, topk)


@torch.library.custom_op("sfa::qk_norm_rope_bwd", mutates_args=())
def qk_norm_rope_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None,
                        sin: torch.Tensor | None, selection: torch.Tensor, eps: float, topk: int, dense_dims: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(grad, x, weight, cos, sin, selection, eps, topk, dense_dims)


@qk_norm_rope_bwd_op.register_fake
def _(grad, x, weight, cos, sin, selection, eps, topk, dense_dims):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, cos, sin, eps, topk, dense_dims, out_dtype = inputs
    ctx.save_for_backward(x, weight, cos, sin, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.eps, ctx.topk, ctx.dense_dims, ctx.out_dtype = eps, topk, dense_dims, out_dtype


def _backward_rule(ctx, grad, _grad_selection):
    x, weight, cos, sin, selection = ctx.saved_tensors
    gx, gw = torch.ops.sfa.qk_norm_rope_bwd(grad.to(ctx.out_dtype), x, weight, cos, sin, selection, ctx.eps,
                                            ctx.topk, ctx.dense_dims)
    return gx, gw, None, None, None, None, None, None


qk_norm_rope_op.register_autograd(_backward_rule, setup_context=_setup_context)


# ---- public API


def kernel_supports(x: torch.Tensor) -> bool:
    """Whether the fused epilogue takes rows like x (CUDA, or CPU under the interpreter; fp16/bf16/fp32;
    D <= 256, the fused top-k's limit); callers keep the unfused ops otherwise."""
    return x.dtype in KERNEL_DTYPES and 1 <= x.shape[-1] <= MAX_DIM and kernel_can_run_on(x)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor | None = None,
                 sin: torch.Tensor | None = None, *, topk: int | None = None, dense_dims: int = 0,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RoPE(RMSNorm(x) * weight) on the first cos.shape[-1] dims of each row (none without cos), then, with
    `topk`, the row with all but its first `dense_dims` and its top-k |value| other coordinates zeroed.

    x (B, T, H, D) (any strides; a last one other than 1 costs a copy); weight (D,); cos, sin (T, R), R even, R <= D. Returns (B, T, H, D)
    contiguous in `out_dtype` (default x's). Differentiable in x and weight (straight-through the mask)."""
    fn = "qk_norm_rope"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{fn}: x must be a (B, T, H, D) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not kernel_supports(x):
        raise ValueError(f"{fn}: x {x.dtype} on {x.device} with D={x.shape[-1]} needs CUDA (or TRITON_INTERPRET=1 "
                         f"on CPU), a dtype in {KERNEL_DTYPES} and D <= {MAX_DIM}; use the unfused ops otherwise")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"{fn}: weight has shape {tuple(weight.shape)}, expected ({d},) (the head dim of x)")
    if (cos is None) != (sin is None):
        raise ValueError(f"{fn}: give cos and sin together (or neither, for no RoPE)")
    if cos is not None:
        if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != x.shape[1]:
            raise ValueError(f"{fn}: cos/sin must be (T={x.shape[1]}, R), got {tuple(cos.shape)} and {tuple(sin.shape)}")
        rotary = cos.shape[-1]
        if rotary % 2 or not 2 <= rotary <= d:
            raise ValueError(f"{fn}: the rotary width R={rotary} must be even and in [2, D={d}]")
    if not isinstance(dense_dims, int) or not 0 <= dense_dims < d:
        raise ValueError(f"{fn}: dense_dims={dense_dims!r} must be an int in [0, {d - 1}]")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= d - dense_dims):
        raise ValueError(f"{fn}: topk={topk!r} must be None or an int in [1, D - dense_dims = {d - dense_dims}]")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"{fn}: out_dtype={out_dtype} must be one of {KERNEL_DTYPES}")
    # Keeping every coordinate past dense_dims is no mask at all (as sfa.topk.masked_rows returns x itself).
    k = 0 if topk is None or dense_dims + topk == d else topk
    return qk_norm_rope_op(x, weight, cos, sin, float(eps), k, dense_dims if k else 0, out_dtype)[0]
