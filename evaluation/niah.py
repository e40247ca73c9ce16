"""Synthetic needle-in-a-haystack prompts, seeded: the same arguments give the same samples.

A sample is built in token space (see docs/evaluation.md "Needle in a haystack"):

    prompt = haystack[:p] + needle + haystack[p:] + question        (exactly `length` tokens)
    answer = the answer tokens the model must produce next

The needle says "The secret number is 73914." (format configurable) and the question asks for the
number. `p`, the needle's first token position, is round(depth * haystack_tokens): depth 0 puts the
needle first, depth 1 right before the question. The haystack is either a filler string repeated
(the paper's setting: one filler character) or a window of real text from a prepared token dataset.

Each piece is tokenized on its own and the token lists are joined, so a prompt is not always the
canonical tokenization of its text. That is harmless for a synthetic task whose training data come
from the same generator, and it is what lets us place the needle at an exact token position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data.format import open_shards, read_meta

# Keys of the seeded random streams, so eval samples and training samples never coincide even
# when both use the same --seed.
EVAL_STREAM, TRAIN_STREAM = 0, 1


@dataclass(frozen=True)
class NeedleFormat:
    """The three texts of a sample; `{answer}` is replaced by the secret digits."""

    needle: str = " The secret number is {answer}."
    question: str = " What is the secret number? The secret number is"
    answer: str = " {answer}"
    digits: int = 5

    def __post_init__(self):
        for name in ("needle", "answer"):
            if "{answer}" not in getattr(self, name):
                raise ValueError(f"needle format: {name}={getattr(self, name)!r} must contain '{{answer}}'")
        if "{answer}" in self.question:
            raise ValueError(f"needle format: question={self.question!r} must not contain the answer")
        if isinstance(self.digits, bool) or not isinstance(self.digits, int) or not 1 <= self.digits <= 18:
            raise ValueError(f"needle format: digits={self.digits!r} must be an int in [1, 18]")


@dataclass(frozen=True)
class NIAHSample:
    input_ids: list[int]  # the prompt, `length` tokens
    answer_ids: list[int]  # what a correct model generates next
    answer: str  # the secret digits
    length: int
    depth: float
    needle_start: int  # token position of the needle's first token in input_ids
    needle_len: int
    index: int  # sample number within its (length, depth) cell, or within the training set

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class FillerHaystack:
    """A filler string (e.g. "." or " The grass is green.") tokenized once and repeated."""

    def __init__(self, tokenizer, filler: str = "."):
        if not isinstance(filler, str) or not filler:
            raise ValueError(f"haystack filler must be a non-empty string, got {filler!r}")
        self.unit = tokenizer.encode(filler)
        if not self.unit:
            raise ValueError(f"haystack filler {filler!r} encodes to no tokens")
        self.description = f"filler {filler!r}"

    def take(self, rng: np.random.Generator, n: int) -> list[int]:
        repeats = math.ceil(n / len(self.unit))
        return (self.unit * repeats)[:n]


class TokenHaystack:
    """Windows of real text: a random contiguous slice of a token stream (a prepared split)."""

    def __init__(self, tokens: np.ndarray, description: str = "token stream"):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"haystack {description}: need a non-empty 1-D token array, got shape {tokens.shape}")
        self.tokens = tokens
        self.description = description

    def take(self, rng: np.random.Generator, n: int) -> list[int]:
        if n > self.tokens.size:
            raise ValueError(
                f"haystack {self.description} holds {self.tokens.size} tokens, fewer than the {n} a prompt needs; "
                "use a larger split or shorter lengths"
            )
        start = int(rng.integers(0, self.tokens.size - n + 1))
        return self.tokens[start : start + n].astype(np.int64).tolist()


def make_sample(
    tokenizer, haystack, fmt: NeedleFormat, length: int, depth: float, rng: np.random.Generator, index: int
) -> NIAHSample:
    """One prompt of exactly `length` tokens with the needle at `depth`; randomness only from `rng`."""
    answer = str(int(rng.integers(10 ** (fmt.digits - 1), 10**fmt.digits)))
    needle_ids = tokenizer.encode(fmt.needle.format(answer=answer))
    question_ids = tokenizer.encode(fmt.question)
    answer_ids = tokenizer.encode(fmt.answer.format(answer=answer))
    n_hay = length - len(needle_ids) - len(question_ids)
    if n_hay < 0:
        raise ValueError(
            f"length={length} is shorter than the needle ({len(needle_ids)} tokens) plus the question "
            f"({len(question_ids)} tokens)"
        )
    hay = haystack.take(rng, n_hay)
    start = round(depth * n_hay)
    ids = hay[:start] + needle_ids + hay[start:] + question_ids
    return NIAHSample(ids, answer_ids, answer, length, float(depth), start, len(needle_ids), index)


def check_grid(lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be a non-empty list of positive ints, got {list(lengths)!r}")
    if not depths or any(not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be a non-empty list of numbers in [0, 1], got {list(depths)!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int (per length and depth), got {samples!r}")


def eval_samples(
    tokenizer, haystack, fmt: NeedleFormat, lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int
) -> list[NIAHSample]:
    """The evaluation grid: `samples` prompts per (length, depth). A sample's randomness is keyed by
    (seed, length, depth, index), so adding a length or depth leaves the other cells' samples unchanged."""
    check_grid(lengths, depths, samples)
    out = []
    for length in lengths:
        for depth in depths:
            for i in range(samples):
                rng = np.random.default_rng([seed, EVAL_STREAM, length, round(depth * 1_000_000), i])
                out.append(make_sample(tokenizer, haystack, fmt, length, depth, rng, i))
    return out


def train_samples(tokenizer, haystack, fmt: NeedleFormat, lengths: Sequence[int], count: int, seed: int, stream: int = 0):
    """`count` training prompts (a generator): length drawn from `lengths`, depth uniform in [0, 1]
    (not the eval grid, so a model cannot learn grid positions). `stream` keys separate sample sets
    (train 0, val 1) drawn with one seed."""
    check_grid(lengths, [0.0], 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"number of training samples must be an int >= 0, got {count!r}")
    for i in range(count):
        rng = np.random.default_rng([seed, TRAIN_STREAM, stream, i])
        length = int(lengths[int(rng.integers(0, len(lengths)))])
        depth = float(rng.random())
        yield make_sample(tokenizer, haystack, fmt, length, depth, rng, i)


def haystack_from_prepared(data_dir, split: str, tokenizer, max_tokens: int = 20_000_000) -> TokenHaystack:
    """Real-text haystack: the first `max_tokens` tokens of a prepared split, with the end-of-text
    separators removed so that a haystack reads as one running text."""
    meta = read_meta(data_dir)
    if meta["tokenizer"] != tokenizer.name:
        raise ValueError(
            f"haystack data {data_dir} was tokenized with {meta['tokenizer']!r}, but the prompts use {tokenizer.name!r}"
        )
    pieces, have = [], 0
    for shard in open_shards(data_dir, split, meta):
        piece = np.asarray(shard[: max_tokens - have])
        pieces.append(piece[piece != meta["eot_token"]])
        have += len(piece)
        if have >= max_tokens:
            break
    tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    return TokenHaystack(tokens, description=f"{data_dir} split {split!r}")
