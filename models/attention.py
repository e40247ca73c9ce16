"""The one seam where a model's attention becomes dense, SFA, or the short-embedding baseline.

Models compute q, k, v split into heads (and, for Qwen3, normalised and rotated) and hand them to
`attend`. Everything that differs between the three kinds lives here, except the width of the q/k
projections, which the models read from `qk_head_dim`:
  dense : softmax(q kᵀ / sqrt(D) + causal) v through torch's SDPA (a static-cache decode step on CUDA:
          the split-KV decode kernel, static_dense_attention).
  sfa   : the same with q and k reduced to their top-k coordinates per head (sfa.sfa_attention).
  short : q and k are projected to d_short per head instead of D (V and the output unchanged), so the
          model simply produces narrower q/k and the attention is dense with scale 1/sqrt(d_short).
Two axes orthogonal to the kind (docs/models.md "RoPE and SFA"):
  rope  : full (RoPE on every q/k dim, as HF Qwen3) | decoupled (RoPE on the first rope_dims dims only;
          under SFA those stay dense and top-k runs over the other, un-rotated dims, as in DeepSeek's MLA)
          | none (no positional signal in attention). Models without RoPE (GPT-2) accept only full.
          rope_shared (decoupled only): the keys' rotary dims come from one projection per token shared
          by every KV head (MLA's shared rotary key), so a compressed cache stores them once per layer.
  scale : sqrt_d (1/sqrt(D), the paper's) | sqrt_k (SFA: 1/sqrt of the coordinates a row keeps)
          | learned (a per-head temperature on q, starting at 1/sqrt(D)).
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

import sfa
from sfa.backends import takes_premasked
from sfa.dense import SDPA_PREFERENCE, dense_sdpa
from sfa.reference import causal_mask

try:  # the split-KV dense decode kernel (Triton); without Triton every static dense step takes the masked SDPA
    from sfa.kernels.decode import dense_decode_attention, dense_decode_refusal
except ImportError:
    dense_decode_attention = dense_decode_refusal = None

ATTENTION_KINDS = ("dense", "sfa", "short")
ROPE_LAYOUTS = ("full", "decoupled", "none")
SCALES = ("sqrt_d", "sqrt_k", "learned")


@dataclass
class AttentionConfig:
    kind: str = "dense"
    topk_q: int | None = None  # SFA: features kept per query row (per Q head)
    topk_k: int | None = None  # SFA: features kept per key row (per KV head); defaults to topk_q
    d_short: int | None = None  # short baseline: q/k width per head
    backend: str = "auto"  # sfa.sfa_attention backend
    feature_map: bool = False  # SFA on Qwen3: learned d×d map shared by Q and K after RoPE
    rope: str = "full"  # full | decoupled | none (see the module docstring)
    rope_dims: int | None = None  # rope=decoupled: the leading q/k dims per head that are rotary
    rope_shared: bool = False  # rope=decoupled: one rotary key per token shared by every KV head
    scale: str = "sqrt_d"  # sqrt_d | sqrt_k | learned

    @classmethod
    def coerce(cls, attention: "AttentionConfig | dict | str | None") -> "AttentionConfig":
        """Accept an AttentionConfig, a mapping of its fields, a kind name, or None (dense)."""
        if attention is None:
            return cls()
        if isinstance(attention, cls):
            return attention
        if isinstance(attention, str):
            return cls(kind=attention)
        if isinstance(attention, Mapping):  # a dict, or an OmegaConf DictConfig from Hydra
            attention = dict(attention)
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(attention) - known)
            if unknown:
                raise ValueError(f"attention: unknown field(s) {unknown}; known: {sorted(known)}")
            return cls(**attention)
        raise TypeError(f"attention must be an AttentionConfig, dict, kind name or None, got {type(attention).__name__}")

    def resolved(self, head_dim: int, uses_rope: bool = True) -> "AttentionConfig":
        """Check this config against a model's head dim (and whether the model has RoPE at all); return a
        copy with topk_k filled in."""
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention.kind={self.kind!r} is unknown; choose one of {', '.join(ATTENTION_KINDS)}")
        self._check_rope(head_dim, uses_rope)
        values = asdict(self)
        if self.kind == "sfa":
            if self.topk_q is None:
                raise ValueError("attention.topk_q is required for attention.kind='sfa'")
            values["topk_k"] = self.topk_q if self.topk_k is None else self.topk_k
            free = head_dim - (self.rope_dims if self.rope == "decoupled" else 0)
            for name in ("topk_q", "topk_k"):
                k = values[name]
                if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= free:
                    limit = f"head_dim - rope_dims = {free}" if free != head_dim else f"head_dim={head_dim}"
                    raise ValueError(f"attention.{name}={k!r} must be an int in [1, {limit}]")
            if self.backend not in sfa.available_backends():
                raise ValueError(
                    f"attention.backend={self.backend!r} is unknown; available: {', '.join(sfa.available_backends())}"
                )
        elif self.topk_q is not None or self.topk_k is not None:
            raise ValueError(f"attention.topk_q/topk_k are only meaningful for kind='sfa', not {self.kind!r}")
        if self.kind == "short":
            d = self.d_short
            if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= head_dim:
                raise ValueError(f"attention.d_short={d!r} must be an int in [1, head_dim={head_dim}] for kind='short'")
        elif self.d_short is not None:
            raise ValueError(f"attention.d_short is only meaningful for kind='short', not {self.kind!r}")
        if self.feature_map and self.kind != "sfa":
            raise ValueError("attention.feature_map=True needs attention.kind='sfa'")
        if self.feature_map and self.rope != "full":
            raise ValueError(
                f"attention.feature_map=True is the paper's remedy for full RoPE; with attention.rope={self.rope} "
                "the sparse dims carry no rotation already: drop one of the two"
            )
        if self.scale not in SCALES:
            raise ValueError(f"attention.scale={self.scale!r} is unknown; choose one of {', '.join(SCALES)}")
        if self.scale == "sqrt_k" and self.kind != "sfa":
            raise ValueError(f"attention.scale=sqrt_k needs attention.kind=sfa (kind={self.kind} keeps every coordinate)")
        return AttentionConfig(**values)

    def _check_rope(self, head_dim: int, uses_rope: bool) -> None:
        if self.rope not in ROPE_LAYOUTS:
            raise ValueError(f"attention.rope={self.rope!r} is unknown; choose one of {', '.join(ROPE_LAYOUTS)}")
        if not uses_rope and self.rope != "full":
            raise ValueError(
                f"attention.rope={self.rope}: this model has learned absolute positions, not RoPE; the rope axis "
                "applies to RoPE models (model=qwen3_*)"
            )
        if not isinstance(self.rope_shared, bool):
            raise ValueError(f"attention.rope_shared={self.rope_shared!r} must be true or false")
        if self.rope != "decoupled":
            if self.rope_dims is not None:
                raise ValueError(f"attention.rope_dims={self.rope_dims} needs attention.rope=decoupled (got {self.rope})")
            if self.rope_shared:
                raise ValueError(
                    f"attention.rope_shared=True needs attention.rope=decoupled (got {self.rope}): only a decoupled "
                    "head has a separate rotary part to share"
                )
            return
        if self.rope_shared and self.kind == "short":
            raise ValueError(
                "attention.rope_shared=True applies to kind=dense or sfa; the short baseline (kind=short) narrows "
                "its q/k itself: drop attention.rope_shared"
            )
        short = self.kind == "short" and isinstance(self.d_short, int) and not isinstance(self.d_short, bool)
        d, r = (self.d_short if short else head_dim), self.rope_dims
        if isinstance(r, bool) or not isinstance(r, int) or r < 2 or r % 2 or r >= d:
            raise ValueError(
                f"attention.rope_dims={r!r} must be an even int in [2, {d - 1}] (the q/k head dim is {d}) for "
                "attention.rope=decoupled"
            )

    def qk_head_dim(self, head_dim: int) -> int:
        """Width of q and k per head: d_short for the short baseline, else the head dim."""
        return self.d_short if self.kind == "short" else head_dim

    def rotary_dims(self, qk_dim: int) -> int:
        """How many leading q/k dims of a head RoPE rotates (0: no RoPE)."""
        return {"full": qk_dim, "decoupled": self.rope_dims, "none": 0}[self.rope]

    @property
    def dense_dims(self) -> int:
        """SFA's always-kept leading coordinates (sfa.sfa_attention's dense_dims): the rotary part of a
        decoupled head; 0 otherwise."""
        return self.rope_dims if self.kind == "sfa" and self.rope == "decoupled" else 0

    @property
    def shared_dense(self) -> bool:
        """Whether SFA's dense leading coordinates are one shared rotary key per token (rope_shared), which
        the compressed cache stores once for all KV heads. A dense kind keeps a plain per-head cache."""
        return self.rope_shared and self.dense_dims > 0

    def score_scale(self) -> float | None:
        """The scale sfa.sfa_attention gets: None (its default 1/sqrt(D)) unless scale=sqrt_k, which divides by
        the square root of the coordinates a query row keeps (dense_dims + topk_q). `learned` is a gain on q
        (LogitScale), so the kernels still see the default."""
        return 1.0 / math.sqrt(self.dense_dims + self.topk_q) if self.scale == "sqrt_k" else None


class LogitScale(nn.Module):
    """attention.scale=learned: a per-head temperature exp(log_gain) multiplying q, so every score of the head
    scales by it. It starts at 1 (the paper's 1/sqrt(D) scale). A positive factor on a whole row leaves its
    top-k selection unchanged, so SFA's masks are the same with or without it."""

    def __init__(self, n_head: int):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(n_head))

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # q (B, H, T, D)
        return q * self.log_gain.exp().to(q.dtype)[None, :, None, None]


