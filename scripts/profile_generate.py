"""Where a decode step of the engine spends its time: the kernels of N steps under torch.profiler, grouped
into classes by kernel name, set against the step's wall time and its byte floor.

    python scripts/profile_generate.py                                   # Qwen3-0.6B dense, B=1, 32k, graph mode
    python scripts/profile_generate.py --attention sfa --batch 4 --sampler topp --mode compile
    python scripts/profile_generate.py --quick                           # a tiny model on CPU, seconds (CI)

The model, the random cache fill, the warm-up/capture steps, the wall-clock timing and the byte floor are
scripts/bench_generate.py's own. After the warm-up, `--steps` steps are timed without the profiler (the wall
time), then `--steps` more run under torch.profiler (CUDA activity on a GPU: CUPTI records the kernels a CUDA
graph replays; on CPU the top-level aten ops of the step stand in for kernels). Where the profiler recorded no
kernel in graph or compile mode (a torch whose CUPTI does not see inside graphs) the output says so and the
breakdown comes from the same step in eager mode.

Per step: wall ms, summed kernel ms, the gap between them (launch and idle time), the device's span from its
first kernel to its last, each class's kernel count, ms and share, the LM head's ms, the 10 largest kernels by
name (every name in the JSON), and the floors at the copy bandwidth: the step's (weight bytes + cache bytes),
the weights' alone (what the GEMMs cannot beat), the LM head's and the cache's (what attention cannot beat).
Classes come from kernel names, except "sampling": everything after the step's last GEMM (the LM head), since
the sampler's kernels are mostly generic elementwise ones; `--sampler topp` shows top-p's cost against greedy.
Prints a table and writes JSON (--out, and $OUT/profile_generate.json when $OUT is set). Discussion:
docs/inference.md, "Where a small-batch step's time goes".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import (  # noqa: E402  (the benchmark's model, cache fill, timing and floor: one owner)
    TIMED_WARMUP,
    byte_floor_ms,
    copy_bandwidth_gbps,
    device_and_dtype,
    environment,
    make_model,
    ready_decoder,
    sync,
    time_steps,
    weight_bytes_read,
)
from results_out import write_results  # noqa: E402
from models.sampling import Sampler  # noqa: E402

MODELS = ("qwen3_0.6b", "gpt2_small", "qwen3_tiny", "gpt2_tiny")
ATTENTIONS = ("dense", "sfa", "short")
MODES = ("graph", "eager", "compile")
SAMPLERS = {"greedy": Sampler(), "topp": Sampler(temperature=0.8, top_p=0.9)}
DEFAULTS = dict(model="qwen3_0.6b", batch=1, context=32768, steps=20, mode="graph", dtype="bf16", device="cuda")
QUICK = dict(model="qwen3_tiny", batch=1, context=48, steps=3, mode="eager", dtype="fp32", device="cpu")

# The classes, in the order the table prints them.
LABELS = dict(gemm="GEMM / matmul (incl. LM head)", attention="attention decode kernel", combine="its combine kernel",
              sfa_topk="SFA top-k (q/k codes)", norm_rope_elementwise="norm / RoPE / elementwise",
              cache_write_copy="cache write / copy", sampling="sampling (after the LM head)", other="other")
# Kernel name -> class: the first pattern that matches (case-insensitive) wins; no match is "other". GPU names
# are cuBLAS/cuDNN's, ATen's (whose templates name their functor: ArgMaxOps, index_copy, direct_copy), Triton's
# (the function's name) and inductor's (triton_poi/red/per_fused_<the ops fused>, triton_tem_ for templated
# GEMMs: "_to_copy" in a fused name is a cast, not a copy); CPU names are aten ops. The sampler is found by
# position instead (see breakdown), since most of its kernels have generic names.
SAMPLING = r"argmax|softmax|scan|cumsum|exponential|distribution|multinomial"
RULES = (
    ("attention", r"_decode_split_kernel|flash|fmha|sdpa|scaled_dot_product|decode_attention"),
    ("combine", r"_combine_kernel"),
    # Before the LM head a sort is SFA's selection: the cache write codes the new keys with sfa.topk_sparsify,
    # two sorts per row; q's goes through the fused top-k kernel.
    ("sfa_topk", r"topk|sort"),
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|splitkreduce|cublas|matmul|aten::(linear|mm|addmm|bmm)$"),
    ("sampling", SAMPLING),
    ("norm_rope_elementwise", r"catarray|aten::cat$"),  # cat: RoPE's rotate_half
    ("cache_write_copy", r"index_copy|index_put|memcpy|memset|copy|aten::(clone|contiguous|to)$"),
    ("norm_rope_elementwise", r"elementwise|reduce_kernel|norm|index_?select|aten::(add|sub|mul|div|neg|pow|rsqrt|"
                              r"mean|silu|gelu|tanh|exp|where|masked_fill|embedding|eq|ne|lt|le|gt|ge|arange)_?$"),
)
# Inductor's kernels (triton_poi/red/per/for/spl/unk_fused_<ops>, triton_tem_ templates) list the ops they fuse,
# and also name the ops they feed or follow (a custom op: "..._dense_decode_attention_...",
# "..._topk_code_masked_..."); those must not make a fused norm/RoPE kernel "attention" or "SFA top-k". So they
# are classed by their own work only. Inductor's sort is lowered into the kernel itself, so "sort" in its name is
# real work (the reference top-k).
INDUCTOR_KERNEL = r"^triton_(poi|red|per|for|spl|unk|tem)_"
INDUCTOR_RULES = (
    ("gemm", r"^triton_tem_"),
    ("sfa_topk", r"sort"),
    ("sampling", SAMPLING),
    ("cache_write_copy", r"index_put|index_copy"),
    ("norm_rope_elementwise", r""),
)
OTHER = "other"
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="profile_generate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model on CPU (seconds); other flags still apply")
    p.add_argument("--model", choices=MODELS, help=f"preset (default {DEFAULTS['model']}; --quick {QUICK['model']})")
    p.add_argument("--attention", choices=ATTENTIONS, default="dense", help="default dense")
    p.add_argument("--k", type=int, default=16, help="SFA features kept per q/k row (default 16)")
    p.add_argument("--d-short", type=int, default=24, help="short baseline q/k width (default 24)")
    p.add_argument("--batch", type=int, help=f"sequences (default {DEFAULTS['batch']})")
    p.add_argument("--context", type=int, help=f"cached positions per sequence (default {DEFAULTS['context']})")
    p.add_argument("--steps", type=int, help=f"timed steps, and as many profiled (default {DEFAULTS['steps']})")
    p.add_argument("--mode", choices=MODES, help=f"decode engine mode (default {DEFAULTS['mode']}; --quick eager)")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default="greedy",
                   help="greedy (default) or topp: temperature 0.8, top_p 0.9")
    p.add_argument("--dtype", choices=("bf16", "fp32"))
    p.add_argument("--device")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch", "context", "steps", "k"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    return args


def kernel_class(name: str) -> str:
    rules = INDUCTOR_RULES if re.match(INDUCTOR_KERNEL, name) else RULES
    for cls, pattern in rules:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return OTHER


def device_activity(trace: list[dict]) -> list[dict]:
    """The kernels, copies and memsets of a chrome trace."""
    return [e for e in trace if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]


def top_level_ops(trace: list[dict]) -> list[dict]:
    """The CPU ops of a chrome trace that no other op encloses (per thread): what a CPU step runs, once each."""
    by_thread = defaultdict(list)
    for e in trace:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    top = []
    for ops in by_thread.values():
        end = float("-inf")
        for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
            if e["ts"] >= end:  # starts after the enclosing op ended: a new top-level op
                top.append(e)
                end = e["ts"] + e["dur"]
    return top


def breakdown(events: list[dict], steps: int) -> dict:
    """Per step: kernel ms and count (every event), count, ms and share per class, the LM head's ms, every
    kernel name with its class (`by_name`, largest first; `largest` the first 10), and the span from the
    first kernel's start to the last one's end.

    Every step runs the same kernels in the same order on one stream, so the events cut into `steps` equal
    runs; in each, the LM head is the last run of GEMM kernels and everything after it is "sampling" (the
    sampler, then the new token's write and the position's increment), whatever its name. Where the events do
    not cut evenly, names alone decide and `positional` is False. Trace times are microseconds."""
    events = sorted(events, key=lambda e: e["ts"])
    cls = [kernel_class(e["name"]) for e in events]
    per_step, lm_head_us = len(events) // steps, 0.0
    positional = bool(events) and len(events) % steps == 0
    for first in range(0, len(events), per_step) if positional else ():
        run = range(first, first + per_step)
        gemms = [i for i in run if cls[i] == "gemm"]
        if not gemms:
            positional = False
            break
        head = gemms[-1]
        for i in range(head + 1, first + per_step):
            cls[i] = "sampling"
        while head >= first and cls[head] == "gemm":
            lm_head_us += events[head]["dur"]
            head -= 1
    if not positional:
        lm_head_us, cls = 0.0, [kernel_class(e["name"]) for e in events]
    per_name, per_class = defaultdict(lambda: [0, 0.0]), {c: [0, 0.0] for c in LABELS}
    for e, c in zip(events, cls):
        for tally in (per_name[(e["name"], c)], per_class[c]):
            tally[0] += 1
            tally[1] += e["dur"]
    total = sum(e["dur"] for e in events) / 1e3 / steps  # from the events, not the classes: those must add up to it
    classes = {c: dict(count=k / steps, ms=us / 1e3 / steps, share=us / 1e3 / steps / total if total else 0.0)
               for c, (k, us) in per_class.items()}
    by_name = [dict(name=n, kernel_class=c, count=k / steps, ms=us / 1e3 / steps, share=us / 1e3 / steps / total if
                    total else 0.0) for (n, c), (k, us) in sorted(per_name.items(), key=lambda item: -item[1][1])]
    span = (max(e["ts"] + e["dur"] for e in events) - events[0]["ts"]) / 1e3 / steps if events else 0.0
    return dict(kernel_ms=total, kernels=len(events) / steps, span_ms=span, classes=classes, positional=positional,
                lm_head_ms=lm_head_us / 1e3 / steps if positional else None,
                largest=by_name[:10], by_name=by_name,
                other_names=sorted({n for (n, c) in per_name if c == OTHER}))


def profile_steps(decoder, steps: int) -> list[dict]:
    """The chrome-trace events of `steps` decode steps (device activity on CUDA, CPU ops elsewhere)."""
    cuda = decoder.device.type == "cuda"
    # CPU activity on CUDA too: the configuration every torch tests; its host-side cost does not touch kernel times
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            decoder.step()
        sync(decoder.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)["traceEvents"]
    return device_activity(trace) if cuda else top_level_ops(trace)


def measure(model, args, mode: str) -> tuple[float, list[dict]]:
    """Wall ms per step (unprofiled) and the profiled steps' events, in one engine mode."""
    try:
        decoder, _ = ready_decoder(model, args.batch, args.context, 2 * args.steps, mode, real_prefill=False,
                                   sampler=SAMPLERS[args.sampler])
    except ValueError as e:  # the engine's own one-line reasons: graph mode off CUDA, a cache that does not fit
        raise SystemExit(f"profile_generate.py: {e}") from None
    wall_ms = time_steps(decoder, args.steps)
    events = profile_steps(decoder, args.steps)
    del decoder
    if model.lm_head.weight.is_cuda:
        torch.cuda.empty_cache()
    return wall_ms, events


