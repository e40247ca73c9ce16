"""Shared helpers for the Triton kernels: where they may run and which launch config they use.

`@triton.autotune` does not run under TRITON_INTERPRET=1 (the CPU test mode), so every kernel picks
its config through `pick_config`: one small fixed config in the interpreter, the measured table on GPU.
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_can_run_on(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in the interpreter must be exact ("ieee"); on GPU, fp32 inputs also use ieee so the
    fp32 path stays a reference-quality path (bf16/fp16 inputs use the tensor cores regardless)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pick_config(gpu_config: dict, interpreter_config: dict) -> dict:
    """The interpreter's small fixed config, or the GPU config (measured; see docs/bench/notes_topk_decode.md)."""
    return dict(interpreter_config if interpreting() else gpu_config)


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
