"""Fused top-k: dense rows in, SparseCode (and optionally the masked dense rows) out, in one pass.

Selection trick (docs/design.md "Kernel design notes"): |x|'s float bits are monotone in |x|, so packing
them above the column number gives one integer key per entry whose order is "larger magnitude first,
then lower column first" -- the low bits hold (D-1-col), so the lower column compares larger and
wins ties, exactly as `sfa.topk_sparsify` (stable sort) decides. `tl.topk` on the keys returns them
sorted descending; the k-th key is the threshold. Every entry at or above it is kept, and its slot in
the ascending index list is its running count along the row (a cumsum), so the code is written with
one scatter-store per row and no sort of the columns or gather of the values is needed.

Keys are int32 for fp16/bf16 (15 magnitude bits + 8 column bits) and int64 for fp32 (31 + 8), so the
selection is bit-exact in every dtype. Rows of any length D <= 256 are handled by padding the row to
a power of two with keys of -1 (never selected). Anything else falls back to `sfa.topk_sparsify`.

Layout: rows are addressed through up to three leading dims by each tensor's own strides, so x may be a view
of the projection it came from (e.g. q of shape (B, H, T, D) transposed out of a (B, T, 3 H D) output) and is
never copied first. The masked rows, and the selection record below, are written in x's memory order (the
same view into fresh memory), so what attention reads and what backward writes back into the projection's
gradient stays in the layout the projection has. The code (values, indices) is contiguous in logical order.

Backward (straight-through, exact): the masked op records its selection as one bit per column (D/8 bytes a
row, as sfa/kernels/qk_epilogue.py does); one kernel then writes dx = the masked rows' gradient at the kept
columns (plus the values' gradient at each kept column's slot), zero elsewhere, in x's memory order.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..topk import (SparseCode, check_dense_dims, index_dtype_for, register_topk_sparsify, topk_sparsify,
                    with_dense_prefix)
from ._config import KERNEL_DTYPES, interpreting, kernel_can_run_on, next_pow2

MAX_DIM = 256  # column numbers must fit the 8 low bits of the key and a uint8 index


@triton.jit
def keep_top_k(x, cols, selectable, D: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, KEY64: tl.constexpr):
    """The one tie rule of every fused selection: a (rows, D_PAD) mask of the K largest |x| among the
    `selectable` columns of each row, ties to the lower column (the packed keys of this module's docstring).
    x is in the dtype the selection is made in (fp32 keys are int64, 16-bit ones int32)."""
    if KEY64:
        magnitude = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
        tie_break = (D - 1 - cols).to(tl.int64)
        above_all = 0x7FFFFFFFFFFFFFFF
    else:
        magnitude = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
        tie_break = D - 1 - cols
        above_all = 0x7FFFFFFF
    key = (magnitude << 8) | tie_break[None, :]
    key = tl.where(selectable[None, :], key, -1)  # -1: below every key, never selected
    top = tl.topk(key, K_PAD)  # (rows, K_PAD), descending
    if K_PAD != K:
        top = tl.where(tl.arange(0, K_PAD)[None, :] < K, top, above_all)
    kth_key = tl.min(top, axis=1)  # keys are distinct within a row, so exactly K entries are >= it
    return key >= kth_key[:, None]


@triton.jit
def store_selection_bits(BITS, keep, row_base, row_ok, NB: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """keep (BLOCK_R, D_PAD) as NB bytes per row from BITS + row_base: bit j of byte c is column 8c + j."""
    weights = 1 << (tl.arange(0, D_PAD) % 8)
    packed = tl.sum(tl.reshape(tl.where(keep, weights[None, :], 0), (BLOCK_R, D_PAD // 8, 8)), axis=2)
    byte_cols = tl.arange(0, D_PAD // 8)
    tl.store(BITS + row_base[:, None] + byte_cols[None, :], packed.to(tl.uint8),
             mask=row_ok[:, None] & (byte_cols < NB)[None, :])


@triton.jit
def load_selection_bits(BITS, row_base, at_cols, ok):
    """The recorded keep mask at columns at_cols (BLOCK_R, D_PAD) of the rows at BITS + row_base."""
    byte = tl.load(BITS + row_base[:, None] + (at_cols // 8)[None, :], mask=ok, other=0).to(tl.int32)
    return ((byte >> (at_cols % 8)[None, :]) & 1) != 0


@triton.jit
def _row_base(rows64, N1, N2, s0, s1, s2):
    """Element offset of each row of a tensor whose three leading dims (sizes _, N1, N2) have strides s0..s2."""
    return (rows64 // (N1 * N2)) * s0 + ((rows64 // N2) % N1) * s1 + (rows64 % N2) * s2


@triton.jit
def _topk_rows_kernel(
    X, VALUES, INDICES, MASKED, BITS,
    n_rows, N1, N2, sx0, sx1, sx2, sc0, sc1, sc2, sm0, sm1, sm2, sb0, sb1, sb2,
    D: tl.constexpr, D_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    KEY64: tl.constexpr, WRITE_MASKED: tl.constexpr, NB: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < n_rows
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + _row_base(rows64, N1, N2, sx0, sx1, sx2)[:, None] + cols[None, :], mask=ok, other=0.0)

    keep = keep_top_k(x, cols, col_ok, D, K, K_PAD, KEY64)

    slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1  # position in the ascending index list
    out = _row_base(rows64, N1, N2, sc0, sc1, sc2)[:, None] + slot
    write = keep & ok
    tl.store(VALUES + out, x, mask=write)
    col_ids = tl.zeros([BLOCK_R, D_PAD], dtype=tl.int32) + cols[None, :]
    tl.store(INDICES + out, col_ids.to(tl.uint8), mask=write)
    if WRITE_MASKED:
        masked_base = _row_base(rows64, N1, N2, sm0, sm1, sm2)
        tl.store(MASKED + masked_base[:, None] + cols[None, :], tl.where(keep, x, 0.0), mask=ok)
        store_selection_bits(BITS, keep, _row_base(rows64, N1, N2, sb0, sb1, sb2), row_ok, NB, D_PAD, BLOCK_R)


@triton.jit
def _straight_through_kernel(
    BITS, GRAD_MASKED, GRAD_VALUES, DX,
    n_rows, N1, N2, sb0, sb1, sb2, sg0, sg1, sg2, sv0, sv1, sv2, sd0, sd1, sd2,
    D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASKED: tl.constexpr, HAS_VALUES: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dx = the masked rows' gradient where the forward kept a column, plus the values' gradient at the slot
    of each kept column (its rank among the kept ones), zero elsewhere; summed in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    keep = load_selection_bits(BITS, _row_base(rows64, N1, N2, sb0, sb1, sb2), cols, ok) & ok
    dx = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    if HAS_MASKED:
        g_base = _row_base(rows64, N1, N2, sg0, sg1, sg2)
        dx += tl.load(GRAD_MASKED + g_base[:, None] + cols[None, :], mask=keep, other=0.0).to(tl.float32)
    if HAS_VALUES:
        slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1
        v_base = _row_base(rows64, N1, N2, sv0, sv1, sv2)
        dx += tl.load(GRAD_VALUES + v_base[:, None] + slot, mask=keep, other=0.0).to(tl.float32)
    d_base = _row_base(rows64, N1, N2, sd0, sd1, sd2)
    tl.store(DX + d_base[:, None] + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)


# Rows per program on GPU: enough keys in flight per program to hide the sort's latency, few enough
# that the (BLOCK_R, D_PAD) key tile stays in registers. Measured on H100 (docs/bench/notes_topk_decode.md).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_R": br}, num_warps=w)
    for br, w in ((4, 4), (8, 4), (16, 4), (16, 8), (32, 8))
]
_INTERPRETER_BLOCK_R = 16  # the interpreter pays per op, not per element: big blocks are cheap
_tuned = {}


def _launch(kernel, n_rows: int, *args, key, **meta):
    if interpreting():
        kernel[(triton.cdiv(n_rows, _INTERPRETER_BLOCK_R),)](*args, BLOCK_R=_INTERPRETER_BLOCK_R, **meta)
        return
    if kernel not in _tuned:
        _tuned[kernel] = triton.autotune(_GPU_CONFIGS, key=key)(kernel)
    grid = lambda cfg: (triton.cdiv(n_rows, cfg["BLOCK_R"]),)  # noqa: E731
    _tuned[kernel][grid](*args, **meta)


def kernel_supports(x: torch.Tensor, k: int) -> bool:
    """Whether the fused kernel handles this input (else callers get the PyTorch fallback)."""
    return x.dtype in KERNEL_DTYPES and 1 <= x.shape[-1] <= MAX_DIM and kernel_can_run_on(x) and x.numel() > 0


def selection_bytes(d: int) -> int:
    """Bytes per row of a recorded selection (one bit per column)."""
    return triton.cdiv(d, 8)


def _padded_d(d: int) -> int:
    return max(8, next_pow2(d))  # >= 8: the selection record packs eight columns to a byte


# ---- layout: rows through three leading dims, in the memory order of x. Plain Python on sizes and strides, no
# tensor views: these run on every call of the op (eagerly even inside a compiled graph, where the op is opaque).


def _flat_rows(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels take it: at most three leading dims and a last stride of 1 (a copy where needed)."""
    if t.dim() > 4:
        t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _lead3(t: torch.Tensor) -> tuple[tuple, tuple]:
    """Sizes and strides of the leading dims of t (at most three), padded in front to three (size 1, stride 0)."""
    pad = 4 - t.dim()
    return (1,) * pad + tuple(t.shape[:-1]), (0,) * pad + tuple(t.stride()[:-1])


def _row_order(x: torch.Tensor) -> list[int]:
    """x's three leading dims (as _lead3 pads them) from the outermost in memory to the innermost, size-1
    dims first; the flag is a Python int (one guard under compile's symbolic shapes), not a SymBool."""
    sizes, strides = _lead3(x)
    return sorted(range(3), key=lambda i: (0 if sizes[i] == 1 else 1, -strides[i]))


def _empty_in_row_order(x: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(*x.shape[:-1], width) of `dtype`, its rows laid out in the order _flat_rows(x) has them in memory."""
    if x.dim() > 4 or x.stride(-1) != 1:  # _flat_rows copies these into contiguous rows
        return torch.empty((*x.shape[:-1], width), dtype=dtype, device=x.device)
    sizes, _ = _lead3(x)
    strides, step = [0, 0, 0], width
    for i in reversed(_row_order(x)):
        strides[i], step = step, step * sizes[i]
    n = x.dim() - 1
    return torch.empty_strided((*x.shape[:-1], width), (*strides[3 - n:], 1), dtype=dtype, device=x.device)


def _walk(order: list[int], t: torch.Tensor) -> tuple:
    """t's three row strides in `order` (the kernels walk rows in that order, each tensor by its strides)."""
    _, strides = _lead3(t)
    return tuple(strides[i] for i in order)


def topk_rows_into(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor,
                   masked: torch.Tensor | None, bits: torch.Tensor | None = None):
    """Run the kernel into preallocated outputs (tests poison them first to catch unwritten slots).

    x (..., D), any strides; values (..., k) in x's dtype and indices (..., k) uint8 with the same strides;
    masked (..., D) and bits (..., selection_bytes(D)) uint8 (given together, or masked alone: bits go to scratch
    memory), or None for the code alone. Outputs with more than three leading dims must be contiguous.
    """
    d = x.shape[-1]
    if masked is not None and bits is None:
        bits = _empty_in_row_order(x, selection_bytes(d), torch.uint8)
    x = _flat_rows(x)
    outputs = [values, indices] + ([masked, bits] if masked is not None else [])
    if x.dim() == 2 and values.dim() > 2:  # x's rows were flattened: so are the outputs' (views)
        outputs = [t.view(-1, t.shape[-1]) for t in outputs]
    order = _row_order(x)
    walks = [_walk(order, t) for t in (x, *outputs)]
    if walks[1] != walks[2]:
        raise ValueError("topk_rows_into: values and indices must have the same strides")
    if masked is None:
        outputs += outputs[:2]  # never written when WRITE_MASKED is False
        walks += walks[1:3]
    sizes, _ = _lead3(x)
    n_rows = sizes[0] * sizes[1] * sizes[2]
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch(_topk_rows_kernel, n_rows, x, *outputs, n_rows, sizes[order[1]], sizes[order[2]],
                *walks[0], *walks[1], *walks[3], *walks[4],
                D=d, D_PAD=_padded_d(d), K=k, K_PAD=next_pow2(k), KEY64=x.dtype == torch.float32,
                WRITE_MASKED=masked is not None, NB=selection_bytes(d),
                key=["D_PAD", "K_PAD", "KEY64", "WRITE_MASKED"])


def _new_outputs(x: torch.Tensor, k: int, with_masked: bool):
    """values, indices (contiguous), and with_masked: the masked rows and the selection record (x's memory
    order; the record is empty where the kernel does not run, and backward then takes the indices)."""
    lead = x.shape[:-1]
    values = torch.empty((*lead, k), dtype=x.dtype, device=x.device)
    indices = torch.empty((*lead, k), dtype=index_dtype_for(x.shape[-1]), device=x.device)
    if not with_masked:
        return values, indices, None, None
    masked = _empty_in_row_order(x, x.shape[-1], x.dtype)
    nb = selection_bytes(x.shape[-1]) if kernel_supports(x, k) else 0
    return values, indices, masked, _empty_in_row_order(x, nb, torch.uint8)


def _compute(x: torch.Tensor, k: int, with_masked: bool):
    values, indices, masked, bits = _new_outputs(x, k, with_masked)
    if not kernel_supports(x, k):
        code = topk_sparsify(x.detach(), k)
        values.copy_(code.values)
        indices.copy_(code.indices)
        if with_masked:
            masked.copy_(code.to_dense())
    elif x.numel() > 0:
        topk_rows_into(x.detach(), k, values, indices, masked, bits)
    return values, indices, masked, bits


def _straight_through_into(bits: torch.Tensor, grad_masked: torch.Tensor | None, grad_values: torch.Tensor | None,
                           dx: torch.Tensor) -> None:
    d = dx.shape[-1]
    tensors = [_flat_rows(t) for t in (bits, dx)]
    given = [_flat_rows(g) for g in (grad_masked, grad_values) if g is not None]
    if tensors[0].dim() == 2 and bits.dim() > 2:
        tensors, given = [t.reshape(-1, t.shape[-1]) for t in tensors], [g.reshape(-1, g.shape[-1]) for g in given]
    bits, dx = tensors
    grad_masked = given.pop(0) if grad_masked is not None else dx  # never read when absent
    grad_values = given.pop(0) if grad_values is not None else dx
    order = _row_order(bits)
    sizes, _ = _lead3(bits)
    n_rows = sizes[0] * sizes[1] * sizes[2]
    with torch.cuda.device(dx.device) if dx.is_cuda else contextlib.nullcontext():
        _launch(_straight_through_kernel, n_rows, bits, grad_masked, grad_values, dx, n_rows, sizes[order[1]],
                sizes[order[2]], *_walk(order, bits), *_walk(order, grad_masked), *_walk(order, grad_values),
                *_walk(order, dx), D=d, D_PAD=_padded_d(d), HAS_MASKED=grad_masked is not dx,
                HAS_VALUES=grad_values is not dx, key=["D_PAD", "HAS_MASKED", "HAS_VALUES"])


# ---- custom ops: opaque to torch.compile, with fake (meta) kernels and the straight-through backward
#
# The masked op's rows and record, and the straight-through op's dx, are laid out in the memory order of their
# input, so their output strides depend on their input's. Inductor may hand a custom op an input laid out
# differently from the one it traced (it re-chooses the layout of buffers it produces), and then the real
# output's strides differ from the fake's: an assert_size_stride failure at run time (seen on the H200 with
# GPT-2 compiled). The tag makes inductor pass exactly the traced strides.
_EXACT_STRIDES = (torch.Tag.needs_exact_strides,)


@torch.library.custom_op("sfa::topk_code", mutates_args=())
def topk_code_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices, _, _ = _compute(x, k, with_masked=False)
    return values, indices


@torch.library.custom_op("sfa::topk_code_masked", mutates_args=(), tags=_EXACT_STRIDES)
def topk_code_masked_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """values, indices, the masked rows and the selection record (see _new_outputs)."""
    return tuple(_compute(x, k, with_masked=True))


@topk_code_op.register_fake
def _(x, k):
    return _new_outputs(x, k, with_masked=False)[:2]


@topk_code_masked_op.register_fake
def _(x, k):
    return _new_outputs(x, k, with_masked=True)


@torch.library.custom_op("sfa::topk_straight_through", mutates_args=(), tags=_EXACT_STRIDES)
def topk_straight_through_op(bits: torch.Tensor, grad_masked: torch.Tensor | None, grad_values: torch.Tensor | None,
                             dim: int, dtype: torch.dtype) -> torch.Tensor:
    """dx (rows in the memory order of the forward's x, which its record `bits` has) from the gradients of the
    masked rows and of the values, through the recorded selection."""
    dx = _empty_in_row_order(bits, dim, dtype)
    if dx.numel() > 0:
        _straight_through_into(bits, grad_masked, grad_values, dx)
    return dx


@topk_straight_through_op.register_fake
def _(bits, grad_masked, grad_values, dim, dtype):
    return _empty_in_row_order(bits, dim, dtype)


def _setup_context(ctx, inputs, output):
    x, _ = inputs
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.save_for_backward(*output[1::2])  # the indices (and the masked op's selection record)


def _straight_through(ctx, grad_values, grad_masked=None):
    """Gradients reach x only at the selected coordinates: from the values directly, and from the
    masked rows at the same coordinates (the mask is held fixed, as in the reference)."""
    indices, *bits = ctx.saved_tensors
    if bits and bits[0].shape[-1] > 0 and (grad_values is not None or grad_masked is not None):
        return topk_straight_through_op(bits[0], grad_masked, grad_values, ctx.x_shape[-1], ctx.x_dtype), None
    idx = indices.long()
    picked = None
    if grad_values is not None:
        picked = grad_values
    if grad_masked is not None:
        from_masked = grad_masked.gather(-1, idx)
        picked = from_masked if picked is None else picked + from_masked
    if picked is None:
        return None, None
    dx = torch.zeros(ctx.x_shape, dtype=picked.dtype, device=picked.device).scatter(-1, idx, picked)
    return dx.to(ctx.x_dtype), None


def _backward_code(ctx, grad_values, grad_indices):
    return _straight_through(ctx, grad_values)


def _backward_code_masked(ctx, grad_values, grad_indices, grad_masked, grad_bits):
    return _straight_through(ctx, grad_values, grad_masked)


topk_code_op.register_autograd(_backward_code, setup_context=_setup_context)
topk_code_masked_op.register_autograd(_backward_code_masked, setup_context=_setup_context)


# ---- public API


def _check(fn: str, x, k) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor with at least one dim, got {x.dtype} of rank {x.dim()}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{fn}: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"{fn}: k={k} must be in [1, {x.shape[-1]}] (the size of the last dim of x)")


def _eager_without_grad(x: torch.Tensor) -> bool:
    """Outside torch.compile and autograd the custom-op dispatcher only adds latency (tens of
    microseconds per call, visible in decode steps): call the implementation directly."""
    return not torch.compiler.is_compiling() and not (x.requires_grad and torch.is_grad_enabled())


def fused_topk_sparsify(x: torch.Tensor, k: int, dense_dims: int = 0) -> SparseCode:
    """`sfa.topk_sparsify` through the fused kernel (bit-identical result; falls back off-GPU or for D > 256)."""
    if dense_dims:
        check_dense_dims("fused_topk_sparsify", dense_dims, x.shape[-1])
        return with_dense_prefix(x, fused_topk_sparsify(x[..., dense_dims:], k), dense_dims)
    _check("fused_topk_sparsify", x, k)
    if _eager_without_grad(x):
        values, indices, _, _ = _compute(x, k, with_masked=False)
    else:
        values, indices = topk_code_op(x, k)
    return SparseCode(values=values, indices=indices, dim=x.shape[-1])


def fused_topk_masked(x: torch.Tensor, k: int) -> tuple[SparseCode, torch.Tensor]:
    """The code and the masked dense rows (x with all but its top-k |x| zeroed) from one pass over x."""
    _check("fused_topk_masked", x, k)
    if _eager_without_grad(x):
        values, indices, masked, _ = _compute(x, k, with_masked=True)
    else:
        values, indices, masked, _ = topk_code_masked_op(x, k)
    return SparseCode(values=values, indices=indices, dim=x.shape[-1]), masked


# What `sfa.topk.fast_topk_sparsify` (the KV cache's key coding) runs on CUDA. Only CUDA: on CPU the
# sort is faster than the interpreted kernel (tests that want the kernel on CPU call it by name).
register_topk_sparsify("cuda", fused_topk_sparsify)
