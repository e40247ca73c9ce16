"""Device and precision for evaluation: `auto` means CUDA with bf16 autocast when there is a GPU, else
CPU in fp32 (the same rule as train.py's `train.device=auto train.dtype=auto`)."""

from __future__ import annotations

import contextlib

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or device.split(":")[0] not in DEVICES[1:]:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use device=auto or cpu")
    return torch.device(device)


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
