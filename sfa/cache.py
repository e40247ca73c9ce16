"""KV caches for autoregressive decoding: dense, and SFA's compressed one.

Per layer the cache preallocates `capacity` positions and is appended to one step (or one prompt)
at a time. `append` tracks the filled length on the host and returns views of the filled part;
`write` is the shape-static alternative for CUDA graphs: it stores at positions given as a device tensor
and returns the whole buffers, whose valid length the caller passes to attention (`kv_length`). The SFA cache stores each key only as its top-k code (signed values in the cache dtype and
their column indices, uint8 for head dims up to 256) while values stay dense; attention over it goes
through `sfa.sfa_attention(q, keys_code, values, ...)`, which accepts SparseCodes and fewer queries
than keys (the queries are the last positions).

Decoupled RoPE (`dense_dims` > 0): each key's first dense_dims coordinates (the rotary part) are stored
as they are, beside the top-k code of the rest. With `shared_dense` (a model whose rotary key is one per
token for all KV heads) that part is the same in every head, so it is stored once, (B, 1, L, dense_dims),
and handed to attention as a stride-0 expand over the heads (the decode kernel takes any head stride).

`kv_cache_bytes_per_token` is the single formula for the memory a token costs; the caches allocate
exactly that, and the training loop logs it, so the number reported is the number allocated.
"""

from __future__ import annotations

import torch

from .topk import SparseCode, check_dense_dims, fast_topk_sparsify, index_dtype_for


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layer_bytes_per_token(
    n_kv_heads: int, head_dim: int, v_head_dim: int, topk: int | None = None, dtype: torch.dtype = torch.bfloat16,
    dense_dims: int = 0, shared_dense: bool = False,
) -> int:
    """Bytes one token occupies in one layer's cache.

    dense: Hkv * (D + Dv) * elem;  SFA: Hkv * ((dense_dims + Dv) * elem + k * (elem + index_elem))
    (with bf16 values and uint8 indices that is Hkv * (2 dense_dims + 3k + 2Dv)); with shared_dense the
    dense part is counted once: 2 dense_dims + Hkv * (3k + 2Dv).
    """
    elem = _element_size(dtype)
    if topk is None:
        return n_kv_heads * (head_dim + v_head_dim) * elem
    index_elem = _element_size(index_dtype_for(head_dim))
    dense_part = dense_dims * elem * (1 if shared_dense else n_kv_heads)
    return dense_part + n_kv_heads * (topk * (elem + index_elem) + v_head_dim * elem)


def kv_cache_bytes_per_token(
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    v_head_dim: int,
    topk: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    dense_dims: int = 0,
    shared_dense: bool = False,
) -> int:
    """Bytes one token occupies in a whole model's KV cache (what the training loop logs).

    head_dim is the key width actually stored (d_short for the short-embedding baseline);
    topk=None means a dense cache, an int the SFA cache that keeps k of head_dim key features
    (of the last head_dim - dense_dims, with the first dense_dims stored dense: decoupled RoPE;
    shared_dense: those dense dims are one per token for all KV heads, stored once).
    """
    for name, value in (("n_layers", n_layers), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim), ("v_head_dim", v_head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"kv_cache_bytes_per_token: {name} must be a positive int, got {value!r}")
    check_dense_dims("kv_cache_bytes_per_token", dense_dims, head_dim)
    if dense_dims and topk is None:
        raise ValueError("kv_cache_bytes_per_token: dense_dims applies to the SFA cache only (topk given)")
    if shared_dense and not dense_dims:
        raise ValueError("kv_cache_bytes_per_token: shared_dense=True needs dense_dims > 0 (the part to share)")
    limit = head_dim - dense_dims
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= limit):
        bound = f"head_dim - dense_dims = {limit}" if dense_dims else f"head_dim={head_dim}"
        raise ValueError(f"kv_cache_bytes_per_token: topk={topk!r} must be None (dense) or an int in [1, {bound}]")
    return n_layers * layer_bytes_per_token(n_kv_heads, head_dim, v_head_dim, topk, dtype, dense_dims, shared_dense)


