"""What the kernel ops launch, and whether each launch compiles for a Hopper GPU as torch.compile would call it.

A compiled graph does not run our launch code: inductor recompiles every kernel a `kernel_op` names
(sfa/kernels/_config.py) with argument types of its own choosing, and types a Python float as fp64 where
Triton's launcher uses fp32. That broke flash_fwd_kernel's tl.dot on an H200 (docs/benchmarks.md, "Kernel ops
as triton_op"). Both halves of this check run without a GPU:

    python tests/kernel_launches.py capture FILE   # under TRITON_INTERPRET=1: run the ops, record each launch
    python tests/kernel_launches.py compile FILE   # without it: compile each registered kernel for sm_90

`capture` runs every kernel op forward and backward on small CPU tensors and writes each launch's kernel and
arguments (a tensor as its dtype). `compile` builds each kernel that a kernel_op registers from those
arguments (the interpreter's launch configs, which are not the GPU autotuner's), floats typed fp64 as inductor
types them, through Triton's compiler and ptxas for sm_90 (both ship in the triton wheel). It prints one JSON
object: the registered kernels, those never launched, and each failing launch with its error.
tests/test_kernel_launches.py runs both.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TRITON_DTYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32", "torch.uint8": "u8",
                 "torch.int8": "i8", "torch.int32": "i32", "torch.int64": "i64", "torch.bool": "i1"}


def _described(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"a kernel argument of type {type(value).__name__} this check cannot describe")


def _run_every_op():
    """Forward and backward of each kernel op, GQA and causal where the op has them, fp16 and fp32."""
    import torch

    from sfa.kernels.flash import flash_sfa_attention
    from sfa.kernels.qk_epilogue import qk_norm_rope
    from sfa.kernels.topk import fused_topk_masked, fused_topk_sparsify

    for dtype in (torch.float16, torch.float32):
        x = torch.randn(2, 3, 5, 24, dtype=dtype, requires_grad=True)
        code, masked = fused_topk_masked(x, 4)
        (code.values.sum() + masked.sum()).backward()
        fused_topk_sparsify(x.detach(), 5)

        q = torch.randn(1, 4, 9, 16, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 2, 9, 16, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 2, 9, 16, dtype=dtype, requires_grad=True)
        flash_sfa_attention(q, k, v, topk_q=4, topk_k=4, causal=True).sum().backward()

        x = torch.randn(2, 5, 3, 16, dtype=dtype, requires_grad=True)
        weight = torch.randn(16, dtype=dtype, requires_grad=True)
        cos, sin = torch.randn(5, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
        qk_norm_rope(x, weight, 1e-6, cos, sin, topk=4, dense_dims=2).sum().backward()


def capture(path: Path) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        launches.append({"module": self.fn.__module__, "kernel": self.fn.__name__,
                         "args": {name: _described(value) for name, value in bound.items()}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        _run_every_op()
    finally:
        InterpretedFunction.run = run
    path.write_text(json.dumps(launches))


def _registered_kernels() -> dict[str, list]:
    """kernel_op name -> the @triton.jit kernels it registers (off the interpreter, where ops are triton_ops)."""
    import importlib

    import torch

    importlib.import_module("sfa.kernels")  # defines the ops
    registry = torch._library.triton.triton_ops_to_kernels
    return {op: kernels for op, kernels in registry.items() if op.startswith("sfa::")}


@functools.cache
def _sass_counts():
    """scripts/sass_counts.py, owner of the sm_90 compile (loaded by path: scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("sass_counts", Path(__file__).parent.parent / "scripts" / "sass_counts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_for_hopper(kernel, args: dict) -> None:
    options = {name: args[name]["value"] for name in ("num_warps", "num_stages") if name in args}
    signature, constexprs = {}, {}
    for param in kernel.params:
        arg = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = arg["value"]
        elif "tensor" in arg:
            signature[param.name] = "*" + TRITON_DTYPES[arg["tensor"]]
        elif isinstance(arg["value"], bool):
            signature[param.name] = "i1"
        elif isinstance(arg["value"], int):
            signature[param.name] = "i32" if -2**31 <= arg["value"] < 2**31 else "i64"
        elif isinstance(arg["value"], float):
            signature[param.name] = "fp64"  # what torch/_inductor/codegen/triton_utils.py signature_of gives a float
        else:  # None: Triton's launcher makes it a constexpr
            signature[param.name] = "constexpr"
            constexprs[param.name] = None
    _sass_counts().compile_for_sm90(kernel, signature, constexprs, **options)


def compile_registered(path: Path) -> dict:
    launches = json.loads(path.read_text())
    registered = _registered_kernels()
    report = {"registered": {op: [k.__name__ for k in ks] for op, ks in registered.items()},
              "never_launched": [], "compiled": [], "failed": {}}
    kernels = {}  # id -> (the ops that register it, the kernel): ops may share a kernel
    for op, ks in registered.items():
        for k in ks:
            kernels.setdefault(id(k), ([], k))[0].append(op)
    for ops, kernel in kernels.values():
        op = ", ".join(ops)
        seen = [lc for lc in launches if lc["module"] == kernel.fn.__module__ and lc["kernel"] == kernel.__name__]
        if not seen:
            report["never_launched"].append(f"{op}: {kernel.__name__}")
        distinct = {json.dumps(lc["args"], sort_keys=True): lc["args"] for lc in seen}
        for args in distinct.values():
            label = f"{kernel.__name__}({', '.join(f'{n}={a[next(iter(a))]}' for n, a in args.items())})"
            try:
                _compile_for_hopper(kernel, args)
                report["compiled"].append(label)
            except Exception as error:  # report every failing launch, not only the first
                cause = error
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                report["failed"][label] = f"{type(error).__name__} ({type(cause).__name__}): {str(error)[-600:]}"
    return report


if __name__ == "__main__":
    from sfa.kernels._config import interpreting

    command, file = sys.argv[1], Path(sys.argv[2])
    if command == "capture":
        if not interpreting():
            sys.exit("capture runs the kernels on CPU tensors: set TRITON_INTERPRET=1")
        capture(file)
    elif command == "compile":
        if interpreting():
            sys.exit("compile needs the real Triton compiler: unset TRITON_INTERPRET")
        print(json.dumps(compile_registered(file)))
    else:
        sys.exit(f"unknown command {command!r}: capture or compile")
