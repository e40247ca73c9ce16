"""Top-k feature selection: the "S" in SFA.

A SparseCode holds, for every row of the last dimension of a tensor, the k entries of largest
magnitude: their signed values and their column indices (sorted ascending). Ties in |x| go to the
lower column index, so the selection is a pure function of the input (torch.topk gives no such
promise). Indices are stored as uint8 when the row length is <= 256 (every head dim in practice),
else int16: they are what the compressed KV cache stores, so their width is part of the contract.

Decoupled rows (`dense_dims` > 0): the first `dense_dims` coordinates of every row are always kept
(in a RoPE model they carry the rotary, positional part) and the top-k runs over the others only. The
code then holds those leading coordinates as they are (`dense`) beside the k selected ones, whose
indices count from the start of the row, so they lie in [dense_dims, dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def index_dtype_for(dim: int) -> torch.dtype:
    """The narrowest index dtype that can address `dim` columns (the contract: uint8 up to 256)."""
    if dim <= 256:
        return torch.uint8
    if dim <= 32768:
        return torch.int16
    raise ValueError(f"dim={dim} is too large for a SparseCode (at most 32768 columns)")


@dataclass
class SparseCode:
    """k-sparse rows: `values` (..., k) in the source dtype, `indices` (..., k) ascending, `dim` = row length,
    and for decoupled rows `dense` (..., dense_dims): the leading coordinates, always kept."""

    values: torch.Tensor
    indices: torch.Tensor
    dim: int
    dense: torch.Tensor | None = None

    def __post_init__(self):
        if self.values.shape != self.indices.shape:
            raise ValueError(
                f"SparseCode: values {tuple(self.values.shape)} and indices "
                f"{tuple(self.indices.shape)} must have the same shape"
            )
        if self.values.dim() == 0:
            raise ValueError("SparseCode: values must have at least one dimension (the k selected entries)")
        if self.dense is not None:
            if self.dense.shape[:-1] != self.values.shape[:-1] or self.dense.dtype != self.values.dtype:
                raise ValueError(
                    f"SparseCode: dense part {tuple(self.dense.shape)} {self.dense.dtype} must match the rows of "
                    f"values {tuple(self.values.shape)} {self.values.dtype}"
                )
            if self.dense.shape[-1] == 0:
                self.dense = None
        if not 1 <= self.k <= self.dim - self.dense_dims:
            limit = f"dim - dense_dims = {self.dim - self.dense_dims}" if self.dense_dims else f"dim={self.dim}"
            raise ValueError(f"SparseCode: k={self.k} must be in [1, {limit}]")

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def dense_dims(self) -> int:
        """Leading coordinates of each row kept dense (0 for a plain code)."""
        return 0 if self.dense is None else self.dense.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense tensor this code stands for."""
        return torch.Size((*self.values.shape[:-1], self.dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to_dense(self) -> torch.Tensor:
        """Scatter the values back into zero rows. Differentiable in `values` (gradients land only
        at the selected coordinates, which is SFA's straight-through backward)."""
        rows = self.values.new_zeros(self.shape).scatter(-1, self.indices.long(), self.values)
        if self.dense is None:
            return rows
        return torch.cat([self.dense, rows[..., self.dense_dims :]], dim=-1)

    def mask(self) -> torch.Tensor:
        """Boolean mask of the kept coordinates (the dense leading ones included), shape `self.shape`."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        m[..., : self.dense_dims] = True
        return m.scatter(-1, self.indices.long(), True)

    def nbytes(self) -> int:
        parts = [self.values, self.indices] + ([] if self.dense is None else [self.dense])
        return sum(t.numel() * t.element_size() for t in parts)


def check_dense_dims(fn: str, dense_dims, dim: int) -> int:
    """`dense_dims` must leave at least one coordinate to select from."""
    if isinstance(dense_dims, bool) or not isinstance(dense_dims, int) or not 0 <= dense_dims < dim:
        raise ValueError(f"{fn}: dense_dims={dense_dims!r} must be an int in [0, {dim - 1}] (row length {dim})")
    return dense_dims


def with_dense_prefix(x: torch.Tensor, tail: SparseCode, dense_dims: int) -> SparseCode:
    """The code of full rows x from the code of their tail x[..., dense_dims:] (indices shifted to count
    from the start of the row) and the leading coordinates kept as they are."""
    if dense_dims == 0:
        return tail
    indices = (tail.indices.to(torch.int16) + dense_dims).to(index_dtype_for(x.shape[-1]))
    return SparseCode(values=tail.values, indices=indices, dim=x.shape[-1], dense=x[..., :dense_dims])


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (int64, ascending) of the k largest |x| per row; ties to the lower index.

    A stable descending sort keeps equal magnitudes in column order, so the first k are exactly
    the contract's choice. NaN sorts as the largest magnitude (documented: garbage in, garbage out).
    """
    order = torch.sort(x.detach().abs(), dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def topk_sparsify(x: torch.Tensor, k: int, dense_dims: int = 0) -> SparseCode:
    """Keep, per row of the last dim, the k entries of largest |x| with their signs (the SFA mask).
    With `dense_dims`, the first dense_dims entries are kept as they are and the k are chosen among the rest.

    Gradients flow to `x` only at the kept coordinates (through `values` and `dense`).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"topk_sparsify: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("topk_sparsify: x must have at least one dimension")
    if not x.is_floating_point():
        raise TypeError(f"topk_sparsify: x must be a floating-point tensor, got {x.dtype}")
    dim = x.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk_sparsify: k must be an int, got {type(k).__name__}")
    check_dense_dims("topk_sparsify", dense_dims, dim)
    if not 1 <= k <= dim - dense_dims:
        raise ValueError(
            f"topk_sparsify: k={k} must be in [1, {dim - dense_dims}] (the size of the last dim of x"
            + (f" less dense_dims={dense_dims})" if dense_dims else ")")
        )
    tail = x[..., dense_dims:]
    idx = topk_indices(tail, k)
    code = SparseCode(values=tail.gather(-1, idx), indices=idx.to(index_dtype_for(tail.shape[-1])), dim=tail.shape[-1])
    return with_dense_prefix(x, code, dense_dims)


# Faster implementations of `topk_sparsify` by device type, each bit-identical to it (same selection, ties
# and index dtype): sfa/kernels registers the fused Triton kernel for CUDA when it imports. The dispatch lives
# here, not in the callers, so code that must not import the kernels (the KV cache) still gets them.
_FAST_TOPK_SPARSIFY: dict[str, Callable[[torch.Tensor, int, int], SparseCode]] = {}


def register_topk_sparsify(device_type: str, fn: Callable[[torch.Tensor, int, int], SparseCode]) -> None:
    """Make `fn(x, k, dense_dims)` what `fast_topk_sparsify` runs for tensors on `device_type`. It must return
    exactly `topk_sparsify`'s code (and may fall back to it for inputs it does not take)."""
    _FAST_TOPK_SPARSIFY[device_type] = fn


def fast_topk_sparsify(x: torch.Tensor, k: int, dense_dims: int = 0) -> SparseCode:
    """`topk_sparsify` by the implementation registered for x's device, else by the reference."""
    return _FAST_TOPK_SPARSIFY.get(x.device.type, topk_sparsify)(x, k, dense_dims)


def topk_mask(x: torch.Tensor, k: int, dense_dims: int = 0) -> torch.Tensor:
    """x with all but its k largest-|x| entries per row set to zero (same shape and dtype); the first
    `dense_dims` entries are always kept."""
    return topk_sparsify(x, k, dense_dims).to_dense()


def masked_rows(x: torch.Tensor | SparseCode, topk: int, dense_dims: int = 0, *, tail_masked=None) -> torch.Tensor:
    """The dense rows SFA scores with (the one place that expands q or k for every backend): a code's
    scatter, or x with its top-k kept per row and its first `dense_dims` coordinates always kept.
    Keeping every coordinate returns x itself, so SFA with k = D *is* dense attention.

    `tail_masked(rows, k)` masks plain rows (default: the reference selection); the Triton backends pass
    the fused kernel, which selects exactly the same entries."""
    if isinstance(x, SparseCode):
        return x.to_dense()
    if dense_dims + topk == x.shape[-1]:
        return x
    tail = x[..., dense_dims:]
    masked = topk_sparsify(tail, topk).to_dense() if tail_masked is None else tail_masked(tail, topk)
    return masked if dense_dims == 0 else torch.cat([x[..., :dense_dims], masked], dim=-1)
