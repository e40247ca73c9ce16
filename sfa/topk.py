"""Top-k feature selection: the "S" in SFA.

A SparseCode holds, for every row of the last dimension of a tensor, the k entries of largest
magnitude: their signed values and their column indices (sorted ascending). Ties in |x| go to the
lower column index, so the selection is a pure function of the input (torch.topk gives no such
promise). Indices are stored as uint8 when the row length is <= 256 (every head dim in practice),
else int16: they are what the compressed KV cache stores, so their width is part of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """k-sparse rows: `values` (..., k) in the source dtype, `indices` (..., k) ascending, `dim` = row length."""

    values: torch.Tensor
    indices: torch.Tensor
    dim: int

    def __post_init__(self):
        if self.values.shape != self.indices.shape:
            raise ValueError(
                f"SparseCode: values {tuple(self.values.shape)} and indices "
                f"{tuple(self.indices.shape)} must have the same shape"
            )
        if self.values.dim() == 0:
            raise ValueError("SparseCode: values must have at least one dimension (the k selected entries)")
        if not 1 <= self.k <= self.dim:
            raise ValueError(f"SparseCode: k={self.k} must be in [1, dim={self.dim}]")

    @property
    def k(self) -> int:
        return self.values.shape[-1]

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
        dense = self.values.new_zeros(self.shape)
        return dense.scatter(-1, self.indices.long(), self.values)

    def mask(self) -> torch.Tensor:
        """Boolean mask of the selected coordinates, shape `self.shape`."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        return m.scatter(-1, self.indices.long(), True)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel() * self.indices.element_size()


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (int64, ascending) of the k largest |x| per row; ties to the lower index.

    A stable descending sort keeps equal magnitudes in column order, so the first k are exactly
    the contract's choice. NaN sorts as the largest magnitude (documented: garbage in, garbage out).
    """
    order = torch.sort(x.detach().abs(), dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def topk_sparsify(x: torch.Tensor, k: int) -> SparseCode:
    """Keep, per row of the last dim, the k entries of largest |x| with their signs (the SFA mask).

    Gradients flow to `x` only at the selected coordinates (through `values`).
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
    if not 1 <= k <= dim:
        raise ValueError(f"topk_sparsify: k={k} must be in [1, {dim}] (the size of the last dim of x)")
    idx = topk_indices(x, k)
    values = x.gather(-1, idx)
    return SparseCode(values=values, indices=idx.to(index_dtype_for(dim)), dim=dim)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """x with all but its k largest-|x| entries per row set to zero (same shape and dtype)."""
    return topk_sparsify(x, k).to_dense()
