"""FLOP counts per token for attention and for a whole transformer step (pure functions: no torch, no models).

Conventions (docs/metrics.md has the derivations):
- one multiply-add is 2 FLOPs; a training step (forward + backward) costs 3x the forward;
- causal attention over a sequence of T tokens: the query at position i sees i + 1 keys, so a token sees
  (T + 1) / 2 keys on average; this counts only the causal half a block-skipping kernel executes;
- SFA's score term: a query with k_q active coordinates and a key with k_k active ones of D overlap in
  k_q * k_k / D coordinates on average (the mean of the hypergeometric overlap), so a score costs
  2 * k_q * k_k / D FLOPs instead of 2 * D. P.V stays dense. Top-k selection is not counted (no matmul).
  Decoupled RoPE keeps the first dense_dims coordinates dense: r + k_q * k_k / (D - r) per score.
"""

from __future__ import annotations


def mean_keys_per_query(seq_len: int, causal: bool = True) -> float:
    """Average number of keys a query attends to in a sequence of `seq_len` tokens."""
    if seq_len < 1:
        raise ValueError(f"mean_keys_per_query: seq_len must be >= 1, got {seq_len}")
    return (seq_len + 1) / 2 if causal else float(seq_len)


def score_dim(head_dim: int, topk_q: int | None = None, topk_k: int | None = None, dense_dims: int = 0) -> float:
    """Multiply-adds per query-key score: D when dense, the expected overlap k_q * k_k / D with SFA
    (dense_dims + k_q * k_k / (D - dense_dims) when the first dense_dims coordinates are always kept)."""
    if head_dim < 1:
        raise ValueError(f"score_dim: head_dim must be >= 1, got {head_dim}")
    if topk_q is None and topk_k is None:
        return float(head_dim)
    if topk_q is None or topk_k is None:
        raise ValueError(f"score_dim: give both topk_q and topk_k or neither (got {topk_q}, {topk_k})")
    if not 0 <= dense_dims < head_dim:
        raise ValueError(f"score_dim: dense_dims={dense_dims} must be in [0, head_dim={head_dim})")
    sparse = head_dim - dense_dims
    for name, k in (("topk_q", topk_q), ("topk_k", topk_k)):
        if not 1 <= k <= sparse:
            limit = f"head_dim - dense_dims = {sparse}" if dense_dims else f"head_dim={head_dim}"
            raise ValueError(f"score_dim: {name}={k} must be in [1, {limit}]")
    return dense_dims + topk_q * topk_k / sparse


def attention_forward_flops_per_token(
    *,
    n_layer: int,
    n_head: int,
    head_dim: int,
    v_head_dim: int,
    seq_len: int,
    topk_q: int | None = None,
    topk_k: int | None = None,
    causal: bool = True,
    dense_dims: int = 0,
) -> float:
    """Forward FLOPs per token of the score (QK^T) and mix (P.V) matmuls, summed over layers and query heads.

    Key/value heads do not enter: with GQA every query head still scores and mixes on its own.
    """
    keys = mean_keys_per_query(seq_len, causal)
    scores = 2 * score_dim(head_dim, topk_q, topk_k, dense_dims) * keys
    mix = 2 * v_head_dim * keys
    return n_layer * n_head * (scores + mix)


def matmul_forward_flops_per_token(matmul_params: int) -> float:
    """Forward FLOPs per token of the weight matmuls: 2 per weight (each weight is one multiply-add per token)."""
    if matmul_params < 0:
        raise ValueError(f"matmul_forward_flops_per_token: matmul_params must be >= 0, got {matmul_params}")
    return 2.0 * matmul_params


def training_flops_per_token(matmul_params: int, attention_forward_flops: float) -> float:
    """FLOPs per token of one training step: forward + backward = 3x forward."""
    return 3.0 * (matmul_forward_flops_per_token(matmul_params) + attention_forward_flops)
