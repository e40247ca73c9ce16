"""`sfa_attention`: argument checks, then the backend (named, or picked by `auto`: sfa/backends.py)."""

from __future__ import annotations

import torch

from . import backends
from .backends import choose_backend, resolve_backend  # noqa: F401  (choose_backend: the rule, re-exported)
from .topk import SparseCode


def _describe(x) -> str:
    if isinstance(x, SparseCode):
        return f"SparseCode(shape={tuple(x.shape)}, k={x.k}, dtype={x.dtype}, device={x.device})"
    return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"


def _resolve_topk(name: str, x, topk, dim: int, dense_dims: int) -> int:
    if isinstance(x, SparseCode):
        if topk is not None and topk != x.k:
            raise ValueError(f"sfa_attention: {name}={topk} but the SparseCode for it holds k={x.k} entries per row")
        return x.k
    if topk is None:
        raise ValueError(f"sfa_attention: {name} is required when the input is a dense tensor")
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"sfa_attention: {name} must be an int, got {type(topk).__name__}")
    if not 1 <= topk <= dim - dense_dims:
        limit = f"D - dense_dims = {dim} - {dense_dims}" if dense_dims else f"D={dim}"
        raise ValueError(f"sfa_attention: {name}={topk} must be in [1, {limit}] (D = head dim)")
    return topk


def _resolve_dense_dims(q, k, dense_dims, dim: int) -> int:
    """The always-kept leading dims: given, or carried by the SparseCode inputs; all must agree."""
    from_codes = {x.dense_dims for x in (q, k) if isinstance(x, SparseCode)}
    if dense_dims is None:
        if len(from_codes) > 1:
            raise ValueError(f"sfa_attention: the q and k codes keep different dense_dims {sorted(from_codes)}")
        dense_dims = from_codes.pop() if from_codes else 0
    if isinstance(dense_dims, bool) or not isinstance(dense_dims, int) or not 0 <= dense_dims < dim:
        raise ValueError(f"sfa_attention: dense_dims={dense_dims!r} must be an int in [0, D-1={dim - 1}]")
    if from_codes - {dense_dims}:
        raise ValueError(f"sfa_attention: dense_dims={dense_dims} but a SparseCode input keeps {sorted(from_codes)}")
    return dense_dims


def _check_kv_length(kv_length, batch: int, device) -> None:
    if not isinstance(kv_length, torch.Tensor) or kv_length.dim() != 1 or kv_length.shape[0] not in (1, batch):
        got = f"shape {tuple(kv_length.shape)}" if isinstance(kv_length, torch.Tensor) else type(kv_length).__name__
        raise ValueError(f"sfa_attention: kv_length must be a tensor of shape ({batch},) or (1,), got {got}")
    if kv_length.is_floating_point() or kv_length.dtype == torch.bool or kv_length.is_complex():
        raise TypeError(f"sfa_attention: kv_length must be an integer tensor, got {kv_length.dtype}")
    if kv_length.device != device:
        raise ValueError(f"sfa_attention: kv_length is on {kv_length.device}, q/k/v on {device}")


