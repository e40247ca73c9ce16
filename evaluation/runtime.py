"""Precision for evaluation: `auto` means bf16 autocast on a GPU, else fp32 (the same rule as train.py's
`train.dtype=auto`). The device is training.distributed.resolve_device's (`auto`: the GPU if there is one)."""

from __future__ import annotations

import contextlib

import torch

DTYPES = ("auto", "fp32", "bf16")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast where asked for; a no-op context in fp32 (weights stay fp32 either way)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
