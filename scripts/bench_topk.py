"""Benchmark the fused top-k kernel against torch.topk, and the masked backend's SDPA choices.

Prints tables and writes JSON (--out, and $OUT/topk.json when $OUT is set). GPU only.
  1. top-k: fused kernel (codes; codes + masked rows) vs torch.topk(|x|) and vs sfa.topk_sparsify,
     on many rows (default 4M rows of D=128, k=16, bf16 -- the docs/design.md target shape).
  2. masked GQA: forward+backward of dense SDPA on masked q~, k~ with GQA via enable_gqa (priority
     cuDNN > flash) vs expanding K/V heads for cuDNN vs flash; and the whole masked backend vs dense cuDNN.
  3. QK epilogue (--epilogue-only runs just this): Qwen3's RMSNorm -> RoPE -> (SFA) top-k mask of one
     micro-batch's q and k at the study shape (16 x 1024 tokens, 6 query / 3 KV heads of 128, bf16), the fused
     kernel (sfa/kernels/qk_epilogue.py) against the unfused ops the model runs without it (models/qwen3.py's
     RMSNorm and apply_rope, then the masked backend's fused top-k), forward and forward+backward, with
     full RoPE and decoupled RoPE on 32 dims. Per arm: ms, the ms per training step (x 2 tensors x layers x
     micro-batches) and GB/s of the bytes a pass must move. This is where SFA's end-to-end deficit against dense
     with the fused epilogue is looked for (docs/benchmarks.md "Fused QK epilogue").
Timing: triton.testing.do_bench, median, warm-up excluded, L2 flushed between reps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from results_out import write_results  # noqa: E402
import sfa  # noqa: E402
from models.qwen3 import RMSNorm, RotaryEmbedding, apply_rope  # noqa: E402
from sfa.kernels.masked import masked_features, masked_sfa_attention  # noqa: E402
from sfa.kernels.qk_epilogue import qk_norm_rope  # noqa: E402
from sfa.kernels.topk import topk_rows_into  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def topk_rows(n_rows: int, dim: int, k: int, dtype: torch.dtype) -> dict:
    x = torch.randn(n_rows, dim, device="cuda").to(dtype)
    values = torch.empty(n_rows, k, dtype=dtype, device="cuda")
    indices = torch.empty(n_rows, k, dtype=torch.uint8, device="cuda")
    masked = torch.empty_like(x)
    # correctness on this very input before timing
    topk_rows_into(x, k, values, indices, masked)
    want = sfa.topk_sparsify(x[:65536], k)
    exact = torch.equal(indices[:65536], want.indices) and torch.equal(values[:65536], want.values)
    t_codes = bench(lambda: topk_rows_into(x, k, values, indices, None))
    t_codes_masked = bench(lambda: topk_rows_into(x, k, values, indices, masked))
    t_torch = bench(lambda: torch.topk(x.abs(), k, dim=-1))
    t_ref = bench(lambda: sfa.topk_sparsify(x, k)) if n_rows * dim <= (1 << 29) else float("nan")
    elt = x.element_size()
    bytes_codes = n_rows * (dim * elt + k * (elt + 1))
    return dict(
        rows=n_rows, dim=dim, k=k, dtype=str(dtype).replace("torch.", ""), bit_exact=exact,
        fused_codes_ms=t_codes, fused_codes_masked_ms=t_codes_masked, torch_topk_ms=t_torch,
        topk_sparsify_ms=t_ref, speedup_vs_torch_topk=t_torch / t_codes,
        speedup_masked_vs_torch_topk=t_torch / t_codes_masked,
        fused_codes_gbps=bytes_codes / t_codes / 1e6,
        fused_codes_masked_gbps=(bytes_codes + n_rows * dim * elt) / t_codes_masked / 1e6,
    )


def _fwd_bwd(fn, *tensors, timer=bench):
    out = fn()
    grad = torch.randn_like(out)

    def step():
        for t in tensors:
            t.grad = None
        fn().backward(grad)

    return timer(step)


def masked_gqa(b: int, hq: int, hkv: int, n: int, d: int, k: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, hq, n, d, device=dev, dtype=dt, requires_grad=True)
    kk = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, hkv, n, d, device=dev, dtype=dt, requires_grad=True)
    group = hq // hkv
    res = dict(b=b, hq=hq, hkv=hkv, n=n, d=d, k=k)

    def sdpa(backends, expand):
        def fn():
            k2, v2 = (kk.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) if expand and group > 1 else (kk, v)
            with sdpa_kernel(backends, set_priority=True):
                return F.scaled_dot_product_attention(q, k2, v2, is_causal=True, enable_gqa=group > 1 and not expand)
        return fn

    variants = {
        "dense_cudnn_gqa": ([SDPBackend.CUDNN_ATTENTION], False),
        "dense_cudnn_expand": ([SDPBackend.CUDNN_ATTENTION], True),
        "dense_flash_gqa": ([SDPBackend.FLASH_ATTENTION], False),
        "dense_priority_gqa": (
            [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], False),
    }
    for name, (backends, expand) in variants.items():
        try:
            res[name + "_fwd_bwd_ms"] = _fwd_bwd(sdpa(backends, expand), q, kk, v)
        except RuntimeError as e:  # e.g. a backend that rejects GQA
            res[name + "_fwd_bwd_ms"] = None
            res[name + "_error"] = str(e).splitlines()[0][:200]
    masked = lambda: masked_sfa_attention(q, kk, v, topk_q=k, topk_k=k, causal=True, scale=None)  # noqa: E731
    res["masked_backend_fwd_bwd_ms"] = _fwd_bwd(masked, q, kk, v)
    res["masked_backend_fwd_ms"] = bench(lambda: masked_sfa_attention(q.detach(), kk.detach(), v.detach(),
                                                                       topk_q=k, topk_k=k, causal=True, scale=None))
    dense_best = min(x for key, x in res.items() if key.startswith("dense") and key.endswith("_ms") and x)
    res["masked_over_best_dense"] = res["masked_backend_fwd_bwd_ms"] / dense_best
    return res


# The Qwen3 study shape (configs/experiment/study_pkg_qwen3.yaml): one micro-batch's projection rows, and how
# many epilogue passes one optimizer step makes (q and k of 12 layers, 2 micro-batches of 16 x 1024).
STUDY_SHAPE = dict(b=16, t=1024, heads=(6, 3), d=128, k=16)
PASSES_PER_STEP = 12 * 2  # layers x micro-batches, per tensor (q and k are timed separately)
EPILOGUE_LAYOUTS = {"full": (None, 0), "decoupled32": (32, 32)}  # rope -> (rotary dims or all, dense dims)


def qk_epilogue(b: int, t: int, heads: tuple, d: int, k: int, layout: str, device: str = "cuda",
                timer=bench) -> list[dict]:
    """Fused vs unfused epilogue of q and k, dense (no top-k) and SFA (top-k), after checking the fused rows
    equal the unfused ones on this very input (bf16: to 16-bit rounding; exact selections are the kernel tests')."""
    rotary, dense_dims = EPILOGUE_LAYOUTS[layout]
    rotary = rotary or d
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter has no faithful bf16
    cos, sin = RotaryEmbedding(rotary, 1e6).to(device)(0, t, dtype)
    norm = RMSNorm(d, 1e-6).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    rows = []
    for h in heads:
        x = torch.randn(b, t, h, d, device=device, dtype=dtype, requires_grad=True)
        elt = x.element_size()
        for kind, topk in (("dense", None), ("sfa", k)):
            def unfused(x=x, topk=topk):
                y = apply_rope(norm(x).transpose(1, 2), cos, sin)
                return y if topk is None else masked_features(y, topk, dense_dims)

            def fused(x=x, topk=topk):
                return qk_norm_rope(x, norm.weight, norm.eps, cos, sin, topk=topk,
                                    dense_dims=dense_dims if topk else 0).transpose(1, 2)

            with torch.no_grad():
                want, got = unfused().float(), fused().float()
            agree = ((got - want).norm() / want.norm()).item()
            n = x.numel()
            for path, fn in (("unfused", unfused), ("fused", fused)):
                fwd, fwd_bwd = timer(fn), _fwd_bwd(fn, x, norm.weight, timer=timer)
                # a pass must read x and write the rows (fwd); read x and the rows' gradient, write dx (bwd)
                rows.append(dict(layout=layout, heads=h, kind=kind, path=path, rows=b * t * h, d=d,
                                 k=topk, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                                 step_ms=fwd_bwd * PASSES_PER_STEP, fused_vs_unfused_rel_diff=agree,
                                 fwd_gbps=2 * n * elt / fwd / 1e6, fwd_bwd_gbps=5 * n * elt / fwd_bwd / 1e6))
    return rows


def print_epilogue(rows: list[dict]) -> None:
    print(f"\n{'layout':>11} {'H':>2} {'kind':>5} {'path':>8} {'fwd ms':>7} {'fwd+bwd':>8} {'/step ms':>8}"
          f" {'fwd GB/s':>8} {'f+b GB/s':>8} {'x unfused':>9} {'rel diff':>8}")
    by_key = {(r["layout"], r["heads"], r["kind"], r["path"]): r for r in rows}
    for r in rows:
        base = by_key[(r["layout"], r["heads"], r["kind"], "unfused")]
        print(f"{r['layout']:>11} {r['heads']:>2} {r['kind']:>5} {r['path']:>8} {r['fwd_ms']:7.3f} {r['fwd_bwd_ms']:8.3f}"
              f" {r['step_ms']:8.2f} {r['fwd_gbps']:8.0f} {r['fwd_bwd_gbps']:8.0f}"
              f" {base['fwd_bwd_ms'] / r['fwd_bwd_ms']:9.2f} {r['fused_vs_unfused_rel_diff']:8.1e}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4 * 1024 * 1024)
    p.add_argument("--out", default=None, help="JSON path (also written to $OUT/topk.json when $OUT is set)")
    p.add_argument("--skip-masked", action="store_true")
    p.add_argument("--epilogue-only", action="store_true", help="only part 3, the QK epilogue")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_topk.py: needs a CUDA GPU")
    torch.manual_seed(0)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               cudnn=torch.backends.cudnn.version())
    topk = [] if args.epilogue_only else [topk_rows(args.rows, d, k, DTYPES[dt]) for d, k, dt in
            ((128, 16, "bf16"), (64, 8, "bf16"), (256, 32, "bf16"), (128, 16, "fp32"), (128, 64, "bf16"))]
    masked = [] if args.skip_masked or args.epilogue_only else [
        masked_gqa(*s) for s in ((2, 32, 8, 8192, 128, 16), (2, 16, 16, 8192, 128, 16), (1, 32, 8, 16384, 128, 16))]
    epilogue = [r for layout in EPILOGUE_LAYOUTS for r in qk_epilogue(**STUDY_SHAPE, layout=layout)]
    result = dict(env=env, topk=topk, masked=masked, qk_epilogue=epilogue)
    write_results(result, args.out, "topk.json")
    print(json.dumps(env))
    print(f"\n{'rows':>8} {'D':>4} {'k':>3} {'dtype':>8} {'exact':>5} {'fused ms':>9} {'+masked':>8} {'torch.topk':>10}"
          f" {'ref sort':>9} {'x topk':>7} {'GB/s':>6}")
    for r in topk:
        print(f"{r['rows']:>8} {r['dim']:>4} {r['k']:>3} {r['dtype']:>8} {str(r['bit_exact']):>5} {r['fused_codes_ms']:9.3f}"
              f" {r['fused_codes_masked_ms']:8.3f} {r['torch_topk_ms']:10.3f} {r['topk_sparsify_ms']:9.3f}"
              f" {r['speedup_vs_torch_topk']:7.1f} {r['fused_codes_gbps']:6.0f}")
    for r in masked:
        print("\nmasked GQA", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
    print_epilogue(epilogue)


if __name__ == "__main__":
    main()
