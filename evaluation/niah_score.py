"""Scoring needle-in-a-haystack samples: greedy answers, exact match per (length, depth), a heatmap.

The scorer only needs a `generate_fn(prompts (B, T) long tensor, n_new) -> (B, n_new) new tokens`,
so the same code scores our models (`model_generate_fn`) and the oracle/constant stand-ins in tests.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from models import generate

from .niah import NIAHSample

GenerateFn = Callable[[torch.Tensor, int], torch.Tensor]

_LEADING_NUMBER = re.compile(r"\s*(\d+)")


def extract_number(text: str) -> str | None:
    """The digits the generated text starts with (after whitespace), or None if it starts otherwise."""
    match = _LEADING_NUMBER.match(text)
    return match.group(1) if match else None


def is_exact_match(generated_text: str, answer: str) -> bool:
    """Exact match: the generation starts with exactly the answer's digits, not a prefix or extension."""
    return extract_number(generated_text) == answer


def answer_budget(samples: Sequence[NIAHSample]) -> int:
    """New tokens to generate: the longest answer plus one, so that an answer followed by an extra
    digit ("739145" for "73914") is seen and counted wrong."""
    return max(len(s.answer_ids) for s in samples) + 1


def model_generate_fn(model) -> GenerateFn:
    """Greedy decoding with the model's KV cache (models.generate), returning only the new tokens."""
    def fn(prompts: torch.Tensor, n_new: int) -> torch.Tensor:
        return generate(model, prompts, n_new, temperature=0.0)[:, prompts.shape[1] :]

    return fn


def score_samples(
    samples: Sequence[NIAHSample], generate_fn: GenerateFn, tokenizer, *, batch_size: int = 8, device="cpu", progress=None
) -> dict:
    """Generate an answer for every sample and score it. Returns {"cells": [...], "samples": [...],
    "accuracy": overall}. Prompts of one cell all have the same length, so they batch without padding."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not samples:
        raise ValueError("no samples to score")
    n_new = answer_budget(samples)
    by_cell: dict[tuple[int, float], list[NIAHSample]] = defaultdict(list)
    for s in samples:
        by_cell[(s.length, s.depth)].append(s)
    records = []
    for (length, depth), cell in by_cell.items():
        for start in range(0, len(cell), batch_size):
            batch = cell[start : start + batch_size]
            prompts = torch.tensor([s.input_ids for s in batch], dtype=torch.long, device=device)
            new_tokens = generate_fn(prompts, n_new)
            if tuple(new_tokens.shape) != (len(batch), n_new):
                raise ValueError(f"generate_fn returned shape {tuple(new_tokens.shape)}, expected {(len(batch), n_new)}")
            for s, ids in zip(batch, new_tokens.tolist()):
                text = tokenizer.decode(ids)
                records.append(
                    {"length": length, "depth": depth, "index": s.index, "answer": s.answer,
                     "generated": text, "correct": is_exact_match(text, s.answer)}
                )  # fmt: skip
            if progress is not None:
                progress(len(batch))
    cells = []
    for length, depth in by_cell:
        hits = [r["correct"] for r in records if r["length"] == length and r["depth"] == depth]
        cells.append({"length": length, "depth": depth, "samples": len(hits), "correct": sum(hits), "accuracy": sum(hits) / len(hits)})
    accuracy = sum(r["correct"] for r in records) / len(records)
    return {"accuracy": accuracy, "cells": cells, "samples": records}


def plot_heatmap(cells: Sequence[dict], path: str | Path, title: str = "Needle in a haystack: exact match") -> Path:
    """Accuracy per (context length, needle depth) as a PNG: lengths across, depths down."""
    import matplotlib  # lazy: matplotlib is heavy and only the heatmap needs it

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt  # lazy: as above

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for c in cells:
        grid[depths.index(c["depth"])][lengths.index(c["length"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.9 * len(lengths)), max(3.5, 1.5 + 0.5 * len(depths))))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="exact match")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
