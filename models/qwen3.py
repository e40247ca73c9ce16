"""Qwen3: RMSNorm, QK-norm, RoPE, grouped-query attention, SwiGLU MLP, optionally tied embeddings.

Parameter names follow HF's Qwen3ForCausalLM (model.layers.0.self_attn.q_proj, ...), so weights map
one-to-one. SFA sits after QK-norm and RoPE, i.e. on exactly the q and k the dense model would score;
with `attention.feature_map` a learned d×d map per layer, shared by Q and K and initialised to the
identity, is applied after RoPE and before top-k (the paper's "extra linear transformation", which
lets training move positional dimensions out of the sparsified coordinates).

`attention.rope` picks where RoPE goes: every q/k dim (`full`, HF's layout), only the first
`attention.rope_dims` dims of each head (`decoupled`: under SFA those stay dense and top-k runs over the
un-rotated rest), or nowhere (`none`). With `attention.rope_shared` the keys' rotary dims come from one
projection per token shared by every KV head (`k_rope_proj`, DeepSeek MLA's shared rotary key). See
models/attention.py and docs/models.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionConfig, LogitScale, attend, premask_topk
from .base import CausalLM, check_model_dims

try:  # the fused QK epilogue is a Triton kernel; without Triton the unfused ops are the only path
    from sfa.kernels.qk_epilogue import kernel_supports as fused_epilogue_supports
    from sfa.kernels.qk_epilogue import qk_norm_rope
except ImportError:
    qk_norm_rope = None

# The one switch of the fused QK epilogue (sfa/kernels/qk_epilogue.py): RMSNorm -> RoPE, and SFA's top-k when
# its backend takes pre-masked rows, in one Triton pass instead of eager's chain of elementwise kernels and a
# separate top-k pass. Dense and SFA take it alike, so neither is measured on the slower unfused ops.
# auto: on CUDA | on: wherever the kernel runs (also CPU under TRITON_INTERPRET=1, for the tests) | off: the
# readable ops of Qwen3Attention.forward, which are its reference and the CPU path. Cached decoding keeps them.
# From SFA_QK_EPILOGUE, so that scripts/e2e_throughput.py --qk-epilogue can measure one against the other.
# Off by default: eager it is 1.2-1.3x faster end to end on the H200, but under torch.compile (where auto fuses too)
# it gains nothing over inductor's own fusion of the norm and RoPE (0.96x dense, 1.01x SFA; docs/benchmarks.md).
QK_EPILOGUE = os.environ.get("SFA_QK_EPILOGUE", "off")
QK_EPILOGUE_MODES = ("auto", "on", "off")


def check_qk_epilogue() -> None:
    if QK_EPILOGUE not in QK_EPILOGUE_MODES:
        raise ValueError(f"SFA_QK_EPILOGUE={QK_EPILOGUE!r} is unknown; set it to one of {', '.join(QK_EPILOGUE_MODES)}")


def use_fused_qk_epilogue(x: torch.Tensor, layer_cache) -> bool:
    """Whether Qwen3Attention takes the fused epilogue for the projection rows x (see QK_EPILOGUE)."""
    check_qk_epilogue()
    if QK_EPILOGUE == "off" or qk_norm_rope is None or layer_cache is not None:
        return False
    return (QK_EPILOGUE == "on" or x.is_cuda) and fused_epilogue_supports(x)


@dataclass
class Qwen3Config:
    vocab_size: int = 151936
    max_seq_len: int = 40960
    n_layer: int = 28
    n_head: int = 16
    n_kv_head: int = 8
    head_dim: int = 128
    d_model: int = 1024
    intermediate_size: int = 3072
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    attention_bias: bool = False

    def __post_init__(self):
        check_model_dims("Qwen3Config", self)
        if isinstance(self.intermediate_size, bool) or not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
            raise ValueError(f"Qwen3Config.intermediate_size must be a positive int, got {self.intermediate_size!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"Qwen3Config.rope_theta must be positive, got {self.rope_theta!r}")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and cast back before the weight (as HF's Qwen3RMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout over `dim` dims: dims i and i + dim/2 form a rotated pair.

    cos/sin are computed once in fp32 for every position up to the longest sequence seen so far and sliced
    per forward, instead of recomputed at every step. The table is a plain attribute, not a buffer, so
    DDP does not broadcast it every step and checkpoints do not carry it; it follows inv_freq's device."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE needs an even q/k head dim, got {dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table
        if table is None or table[0].shape[0] < end or table[0].device != self.inv_freq.device:
            length = max(end, 2 * table[0].shape[0]) if table is not None else end
            positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float)
            freqs = torch.outer(positions, self.inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            self._table = table = (angles.cos(), angles.sin())
        return table

    def forward(self, start: int, end: int, dtype: torch.dtype):
        """cos, sin (end - start, dim) for positions start..end-1, in `dtype`."""
        cos, sin = self._cos_sin(end)
        return cos[start:end].to(dtype), sin[start:end].to(dtype)

    def at(self, positions: torch.Tensor, limit: int, dtype: torch.dtype):
        """cos, sin (T, dim) at `positions` (T,), a device tensor (a shape-static step) below `limit`."""
        cos, sin = self._cos_sin(limit)
        return cos.index_select(0, positions).to(dtype), sin.index_select(0, positions).to(dtype)


class SplitRMSNorm(nn.Module):
    """QK-norm of a head whose first `rotary` dims are normalised apart from the other `content` dims, each
    with its own weight (attention.rope_shared)."""

    def __init__(self, rotary: int, content: int, eps: float):
        super().__init__()
        self.rotary, self.content = RMSNorm(rotary, eps), RMSNorm(content, eps)

    def forward(self, x):
        r = self.rotary.weight.shape[0]
        return torch.cat((self.rotary(x[..., :r]), self.content(x[..., r:])), dim=-1)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of x (all of them for full RoPE); the rest pass unchanged."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotary, rest = x[..., :r], x[..., r:]
    return torch.cat((rotary * cos + rotate_half(rotary) * sin, rest), dim=-1)


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config, attention: AttentionConfig):
        super().__init__()
        check_qk_epilogue()  # a mistyped switch fails when the model is built, not at its first forward
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.qk_dim = attention.qk_head_dim(config.head_dim)
        self.attention = attention
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.d_model, self.n_head * self.qk_dim, bias=bias)
        # Under rope_shared one rotary key per token serves every KV head (k_rope_proj, below); the heads' own
        # keys supply only the other dims. (k_proj stays here: the init draws its weights in module order.)
        r = self.rope_dims = attention.rope_dims if attention.rope_shared else 0
        self.k_proj = nn.Linear(config.d_model, self.n_kv_head * (self.qk_dim - r), bias=bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=bias)
        eps = config.rms_norm_eps
        if attention.rope_shared:
            # A per-head norm over all D dims would scale the shared part by each head's own RMS, so it would
            # differ per head and could not be stored once: the rotary and content parts are normalised apart.
            # Queries get the same split, so each part of a score is a product of two normalised halves.
            self.q_norm = SplitRMSNorm(r, self.qk_dim - r, eps)
            self.k_norm = SplitRMSNorm(r, self.qk_dim - r, eps)
        else:
            self.q_norm = RMSNorm(self.qk_dim, eps)
            self.k_norm = RMSNorm(self.qk_dim, eps)
        self.k_rope_proj = nn.Linear(config.d_model, r, bias=bias) if attention.rope_shared else None
        self.feature_map = nn.Linear(self.qk_dim, self.qk_dim, bias=False) if attention.feature_map else None
        self.logit_scale = LogitScale(self.n_head) if attention.scale == "learned" else None

    def forward(self, x, cos, sin, layer_cache=None, pairs=None, step=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.qk_dim)
        k = self._keys(x)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        qk_masked = False
        # The fused epilogue applies one RMSNorm per head; a shared rotary key's split norm stays unfused.
        if self.k_rope_proj is None and use_fused_qk_epilogue(q, layer_cache):
            q, k, qk_masked = self._fused_qk_epilogue(q, k, v, cos, sin, pairs)
        else:
            q, k = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2)
            if cos is not None:  # attention.rope=none has no rotary part
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dense_qk = None
        if self.feature_map is not None:
            dense_qk = (q, k)  # the dense target of conversion fine-tuning has no feature map
            q, k = self.feature_map(q), self.feature_map(k)
        if self.logit_scale is not None:
            q = self.logit_scale(q)
        if pairs is not None:
            out, dense_out = attend(q, k, v, self.attention, return_pair=True, dense_qk=dense_qk)
            pairs.append((out, dense_out))
        else:
            out = attend(q, k, v, self.attention, layer_cache=layer_cache, step=step, qk_masked=qk_masked)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))

    def _keys(self, x):
        """Keys (B, T, Hkv, Dqk) before norm and RoPE; under rope_shared the first rope_dims of every head are
        the one shared rotary key (its norm and RoPE keep it the same in every head)."""
        b, t, _ = x.shape
        if self.k_rope_proj is None:
            return self.k_proj(x).view(b, t, self.n_kv_head, self.qk_dim)
        shared = self.k_rope_proj(x).view(b, t, 1, self.rope_dims).expand(-1, -1, self.n_kv_head, -1)
        return torch.cat((shared, self.k_proj(x).view(b, t, self.n_kv_head, self.qk_dim - self.rope_dims)), dim=-1)

    def _fused_qk_epilogue(self, q, k, v, cos, sin, pairs):
        """q, k (B, H, T, D) as the unfused ops make them, from the projection rows (B, T, H, D), in the
        projection's dtype (the one attention runs in, autocast or not); masked to SFA's top-k as well when
        attend can take them so (premask_topk) and nothing needs them unmasked (a feature map comes between
        RoPE and the top-k; the conversion pairs need the dense rows), with qk_masked=True then."""
        topk = None
        if self.feature_map is None and pairs is None:
            topk = premask_topk(self.attention, q.transpose(1, 2), k.transpose(1, 2), v)
        topk_q, topk_k = topk or (None, None)
        dense_dims = self.attention.dense_dims
        q = qk_norm_rope(q, self.q_norm.weight, self.q_norm.eps, cos, sin, topk=topk_q, dense_dims=dense_dims)
        k = qk_norm_rope(k, self.k_norm.weight, self.k_norm.eps, cos, sin, topk=topk_k, dense_dims=dense_dims)
        return q.transpose(1, 2), k.transpose(1, 2), topk is not None


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3Config, attention: AttentionConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config, attention)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(self, x, cos, sin, layer_cache=None, pairs=None, step=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_cache=layer_cache, pairs=pairs, step=step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3(CausalLM):
    uses_rope = True

    def __init__(self, config: Qwen3Config, attention: AttentionConfig | dict | str | None = None):
        super().__init__(config, attention)
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.d_model),
                layers=nn.ModuleList(Qwen3DecoderLayer(config, self.attention) for _ in range(config.n_layer)),
                norm=RMSNorm(config.d_model, config.rms_norm_eps),
            )
        )
        rotary_dims = self.attention.rotary_dims(self.qk_head_dim)
        self.rotary = RotaryEmbedding(rotary_dims, config.rope_theta) if rotary_dims else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, Qwen3Attention) and module.feature_map is not None:
            # Identity start: the SFA model begins as exactly the dense model's q/k (then learns a basis).
            nn.init.eye_(module.feature_map.weight)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def trunk(self, input_ids, start, cache, pairs, step=None):
        x = self.model.embed_tokens(input_ids)
        cos = sin = None
        if self.rotary is not None and step is not None:
            cos, sin = self.rotary.at(step.index, cache.capacity, x.dtype)
        elif self.rotary is not None:
            cos, sin = self.rotary(start, start + input_ids.shape[1], x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, layer_cache=None if cache is None else cache[i], pairs=pairs, step=step)
        return self.model.norm(x)
