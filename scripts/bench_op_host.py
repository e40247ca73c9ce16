"""Host time per call of SFA's top-k custom ops: what a step pays on the CPU before the GPU sees a kernel.

At GPT-2 small, 1k context, a training step calls the masked top-k op 48 times (q and k, 12 layers, 2
micro-batches) and, with the in-place straight-through backward, its backward op 48 times more. When the
host's work per call exceeds the kernel's device time, the step becomes host bound (scripts/profile_train.py:
wall ms well above kernel ms). This prints, per entry point, host microseconds per call on inputs so small that
the device never holds the host back, then the functions where the time goes (cProfile, by own time).

Baselines in the same run: one aten op (x.mul(2)) and a trivial torch.library custom op returning a fresh
tensor: the floor a custom op pays for the dispatcher and autograd wrapper before any of our code runs.

Inside a compiled graph the ops cost what the graph's launcher costs: the "compiled" rows time a
torch.compile'd chain of 16 masked top-k ops (each on the last one's output) and one of 16 trivial custom
ops, and report the host time per op. On the GPU the top-k ops are triton_ops, whose kernel inductor launches
itself (sfa/kernels/_config.py, kernel_op); the trivial op stays opaque, a dispatcher call per op. The
timing does not sync per call: a compiled row near the kernel's own device time (a few us on these inputs)
says the device, not the host, set the pace.

  python scripts/bench_op_host.py [--calls 3000] [--compile-backend inductor] [--out FILE]
Prints a table and writes JSON (--out, and $OUT/bench_op_host.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_generate import sync  # noqa: E402
from e2e_throughput import versions  # noqa: E402  (one owner of the run's versions)
from results_out import write_results  # noqa: E402
from sfa.kernels import topk as topk_kernels  # noqa: E402


@torch.library.custom_op("bench_op_host::fresh_like", mutates_args=())
def fresh_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def head_view(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """q as the model passes it: a (B, H, T, D) view of one part of a (B, T, 3 H D) projection."""
    b, t, h, d = 2, 4, 2, 64
    return torch.randn(b, t, 3 * h * d, device=device, dtype=dtype)[..., : h * d].view(b, t, h, d).transpose(1, 2)


def entry_points(x: torch.Tensor, k: int) -> dict:
    """Name -> zero-argument call. The straight-through op exists only where the backward has its own kernel."""
    calls = {
        "aten x.mul(2)": lambda: x.mul(2),
        "trivial custom op": lambda: fresh_like(x),
        "sfa::topk_code": lambda: topk_kernels.topk_code_op(x, k),
        "sfa::topk_code_masked": lambda: topk_kernels.topk_code_masked_op(x, k),
    }
    straight_through = getattr(topk_kernels, "topk_straight_through_op", None)
    if straight_through is not None:
        _, _, masked, bits = topk_kernels.topk_code_masked_op(x, k)
        grad = torch.randn_like(masked)
        calls["sfa::topk_straight_through"] = lambda: straight_through(bits, grad, None, x.shape[-1], x.dtype)
    return calls


CHAIN = 16  # ops per compiled call: the compiled function's own entry cost is shared by them


def compiled_chains(x: torch.Tensor, k: int, backend: str) -> dict:
    """Name -> (zero-argument call, ops per call): chains of ops compiled whole (fullgraph)."""
    def topk_chain(rows):
        for _ in range(CHAIN):
            rows = topk_kernels.topk_code_masked_op(rows, k)[2]
        return rows

    def trivial_chain(rows):
        for _ in range(CHAIN):
            rows = fresh_like(rows)
        return rows

    topk_compiled = torch.compile(topk_chain, fullgraph=True, backend=backend)
    trivial_compiled = torch.compile(trivial_chain, fullgraph=True, backend=backend)
    return {
        f"compiled: {CHAIN} trivial custom ops": (lambda: trivial_compiled(x), CHAIN),
        f"compiled: {CHAIN} sfa::topk_code_masked": (lambda: topk_compiled(x), CHAIN),
    }


def host_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(50):  # warm-up: compiles and autotunes
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0  # no sync: the device work per call is a few microseconds
    sync(device)
    return elapsed / calls * 1e6


def where_the_time_goes(fn, calls: int, top: int) -> list[dict]:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (path, line, name), (_, ncalls, own, cumulative, _) in stats.stats.items():
        rows.append(dict(function=f"{os.path.basename(path)}:{line}({name})", calls_per_call=ncalls / calls,
                         own_us=own / calls * 1e6, cumulative_us=cumulative / calls * 1e6))
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per entry point (default 3000)")
    parser.add_argument("--k", type=int, default=8, help="top-k of the 64-wide rows (default 8)")
    parser.add_argument("--top", type=int, default=10, help="functions listed per entry point (default 10)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled rows (default inductor)")
    parser.add_argument("--out", default=None, help="JSON path (also $OUT/bench_op_host.json when $OUT is set)")
    args = parser.parse_args(argv)
    if args.calls < 1 or not 1 <= args.k <= 64:
        parser.error(f"--calls must be >= 1 and --k in 1..64 (got --calls {args.calls}, --k {args.k})")
    if not torch.cuda.is_available():
        sys.exit("bench_op_host.py measures the CUDA launch path: it needs a GPU")
    device = torch.device("cuda")
    x = head_view(device, torch.bfloat16)
    results = []
    for name, fn in entry_points(x, args.k).items():
        results.append(dict(entry=name, ops_per_call=1, host_us=host_us(fn, args.calls, device),
                            functions=where_the_time_goes(fn, max(1, args.calls // 3), args.top)))
    for name, (fn, ops) in compiled_chains(x, args.k, args.compile_backend).items():
        calls = max(1, args.calls // ops)
        results.append(dict(entry=name, ops_per_call=ops, host_us=host_us(fn, calls, device) / ops,
                            functions=where_the_time_goes(fn, max(1, calls // 3), args.top)))

    for r in results:
        print(f"\n{r['entry']}: the {args.top} functions with the most own time (us, calls: per call of "
              f"{r['ops_per_call']} op{'s' if r['ops_per_call'] > 1 else ''})")
        for f in r["functions"]:
            print(f"  {f['own_us']:>8.2f} {f['cumulative_us']:>9.2f} {f['calls_per_call']:>5.1f}  {f['function']}")
    print(f"\n{'entry point':<40} {'host us/op':>11}")
    for r in results:
        print(f"{r['entry']:<40} {r['host_us']:>11.1f}")
    payload = dict(versions=versions(), calls=args.calls, k=args.k, compile_backend=args.compile_backend,
                   input=list(x.shape), results=results)
    for path in write_results(payload, args.out, "bench_op_host.json"):
        print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
