"""The `masked` backend: fused top-k to masked dense q~, k~, then the fastest dense SDPA kernel (sfa/dense.py).

Random top-k supports cover nearly all D within a tile (docs/design.md), so once q and k are masked the
best a kernel can do is dense tensor-core attention on q~, k~ -- which cuDNN/FlashAttention already
are. The top-k pass writes q~ and k~ once (the expansion happens per tensor, never per tile visit).
Backward is straight-through by construction: the top-k custom op sends dq~ (dk~) back to q (k) only
at the selected coordinates; SDPA's own backward gives dq~, dk~ and a dense dv. When the producer of q and k
masked them already (the fused QK epilogue, sfa/kernels/qk_epilogue.py), the `premasked` entry is the dense
step alone.
"""

from __future__ import annotations

import torch

from ..backends import Capabilities, register_backend
from ..dense import dense_sdpa
from ..topk import SparseCode, masked_rows
from ._config import KERNEL_DTYPES
from .topk import MAX_DIM, fused_topk_masked


def _fused_masked(rows: torch.Tensor, topk: int) -> torch.Tensor:
    return fused_topk_masked(rows, topk)[1]


def masked_features(x: torch.Tensor | SparseCode, topk: int, dense_dims: int = 0) -> torch.Tensor:
    """Dense top-k-masked rows through the fused kernel (sfa.topk.masked_rows), differentiable
    straight-through; the first `dense_dims` coordinates are kept (x itself when nothing is dropped)."""
    return masked_rows(x, topk, dense_dims, tail_masked=_fused_masked)


def masked_sfa_attention(q, k, v, *, topk_q: int, topk_k: int, causal: bool = True, scale: float | None = None,
                         dense_dims: int = 0):
    """The `masked` backend (arguments already checked by sfa.sfa_attention)."""
    q_masked = masked_features(q, topk_q, dense_dims)
    k_masked = masked_features(k, topk_k, dense_dims)
    return dense_sdpa(q_masked, k_masked, v, causal=causal, scale=scale)


def premasked_sfa_attention(q, k, v, *, topk_q: int, topk_k: int, causal: bool = True, scale: float | None = None,
                            dense_dims: int = 0):
    """The `masked` backend over q~, k~ their producer already masked (sfa_attention(..., premasked=True),
    e.g. from the fused QK epilogue): what is left of it is the dense step."""
    return dense_sdpa(q, k, v, causal=causal, scale=scale)


# auto's choice for training and prefill on CUDA: 0.97-1.10x dense cuDNN's time for the SFA attention step
# (forward + backward, top-k included) at 8k-32k on the H200, while the reference's sort-based top-k alone costs
# more than the whole attention (docs/benchmarks.md, docs/bench/topk_decode.md). Head dims up to the fused
# top-k's MAX_DIM (its uint8 indices); beyond, auto takes the reference.
register_backend(
    "masked", masked_sfa_attention,
    Capabilities(devices=("cuda",), dtypes=KERNEL_DTYPES, max_head_dim=MAX_DIM),
    priority=10, premasked=premasked_sfa_attention,
)
