"""The `auto` rule: which backend serves a call, from measured tables (cite: docs/kernels.md).

Kept free of Triton imports so it can be read (and tested) anywhere. The numbers behind each rule:
  * decode vs dense decode:   docs/bench/results/decode_h200.json (decode beats dense cuDNN 1.1-1.3x at 32k-128k, T=1)
  * fused top-k vs torch:     docs/bench/results/topk_h200.json ("topk" and "masked": masked = 1.02-1.08x dense cuDNN fwd+bwd)
  * flash vs masked:          docs/bench/attention.md -- update FLASH_WINS when it reports wins.
"""

from __future__ import annotations

import torch

from ..topk import SparseCode

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_KERNEL_HEAD_DIM = 256  # uint8 column indices
DECODE_MAX_QUERY_ROWS = 64  # (Hq/Hkv) x Nq rows per program in the decode kernel

# (min_queries, max_head_dim) ranges where the `flash` backend measured faster than `masked` for
# training/prefill on the GPU. Empty: in the H200 run of docs/bench/attention.md flash was
# 1.06-1.37x slower than masked at every measured shape (8k-32k, D 64/128, fwd and fwd+bwd).
FLASH_WINS: list[tuple[int, int]] = []


def _dtype_and_dim(x) -> tuple[torch.dtype, int]:
    return x.dtype, x.shape[-1]


def choose_backend(q, k, v, *, topk_q: int, topk_k: int, causal: bool) -> str:
    """Pick a registered backend for these (already validated) inputs; never raises."""
    from ..ops import BACKENDS

    if v.device.type != "cuda":
        return "reference"
    dtype, dim = _dtype_and_dim(q)
    if dtype not in KERNEL_DTYPES or dim > MAX_KERNEL_HEAD_DIM or v.dtype not in KERNEL_DTYPES:
        return "reference"
    n_q, group = q.shape[2], q.shape[1] // k.shape[1]
    if isinstance(k, SparseCode) and group * n_q <= DECODE_MAX_QUERY_ROWS and "decode" in BACKENDS:
        return "decode"
    if "flash" in BACKENDS and any(n_q >= min_q and dim <= max_d for min_q, max_d in FLASH_WINS):
        return "flash"
    if "masked" in BACKENDS:
        return "masked"
    return "reference"
