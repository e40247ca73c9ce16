"""GPT-2 and Qwen3 with dense, SFA or short-embedding attention (chosen in models/attention.py)."""

from .attention import AttentionConfig
from .generate import generate
from .gpt2 import GPT2, GPT2Config
from .presets import PRESETS, build_model
from .qwen3 import Qwen3, Qwen3Config

__all__ = [
    "GPT2",
    "PRESETS",
    "AttentionConfig",
    "GPT2Config",
    "Qwen3",
    "Qwen3Config",
    "build_model",
    "from_hf",
    "generate",
    "to_hf",
]


def __getattr__(name: str):
    if name in ("from_hf", "to_hf"):
        from . import hf  # lazy: transformers is heavy (~2 s) and training never needs it

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
