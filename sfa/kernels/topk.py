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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..topk import (SparseCode, check_dense_dims, index_dtype_for, register_topk_sparsify, topk_sparsify,
                    with_dense_prefix)
from ._config import KERNEL_DTYPES, interpreting, kernel_can_run_on, kernel_op, launchable, next_pow2

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
def _topk_rows_kernel(
    X, VALUES, INDICES, MASKED,
    n_rows, stride_x_row,
    D: tl.constexpr, D_PAD: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    KEY64: tl.constexpr, WRITE_MASKED: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < n_rows
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=ok, other=0.0)

    keep = keep_top_k(x, cols, col_ok, D, K, K_PAD, KEY64)

    slot = tl.cumsum(keep.to(tl.int32), axis=1) - 1  # position in the ascending index list
    out = rows64[:, None] * K + slot
    write = keep & ok
    tl.store(VALUES + out, x, mask=write)
    col_ids = tl.zeros([BLOCK_R, D_PAD], dtype=tl.int32) + cols[None, :]
    tl.store(INDICES + out, col_ids.to(tl.uint8), mask=write)
    if WRITE_MASKED:
        tl.store(MASKED + rows64[:, None] * D + cols[None, :], tl.where(keep, x, 0.0), mask=ok)


# Rows per program on GPU: enough keys in flight per program to hide the sort's latency, few enough
# that the (BLOCK_R, D_PAD) key tile stays in registers. Measured on H100 (docs/bench/notes_topk_decode.md).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_R": br}, num_warps=w)
    for br, w in ((4, 4), (8, 4), (16, 4), (16, 8), (32, 8))
]
_INTERPRETER_BLOCK_R = 16  # the interpreter pays per op, not per element: big blocks are cheap
_tuned_kernel = None


def _gpu_kernel():
    global _tuned_kernel
    if _tuned_kernel is None:
        _tuned_kernel = triton.autotune(_GPU_CONFIGS, key=["D_PAD", "K_PAD", "KEY64", "WRITE_MASKED"])(
            _topk_rows_kernel
        )
    return _tuned_kernel


def kernel_supports(x: torch.Tensor, k: int) -> bool:
    """Whether the fused kernel handles this input (else callers get the PyTorch fallback)."""
    return x.dtype in KERNEL_DTYPES and 1 <= x.shape[-1] <= MAX_DIM and kernel_can_run_on(x) and x.numel() > 0


def topk_rows_into(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor, masked: torch.Tensor | None,
                   traceable: bool = False):
    """Run the kernel into preallocated outputs (tests poison them first to catch unwritten slots).

    x (..., D); values (..., k) in x's dtype; indices (..., k) uint8; masked (..., D) contiguous or None.
    `traceable`: called from a kernel_op's implementation (see sfa/kernels/_config.py).
    """
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n_rows = rows.shape[0]
    meta = dict(
        D=d, D_PAD=max(2, next_pow2(d)), K=k, K_PAD=next_pow2(k),
        KEY64=x.dtype == torch.float32, WRITE_MASKED=masked is not None,
    )
    masked_arg = masked if masked is not None else values  # never written when WRITE_MASKED is False
    if interpreting():
        grid = (triton.cdiv(n_rows, _INTERPRETER_BLOCK_R),)
        _topk_rows_kernel[grid](rows, values, indices, masked_arg, n_rows, rows.stride(0),
                                BLOCK_R=_INTERPRETER_BLOCK_R, **meta)
    else:
        grid = lambda cfg: (triton.cdiv(n_rows, cfg["BLOCK_R"]),)  # noqa: E731
        with torch.cuda.device(x.device):
            launchable(_gpu_kernel(), traceable)[grid](rows, values, indices, masked_arg, n_rows, rows.stride(0), **meta)


def _new_outputs(x: torch.Tensor, k: int, with_masked: bool):
    lead = x.shape[:-1]
    values = torch.empty((*lead, k), dtype=x.dtype, device=x.device)
    indices = torch.empty((*lead, k), dtype=index_dtype_for(x.shape[-1]), device=x.device)
    masked = torch.empty(x.shape, dtype=x.dtype, device=x.device) if with_masked else None
    return values, indices, masked


def _compute(x: torch.Tensor, k: int, with_masked: bool, traceable: bool = False):
    if not kernel_supports(x, k):
        code = topk_sparsify(x.detach(), k)
        return code.values, code.indices, (code.to_dense() if with_masked else None)
    values, indices, masked = _new_outputs(x, k, with_masked)
    if x.numel() > 0:
        topk_rows_into(x.detach(), k, values, indices, masked, traceable)
    return values, indices, masked


# ---- the ops (kernel_op: compiled graphs launch the kernel themselves), with the straight-through backward


def _code_outputs(x, k):
    values, indices, _ = _new_outputs(x, k, with_masked=False)
    return values, indices


def _code_masked_outputs(x, k):
    return _new_outputs(x, k, with_masked=True)


@kernel_op("sfa::topk_code", fake=_code_outputs, kernels=(_topk_rows_kernel,))
def topk_code_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices, _ = _compute(x, k, with_masked=False, traceable=True)
    return values, indices


@kernel_op("sfa::topk_code_masked", fake=_code_masked_outputs, kernels=(_topk_rows_kernel,))
def topk_code_masked_op(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices, masked = _compute(x, k, with_masked=True, traceable=True)
    return values, indices, masked


def _setup_context(ctx, inputs, output):
    x, _ = inputs
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.save_for_backward(output[1])


def _straight_through(ctx, grad_values, grad_masked=None):
    """Gradients reach x only at the selected coordinates: from the values directly, and from the
    masked rows at the same coordinates (the mask is held fixed, as in the reference)."""
    (indices,) = ctx.saved_tensors
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


def _backward_code_masked(ctx, grad_values, grad_indices, grad_masked):
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
        values, indices, _ = _compute(x, k, with_masked=False)
    else:
        values, indices = topk_code_op(x, k)
    return SparseCode(values=values, indices=indices, dim=x.shape[-1])


def fused_topk_masked(x: torch.Tensor, k: int) -> tuple[SparseCode, torch.Tensor]:
    """The code and the masked dense rows (x with all but its top-k |x| zeroed) from one pass over x."""
    _check("fused_topk_masked", x, k)
    if _eager_without_grad(x):
        values, indices, masked = _compute(x, k, with_masked=True)
    else:
        values, indices, masked = topk_code_masked_op(x, k)
    return SparseCode(values=values, indices=indices, dim=x.shape[-1]), masked


# What `sfa.topk.fast_topk_sparsify` (the KV cache's key coding) runs on CUDA. Only CUDA: on CPU the
# sort is faster than the interpreted kernel (tests that want the kernel on CPU call it by name).
register_topk_sparsify("cuda", fused_topk_sparsify)
