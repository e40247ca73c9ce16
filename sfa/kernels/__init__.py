"""Triton kernels for SFA; importing this registers the backends, each with what it supports and its
priority for `auto` (sfa/backends.py):

  decode  split-KV attention of a few queries over the compressed cache (K as SparseCode); the same
          kernels in a dense-key mode are the dense decode step (dense_decode_attention)
  masked  fused top-k -> masked dense q~, k~ -> cuDNN/flash SDPA (training, prefill)
  flash   FlashSFA forward + backward (sfa/kernels/flash.py), when present; only when named
and, not a backend, qk_epilogue: a Qwen3-style QK-norm -> RoPE -> top-k mask of q/k in one pass.
See docs/kernels.md.
"""

from .decode import decode_sfa_attention, dense_decode_attention
from .masked import masked_sfa_attention
from .qk_epilogue import qk_norm_rope
from .topk import fused_topk_masked, fused_topk_sparsify

try:  # FlashSFA; the other backends work without it
    from .flash import flash_sfa_attention
except ImportError:  # pragma: no cover - only while flash.py is absent or broken
    flash_sfa_attention = None

__all__ = [
    "decode_sfa_attention", "dense_decode_attention", "flash_sfa_attention", "fused_topk_masked", "fused_topk_sparsify",
    "masked_sfa_attention", "qk_norm_rope",
]