@dataclass
class StaticStep:
    """Where a shape-static cache step writes and what it may see, read on the device (so the step can be
    captured in a CUDA graph and replayed at every position): `index` (T,) the new tokens' positions,
    `kv_length` (1,) the keys that exist once they are written, and for dense kinds `mask` (T, capacity),
    True where a new token may attend. Built once per forward and shared by the layers."""

    index: torch.Tensor
    kv_length: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def at(cls, position: torch.Tensor, n_new: int, capacity: int, needs_mask: bool) -> "StaticStep":
        index = position if n_new == 1 else position + torch.arange(n_new, device=position.device)
        mask = torch.arange(capacity, device=position.device) <= index[:, None] if needs_mask else None
        return cls(index=index, kv_length=index[-1:] + 1, mask=mask)


def static_dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense attention of T new queries over a whole preallocated cache, `mask` (T, capacity) selecting the
    keys each may see. The G query heads sharing a KV head become G*T rows of one head, so every SDPA kernel
    that takes a mask serves GQA without repeating the cache (each cached byte is read once)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    rows = q.reshape(b, hkv, group * t, d)
    row_mask = mask if t == 1 else mask.repeat(group, 1)  # rows are (head in group, token): token = row % t
    with sdpa_kernel(SDPA_PREFERENCE, set_priority=True) if q.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=row_mask)
    return out.reshape(b, hq, t, v.shape[-1])


