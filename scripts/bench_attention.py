"""Attention kernels against the best dense kernels: time and TFLOP/s vs sequence length.

    python scripts/bench_attention.py --n 8192 16384 --d 64 128 --pass fwd fwdbwd --out attention.json
    python scripts/bench_attention.py --sweep --n 8192 --d 64 128     # FlashSFA launch-config table

Backends (pick with --backends):
  cudnn, sdpa_flash   dense SDPA with one backend forced (the baselines; dense q, k)
  flex                FlexAttention, compiled, causal block mask (dense)
  reference           sfa backend "reference" (PyTorch top-k + SDPA)
  masked              sfa backend "masked" (fused top-k + cuDNN SDPA), if registered
  flash               sfa backend "flash" (fused top-k + FlashSFA kernels): the full SFA step
  flash_kernel        FlashSFA alone on pre-masked q~, k~ ("codes in", no top-k): the prefill kernel
  cudnn_masked        cuDNN SDPA on the same pre-masked q~, k~: flash_kernel's like-for-like rival
                      (masked rows are 7/8 zeros at k=D/8, which dense kernels also run faster on)

FLOP convention: dense-equivalent 4·B·H·N²·D for the forward (×0.5 when causal) and ×3.5 of that for
forward+backward, for every backend, so TFLOP/s compare like for like (SFA does less real work in QKᵀ).
Work is held constant: B = tokens // N (at least 1), H heads. Fresh random data per shape; timing is
triton.testing.do_bench's median with its warm-up excluded. "vs cudnn" = time / cuDNN time (same run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sfa  # noqa: E402
import sfa.kernels  # noqa: E402,F401  (registers the Triton backends)
from sfa.kernels import flash  # noqa: E402
from sfa.kernels.masked import masked_features  # noqa: E402

DENSE = ("cudnn", "sdpa_flash", "flex")
ALL_BACKENDS = ("cudnn", "sdpa_flash", "flex", "reference", "masked", "flash", "flash_kernel", "cudnn_masked")
PRE_MASKED = ("flash_kernel", "cudnn_masked")  # take q~, k~ expanded outside the timed region


def dense_equivalent_flops(b, h, n, d, causal, pass_):
    flops = 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)
    return flops * (3.5 if pass_ == "fwdbwd" else 1.0)


_flex_cache: dict = {}


def _flex(q, k, v, causal, gqa):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # lazy: heavy (the compiler stack); only the flex baseline uses it

    n = q.shape[-2]
    key = (n, causal)
    if key not in _flex_cache:
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, n, n, device=q.device)
        _flex_cache[key] = (torch.compile(flex_attention, dynamic=False), mask)
    fn, mask = _flex_cache[key]
    return fn(q, k, v, block_mask=mask, enable_gqa=gqa)


def forward_fn(backend, q, k, v, topk, causal):
    """A closure computing the forward of `backend` on leaves q, k, v."""
    gqa = q.shape[1] != k.shape[1]
    if backend in ("cudnn", "sdpa_flash", "cudnn_masked"):
        which = SDPBackend.FLASH_ATTENTION if backend == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def run():
            with sdpa_kernel([which]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return run
    if backend == "flex":
        return lambda: _flex(q, k, v, causal, gqa)
    if backend in ("reference", "masked", "flash"):
        if backend not in sfa.available_backends():
            raise RuntimeError(f"backend {backend!r} is not registered")
        return lambda: sfa.sfa_attention(q, k, v, topk_q=topk, causal=causal, backend=backend)
    if backend == "flash_kernel":
        scale = 1.0 / math.sqrt(q.shape[-1])
        return lambda: torch.ops.sfa.flash_fwd(q, k, v, causal, scale)[0]
    raise ValueError(f"--backends: unknown backend {backend!r}; choose from {', '.join(ALL_BACKENDS)}")


def time_backend(backend, b, h, hkv, n, d, topk, causal, pass_, dtype, rep_ms):
    q = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hkv, n, d, device="cuda", dtype=dtype) for _ in range(2))
    if backend in PRE_MASKED:  # codes in: the top-k expansion happens outside the timed region
        q, k = masked_features(q, topk), masked_features(k, topk)
    if pass_ == "fwd":
        fn = forward_fn(backend, q, k, v, topk, causal)
        with torch.no_grad():
            return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    fwd = forward_fn(backend, *leaves, topk, causal)
    grad = torch.randn(b, h, n, d, device="cuda", dtype=dtype)

    def step():
        fwd().backward(grad)
    return triton.testing.do_bench(step, warmup=25, rep=rep_ms, grad_to_none=leaves, return_mode="median")


def run_benchmark(args):
    dtype = getattr(torch, args.dtype)
    rows = []
    for pass_ in args.passes:
        for d in args.d:
            for n in args.n:
                b = max(1, args.tokens // n)
                dense_ms = {}
                for divisor in args.k_div:
                    topk = max(1, d // divisor)
                    for backend in args.backends:
                        if backend == "reference" and n > args.max_n_reference:
                            continue
                        if backend in DENSE and backend in dense_ms:  # independent of k: measured once
                            ms, err = dense_ms[backend]
                        else:
                            try:
                                ms, err = time_backend(backend, b, args.heads, args.kv_heads, n, d, topk, args.causal,
                                                       pass_, dtype, args.rep), None
                            except Exception as e:  # report and carry on (e.g. a backend missing on this GPU)
                                ms, err = float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                                if args.verbose:
                                    traceback.print_exc()
                            if backend in DENSE:
                                dense_ms[backend] = (ms, err)
                            torch.cuda.empty_cache()
                        flops = dense_equivalent_flops(b, args.heads, n, d, args.causal, pass_)
                        rows.append(dict(pass_=pass_, n=n, d=d, k=topk, batch=b, heads=args.heads,
                                         kv_heads=args.kv_heads, causal=args.causal,
                                         backend=backend, ms=ms, tflops=flops / ms / 1e9 if ms == ms else float("nan"),
                                         error=err))
                        print(f"  {pass_:6s} N={n:6d} D={d:3d} k={topk:3d} {backend:12s} "
                              f"{ms:9.3f} ms  {rows[-1]['tflops']:7.1f} TFLOP/s" + (f"  [{err}]" if err else ""),
                              flush=True)
    for row in rows:
        base = next((r["ms"] for r in rows if r["backend"] == "cudnn" and r["pass_"] == row["pass_"]
                     and r["n"] == row["n"] and r["d"] == row["d"]), float("nan"))
        row["vs_cudnn"] = row["ms"] / base if base == base and base > 0 else float("nan")
    return rows


def print_table(rows):
    print("\n| pass | N | D | k | B×H (kv heads) | backend | ms | TFLOP/s | time / cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" ({r['error']})" if r.get("error") else ""
        print(f"| {r['pass_']} | {r['n']} | {r['d']} | {r['k']} | {r['batch']}×{r['heads']} ({r['kv_heads']}) | {r['backend']}{note} "
              f"| {r['ms']:.3f} | {r['tflops']:.1f} | {r['vs_cudnn']:.2f} |")


# ---- launch-config sweep for the FlashSFA kernels (fills flash.GPU_CONFIGS; see docs/bench/notes_flash.md)
SWEEP = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 3),
            (128, 128, 8, 2), (64, 128, 4, 3)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2),
             (32, 128, 8, 3), (64, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 4), (32, 64, 4, 4)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 3),
           (128, 64, 8, 3), (64, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
}


def run_sweep(args):
    dtype = getattr(torch, args.dtype)
    rows = []
    for d in args.d:
        n = args.n[0]
        b = max(1, args.tokens // n)
        topk = max(1, d // args.k_div[0])
        q, k, v = (torch.randn(b, args.heads, n, d, device="cuda", dtype=dtype) for _ in range(3))
        q, k = masked_features(q, topk), masked_features(k, topk)
        scale = 1.0 / math.sqrt(d)
        out, lse = flash.flash_forward(q, k, v, causal=args.causal, scale=scale)
        grad = torch.randn_like(out)
        base_grads = flash.flash_backward(grad, q, k, v, out, lse, causal=args.causal, scale=scale)
        for kernel in args.sweep_kernels:
            configs = SWEEP[kernel]
            for bm, bn, warps, stages in configs:
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
                try:
                    if kernel == "fwd":
                        fn = lambda: flash.flash_forward(q, k, v, causal=args.causal, scale=scale, config=cfg)  # noqa: E731
                        check = [(fn()[0], out)]
                    else:
                        fn = lambda: flash.flash_backward(grad, q, k, v, out, lse, causal=args.causal,  # noqa: E731
                                                          scale=scale, configs={kernel: cfg})
                        check = list(zip(fn(), base_grads))
                    err = max(((a.float() - r.float()).norm() / r.float().norm()).item() for a, r in check)
                    ms = triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")
                except Exception as e:  # e.g. out of shared memory for a large tile
                    ms, err = float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
                rows.append(dict(kernel=kernel, d=d, n=n, batch=b, heads=args.heads, k=topk, causal=args.causal,
                                 config=cfg, ms=ms, rel_diff_vs_default=err))
                print(f"  {kernel:5s} D={d:3d} {bm:4d}x{bn:<4d} w{warps} s{stages}  {ms:8.3f} ms  diff {err}", flush=True)
    print("\n| kernel | D | BLOCK_M×BLOCK_N | warps | stages | ms (N=%d) |" % args.n[0])
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = r["config"]
        print(f"| {r['kernel']} | {r['d']} | {c['BLOCK_M']}×{c['BLOCK_N']} | {c['num_warps']} | {c['num_stages']} "
              f"| {r['ms']:.3f} |")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768], help="sequence lengths")
    p.add_argument("--d", type=int, nargs="+", default=[64, 128], help="head dims")
    p.add_argument("--k-div", type=int, nargs="+", default=[16, 8, 4], help="k = D // k_div (default D/16, D/8, D/4)")
    p.add_argument("--pass", dest="passes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--backends", nargs="+", default=list(ALL_BACKENDS), choices=ALL_BACKENDS)
    p.add_argument("--tokens", type=int, default=32768, help="B·N held constant (B = tokens // N, at least 1)")
    p.add_argument("--heads", type=int, default=16, help="query heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default: --heads")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--no-causal", dest="causal", action="store_false", help="non-causal attention (default causal)")
    p.add_argument("--max-n-reference", type=int, default=16384, help="skip the reference backend above this N")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time per measurement, ms")
    p.add_argument("--sweep", action="store_true", help="time FlashSFA launch configs at the first --n instead")
    p.add_argument("--sweep-kernels", nargs="+", choices=list(SWEEP), default=list(SWEEP), help="what --sweep tunes")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing backends")
    args = p.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    for name in ("n", "d", "k_div"):
        if any(x < 1 for x in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} values must be positive, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (the baselines are GPU kernels)")
    torch.backends.cuda.matmul.allow_tf32 = False
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    print(env, flush=True)
    rows = run_sweep(args) if args.sweep else run_benchmark(args)
    if not args.sweep:
        print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, args=vars(args), flop_convention="dense-equivalent 4BHN^2D (x0.5 causal), "
                           "x3.5 for fwd+bwd", rows=rows), f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
