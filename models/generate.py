"""Autoregressive generation, greedy or sampled, with the model's KV cache (dense or compressed)."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top_k largest and outside the nucleus: the smallest set of
    most likely tokens whose probability sums to at least top_p (the most likely token always stays)."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature == 0, else a sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(input_ids, max_new_tokens, temperature, top_p, top_k):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("generate: input_ids must be a (B, T) tensor with T >= 1")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue `input_ids` (B, T) by up to max_new_tokens tokens; returns (B, T + n_generated).

    temperature 0 is greedy. With use_cache the prompt is encoded once into model.new_cache() and each
    step feeds one token; without it every step recomputes the whole (window of the) sequence, keeping
    the last max_seq_len tokens. A sequence that produced eos_token_id keeps emitting it; generation
    stops early once every sequence has.
    """
    _check_args(input_ids, max_new_tokens, temperature, top_p, top_k)
    max_len = model.config.max_seq_len
    total = input_ids.shape[1] + max_new_tokens
    if use_cache and total > max_len:
        raise ValueError(
            f"generate: prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_seq_len={max_len}; shorten them, or use_cache=False to slide a window"
        )
    was_training = model.training
    model.eval()
    try:
        tokens = input_ids
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = model.new_cache(input_ids.shape[0], capacity=total) if use_cache else None
        step_input = input_ids
        for _ in range(max_new_tokens):
            if not use_cache:
                step_input = tokens[:, -max_len:]
            logits, _ = model(step_input, cache=cache)
            new = next_token(logits[:, -1], temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
            if eos_token_id is not None:
                new = torch.where(finished, torch.full_like(new, eos_token_id), new)
                finished |= new == eos_token_id
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            step_input = new[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
        return tokens
    finally:
        model.train(was_training)
