"""Load any of our checkpoints as a ready-to-evaluate model.

training/checkpoint.py reads the file (the model state dict and the run config it was trained with) and
loads the weights strictly; training/run_config.py rebuilds the model that config describes with the same
helpers train.py uses, so an evaluation never needs the run's command line. `attention` replaces the
trained attention, e.g. to evaluate a dense checkpoint with SFA switched on without training (the
conversion study).
"""

from __future__ import annotations

from pathlib import Path

import torch

from training import checkpoint as ckpt
from training.distributed import resolve_device
from training.run_config import model_from_config


def attention_override(kind: str | None, k: int | None = None, backend: str = "auto") -> dict | None:
    """The `--attention KIND --k K` command-line pair as an attention override (None = as trained)."""
    if kind is None:
        if k is not None:
            raise ValueError("--k needs --attention sfa (k is the number of features SFA keeps)")
        return None
    if kind == "sfa":
        if k is None:
            raise ValueError("--attention sfa needs --k (features kept per query/key row, e.g. 8)")
        return {"kind": "sfa", "topk_q": int(k), "backend": backend}
    if kind == "dense":
        if k is not None:
            raise ValueError("--k is only meaningful with --attention sfa")
        return {"kind": "dense"}
    raise ValueError(
        f"--attention must be 'sfa' or 'dense' (an override that keeps the checkpoint's parameters), got {kind!r}"
    )


def load_model(path: str | Path, device="cpu", attention=None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on `device`, the run config it was trained with).

    `path` is a checkpoint file or a run directory (its newest checkpoint). `attention` (optional)
    replaces the trained attention; it must not change parameter shapes (dense <-> sfa is fine, the
    short baseline or a Qwen3 feature map is not)."""
    state, cfg, file = ckpt.read_checkpoint(path)
    model = model_from_config(cfg, attention)
    why = " (the attention override changes the model's parameters)" if attention is not None else ""
    ckpt.load_weights(model, state, f"checkpoint {file}{why}")
    return model.to(resolve_device(device, key="device")).eval(), cfg
