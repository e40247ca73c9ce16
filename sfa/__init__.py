"""Sparse Feature Attention: top-k feature-sparse queries and keys, exact softmax, dense values.

Importable without Hydra or the models. See README "The SFA library" and ../docs/contract.md.
"""

from .backends import Capabilities, available_backends, register_backend
from .ops import sfa_attention
from .reference import dense_attention, sfa_attention_reference
from .topk import SparseCode, topk_mask, topk_sparsify

__all__ = [
    "Capabilities",
    "SparseCode",
    "available_backends",
    "dense_attention",
    "register_backend",
    "sfa_attention",
    "sfa_attention_reference",
    "topk_mask",
    "topk_sparsify",
]

# The Triton backends register themselves when Triton imports; sfa works without it (reference only).
try:
    from . import kernels  # noqa: F401
except ImportError:
    pass