def fmt_row(label: str, count: float, ms: float, share: float) -> str:
    return f"{label:<34} {count:>10.1f} {ms:>9.4f} {100 * share:>6.1f}%"


def print_report(r: dict) -> None:
    a = r["args"]
    print(f"\n{a['model']} {a['attention']} B={a['batch']} ctx={a['context']} mode={a['mode']} sampler={a['sampler']}"
          f" ({a['steps']} steps; breakdown from {r['breakdown_mode']} mode)")
    if r["note"]:
        print("NOTE:", r["note"])
    print(f"wall {r['wall_ms']:.4f} ms/step (unprofiled) | kernels {r['kernel_ms']:.4f} ms/step "
          f"({r['kernels']:.0f} per step) | gap (launch/idle) {r['gap_ms']:.4f} ms | device span {r['span_ms']:.4f} ms")
    f, gemm_ms = r["floors"], r["classes"]["gemm"]["ms"]
    print(f"byte floor {f['step_ms']:.4f} ms (wall {r['wall_ms'] / f['step_ms']:.2f}x) | weights "
          f"{f['weight_bytes'] / 1e9:.3f} GB -> GEMM floor {f['gemm_ms']:.4f} ms (GEMM {gemm_ms / f['gemm_ms']:.2f}x) | "
          f"cache {f['context_bytes'] / 1e9:.3f} GB -> {f['cache_ms']:.4f} ms | copy bandwidth {r['copy_gbps']:.0f} GB/s")
    if r["positional"]:
        print(f"LM head {r['lm_head_ms']:.4f} ms/step of the GEMMs (floor {f['lm_head_ms']:.4f} ms)")
    else:
        print("NOTE: the steps' kernels did not cut into equal runs: classes by name alone, the sampler's sorts "
              "under SFA top-k and its elementwise kernels under elementwise; no LM head figure")
    head = f"{'class':<34} {'kernels':>10} {'ms/step':>9} {'share':>7}"
    print(head + "\n" + "-" * len(head))
    for cls, c in r["classes"].items():
        print(fmt_row(LABELS[cls], c["count"], c["ms"], c["share"]))
    print(fmt_row("total", r["kernels"], r["kernel_ms"], 1.0 if r["kernel_ms"] else 0.0))
    print(f"\nlargest kernels by name:\n{'ms/step':>9} {'count':>7} {'share':>6}  {'class':<22} name")
    for k in r["largest"]:
        print(f"{k['ms']:>9.4f} {k['count']:>7.1f} {100 * k['share']:>5.1f}%  {k['kernel_class']:<22} {k['name'][:100]}")
    if r["other_names"]:
        print(f"\nunclassified ('other'): {', '.join(n[:60] for n in r['other_names'][:10])}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args, "profile_generate.py", "use --quick (CPU) or --device cpu --mode eager")
    max_len = args.context + TIMED_WARMUP + 2 * args.steps + 1
    model = make_model(args.model, args.attention, max_len, args, device, dtype)
    copy_gbps = copy_bandwidth_gbps(device)
    wall_ms, events = measure(model, args, args.mode)
    breakdown_mode, note = args.mode, ""
    if device.type == "cuda" and sum(e["cat"] == "kernel" for e in events) < args.steps:
        note = (f"torch {torch.__version__}'s profiler recorded no kernel inside the {args.mode} mode's CUDA graphs; "
                "the kernel breakdown below is of the same step in eager mode (the wall time is still "
                f"{args.mode} mode's)")
        print("NOTE:", note, flush=True)
        breakdown_mode = "eager"
        _, events = measure(model, args, "eager")
    result = dict(env=environment(device, dtype), args=vars(args), breakdown_mode=breakdown_mode, note=note,
                  copy_gbps=copy_gbps, wall_ms=wall_ms, **breakdown(events, args.steps))
    result["gap_ms"] = wall_ms - result["kernel_ms"]
    weight_bytes = weight_bytes_read(model)
    lm_head_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    context_bytes = args.batch * args.context * model.kv_cache_bytes_per_token(dtype)
    result["floors"] = dict(weight_bytes=weight_bytes, context_bytes=context_bytes,
                            step_ms=byte_floor_ms(weight_bytes, context_bytes, copy_gbps),
                            gemm_ms=byte_floor_ms(weight_bytes, 0, copy_gbps),
                            cache_ms=byte_floor_ms(0, context_bytes, copy_gbps),
                            lm_head_ms=byte_floor_ms(lm_head_bytes, 0, copy_gbps))
    print_report(result)
    write_results(result, args.out, "profile_generate.json")
    return result


if __name__ == "__main__":
    main()
