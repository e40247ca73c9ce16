"""Choosing the next token from logits on the device: greedy, or temperature / top-k / top-p sampling.

Nothing here reads a tensor on the host, so a decode step that samples can be captured in a CUDA graph:
the draw is the exponential race argmax(p / E) with E ~ Exp(1) i.i.d., which picks token i with
probability p_i (as torch.multinomial would, whose CUDA kernel may synchronise; gpt-fast samples the
same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def filter_logits(logits: torch.Tensor, *, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top_k largest and outside the nucleus: the smallest set of
    most likely tokens whose probability sums to at least top_p (the most likely token always stays).

    top_k keeps exactly k tokens, ties going to the lower token id as in argmax, so top_k=1 is greedy even
    where bf16 logits tie (a threshold at the k-th value would keep every tied token)."""
    if top_k is not None and top_k < logits.size(-1):
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        drop = torch.ones_like(logits, dtype=torch.bool).scatter(-1, order[..., :top_k], False)
        logits = logits.masked_fill(drop, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
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
    """(B, V) logits -> (B,) int64 token ids: argmax when temperature == 0, else a sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


def check_sampling(temperature, top_p, top_k, fn: str = "generate") -> None:
    if not temperature >= 0.0:
        raise ValueError(f"{fn}: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{fn}: top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{fn}: top_k must be None or an int >= 1, got {top_k!r}")


@dataclass(frozen=True)
class Sampler:
    """The sampling settings of one generation, applied as `sampler(logits)` -> tokens."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p, self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return next_token(logits, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                          generator=self.generator)
