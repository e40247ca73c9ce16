"""Dense bf16 tensor-core peak FLOP/s per GPU, for MFU.

Vendor datasheet numbers WITHOUT 2:4 structured sparsity (datasheets often print the sparse figure,
which is twice these). Matched against torch.cuda.get_device_name(); the first matching row wins, so
specific variants come before the generic name. Unknown devices and CPUs give None (MFU is then null);
`metrics.peak_flops` in the config overrides the lookup.
"""

from __future__ import annotations

import torch

# (substring of the device name, bf16 dense peak FLOP/s)
BF16_DENSE_PEAKS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM ("NVIDIA H200")
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),  # SXM4 and PCIe share the bf16 peak
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
]


def bf16_peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this name, or None when the name is not in the table."""
    for pattern, peak in BF16_DENSE_PEAKS:
        if pattern in device_name:
            # "GH200" contains "H200" too, but the GH200 row holds the same number; ordering handles the rest.
            return peak
    return None


def detect_peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, per-device bf16 peak or None). CPUs have no meaningful tensor-core peak: None."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, bf16_peak_flops(name)
