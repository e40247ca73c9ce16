"""GPT-2: learned positions, pre-LayerNorm blocks, GELU (tanh) MLP, biases, tied embeddings.

Parameter names follow HF's GPT2LMHeadModel (transformer.wte, transformer.h.0.attn.c_attn, ...) so
weights map one-to-one; HF stores its projections as Conv1D (in, out), we use nn.Linear (out, in),
and models/hf.py transposes. SFA sits right after the head split: q and k of every head go to the
attention seam as they come out of c_attn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionConfig, LogitScale, attend
from .base import CausalLM, check_model_dims


@dataclass
class GPT2Config:
    vocab_size: int = 50304  # 50257 padded up to a multiple of 64, as in nanoGPT
    max_seq_len: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    head_dim: int | None = None  # default d_model // n_head; may differ (head-dim sweeps)
    n_kv_head: int | None = None  # GPT-2 has no GQA: always n_head
    mlp_hidden: int | None = None  # default 4 * d_model
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0  # on embeddings and residual branches (attention dropout is not supported)
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.head_dim is None and isinstance(self.d_model, int) and isinstance(self.n_head, int) and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.mlp_hidden is None and isinstance(self.d_model, int):
            self.mlp_hidden = 4 * self.d_model
        check_model_dims("GPT2Config", self)
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise ValueError(f"GPT2Config.mlp_hidden must be a positive int, got {self.mlp_hidden!r}")
        if self.n_kv_head != self.n_head:
            raise ValueError(f"GPT2Config: n_kv_head={self.n_kv_head} must equal n_head={self.n_head} (GPT-2 has no GQA)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout={self.dropout} must be in [0, 1)")


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, attention: AttentionConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qk_dim = attention.qk_head_dim(config.head_dim)
        self.attention = attention
        # One fused projection, split as [q | k | v]; q/k are narrower for the short baseline.
        self.split_sizes = (self.n_head * self.qk_dim, self.n_head * self.qk_dim, self.n_head * self.head_dim)
        self.c_attn = nn.Linear(config.d_model, sum(self.split_sizes))
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.logit_scale = LogitScale(self.n_head) if attention.scale == "learned" else None

    def forward(self, x, layer_cache=None, pairs=None, step=None):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=-1)
        q = q.view(b, t, self.n_head, self.qk_dim).transpose(1, 2)
        k = k.view(b, t, self.n_head, self.qk_dim).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        if self.logit_scale is not None:
            q = self.logit_scale(q)
        if pairs is not None:
            out, dense_out = attend(q, k, v, self.attention, return_pair=True)
            pairs.append((out, dense_out))
        else:
            out = attend(q, k, v, self.attention, layer_cache=layer_cache, step=step)
        out = out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(out))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.mlp_hidden)
        self.c_proj = nn.Linear(config.mlp_hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # tanh approximation: what GPT-2 was trained with (HF "gelu_new").
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, attention: AttentionConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = GPT2Attention(config, attention)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, x, layer_cache=None, pairs=None, step=None):
        x = x + self.attn(self.ln_1(x), layer_cache=layer_cache, pairs=pairs, step=step)
        return x + self.mlp(self.ln_2(x))


class GPT2(CausalLM):
    def __init__(self, config: GPT2Config, attention: AttentionConfig | dict | str | None = None):
        super().__init__(config, attention)
        if self.attention.feature_map:
            raise ValueError("attention.feature_map is a Qwen3 option (it keeps RoPE dims out of top-k); GPT-2 has no RoPE")
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.max_seq_len, config.d_model),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(GPT2Block(config, self.attention) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.d_model, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections by 1/sqrt(2 * n_layer) to keep the stream's variance.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.transformer.wte

    def embedding_parameters(self):
        return [*super().embedding_parameters(), self.transformer.wpe.weight]

    def trunk(self, input_ids, start, cache, pairs, step=None):
        if step is None:
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        else:
            positions = step.index
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        for i, block in enumerate(self.transformer.h):
            x = block(x, layer_cache=None if cache is None else cache[i], pairs=pairs, step=step)
        return self.transformer.ln_f(x)
