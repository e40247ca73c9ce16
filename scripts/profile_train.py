"""Where a training step's time goes: the kernels of N optimizer steps of the real loop (training.loop.train_step,
the run train.py would build) under torch.profiler, grouped into classes by kernel name, for dense attention and
SFA side by side, and what SFA adds per class.

    python scripts/profile_train.py --shape gpt2_1k --attention dense masked flash --compile on
    python scripts/profile_train.py --quick                  # GPT-2 tiny on CPU, dense and masked-by-reference (CI)

The arms are e2e_throughput.py's (its shapes, k = head dim / 8 and overrides), built in this process one after
another. Per arm: `--warmup` steps (compilation and Triton's autotuning happen there), `--steps` steps timed
without the profiler (the wall time, device synchronised at both ends), then `--steps` more under torch.profiler.
Per step: wall ms, summed kernel ms, each class's kernel count and ms, and the largest kernels by name (every name
in the JSON). Then SFA's arms against dense: ms per class and the difference. On CPU the profiler's top-level aten
ops stand in for kernels. Prints the tables and writes JSON (--out, and $OUT/profile_train.json when $OUT is set).
Discussion: docs/benchmarks.md, "Where SFA's training step loses time".
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from e2e_throughput import ATTENTION, COMMON, SHAPES, versions  # noqa: E402  (the arms: one owner)
from profile_generate import device_activity, top_level_ops  # noqa: E402  (trace parsing: one owner)
from results_out import write_results  # noqa: E402
from training import distributed as dist  # noqa: E402
from training.hydra_setup import compose_run_config  # noqa: E402
from training.loop import train_step  # noqa: E402
from training.run_setup import setup  # noqa: E402

# Kernel name -> class, the first pattern that matches (case-insensitive) wins. Inductor's kernels
# (triton_poi/red/per_fused_<ops>) name the ops they fuse, and also the custom ops they feed ("..._topk_code_...");
# they are "compiled elementwise" unless they scatter or gather (a straight-through backward, or the embedding's).
INDUCTOR_KERNEL = r"^triton_(poi|red|per|for|spl|unk)_"
RULES = (
    ("gemm", r"gemm|gemv|nvjet|cutlass|xmma|splitkreduce|cublas|^triton_tem_|aten::(linear|mm|addmm|bmm|matmul)$"),
    ("sfa_kernels", r"^_topk_rows_kernel|^flash_fwd_kernel|^flash_bwd_|^_fwd_kernel|^_bwd_kernel"),
    ("attention", r"fmha|flash|sdpa|cudnn|scaled_dot_product|attention"),
    ("scatter_gather", r"scatter|gather|index_put|index_add|embedding_dense_backward|sort"),
    ("optimizer", r"multi_tensor|adam|foreach|_amp_"),
    ("loss", r"cross_entropy|log_softmax|nll_loss"),
    ("compiled_elementwise", INDUCTOR_KERNEL),
    ("copy", r"memcpy|memset|copy|aten::(clone|contiguous|to|_to_copy|copy_)$"),
    ("eager_elementwise", r"elementwise|reduce|norm|aten::"),
)
OTHER = "other"
CLASSES = (*[c for c, _ in RULES if c != "eager_elementwise"], "eager_elementwise", OTHER)
QUICK = dict(shape="gpt2_tiny", attention=["dense", "reference"], compile="off", warmup=2, steps=2, device="cpu")
# --quick's shape: GPT-2 tiny on the embedded corpus at 64 tokens (not an e2e_throughput shape: it runs on CPU in CI)
TINY = (4, ["model=gpt2_tiny", "train.seq_len=64", "train.micro_batch=2", "train.batch_tokens=128"])


def kernel_class(name: str) -> str:
    for cls, pattern in RULES:
        if re.search(pattern, name, re.IGNORECASE):
            return cls
    return OTHER


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="profile_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="GPT-2 tiny on CPU, dense and SFA by the reference (seconds)")
    p.add_argument("--shape", choices=list(SHAPES), default="gpt2_1k", help="default gpt2_1k")
    p.add_argument("--attention", nargs="+", choices=[*ATTENTION, "reference"], default=["dense", "masked"],
                   help="arms: dense and SFA backends (default dense masked)")
    p.add_argument("--compile", choices=("off", "on"), default="on", help="train.compile (default on)")
    p.add_argument("--warmup", type=int, default=30, help="steps before timing (compile, autotune; default 30)")
    p.add_argument("--steps", type=int, default=10, help="timed steps, and as many profiled (default 10)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides for every arm")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("warmup", "steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    return args


def arm_config(args, attention: str, root: Path):
    """The arm's resolved config, as e2e_throughput.py would run it (its COMMON overrides; no time limit)."""
    k, shape_overrides = TINY if args.shape == "gpt2_tiny" else SHAPES[args.shape]
    att = ["attention=dense"] if attention == "dense" else ["attention=sfa", f"attention.k={k}",
                                                            f"attention.backend={attention}"]
    items = [*shape_overrides, *COMMON, *att, f"train.compile={str(args.compile == 'on').lower()}",
             f"train.device={args.device}", f"root={root}", f"out_dir={root / attention}", *args.set]
    return OmegaConf.create(compose_run_config(items)), k


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def breakdown(events: list[dict], steps: int) -> dict:
    per_name, per_class = defaultdict(lambda: [0, 0.0]), {c: [0, 0.0] for c in CLASSES}
    for e in events:
        c = kernel_class(e["name"])
        for tally in (per_name[(e["name"], c)], per_class[c]):
            tally[0] += 1
            tally[1] += e["dur"]
    total = sum(e["dur"] for e in events) / 1e3 / steps
    classes = {c: dict(count=n / steps, ms=us / 1e3 / steps) for c, (n, us) in per_class.items()}
    by_name = [dict(name=n, kernel_class=c, count=k / steps, ms=us / 1e3 / steps)
               for (n, c), (k, us) in sorted(per_name.items(), key=lambda item: -item[1][1])]
    return dict(kernel_ms=total, kernels=len(events) / steps, classes=classes, by_name=by_name)


