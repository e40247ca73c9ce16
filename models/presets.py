"""Named model shapes and `build_model`, the one constructor the training loop calls."""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from .attention import AttentionConfig
from .gpt2 import GPT2, GPT2Config
from .qwen3 import Qwen3, Qwen3Config

PRESETS: dict[str, GPT2Config | Qwen3Config] = {
    # CPU tests and the default job: GPT-2 vocabulary, four 64-wide heads.
    "gpt2_tiny": GPT2Config(n_layer=4, n_head=4, d_model=256),
    # The published GPT-2 shapes (vocab 50257 padded to 50304 as in nanoGPT).
    "gpt2_small": GPT2Config(n_layer=12, n_head=12, d_model=768),
    "gpt2_medium": GPT2Config(n_layer=24, n_head=16, d_model=1024),
    # CPU-sized Qwen3. Its vocabulary is GPT-2's padded 50304, not Qwen's 151936: at d_model 256 the
    # 151936-row embedding alone would be 39M parameters and the logits dominate a CPU step. Train it
    # on GPT-2-tokenized data, or override vocab_size=151936 for the Qwen tokenizer.
    "qwen3_tiny": Qwen3Config(
        vocab_size=50304, max_seq_len=1024, n_layer=4, n_head=4, n_kv_head=2, head_dim=64, d_model=256,
        intermediate_size=768,
    ),
    # Qwen3-0.6B as published (HF Qwen/Qwen3-0.6B config.json).
    "qwen3_0.6b": Qwen3Config(
        vocab_size=151936, max_seq_len=40960, n_layer=28, n_head=16, n_kv_head=8, head_dim=128, d_model=1024,
        intermediate_size=3072, rope_theta=1e6, rms_norm_eps=1e-6, tie_embeddings=True,
    ),
}


def model_class(config) -> type:
    if isinstance(config, GPT2Config):
        return GPT2
    if isinstance(config, Qwen3Config):
        return Qwen3
    raise TypeError(f"config must be a GPT2Config or Qwen3Config, got {type(config).__name__}")


def resolve_config(config_or_preset: str | GPT2Config | Qwen3Config, **overrides) -> GPT2Config | Qwen3Config:
    """A preset name or config, with fields replaced by `overrides` (validated again)."""
    if isinstance(config_or_preset, str):
        if config_or_preset not in PRESETS:
            raise ValueError(f"unknown model preset {config_or_preset!r}; choose one of {', '.join(PRESETS)}")
        config = PRESETS[config_or_preset]
    else:
        config = config_or_preset
    model_class(config)
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} field(s) {unknown}; known: {sorted(known)}")
    if isinstance(config, GPT2Config):
        # Fields GPT-2 derives from others are re-derived when those change, unless set explicitly:
        # build_model("gpt2_small", d_model=512) gets head_dim 512 // 12, not a stale 64.
        derived = {"head_dim": config.d_model // config.n_head, "n_kv_head": config.n_head, "mlp_hidden": 4 * config.d_model}
        for name, default in derived.items():
            if name not in overrides and getattr(config, name) == default:
                overrides[name] = None
    return dataclasses.replace(config, **overrides)


def build_model(
    config_or_preset_name: str | GPT2Config | Qwen3Config,
    attention: AttentionConfig | dict | str | None = None,
    **overrides,
) -> nn.Module:
    """Build GPT-2 or Qwen3 from a preset name or config, with `attention` (default dense) and
    config fields replaced by `overrides`, e.g. build_model("gpt2_small", attn, n_layer=6, head_dim=32)."""
    config = resolve_config(config_or_preset_name, **overrides)
    return model_class(config)(config, attention)
