"""The backends of `sfa_attention`, what each can serve, and how `auto` picks one.

A backend is a function with the signature of `sfa_attention_reference` (arguments already checked,
`topk_q`/`topk_k`/`dense_dims` resolved to ints), registered with its `Capabilities` and a priority. The
backend declares both where it is defined, beside the limits of its kernel and the measurement behind its
priority (sfa/kernels/*.py); nothing here restates them. `auto` walks the registry from the highest
priority down and takes the first backend whose capabilities fit the call. `reference` (priority 0, fits
everything) is always registered, so `auto` never fails. A backend registered without a priority is used
only when named. The Triton backends register themselves when sfa.kernels imports (where Triton does).

A backend may also register a `premasked` entry: the same backend over q and k that their producer already
masked (the top-k fused into the pass that wrote them, sfa/kernels/qk_epilogue.py), which skips the
backend's own top-k. `takes_premasked` tells a producer whether the backend a call will reach has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .reference import sfa_attention_reference
from .topk import SparseCode

BackendFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Capabilities:
    """The calls a backend serves when `auto` picks it (None: no limit)."""

    devices: tuple[str, ...] | None = None  # device types (of v; sfa_attention checks q, k, v share one)
    dtypes: tuple[torch.dtype, ...] | None = None  # of q and v (sfa_attention checks q, k, v share one)
    max_head_dim: int | None = None  # largest q/k head dim D
    head_dims: tuple[int, ...] | None = None  # the only head dims D and Dv it takes
    max_query_rows: int | None = None  # query rows per KV head: (Hq / Hkv) x Nq
    key_code_only: bool = False  # only over keys given as a SparseCode (a compressed KV cache)
    dense_dims: bool = True  # takes decoupled rows (dense_dims > 0)
    kv_length: bool = False  # takes kv_length= (a static cache's valid length, read on the device)

    def fit(self, q, k, v, dense_dims: int = 0, kv_length: bool = False) -> bool:
        d, dv = q.shape[-1], v.shape[-1]
        return (
            (self.devices is None or v.device.type in self.devices)
            and (self.dtypes is None or (q.dtype in self.dtypes and v.dtype in self.dtypes))
            and (self.max_head_dim is None or d <= self.max_head_dim)
            and (self.head_dims is None or (d in self.head_dims and dv in self.head_dims))
            and (self.max_query_rows is None or (q.shape[1] // k.shape[1]) * q.shape[2] <= self.max_query_rows)
            and (not self.key_code_only or isinstance(k, SparseCode))
            and (self.dense_dims or dense_dims == 0)
            and (self.kv_length or not kv_length)
        )


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    capabilities: Capabilities
    priority: int | None  # auto tries higher first; None: only when named
    premasked: BackendFn | None = None  # the backend over q, k masked by their producer; None: it masks them


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: BackendFn, capabilities: Capabilities | None = None,
                     priority: int | None = None, premasked: BackendFn | None = None) -> None:
    """Make `fn` selectable as `sfa_attention(..., backend=name)`, and by `auto` when it has a priority and
    its `capabilities` fit the call (default: fits every call). `premasked` (same signature): the backend
    for `sfa_attention(..., premasked=True)`, q and k already masked; without it those calls go to `fn`."""
    if name == "auto":
        raise ValueError("register_backend: 'auto' is the rule that picks a backend, not a backend name")
    BACKENDS[name] = Backend(name, fn, capabilities or Capabilities(), priority, premasked)


def available_backends() -> list[str]:
    return ["auto", *BACKENDS]


def choose_backend(q, k, v, *, dense_dims: int = 0, kv_length: bool = False) -> str:
    """The `auto` rule: the highest-priority registered backend whose capabilities fit these (already
    checked) inputs; `kv_length`: the call passes one. Never raises: the reference fits everything."""
    candidates = sorted((b for b in BACKENDS.values() if b.priority is not None), key=lambda b: -b.priority)
    return next(b.name for b in candidates if b.capabilities.fit(q, k, v, dense_dims, kv_length))


def resolve_backend(name: str, q, k, v, *, dense_dims: int = 0, kv_length: bool = False) -> Backend:
    """The backend `sfa_attention(..., backend=name)` runs for these (already checked) inputs."""
    if name == "auto":
        name = choose_backend(q, k, v, dense_dims=dense_dims, kv_length=kv_length)
    chosen = BACKENDS.get(name)
    if chosen is None:
        raise ValueError(f"sfa_attention: unknown backend {name!r}; available: {', '.join(available_backends())}")
    return chosen


def takes_premasked(q, k, v, *, backend: str = "auto", dense_dims: int = 0) -> bool:
    """Whether `sfa_attention(q, k, v, backend=backend, dense_dims=dense_dims, premasked=True)` skips the
    top-k, so that a producer of q and k gains by masking them itself. q, k, v need only the shapes, dtypes
    and device the call will have (e.g. the unnormalised projections)."""
    return resolve_backend(backend, q, k, v, dense_dims=dense_dims).premasked is not None


# The oracle: plain PyTorch, every device and dtype; auto's last resort.
register_backend("reference", sfa_attention_reference, Capabilities(kv_length=True), priority=0)