def host_ops(trace: list[dict], steps: int) -> list[dict]:
    """The host's ops by name, inclusive time (an op's own and what it calls), largest first: where the host spends
    a step when the device waits for it (wall ms well above kernel ms)."""
    per_name = defaultdict(lambda: [0, 0.0])
    for e in trace:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            per_name[e["name"]][0] += 1
            per_name[e["name"]][1] += e["dur"]
    return [dict(name=n, count=k / steps, ms=us / 1e3 / steps)
            for n, (k, us) in sorted(per_name.items(), key=lambda item: -item[1][1])]


def profile_arm(args, attention: str, work: Path) -> dict:
    cfg, k = arm_config(args, attention, work / "root")
    info = dist.setup(cfg.dist, cfg.train.device)
    try:
        run = setup(cfg, work / attention, info)
        device = info.device
        for _ in range(args.warmup):
            train_step(run)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            train_step(run)
        sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                train_step(run)
            sync(device)
        trace_path = work / f"trace_{attention}.json"
        prof.export_chrome_trace(str(trace_path))
        trace = json.loads(trace_path.read_text())["traceEvents"]
        events = device_activity(trace) if device.type == "cuda" else top_level_ops(trace)
        host = host_ops(trace, args.steps)
        tokens = cfg.train.batch_tokens
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        result = dict(attention=attention, k=None if attention == "dense" else k, wall_ms=wall_ms,
                      tokens_per_s=tokens / wall_ms * 1e3, peak_gib=peak, **breakdown(events, args.steps),
                      host_ops=host)
        del run
        return result
    finally:
        dist.teardown()
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def print_tables(arms: list[dict]) -> None:
    print(f"\n{'arm':<10} {'wall ms':>9} {'kernel ms':>10} {'kernels':>8} {'tokens/s':>11} {'x dense':>8}")
    dense = next((a for a in arms if a["attention"] == "dense"), None)
    for a in arms:
        ratio = f"{a['tokens_per_s'] / dense['tokens_per_s']:.3f}" if dense else "-"
        print(f"{a['attention']:<10} {a['wall_ms']:>9.2f} {a['kernel_ms']:>10.2f} {a['kernels']:>8.0f} "
              f"{a['tokens_per_s']:>11,.0f} {ratio:>8}")
    print(f"\nms per step by class{'' if dense is None else ' (and minus dense)'}:")
    names = [a["attention"] for a in arms]
    print(f"{'class':<22}" + "".join(f"{n:>10}" for n in names)
          + "".join(f"{n[:6] + '-dense':>13}" for n in names if dense and n != "dense"))
    for c in CLASSES:
        row = [a["classes"][c]["ms"] for a in arms]
        if not any(row):
            continue
        deltas = [a["classes"][c]["ms"] - dense["classes"][c]["ms"] for a in arms if dense and a is not dense]
        print(f"{c:<22}" + "".join(f"{x:>10.3f}" for x in row) + "".join(f"{d:>+13.3f}" for d in deltas))
    for a in arms:
        print(f"\n{a['attention']}: the host's 12 largest ops, inclusive (ms per step, count per step)")
        for e in a["host_ops"][:12]:
            print(f"  {e['ms']:8.3f} {e['count']:6.0f}  {e['name'][:100]}")
    for a in arms:
        print(f"\n{a['attention']}: the 12 largest kernels (ms per step, count per step)")
        for e in a["by_name"][:12]:
            print(f"  {e['ms']:8.3f} {e['count']:6.0f}  {e['kernel_class']:<20} {e['name'][:90]}")


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        arms = [profile_arm(args, attention, Path(tmp)) for attention in args.attention]
    print_tables(arms)
    result = dict(script="profile_train.py", shape=args.shape, compile=args.compile, warmup=args.warmup,
                  steps=args.steps, versions=versions(), arms=arms)
    for path in write_results(result, args.out, "profile_train.json"):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
