"""What GPT-2 and Qwen3 share: input checks, the loss, parameter counts, cache construction and the
dimensions the FLOP and memory accounting reads. Each model supplies `embed_tokens` (its token
embedding), `lm_head`, and `trunk` (embeddings through the final norm)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfa.cache import KVCache, kv_cache_bytes_per_token

from .attention import AttentionConfig, StaticStep


def check_model_dims(name: str, config) -> None:
    """Clear errors for impossible shapes, shared by both configs (called from __post_init__)."""
    for field in ("vocab_size", "max_seq_len", "n_layer", "n_head", "d_model", "n_kv_head", "head_dim"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}.{field} must be a positive int, got {value!r}")
    if config.n_head % config.n_kv_head != 0:
        raise ValueError(
            f"{name}: n_head={config.n_head} must be a multiple of n_kv_head={config.n_kv_head} (grouped-query attention)"
        )


class CausalLM(nn.Module):
    """Base for the decoder-only language models. forward -> (logits float (B, T, V), loss | None)."""

    uses_rope = False  # whether the model's positions come from RoPE (the attention.rope axis applies)

    def __init__(self, config, attention: AttentionConfig | dict | str | None):
        super().__init__()
        self.config = config
        self.attention = AttentionConfig.coerce(attention).resolved(config.head_dim, uses_rope=self.uses_rope)

    # --- subclass hooks -------------------------------------------------------------------------
    embed_tokens: nn.Embedding
    lm_head: nn.Linear

    def trunk(
        self, input_ids: torch.Tensor, start: int, cache: KVCache | None, pairs: list | None, step: StaticStep | None
    ) -> torch.Tensor:
        """Hidden states after the final norm. Positions start at `start`, or are step.index for a
        shape-static cache step."""
        raise NotImplementedError

    # --- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_attention_pairs: bool = False,
        *,
        logits_to_keep: int = 0,
        position: torch.Tensor | None = None,
    ):
        """Logits (float) for every position and the mean cross-entropy against `targets`
        (-1 = ignore). With `cache`, input_ids continue the cached sequence. With
        `return_attention_pairs` (SFA only) also returns, per layer, (sfa_out, dense_out), each
        (B, H, T, Dv), where dense_out is dense attention on the same layer input without gradients.

        logits_to_keep=n > 0 returns logits for the last n positions only (as HF's argument; 0 = all):
        generation needs one row, and B x T x vocab fp32 logits of a long prompt would not fit.
        position (a (1,) int64 tensor on the model's device, with `cache`): input_ids sit at positions
        position, position+1, ..., read on the device. The step then writes the cache at those positions
        and attends over its whole capacity, so it has one shape at every position (CUDA graphs). The
        caller keeps position + T within the cache (not checked: a device sync); cache.length does not move."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of shape (B, T), got {got}")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep cannot be combined with targets (the loss needs every position's logits)")
        if position is not None:
            self._check_position(position, cache)
        start = 0 if cache is None else cache.length
        if cache is not None and len(cache) != self.config.n_layer:
            raise ValueError(f"cache has {len(cache)} layers but the model has n_layer={self.config.n_layer}")
        want = (self._cache_topk(), self.qk_head_dim, self._cache_dense_dims(), self.attention.shared_dense)
        if cache is not None and (cache.topk, cache.head_dim, cache.dense_dims, cache.shared_dense) != want:
            raise ValueError(
                f"cache layout (topk={cache.topk}, key dim {cache.head_dim}, dense_dims={cache.dense_dims}, "
                f"shared_dense={cache.shared_dense}) does not fit this model's attention (topk={want[0]}, key dim "
                f"{want[1]}, dense_dims={want[2]}, shared_dense={want[3]}); make it with model.new_cache()"
            )
        if position is None and start + input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + input_ids.shape[1]} positions ({start} cached + {input_ids.shape[1]} new) "
                f"exceeds max_seq_len={self.config.max_seq_len}"
            )
        if return_attention_pairs and self.attention.kind != "sfa":
            raise ValueError(f"return_attention_pairs needs attention.kind='sfa', not {self.attention.kind!r}")
        pairs = [] if return_attention_pairs else None
        step = None
        if position is not None:
            step = StaticStep.at(position, input_ids.shape[1], cache.capacity, needs_mask=self.attention.kind != "sfa")
        hidden = self.trunk(input_ids, start, cache, pairs, step)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden).float()
        loss = None
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets {tuple(targets.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if return_attention_pairs:
            return logits, loss, pairs
        return logits, loss

    @staticmethod
    def _check_position(position, cache) -> None:
        if cache is None:
            raise ValueError("position is the write position in a KV cache: pass cache= as well")
        if not isinstance(position, torch.Tensor) or position.shape != (1,) or position.dtype != torch.int64:
            got = f"{tuple(position.shape)} {position.dtype}" if isinstance(position, torch.Tensor) else type(position).__name__
            raise ValueError(f"position must be an int64 tensor of shape (1,), got {got}")
        if position.device != cache[0].values.device:
            raise ValueError(f"position is on {position.device}, the cache on {cache[0].values.device}")

    # --- accounting -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.attention.qk_head_dim(self.config.head_dim)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied embedding counted once. exclude_embeddings drops the token embedding
        (and GPT-2's position table), as in the scaling-law convention of "non-embedding" params."""
        total = sum(p.numel() for p in self.parameters())  # parameters() already de-duplicates tied weights
        if exclude_embeddings:
            total -= sum(p.numel() for p in self.embedding_parameters())
        return total

    def embedding_parameters(self) -> list[nn.Parameter]:
        params = [self.embed_tokens.weight]
        if self.lm_head.weight is not self.embed_tokens.weight:
            params.append(self.lm_head.weight)
        return params

    def attention_flops_dims(self) -> dict:
        cfg, att = self.config, self.attention
        return {
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_kv_head": cfg.n_kv_head,
            "head_dim": self.qk_head_dim,
            "v_head_dim": cfg.head_dim,
            "topk_q": att.topk_q,
            "topk_k": att.topk_k,
            "dense_dims": att.dense_dims,
        }

    def _cache_topk(self) -> int | None:
        return self.attention.topk_k if self.attention.kind == "sfa" else None

    def _cache_dense_dims(self) -> int:
        return self.attention.dense_dims

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        cfg = self.config
        return kv_cache_bytes_per_token(
            cfg.n_layer, cfg.n_kv_head, self.qk_head_dim, cfg.head_dim, self._cache_topk(), dtype, self._cache_dense_dims(),
            self.attention.shared_dense,
        )

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty cache of the layout this model's attention needs (dense / sfa / short).
        dtype and device default to the model's parameters'."""
        param = self.lm_head.weight
        cfg = self.config
        if capacity > cfg.max_seq_len:
            raise ValueError(f"cache capacity={capacity} exceeds max_seq_len={cfg.max_seq_len}")
        return KVCache(
            n_layers=cfg.n_layer,
            batch_size=batch_size,
            capacity=capacity,
            n_kv_heads=cfg.n_kv_head,
            head_dim=self.qk_head_dim,
            v_head_dim=cfg.head_dim,
            topk=self._cache_topk(),
            dtype=dtype or param.dtype,
            device=device or param.device,
            dense_dims=self._cache_dense_dims(),
            shared_dense=self.attention.shared_dense,
        )
