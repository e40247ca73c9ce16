"""Triton kernels for SFA; importing this registers the backends with sfa.ops.

  masked  fused top-k -> masked dense q~, k~ -> cuDNN/flash SDPA (training, prefill)
  decode  split-KV attention of a few queries over the compressed cache (K as SparseCode)
  flash   FlashSFA forward + backward (sfa/kernels/flash.py), when present
See docs/kernels.md.
"""

from ..ops import register_backend
from .decode import decode_sfa_attention
from .masked import masked_sfa_attention
from .topk import fused_topk_masked, fused_topk_sparsify

register_backend("masked", masked_sfa_attention)
register_backend("decode", decode_sfa_attention, takes_kv_length=True)

try:  # FlashSFA; the other backends work without it
    from .flash import flash_sfa_attention
except ImportError:  # pragma: no cover - only while flash.py is absent or broken
    flash_sfa_attention = None
else:
    register_backend("flash", flash_sfa_attention)

__all__ = ["decode_sfa_attention", "flash_sfa_attention", "fused_topk_masked", "fused_topk_sparsify", "masked_sfa_attention"]
