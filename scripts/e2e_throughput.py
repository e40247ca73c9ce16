"""End-to-end training throughput on one GPU: dense attention (SDPA) against SFA through the `masked` and
`flash` backends, torch.compile off and on, at the shapes of the throughput targets (docs/benchmarks.md),
one train.py run per arm, one after another; a table and a JSON file.

    python scripts/e2e_throughput.py --out workspace/e2e                     # all 18 arms
    python scripts/e2e_throughput.py --out workspace/e2e --shapes gpt2_1k   # one shape (6 arms, ~7 min)
    python scripts/e2e_throughput.py --out workspace/e2e --summarize        # the table of what OUT holds
    python scripts/e2e_throughput.py --out workspace/e2e --shapes qwen3_1k --attention dense masked \
        --compile off --qk-epilogue fused unfused                           # Qwen3's fused QK epilogue, on and off

Shapes: gpt2_1k (GPT-2 small, 1,024 tokens, micro-batch 16, 32k tokens per step), gpt2_8k (8,192 tokens,
micro-batch 2, 64k per step), qwen3_1k (the Qwen3 study shape of docs/results.md, experiment=study_large_qwen3:
12 layers, d_model 768, head dim 128, GQA 6/3, at 1,024 tokens, micro-batch 16). SFA uses k = head dim / 8
(8 for GPT-2, 16 for Qwen3). Every arm trains on the embedded corpus in bf16 (train.dtype=auto on CUDA) for
--seconds after its warm-up (--eager-warmup more seconds, for Triton's one-time autotuning of the fused top-k
and epilogue kernels in the first steps; --compile-warmup more with compile), evaluates and checkpoints only
at the end (the checkpoint is deleted afterwards), and logs every 10 steps. Steady state: the median
tokens/s of the records after the first fifth of the steps and after the first log window, which holds
compilation and autotuning (scripts/summarize_throughput.py). MFU is against executed FLOPs
(docs/metrics.md). Each call adds its arms to OUT and prints the table of every arm OUT holds, so the
shapes can be run in separate calls.

--qk-epilogue: Qwen3 arms with the fused QK epilogue (RMSNorm -> RoPE -> SFA's top-k in one Triton pass,
sfa/kernels/qk_epilogue.py; SFA_QK_EPILOGUE=auto for that arm, named ...-fused) and/or with the unfused eager ops
(SFA_QK_EPILOGUE=off, the model's default and the default here; the bare arm name). GPT-2 has no QK epilogue and
runs once. "x dense" compares arms of the same epilogue, "x unfused" a fused arm with its unfused twin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from summarize_throughput import steady_state  # noqa: E402

LOG_EVERY = 10
SHAPES = {
    "gpt2_1k": (8, ["model=gpt2_small", "train.seq_len=1024", "train.micro_batch=16", "train.batch_tokens=32768"]),
    "gpt2_8k": (8, ["model=gpt2_small", "model.max_seq_len=8192", "train.seq_len=8192", "train.micro_batch=2",
                    "train.batch_tokens=65536"]),
    "qwen3_1k": (16, ["experiment=study_large_qwen3", "train.seq_len=1024", "train.micro_batch=16",
                      "train.batch_tokens=32768"]),
}
ATTENTION = ("dense", "masked", "flash")
EPILOGUES = {"fused": "auto", "unfused": "off"}  # --qk-epilogue -> SFA_QK_EPILOGUE (models/qwen3.py)
COMMON = ["data=embedded", "logging=disabled", "train.resume=none", "train.max_steps=1000000", "train.eval_every=0",
          "train.eval_batches=1", "train.ckpt_every=0", "train.keep_checkpoints=1", f"train.log_every={LOG_EVERY}",
          "train.diagnostics_every=0", "optim.warmup_steps=10"]


def arm_name(shape: str, attention: str, compiled: bool, epilogue: str = "unfused") -> str:
    """The bare name is the model's default epilogue (unfused, models/qwen3.py), as in runs from before it existed."""
    return f"{shape}-{attention}-{'compile' if compiled else 'eager'}" + ("" if epilogue == "unfused" else f"-{epilogue}")


def overrides(shape: str, attention: str, compiled: bool, seconds: float, warmup: float, out: Path,
              extra=(), epilogue: str = "unfused", eager_warmup: float = 0.0) -> list[str]:
    k, shape_overrides = SHAPES[shape]
    att = ["attention=dense"] if attention == "dense" else ["attention=sfa", f"attention.k={k}",
                                                            f"attention.backend={attention}"]
    limit = seconds + (warmup if compiled else eager_warmup)
    return [*shape_overrides, *COMMON, *att, f"train.compile={str(compiled).lower()}", f"train.time_limit_s={limit}",
            f"root={out / 'root'}", f"out_dir={out / arm_name(shape, attention, compiled, epilogue)}", *extra]


def run_arm(shape, attention, compiled, epilogue, args) -> None:
    name = arm_name(shape, attention, compiled, epilogue)
    run_dir = args.out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: an old arm's metrics must not mix in
    cmd = [sys.executable, str(REPO / "train.py"),
           *overrides(shape, attention, compiled, args.seconds, args.compile_warmup, args.out, args.set, epilogue,
                      args.eager_warmup)]
    env = {**os.environ, "SFA_QK_EPILOGUE": EPILOGUES[epilogue]}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_output.txt").write_text(done.stdout + done.stderr)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~1.5 GB each, not needed for throughput
    status = "ok" if done.returncode == 0 else f"failed ({done.returncode}), see {run_dir / 'train_output.txt'}"
    print(f"{name:<28} {time.perf_counter() - started:6.0f} s  {status}", flush=True)


