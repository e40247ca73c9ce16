"""What the Triton kernels share: where they may run, the dtypes they take, the precision of their dots,
log2(e) for their base-2 softmax, and small launch helpers.

`@triton.autotune` does not run under TRITON_INTERPRET=1 (the CPU test mode), so each kernel's launcher
picks one small fixed config in the interpreter and its measured table on the GPU.
"""

from __future__ import annotations

import math
import os

import torch
import triton.language as tl

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The kernels' softmax runs in base 2 (one exp2 per score): exp(x) = exp2(x * LOG2E). A constexpr, so the
# kernels may read it; host code multiplies by LOG2E.value.
LOG2E = tl.constexpr(math.log2(math.e))


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_can_run_on(t: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of the kernels' tl.dot: fp32 inputs get exact fp32 dots ("ieee"), so the fp32 path
    stays a reference-quality path on the GPU and matches the fp32 reference in the interpreter; 16-bit
    inputs use the tensor cores whatever this says."""
    return "ieee" if dtype == torch.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def kernel_op(name: str, fake, kernels: tuple = ()):
    """Decorator: the torch.library op `name` whose implementation launches our Triton kernels.

    On the GPU it is a `torch.library.triton_op`: torch.compile traces into the implementation and inductor
    launches the kernels from its compiled graph, instead of each call paying Triton's Python launch path
    (autotuner key, argument binding: ~100 us of host time, docs/benchmarks.md "Where SFA's training step
    loses time"). Eagerly it runs like any custom op. Under TRITON_INTERPRET=1 the kernels are Python that
    cannot run on the fake tensors tracing uses, so the op stays opaque: a `custom_op` with `fake` as its
    meta kernel. Schema, autograd and results are the same either way. The implementation must launch every
    kernel through `launchable(kernel, traceable=True)`.

    `kernels`: the @triton.jit functions the implementation launches. A compiled graph holds the kernel's code,
    so torch's AOTAutograd cache keys a graph on the source of its triton_ops' kernels, which triton_op finds
    by scanning the implementation's source. That scan misses kernels reached through helpers like ours, and
    an edited kernel would then be replayed from a warm cache in its old version; naming them here puts their
    source (and their @triton.jit helpers') in the key. Launch configs are not part of it."""
    def define(fn):
        if interpreting():
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fake)
            return op
        op = torch.library.triton_op(name, fn, mutates_args=())
        registry = getattr(torch._library.triton, "triton_ops_to_kernels", None)  # what the cache key reads
        if registry is not None:
            registry[name] = list(kernels)
        return op
    return define


def launchable(kernel, traceable: bool):
    """`kernel` as a launcher calls it: wrapped by `torch.library.wrap_triton` inside a kernel_op's
    implementation (so tracing records the launch), as it is elsewhere. Direct eager callers must not wrap
    it: an eager wrap_triton launch dispatches a higher-order op, far slower than the launch itself."""
    return torch.library.wrap_triton(kernel) if traceable and not interpreting() else kernel