def check_attention_inputs(q, k, v, *, topk_q, topk_k, scale=None, dense_dims=None, kv_length=None) -> tuple[int, int, int]:
    """Raise a clear error for any argument outside the contract; return the resolved
    (topk_q, topk_k, dense_dims)."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, (torch.Tensor, SparseCode)):
            raise TypeError(f"sfa_attention: {name} must be a tensor or a SparseCode, got {type(x).__name__}")
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"sfa_attention: v must be a tensor, got {type(v).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"sfa_attention: {name} must have rank 4 (B, H, N, D), got {_describe(x)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"sfa_attention: {name} must be floating point, got {_describe(x)}")
    (b, hq, nq, d), (bk, hkv, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"sfa_attention: batch sizes differ: q {b}, k {bk}, v {bv}")
    if d != dk:
        raise ValueError(f"sfa_attention: head dim of q ({d}) and k ({dk}) must match")
    if hkv != hv or nk != nv:
        raise ValueError(f"sfa_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must agree in heads and length")
    if hq % hkv != 0:
        raise ValueError(f"sfa_attention: query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if nq > nk:
        raise ValueError(f"sfa_attention: more queries ({nq}) than keys ({nk}); queries are the last positions of the keys")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"sfa_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"sfa_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"sfa_attention: scale must be a positive number, got {scale!r}")
    if kv_length is not None:
        _check_kv_length(kv_length, b, v.device)
    dense_dims = _resolve_dense_dims(q, k, dense_dims, d)
    topk_q = _resolve_topk("topk_q", q, topk_q, d, dense_dims)
    topk_k = _resolve_topk(
        "topk_k", k, topk_q if topk_k is None and not isinstance(k, SparseCode) else topk_k, d, dense_dims
    )
    return topk_q, topk_k, dense_dims


def sfa_attention(
    q: torch.Tensor | SparseCode,
    k: torch.Tensor | SparseCode,
    v: torch.Tensor,
    *,
    topk_q: int | None = None,
    topk_k: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    dense_dims: int | None = None,
    kv_length: torch.Tensor | None = None,
    premasked: bool = False,
) -> torch.Tensor:
    """Sparse Feature Attention: softmax(mask(q)·mask(k)ᵀ·scale + causal)·v.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), Hq a multiple of Hkv (GQA), Nq <= Nk
    (queries are the last Nq positions). q and k may be given as SparseCodes instead. topk_k
    defaults to topk_q. scale defaults to 1/sqrt(D). Returns (B, Hq, Nq, Dv) in v's dtype.
    dense_dims (decoupled RoPE; default 0, or what the SparseCode inputs carry): the first dense_dims
    coordinates of every q and k row are always kept and topk_* are chosen among the other D - dense_dims,
    so a score is the dense dot of the leading part plus the SFA overlap of the rest.
    kv_length (an integer tensor (B,) or (1,) on the inputs' device): only the first kv_length[b] positions
    of k and v exist (a cache preallocated to Nk positions); the queries are the last Nq of those. It must
    lie in [Nq, Nk], which is not checked (reading it would cost a device sync). Backends without it refuse it;
    `auto` then falls back to the reference.
    premasked: q and k are dense rows their producer already masked to topk_q / topk_k (first dense_dims
    kept), e.g. in the fused QK epilogue (sfa/kernels/qk_epilogue.py). A backend registered with a
    `premasked` entry then skips its top-k (sfa.backends.takes_premasked says whether the call's backend
    does); any other masks them again, which keeps every value (a masked row is its own top-k) and moves a
    gradient only between coordinates that are exactly zero.
    Non-finite inputs are not checked (that would cost a device sync): NaN/Inf propagate in the
    reference and give unspecified selections in the kernels.
    """
    topk_q, topk_k, dense_dims = check_attention_inputs(
        q, k, v, topk_q=topk_q, topk_k=topk_k, scale=scale, dense_dims=dense_dims, kv_length=kv_length
    )
    if premasked and (isinstance(q, SparseCode) or isinstance(k, SparseCode)):
        raise ValueError("sfa_attention: premasked=True means q and k are masked dense rows, not SparseCodes")
    extra = {}
    chosen = resolve_backend(backend, q, k, v, dense_dims=dense_dims, kv_length=kv_length is not None)
    backend = chosen.name
    if kv_length is not None:
        if not chosen.capabilities.kv_length:
            takers = sorted(name for name, b in backends.BACKENDS.items() if b.capabilities.kv_length)
            raise ValueError(
                f"sfa_attention: backend {backend!r} does not take kv_length; use one of {', '.join(takers)}"
            )
        extra["kv_length"] = kv_length
    fn = chosen.premasked if premasked and chosen.premasked is not None else chosen.fn
    return fn(q, k, v, topk_q=topk_q, topk_k=topk_k, causal=causal, scale=scale, dense_dims=dense_dims, **extra)