def static_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StaticStep) -> torch.Tensor:
    """Dense attention of a shape-static step: T new queries over the whole preallocated cache, of which the
    first step.kv_length keys exist. The one place that picks the kernel:
      CUDA, where the split-KV decode kernel takes the inputs (sfa.kernels.decode.dense_decode_refusal: at most
          MAX_QUERY_ROWS query rows per KV head, head dims <= 256, fp16/bf16/fp32): that kernel. It reads only
          the valid keys and splits them across the SMs; the masked SDPA reads the whole capacity with one
          program per (batch, head), 5-20x the step's byte floor at batch <= 4 on an H200 (docs/inference.md).
      otherwise (CPU, where the kernel would only run in Triton's slow interpreter; wider steps; a step that
          needs gradients, which the inference-only kernel has no formula for): the masked SDPA.
    Both compute the same function; the kernel's own tests hold it to an fp64 reference."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.is_cuda and not needs_grad and dense_decode_refusal is not None and dense_decode_refusal(q, k, v) is None:
        return dense_decode_attention(q, k, v, causal=True, kv_length=step.kv_length)
    return static_dense_sdpa(q, k, v, step.mask)


def _autocast_dtypes(q, k, v):
    """Under autocast, norms and RoPE leave q and k in fp32 while the v projection is bf16. SDPA casts
    its inputs itself; sfa_attention refuses mixed dtypes, so cast them to the autocast dtype here."""
    device_type = v.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else v.dtype

    def cast(x):
        return x if isinstance(x, sfa.SparseCode) or x.dtype == dtype else x.to(dtype)

    return cast(q), cast(k), cast(v)


# --- opt-in diagnostics: what attention does per layer (training/diagnostics.py logs them) ------------
_stats_sink: list | None = None
DIAGNOSTIC_QUERY_ROWS = 256  # scores are formed for the last this-many query positions of the first sequence


@contextlib.contextmanager
def collect_attention_stats():
    """Within this context every attend() call without a cache appends one dict of statistics of its
    inputs (one per layer, in order): the share of q's and k's energy the top-k keeps, the largest
    logit, and the mean softmax entropy of the attention rows. Costs a few small extra matmuls per
    layer, so the training loop only enables it on diagnostic steps (train.diagnostics_every)."""
    global _stats_sink
    outer, _stats_sink = _stats_sink, []
    try:
        yield _stats_sink
    finally:
        _stats_sink = outer


@torch.no_grad()
def _attention_stats(q: torch.Tensor, k: torch.Tensor, config: AttentionConfig) -> dict[str, float]:
    q, k = q[:1].float(), k[:1].float()  # q (1, Hq, T, D), k (1, Hkv, T, D)
    if config.kind == "sfa":
        q_kept = sfa.topk_mask(q, config.topk_q, config.dense_dims)
        k_kept = sfa.topk_mask(k, config.topk_k, config.dense_dims)
    else:
        q_kept, k_kept = q, k

    def energy_kept(kept, full):
        return (kept.square().sum(-1) / full.square().sum(-1).clamp_min(1e-30)).mean().item()

    n_keys, n_rows = k.shape[2], min(q.shape[2], DIAGNOSTIC_QUERY_ROWS)
    keys = k_kept.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = config.score_scale() or 1.0 / math.sqrt(q.shape[-1])
    scores = (q_kept[:, :, -n_rows:] @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~causal_mask(n_rows, n_keys, q.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    return {
        "q_energy_kept": energy_kept(q_kept, q),
        "k_energy_kept": energy_kept(k_kept, k),
        "max_logit": scores.max().item(),
        "entropy": torch.special.entr(probs).sum(-1).mean().item(),
    }


def premask_topk(config: AttentionConfig, q, k, v) -> tuple[int, int] | None:
    """(topk_q, topk_k) for a producer of q and k that can take their top-k itself (Qwen3's fused QK epilogue)
    and hand attend the masked rows (`qk_masked=True`): when the SFA backend of the call takes pre-masked rows
    (the registry says: sfa.backends.takes_premasked) and attend needs nothing of the unmasked rows (no
    statistics being collected); else None. q (B, Hq, T, D), k, v with the shapes, dtypes and device attend
    will get."""
    if config.kind != "sfa" or _stats_sink is not None:
        return None
    if not takes_premasked(q, k, v, backend=config.backend, dense_dims=config.dense_dims):
        return None
    return config.topk_q, config.topk_k


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: AttentionConfig,
    *,
    layer_cache=None,
    step: StaticStep | None = None,
    return_pair: bool = False,
    dense_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
    qk_masked: bool = False,
):
    """Causal attention of the kind `config.kind` (config already `resolved`).

    q (B, Hq, T, Dqk), k (B, Hkv, T, Dqk), v (B, Hkv, T, Dv) -> (B, Hq, T, Dv).
    With `layer_cache` (an sfa.cache.LayerCache) the new k/v are appended first and q attends to
    everything cached; with `step` as well they are written at step.index instead and q attends over the
    whole cache, masked to step.kv_length (a shape-static step). With `return_pair` (SFA only, no cache)
    also returns the dense attention output of the same inputs computed without gradients, for the
    conversion loss (paper Eq. 8); `dense_qk` overrides the q/k that dense output uses (Qwen3 passes them
    from before its feature map). `qk_masked`: SFA's q and k come masked already (see premask_topk).
    """
    if _stats_sink is not None and layer_cache is None:
        _stats_sink.append(_attention_stats(q, k, config))
    if layer_cache is not None:
        if return_pair:
            raise ValueError("return_attention_pairs cannot be combined with a KV cache")
        k, v = layer_cache.append(k, v) if step is None else layer_cache.write(k, v, step.index)
        # The cache may hold another dtype than the activations (e.g. bf16 cache, fp32 model).
        out_dtype, q = q.dtype, q.to(v.dtype)
    else:
        out_dtype = None
    if config.kind == "sfa":
        if layer_cache is None:  # with a cache, q was cast to the cache's dtype above: the cache governs
            q, k, v = _autocast_dtypes(q, k, v)
        out = sfa.sfa_attention(
            q, k, v, topk_q=config.topk_q, topk_k=None if isinstance(k, sfa.SparseCode) else config.topk_k,
            causal=True, backend=config.backend, scale=config.score_scale(), dense_dims=config.dense_dims,
            kv_length=None if step is None else step.kv_length, premasked=qk_masked,
        )
    elif step is not None:
        out = static_dense_attention(q, k, v, step)
    else:
        out = dense_sdpa(q, k, v)
    if out_dtype is not None:
        out = out.to(out_dtype)
    if not return_pair:
        return out
    if config.kind != "sfa":
        raise ValueError(f"return_attention_pairs needs attention.kind='sfa', not {config.kind!r}")
    dq, dk = dense_qk if dense_qk is not None else (q, k)
    with torch.no_grad():
        dense_out = dense_sdpa(dq, dk, v)
    return out, dense_out

