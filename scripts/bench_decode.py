"""Benchmark SFA decode over the compressed cache against dense decode: SDPA (cuDNN, flash), the masked SDPA
the static-cache engine fell back to, and our split-KV dense decode kernel (the same kernel's dense-key mode).

One query token per sequence (T=1; also T=4 at one point), GQA (32 query / 8 KV heads; --q-heads 16 gives
Qwen3-0.6B's 16 / 8), D = Dv = 128, k = 16 (D/8), bf16, context 8k..128k, batch 1 and 8 (--batches).
Reports latency, the cache bytes each kernel must read and the achieved GB/s against the measured device-to-device copy bandwidth (read + write), and
KV-cache bytes per token. Launch-config sweeps pick the SFA kernel's config first (--no-sweep skips it) and,
with --dense-sweep, the dense kernel's. The SFA columns time the sweep's best plan; g:ship times the plan the
library ships (GPU_DECODE_CONFIG / _WIDE), which is what the engine runs.
Prints tables, writes JSON (--out, and $OUT/decode.json when $OUT is set). GPU only.
"""

from __future__ import annotations

import argparse
import json
import math
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
from models.attention import StaticStep, static_dense_sdpa  # noqa: E402
from sfa.kernels import decode as decode_mod  # noqa: E402
from sfa.reference import dense_attention, sfa_attention_reference  # noqa: E402

HQ, HKV, D, K = 32, 8, 128, 16


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbps() -> float:
    x = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / ms / 1e6


def make_inputs(b, n_keys, n_q=1):
    q = torch.randn(b, HQ, n_q, D, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(b, HKV, n_keys, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, HKV, n_keys, D, device="cuda", dtype=torch.bfloat16)
    code = sfa.topk_sparsify(keys, K)
    q_masked = sfa.topk_mask(q, K)
    return q, q_masked, keys, code, v


def dense_times(q, keys, v) -> dict:
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, keys, v, is_causal=False, enable_gqa=True)
        try:
            fn()
            out[name] = bench(fn)
        except RuntimeError as e:
            out[name] = None
            out[name + "_error"] = str(e).splitlines()[0][:160]
    return out


def sfa_time(q_masked, code, v, config=None, graph=False) -> float:
    out = torch.empty(*q_masked.shape[:-1], v.shape[-1], device="cuda", dtype=v.dtype)
    scale = 1 / math.sqrt(D)
    fn = lambda: decode_mod.decode_into(q_masked, code.values, code.indices, v, out, scale=scale, causal=True,  # noqa: E731
                                        config=dict(config) if config else None)
    return bench_graph(fn) if graph else bench(fn)


def dense_kernel_time(q, keys, v, config=None, graph=False) -> float:
    """Our dense decode kernel as the engine calls it: with a (1,) device length (here the whole cache)."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], device="cuda", dtype=v.dtype)
    n_valid = torch.tensor([keys.shape[2]], device="cuda")
    fn = lambda: decode_mod.dense_decode_into(q, keys, v, out, scale=1 / math.sqrt(D), causal=True,  # noqa: E731
                                              config=dict(config) if config else None, n_valid=n_valid)
    return bench_graph(fn) if graph else bench(fn)


def masked_sdpa_graph_time(q, keys, v) -> float:
    """The static-cache engine's fallback dense step (models.attention.static_dense_sdpa): SDPA, cuDNN first, of the
    folded GQA rows with a (T, capacity) mask; here every position is valid."""
    n_q, n_keys = q.shape[2], keys.shape[2]
    mask = StaticStep.at(torch.tensor([n_keys - n_q], device="cuda"), n_q, n_keys, needs_mask=True).mask
    return bench_graph(lambda: static_dense_sdpa(q, keys, v, mask))


def plan_for(q, k, v, narrow: dict, wide: dict) -> dict:
    """The plan of `narrow` and `wide` that the library's dispatch would launch for these inputs (bf16 here)."""
    return decode_mod._launch_config(None, q, k, v, narrow, wide, decode_mod.GPU_DECODE_CONFIG_FP32)


