"""Precision for evaluation: `auto` means bf16 autocast on a GPU, else fp32 (training.distributed's rule, the
same as train.py's `train.dtype`). The device is training.distributed.resolve_device's (`auto`: the GPU if
there is one)."""

from __future__ import annotations

import torch

from training.distributed import autocast, compute_dtype

__all__ = ["DTYPES", "autocast", "resolve_dtype"]

DTYPES = ("auto", "fp32", "bf16")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return compute_dtype(device, dtype)
