"""Autoregressive generation, greedy or sampled, through the model's KV cache (dense or compressed).

generate() is the one entry point; the static-cache decode engine it drives is models/decoding.py, the
token choice models/sampling.py.
"""

from __future__ import annotations

import torch

from .decoding import Decoder
from .sampling import Sampler, check_sampling


def _check_args(model, input_ids, max_new_tokens, temperature, top_p, top_k, prefill_chunk, eos_check_every):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("generate: input_ids must be a (B, T) tensor with T >= 1")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_p, top_k)
    for name, value in (("prefill_chunk", prefill_chunk), ("eos_check_every", eos_check_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"generate: {name} must be a positive int, got {value!r}")
    device = model.lm_head.weight.device
    if input_ids.device != device:
        raise ValueError(f"generate: input_ids are on {input_ids.device}, the model on {device}")


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
    prefill_chunk: int | None = None,
    mode: str = "auto",
    eos_check_every: int = 16,
) -> torch.Tensor:
    """Continue `input_ids` (B, T) by up to max_new_tokens tokens; returns (B, T + n_generated).

    temperature 0 is greedy, else top-k, then top-p, then a draw from `generator` (on the model's device).
    With use_cache the prompt is prefilled into a cache preallocated to T + max_new_tokens, at most
    `prefill_chunk` positions per forward (default: about 16k tokens per forward over the batch), and each
    further token comes from one shape-static decode step: replayed from a CUDA graph (mode "graph", the
    default on CUDA), compiled ("compile"), or run eagerly ("eager", the default elsewhere). Without the
    cache every step recomputes the whole (window of the) sequence, keeping the last max_seq_len tokens.
    A sequence that produced eos_token_id keeps emitting it; generation stops once every sequence has
    (checked on the host every eos_check_every steps; the result is the same as checking every step).
    """
    _check_args(model, input_ids, max_new_tokens, temperature, top_p, top_k, prefill_chunk, eos_check_every)
    sampler = Sampler(temperature, top_p, top_k, generator)
    max_len = model.config.max_seq_len
    total = input_ids.shape[1] + max_new_tokens
    if use_cache and total > max_len:
        raise ValueError(
            f"generate: prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_seq_len={max_len}; shorten them, or use_cache=False to slide a window"
        )
    if max_new_tokens == 0:
        return input_ids
    was_training = model.training
    model.eval()
    try:
        if not use_cache:
            return _recompute(model, input_ids, max_new_tokens, sampler, eos_token_id)
        decoder = Decoder(model, input_ids.shape[0], total, sampler=sampler, mode=mode, eos_token_id=eos_token_id)
        return decoder.run(input_ids, max_new_tokens, prefill_chunk=prefill_chunk, eos_check_every=eos_check_every)
    finally:
        model.train(was_training)


def _recompute(model, input_ids, max_new_tokens, sampler, eos_token_id):
    """The cache-free oracle: a full forward over the last max_seq_len tokens for every new token."""
    tokens = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits, _ = model(tokens[:, -model.config.max_seq_len :], logits_to_keep=1)
        new = sampler(logits[:, -1])
        if eos_token_id is not None:
            new = torch.where(finished, eos_token_id, new)
            finished |= new == eos_token_id
        tokens = torch.cat([tokens, new[:, None]], dim=1)
        if eos_token_id is not None and bool(finished.all()):
            break
    return tokens