def summarize(out: Path) -> list[dict]:
    rows = []
    for shape in SHAPES:
        for epilogue in EPILOGUES:
            for compiled in (False, True):
                for attention in ATTENTION:
                    run_dir = out / arm_name(shape, attention, compiled, epilogue)
                    if not (run_dir / "metrics.jsonl").is_file():
                        continue
                    try:
                        row = steady_state(run_dir, warmup_steps=LOG_EVERY)
                    except SystemExit as e:  # too few steps to measure
                        print(f"{run_dir.name}: {e}", file=sys.stderr)
                        continue
                    rows.append({"shape": shape, "attention_backend": attention, "compile": compiled,
                                 "qk_epilogue": epilogue, **row})
    by_arm = {(r["shape"], r["attention_backend"], r["compile"], r["qk_epilogue"]): r for r in rows}

    def ratio(r, to):
        return r["tokens_per_s"] / to["tokens_per_s"] if to else None

    for r in rows:
        shape, attention, compiled, epilogue = r["shape"], r["attention_backend"], r["compile"], r["qk_epilogue"]
        r["x_dense"] = ratio(r, by_arm.get((shape, "dense", compiled, epilogue)))
        r["x_eager"] = ratio(r, by_arm.get((shape, attention, False, epilogue)))
        r["x_unfused"] = None if epilogue == "unfused" else ratio(r, by_arm.get((shape, attention, compiled, "unfused")))
    return rows


def versions() -> dict:
    import torch  # lazy: heavy; the arms run in subprocesses and --help answers without it

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import triton  # lazy: optional (absent on some CPU installs)

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    # GIT_COMMIT first, as in scripts/gpu_tests.sh: a tree copied to a GPU machine may carry a stale .git or none
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["commit"] = os.environ.get("GIT_COMMIT") or commit.stdout.strip() or None
    return info


def previous_result(out: Path) -> dict:
    """OUT/e2e_throughput.json as the last run wrote it, or {}."""
    path = out / "e2e_throughput.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_versions(ran: dict | None) -> dict:
    """The versions the arms ran with: this machine's, or under --summarize (`ran`: what the run that wrote
    OUT/e2e_throughput.json recorded) those of the run, since a summary may be made on another machine (a laptop
    reading a GPU run's folder); without that record this machine's are marked as the summarizer's."""
    here = versions()
    if ran is None:
        return here
    if ran:
        return {key: ran.get(key) for key in here}
    return {key: None for key in here} | {"device": "unknown (summarized only)", "summarized_with": here}


def print_table(rows: list[dict]) -> None:
    ratio = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    print(f"{'shape':<9} {'attention':<7} {'compile':<8} {'epilogue':<9} {'tokens/s':>10} {'x dense':>8} "
          f"{'x eager':>8} {'x unfused':>9} {'MFU':>6} {'peak GiB':>9} {'steps':>6}")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['shape']:<9} {r['attention_backend']:<7} {'on' if r['compile'] else 'off':<8} "
              f"{r['qk_epilogue']:<9} {r['tokens_per_s']:>10,.0f} {ratio(r['x_dense']):>8} {ratio(r['x_eager']):>8} "
              f"{ratio(r['x_unfused']):>9} {mfu:>6} {r['peak_memory_gib']:>9.1f} {r['steps_measured']:>6}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and e2e_throughput.json")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--attention", nargs="+", choices=ATTENTION, default=list(ATTENTION))
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--qk-epilogue", nargs="+", choices=list(EPILOGUES), default=["unfused"],
                        help="Qwen3's QK norm/RoPE/top-k as one fused pass and/or the unfused eager ops (default, "
                             "as the model's own default)")
    parser.add_argument("--seconds", type=float, default=20.0, help="training seconds per arm after warm-up")
    parser.add_argument("--compile-warmup", type=float, default=90.0,
                        help="extra seconds for arms with compile (compilation happens inside the timed loop; a cold "
                             "inductor cache took 64 s for the Qwen3 study model on an H200, so 40 s measured nothing)")
    parser.add_argument("--eager-warmup", type=float, default=10.0,
                        help="extra seconds for arms without compile: Triton autotunes the SFA top-k and the fused "
                             "epilogue in the first steps, which left the fused arms few steps to measure")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="train.py overrides for every arm, after the arm's own (e.g. train.compile_backend=...)")
    parser.add_argument("--summarize", action="store_true", help="run nothing; print the table of what OUT holds")
    args = parser.parse_args(argv)
    for name, value in (("--seconds", args.seconds), ("--compile-warmup", args.compile_warmup),
                        ("--eager-warmup", args.eager_warmup)):
        if not value >= 0 or (name == "--seconds" and value == 0):
            parser.error(f"{name} must be a positive number of seconds, got {value}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        for shape in args.shapes:
            for compiled in (c == "on" for c in args.compile):
                # GPT-2 has no QK epilogue: its arms run once, whatever --qk-epilogue says.
                for epilogue in (args.qk_epilogue if shape.startswith("qwen3") else ["unfused"]):
                    for attention in args.attention:
                        run_arm(shape, attention, compiled, epilogue, args)
    rows = summarize(args.out)
    if not rows:
        raise SystemExit(f"{args.out}: no arm with metrics to summarize")
    ran = previous_result(args.out) if args.summarize else None
    seconds = args.seconds if ran is None else ran.get("seconds_per_arm")  # what the arms ran with, not a default
    result = {**run_versions(ran), "seconds_per_arm": seconds, "rows": rows}
    (args.out / "e2e_throughput.json").write_text(json.dumps(result, indent=2))
    print(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}")
    print_table(rows)
    print(f"JSON: {args.out / 'e2e_throughput.json'}")


if __name__ == "__main__":
    main()