class LayerCache:
    """One layer's cache: keys (dense, or as a top-k code when `topk` is set) and dense values.

    Shapes: keys (B, Hkv, capacity, D) dense, or values/indices (B, Hkv, capacity, k) and, with
    dense_dims, the keys' leading coordinates (B, Hkv, capacity, dense_dims), or (B, 1, capacity,
    dense_dims) with shared_dense; values (B, Hkv, capacity, Dv). `length` positions are filled.
    shared_dense trusts its caller that the leading coordinates are equal in every KV head (the model's
    shared rotary key): it stores the first head's.
    """

    def __init__(self, batch_size, capacity, n_kv_heads, head_dim, v_head_dim, topk=None, dtype=torch.bfloat16, device=None,
                 dense_dims=0, shared_dense=False):
        check_dense_dims("LayerCache", dense_dims, head_dim)
        if topk is not None and not 1 <= topk <= head_dim - dense_dims:
            raise ValueError(f"LayerCache: topk={topk} must be in [1, head_dim - dense_dims = {head_dim - dense_dims}]")
        self.topk = topk
        self.head_dim = head_dim
        self.n_kv_heads = n_kv_heads
        self.dense_dims = dense_dims if topk is not None else 0
        self.shared_dense = shared_dense and self.dense_dims > 0
        self.capacity = capacity
        self.length = 0
        shape = (batch_size, n_kv_heads, capacity)
        self.key_dense = None
        if topk is None:
            self.keys = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        else:
            self.key_values = torch.zeros(*shape, topk, dtype=dtype, device=device)
            self.key_indices = torch.zeros(*shape, topk, dtype=index_dtype_for(head_dim), device=device)
            if self.dense_dims:
                dense_heads = 1 if self.shared_dense else n_kv_heads
                self.key_dense = torch.zeros(batch_size, dense_heads, capacity, self.dense_dims, dtype=dtype, device=device)
        self.values = torch.zeros(*shape, v_head_dim, dtype=dtype, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer this layer allocated (for exact memory accounting)."""
        keys = [self.keys] if self.topk is None else [self.key_values, self.key_indices]
        if self.key_dense is not None:
            keys.append(self.key_dense)
        return [*keys, self.values]

    def append(self, k: torch.Tensor | SparseCode, v: torch.Tensor):
        """Store new keys/values (B, Hkv, T, ·) and return everything cached so far:
        (keys (B, Hkv, L, D) or their SparseCode, values (B, Hkv, L, Dv)).

        An SFA cache takes dense keys (it selects their top-k here) or a ready SparseCode."""
        n_new = v.shape[-2]
        end = self.length + n_new
        if end > self.capacity:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {n_new} new positions exceed its capacity {self.capacity}"
            )
        if self.topk is None:
            if isinstance(k, SparseCode):
                k = k.to_dense()
            self.keys[:, :, self.length : end] = k
        else:
            code = self._code_of(k)
            self.key_values[:, :, self.length : end] = code.values
            self.key_indices[:, :, self.length : end] = code.indices
            if self.key_dense is not None:
                self.key_dense[:, :, self.length : end] = self._stored_dense(code)
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.cached_keys(), self.values[:, :, :end]

    def write(self, k: torch.Tensor | SparseCode, v: torch.Tensor, index: torch.Tensor):
        """Store new keys/values (B, Hkv, T, ·) at positions `index` ((T,) int64, on the cache's device) and
        return the whole buffers: (keys (B, Hkv, capacity, D) or their SparseCode, values (B, Hkv, capacity, Dv)).

        Nothing is read on the host and every shape is fixed, so a decode step built on it can be captured
        in a CUDA graph. `length` is not advanced: the caller tracks the position on the device."""
        dtype = self.values.dtype  # index_copy_ does not cast (slice assignment in `append` does)
        if self.topk is None:
            self.keys.index_copy_(2, index, (k.to_dense() if isinstance(k, SparseCode) else k).to(dtype))
        else:
            code = self._code_of(k)
            self.key_values.index_copy_(2, index, code.values.to(dtype))
            self.key_indices.index_copy_(2, index, code.indices)
            if self.key_dense is not None:
                self.key_dense.index_copy_(2, index, self._stored_dense(code).to(dtype))
        self.values.index_copy_(2, index, v.to(dtype))
        return self.cached_keys(self.capacity), self.values

    def _code_of(self, k: torch.Tensor | SparseCode) -> SparseCode:
        """The top-k code an SFA cache stores for keys k (dense keys are selected here, by the fused kernel where
        one is registered for their device: a decode step codes its new keys every layer)."""
        code = k if isinstance(k, SparseCode) else fast_topk_sparsify(k, self.topk, self.dense_dims)
        if (code.k, code.dim, code.dense_dims) != (self.topk, self.head_dim, self.dense_dims):
            raise ValueError(
                f"KV cache: key code has k={code.k}, dim={code.dim}, dense_dims={code.dense_dims}; the cache holds "
                f"k={self.topk}, dim={self.head_dim}, dense_dims={self.dense_dims}"
            )
        return code

    def _stored_dense(self, code: SparseCode) -> torch.Tensor:
        """What key_dense holds of a code's leading coordinates: all heads', or the shared one once."""
        return code.dense[:, :1] if self.shared_dense else code.dense

    def cached_keys(self, length: int | None = None) -> torch.Tensor | SparseCode:
        """The first `length` (default: the filled length) cached keys, as views."""
        end = self.length if length is None else length
        if self.topk is None:
            return self.keys[:, :, :end]
        dense = None if self.key_dense is None else self.key_dense[:, :, :end]
        if self.shared_dense:  # one copy read by every head: a stride-0 view, no bytes repeated
            dense = dense.expand(-1, self.n_kv_heads, -1, -1)
        return SparseCode(
            values=self.key_values[:, :, :end],
            indices=self.key_indices[:, :, :end],
            dim=self.head_dim,
            dense=dense,
        )


class KVCache:
    """A model's cache: one LayerCache per layer, all with the same layout.

    topk=None gives the dense cache (also the short-embedding baseline's, with head_dim = d_short);
    an int gives SFA's compressed cache, with dense_dims > 0 its decoupled layout (shared_dense: the
    dense part stored once for all KV heads).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        capacity: int,
        n_kv_heads: int,
        head_dim: int,
        v_head_dim: int,
        topk: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
        dense_dims: int = 0,
        shared_dense: bool = False,
    ):
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        # Validates head counts, dims and topk with the same messages as the accounting.
        kv_cache_bytes_per_token(n_layers, n_kv_heads, head_dim, v_head_dim, topk, dtype, dense_dims, shared_dense)
        self.n_kv_heads, self.head_dim, self.v_head_dim = n_kv_heads, head_dim, v_head_dim
        self.topk, self.dtype, self.capacity, self.dense_dims = topk, dtype, capacity, dense_dims
        self.shared_dense = shared_dense
        self.layers = [
            LayerCache(batch_size, capacity, n_kv_heads, head_dim, v_head_dim, topk, dtype, device, dense_dims,
                       shared_dense)
            for _ in range(n_layers)
        ]

    @property
    def kind(self) -> str:
        return "dense" if self.topk is None else "sfa"

    @property
    def length(self) -> int:
        """Positions cached so far (read before a forward: it is the new tokens' position offset)."""
        return self.layers[0].length

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]

    def bytes_per_token(self) -> int:
        """Bytes per cached position for the whole model (all layers, one sequence of the batch)."""
        return kv_cache_bytes_per_token(
            len(self.layers), self.n_kv_heads, self.head_dim, self.v_head_dim, self.topk, self.dtype, self.dense_dims,
            self.shared_dense,
        )

    def nbytes(self) -> int:
        """Bytes actually allocated (all layers, whole batch, full capacity)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())