def bench_graph(fn) -> float:
    """GPU time without launch overhead (CUDA graph replays). No L2 flush: short contexts fit in L2."""
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def cudnn_graph_time(q, keys, v) -> float:
    def fn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, keys, v, is_causal=False, enable_gqa=True)
    return bench_graph(fn)


def sweep_shapes() -> tuple:
    """(batch, context, queries) of the sweep; [3] has 16 rows per program (queries x the GQA group of HQ), [5]
    8 rows (4 queries at Qwen3-0.6B's group of 2); [6] is the generation benchmark's B = 4, 32k step."""
    return ((1, 131072, 1), (8, 32768, 1), (8, 131072, 1), (8, 32768, max(1, 16 // (HQ // HKV))), (1, 32768, 1),
            (4, 32768, max(1, 8 // (HQ // HKV))), (4, 32768, 1))


def sweep(configs, time_of) -> list[dict]:
    """CUDA-graph timings (the kernels' GPU time; eager batch-1 timings are launch-bound on some hosts) of each
    config at sweep_shapes(), fastest first by the total over its one-query shapes ([0-2], [4], [6]); the 16- and
    8-row shapes are kept apart (wide_rows_ms, eight_rows_ms)."""
    rows = []
    shapes = sweep_shapes()
    inputs = {s: make_inputs(*s) for s in shapes}
    for cfg in configs:
        try:
            times = [time_of(inputs[s], dict(cfg)) for s in shapes]
        except Exception as e:  # out of resources for this config
            print("config failed", cfg, str(e).splitlines()[0][:100])
            continue
        rows.append(dict(config=cfg, ms=times, total=sum(times[:3]) + times[4] + times[6], wide_rows_ms=times[3],
                         eight_rows_ms=times[5]))
    rows.sort(key=lambda r: r["total"])
    del inputs
    torch.cuda.empty_cache()
    return rows


def sweep_configs() -> list[dict]:
    # Compiled variants x split plans (PROGRAMS_PER_SM, SPLIT_CAP and MIN_KEYS_PER_SPLIT change only the grid).
    # Earlier sweeps (docs/bench/notes_topk_decode.md) found BLOCK_L=64, 4 warps, 3 stages best of BLOCK_L
    # {32, 64, 128} x warps {4, 8}; 16/SM of {8, 16, 32}, 4 stages no better; lifting the 128-split cap slows batch 1
    # (264 splits: +11% at 128k); 2 stages ~ 3. So this one tries fewer, longer splits.
    # MIN_PROGRAMS_PER_SM floors the minimum chunk: at B = 4, 32k the shipped plan's programs of 512 keys read at
    # 83% of copy bandwidth where B = 8's of 1024 read at 92% (docs/inference.md), yet batch 1 needs its 512
    # programs (1024-key chunks, 256 programs, were 20% slower there).
    configs = [dict(BLOCK_L=block_l, PROGRAMS_PER_SM=per_sm, SPLIT_CAP=cap, MIN_KEYS_PER_SPLIT=min_keys,
                    MIN_PROGRAMS_PER_SM=min_programs, num_warps=warps, num_stages=stages)
               for block_l, warps, stages in ((64, 4, 3), (64, 4, 2))
               for per_sm, cap, min_keys, min_programs in (
                   (16, 128, 0, 0), (16, 64, 0, 0), (16, 32, 0, 0), (16, 128, 1024, 0), (16, 128, 2048, 0), (8, 128, 0, 0),
                   (32, 128, 0, 0), (16, 64, 768, 4), (16, 64, 1024, 4), (16, 128, 1024, 4), (16, 64, 2048, 4))]
    # Capping registers (ptx .maxnreg 96/80/64, for 5-8 resident blocks instead of 4) helped at no shape on the
    # H200 (docs/bench/results/decode_2026-12-03_h200_c36837b_q16.json), so it is no longer swept.
    # The transposed-query gather (QUERY_COLUMNS: one vector load per code entry instead of one load per query
    # row) against the same plans, and with smaller tiles / more warps for the many-row shapes.
    configs += [dict(BLOCK_L=block_l, PROGRAMS_PER_SM=per_sm, SPLIT_CAP=cap, num_warps=warps, num_stages=stages,
                     QUERY_COLUMNS=True)
                for block_l, warps, stages, per_sm, cap in ((64, 4, 2, 16, 64), (64, 4, 3, 16, 128), (64, 4, 2, 8, 128),
                                                            (32, 4, 2, 16, 64), (64, 8, 2, 16, 64), (128, 8, 2, 16, 64))]
    return sweep(configs, lambda x, cfg: sfa_time(x[1], x[3], x[4], cfg, graph=True))


def sweep_dense_configs() -> list[dict]:
    """The dense kernel moves 512 bytes per key and KV head (SFA: 304), so larger tiles and deeper pipelines may
    pay off where they did not for SFA; the split plans are SFA's best few."""
    configs = [dict(BLOCK_L=block_l, PROGRAMS_PER_SM=per_sm, SPLIT_CAP=cap, num_warps=warps, num_stages=stages)
               for block_l, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3))
               for per_sm, cap in ((16, 64), (16, 128), (8, 128))]
    return sweep(configs, lambda x, cfg: dense_kernel_time(x[0], x[2], x[4], cfg, graph=True))


def main():
    global HQ
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--no-sweep", action="store_true", help="skip the SFA kernel's config sweep")
    p.add_argument("--dense-sweep", action="store_true", help="also sweep the dense kernel's configs (~15 configs)")
    p.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--query-rows", default="1,4",
                   help="query rows per sequence timed at 32k context (speculative or chunked decoding; other "
                        "contexts time 1 row)")
    p.add_argument("--q-heads", type=int, default=HQ,
                   help=f"query heads over the {HKV} KV heads (16: Qwen3-0.6B's GQA group of 2, as in "
                        "scripts/profile_generate.py)")
    args = p.parse_args()
    if args.q_heads < HKV or args.q_heads % HKV:
        p.error(f"--q-heads {args.q_heads} must be a multiple of the {HKV} KV heads")
    HQ = args.q_heads  # every input and the row count of the programs follow it
    try:
        query_rows = tuple(map(int, args.query_rows.split(",")))
    except ValueError:
        query_rows = ()
    if not query_rows or min(query_rows) < 1:
        p.error(f"--query-rows {args.query_rows} must be positive row counts, e.g. 1,4,8")
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py: needs a CUDA GPU")
    torch.manual_seed(0)
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               cudnn=torch.backends.cudnn.version())
    copy_gbps = copy_bandwidth_gbps()
    # The plans the library ships, kept apart from the sweep's best: the table times both, since the sweep's best
    # in isolation has been slower in the engine (docs/inference.md, "Launch plan, second look").
    shipped, shipped_wide = dict(decode_mod.GPU_DECODE_CONFIG), dict(decode_mod.GPU_DECODE_CONFIG_WIDE)
    sweep = [] if args.no_sweep else sweep_configs()
    best = sweep[0]["config"] if sweep else dict(decode_mod.GPU_DECODE_CONFIG)
    best_wide = min(sweep, key=lambda r: r["wide_rows_ms"])["config"] if sweep else dict(decode_mod.GPU_DECODE_CONFIG_WIDE)
    dense_sweep = sweep_dense_configs() if args.dense_sweep else []
    dense_best = dense_sweep[0]["config"] if dense_sweep else dict(decode_mod.GPU_DENSE_DECODE_CONFIG)
    dense_best_wide = (min(dense_sweep, key=lambda r: r["wide_rows_ms"])["config"] if dense_sweep
                       else dict(decode_mod.GPU_DENSE_DECODE_CONFIG_WIDE))

    # correctness of the timed path on one bench-sized input (fp32 reference)
    q, q_masked, keys, code, v = make_inputs(2, 20000, n_q=1)
    out = torch.empty(2, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    decode_mod.decode_into(q_masked, code.values, code.indices, v, out, scale=1 / math.sqrt(D), causal=True,
                           config=dict(best))
    ref = sfa_attention_reference(q.float(), keys.float(), v.float(), topk_q=K, topk_k=K, causal=True)
    rel_err = ((out.float() - ref).norm() / ref.norm()).item()
    dense_out = torch.empty_like(out)
    decode_mod.dense_decode_into(q, keys, v, dense_out, scale=1 / math.sqrt(D), causal=True, config=dict(dense_best))
    dense_ref = dense_attention(q.float(), keys.float(), v.float(), causal=True)
    dense_rel_err = ((dense_out.float() - dense_ref).norm() / dense_ref.norm()).item()
    del q, q_masked, keys, code, v, out, ref, dense_out, dense_ref

    dense_bpt = HKV * (D + D) * 2
    sfa_bpt = HKV * (3 * K + 2 * D)
    table = []
    for b in map(int, args.batches.split(",")):
        for n_keys in map(int, args.contexts.split(",")):
            for n_q in (query_rows if n_keys == 32768 else (1,)):
                q, q_masked, keys, code, v = make_inputs(b, n_keys, n_q)
                dense = dense_times(q, keys, v)
                best_dense = min(t for name, t in dense.items() if isinstance(t, float))
                # the library's own choice between each pair of plans (narrow or wide by rows per program)
                cfg = plan_for(q_masked, code.values, v, best, best_wide)
                shipped_cfg = plan_for(q_masked, code.values, v, shipped, shipped_wide)
                dense_cfg = plan_for(q, keys, v, dense_best, dense_best_wide)
                t_kernel = sfa_time(q_masked, code, v, dict(cfg))
                t_dense_kernel = dense_kernel_time(q, keys, v, dict(dense_cfg))
                try:
                    t_kernel_graph = sfa_time(q_masked, code, v, dict(cfg), graph=True)
                    t_shipped_graph = sfa_time(q_masked, code, v, dict(shipped_cfg), graph=True)
                    t_cudnn_graph = cudnn_graph_time(q, keys, v)
                    t_dense_kernel_graph = dense_kernel_time(q, keys, v, dict(dense_cfg), graph=True)
                    t_masked_graph = masked_sdpa_graph_time(q, keys, v)
                except RuntimeError as e:  # graph capture refused: report, keep going
                    print("cudagraph timing failed:", str(e).splitlines()[0][:120])
                    t_kernel_graph = t_shipped_graph = t_cudnn_graph = t_dense_kernel_graph = t_masked_graph = float("nan")
                decode_mod.GPU_DECODE_CONFIG.update(best)
                decode_mod.GPU_DECODE_CONFIG_WIDE.update(best_wide)
                t_backend = bench(lambda q=q, code=code, v=v: sfa.sfa_attention(q, code, v, topk_q=K, backend="decode"))
                dense_bytes, sfa_bytes = b * n_keys * dense_bpt, b * n_keys * sfa_bpt
                table.append(dict(
                    batch=b, context=n_keys, queries=n_q, dense_ms=dense, best_dense_ms=best_dense,
                    sfa_kernel_ms=t_kernel, sfa_backend_ms=t_backend, speedup=best_dense / t_kernel,
                    speedup_backend=best_dense / t_backend,
                    cudagraph_ms=dict(cudnn=t_cudnn_graph, sfa_kernel=t_kernel_graph, sfa_kernel_shipped=t_shipped_graph,
                                      dense_kernel=t_dense_kernel_graph, cudnn_masked=t_masked_graph),
                    speedup_cudagraph=t_cudnn_graph / t_kernel_graph,
                    speedup_cudagraph_shipped=t_cudnn_graph / t_shipped_graph,
                    dense_kernel_ms=t_dense_kernel, dense_kernel_gbps=dense_bytes / t_dense_kernel_graph / 1e6,
                    dense_kernel_fraction_of_copy_bw=dense_bytes / t_dense_kernel_graph / 1e6 / copy_gbps,
                    dense_gbps=dense_bytes / best_dense / 1e6, sfa_gbps=sfa_bytes / t_kernel / 1e6,
                    sfa_fraction_of_copy_bw=sfa_bytes / t_kernel / 1e6 / copy_gbps,
                ))
                del q, q_masked, keys, code, v
                torch.cuda.empty_cache()
    result = dict(env=env, copy_gbps=copy_gbps, heads=dict(q=HQ, kv=HKV), d=D, k=K, dtype="bfloat16",
                  kv_bytes_per_token_per_layer=dict(dense=dense_bpt, sfa=sfa_bpt, ratio=sfa_bpt / dense_bpt),
                  byte_ratio_cap=dense_bpt / sfa_bpt, decode_config=best, decode_config_wide_rows=best_wide,
                  shipped_decode_config=shipped, shipped_decode_config_wide_rows=shipped_wide, rel_err_vs_fp32=rel_err,
                  dense_decode_config=dense_best, dense_decode_config_wide_rows=dense_best_wide,
                  dense_rel_err_vs_fp32=dense_rel_err, sweep_shapes=sweep_shapes(), sweep=sweep, dense_sweep_top10=dense_sweep[:10],
                  table=table)
    write_results(result, args.out, "decode.json")
    print(json.dumps(env), f"copy {copy_gbps:.0f} GB/s", "config", best, f"rel_err {rel_err:.2e}")
    print(f"KV bytes/token/layer: dense {dense_bpt}, sfa {sfa_bpt} (cap {dense_bpt / sfa_bpt:.2f}x)")
    print("sweep ms at (B, L, T) =", sweep_shapes())
    for r in sweep:
        print("sweep", r["config"], [round(t, 4) for t in r["ms"]])
    print("best for >= 16 rows/program:", best_wide)
    print("shipped:", shipped, "and for >= 16 rows/program:", shipped_wide, "(g:ship, g:xs = cudnn / g:ship)")
    print(f"{'B':>2} {'L':>7} {'T':>2} {'cudnn':>8} {'flash':>8} {'effic':>8} {'sfa':>8} {'sfa+topk':>8} {'x':>5} {'sfaGB/s':>8} {'%copy':>6} {'g:cudnn':>8} {'g:sfa':>8} {'g:x':>5} {'g:ship':>8} {'g:xs':>5}")
    for r in table:
        d = r["dense_ms"]
        f = lambda t: f"{t:8.4f}" if isinstance(t, float) else f"{'-':>8}"  # noqa: E731
        print(f"{r['batch']:>2} {r['context']:>7} {r['queries']:>2} {f(d.get('cudnn'))} {f(d.get('flash'))} "
              f"{f(d.get('efficient'))} {r['sfa_kernel_ms']:8.4f} {r['sfa_backend_ms']:8.4f} {r['speedup']:5.2f} "
              f"{r['sfa_gbps']:8.0f} {100 * r['sfa_fraction_of_copy_bw']:6.1f} {r['cudagraph_ms']['cudnn']:8.4f} "
              f"{r['cudagraph_ms']['sfa_kernel']:8.4f} {r['speedup_cudagraph']:5.2f} "
              f"{r['cudagraph_ms']['sfa_kernel_shipped']:8.4f} {r['speedup_cudagraph_shipped']:5.2f}")
    print(f"\ndense decode, CUDA-graph ms: cuDNN (no mask, every key valid), the engine's masked SDPA fallback, our "
          f"split-KV dense kernel {dense_best} (rel_err {dense_rel_err:.2e}); x = that / ours")
    for r in dense_sweep[:6]:
        print("dense sweep", r["config"], [round(t, 4) for t in r["ms"]])
    print(f"{'B':>2} {'L':>7} {'T':>2} {'cudnn':>8} {'masked':>8} {'ours':>8} {'x cudnn':>7} {'x mask':>7} "
          f"{'GB/s':>6} {'%copy':>6} {'eager':>8}")
    for r in table:
        g = r["cudagraph_ms"]
        print(f"{r['batch']:>2} {r['context']:>7} {r['queries']:>2} {g['cudnn']:8.4f} {g['cudnn_masked']:8.4f} "
              f"{g['dense_kernel']:8.4f} {g['cudnn'] / g['dense_kernel']:7.2f} {g['cudnn_masked'] / g['dense_kernel']:7.2f} "
              f"{r['dense_kernel_gbps']:6.0f} {100 * r['dense_kernel_fraction_of_copy_bw']:6.1f} {r['dense_kernel_ms']:8.4f}")


if __name__ == "__main__":
    main()
