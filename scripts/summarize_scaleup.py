"""Tables of a scripts/scaleup.sh output directory: the arms (val loss, PPL vs dense, KV bytes, tokens/s, MFU,
peak memory), the scaling (tokens/s at 1, 2 and N GPUs, speedup, efficiency, checkpoint save and resume times)
and the kill-and-resume check (the killed run against the uninterrupted one). Writes OUT/scaleup.json.

    python scripts/summarize_scaleup.py OUT [--best sfa-k16-rope32]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from summarize_throughput import steady_state  # noqa: E402  (the steady-state rule every throughput table uses)
from training.sinks import metrics_file, read_metrics  # noqa: E402  (plain or gzipped metrics.jsonl)

SAVE_RE = re.compile(r"checkpoint \S+ saved in ([0-9.]+) s")
RESUME_RE = re.compile(r"resumed from \S+ at step \d+ .* in ([0-9.]+) s")


def metrics_of(run: Path) -> list[dict]:
    return read_metrics(run) if metrics_file(run) is not None else []


def log_times(run: Path, pattern: re.Pattern) -> list[float]:
    log = run / "train.log"
    return [float(m.group(1)) for m in pattern.finditer(log.read_text())] if log.is_file() else []


def run_row(run: Path, records: list[dict] | None = None) -> dict:
    """One run's row; `records`: its metrics when the caller has read them already."""
    records = metrics_of(run) if records is None else records
    info = json.loads((run / "run_info.json").read_text()) if (run / "run_info.json").is_file() else {}
    speed = steady_state(run) if records else {}
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return {
        "run": str(run), "device": info.get("device"), "world_size": info.get("world_size"),
        "steps": records[-1]["step"] if records else 0, "tokens": records[-1]["tokens"] if records else 0,
        "final_val_loss": vals[-1] if vals else None, "tokens_per_s": speed.get("tokens_per_s"),
        "mfu": speed.get("mfu"), "peak_memory_gib": speed.get("peak_memory_gib"),
        "kv_cache_bytes_per_token": info.get("kv_cache_bytes_per_token"),
        "ckpt_save_s": log_times(run, SAVE_RE), "resume_s": log_times(run, RESUME_RE),
    }


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def arms_table(out: Path) -> list[dict]:
    rows = [dict(run_row(run), arm=run.name) for run in sorted((out / "arms").glob("*")) if run.is_dir()]
    dense = next((r for r in rows if r["arm"] == "dense"), None)
    print("arms (NGPU GPUs, the same tokens each)")
    print(f"{'arm':<18} {'tokens':>12} {'val loss':>9} {'PPL/dense':>10} {'KV B/token':>11} {'tokens/s':>10} "
          f"{'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if dense and dense["final_val_loss"] is not None and r["final_val_loss"] is not None:
            r["ppl_vs_dense"] = math.exp(r["final_val_loss"] - dense["final_val_loss"])
        print(f"{r['arm']:<18} {r['tokens']:>12,} {fmt(r['final_val_loss'], '.4f'):>9} "
              f"{fmt(r.get('ppl_vs_dense'), '.3f'):>10} {fmt(r['kv_cache_bytes_per_token'], ','):>11} "
              f"{fmt(r['tokens_per_s'], ',.0f'):>10} {fmt(r['mfu'], '.1%'):>6} {fmt(r['peak_memory_gib'], '.1f'):>9}")
    return rows


def scaling_table(out: Path) -> list[dict]:
    rows = []
    for run in sorted((out / "scaling").glob("*-*gpu")):
        arm, _, n = run.name.rpartition("-")
        rows.append(dict(run_row(run), arm=arm, gpus=int(n[:-3])))
    rows.sort(key=lambda r: (r["arm"], r["gpus"]))
    print("\nscaling (same global batch; tokens/s all GPUs together)")
    print(f"{'arm':<18} {'GPUs':>4} {'tokens/s':>11} {'speedup':>8} {'efficiency':>10} {'MFU':>6} {'peak GiB/GPU':>13} "
          f"{'ckpt save s':>12} {'resume s':>9}")
    for r in rows:
        one = next((o for o in rows if o["arm"] == r["arm"] and o["gpus"] == 1), None)
        if one and one["tokens_per_s"] and r["tokens_per_s"]:
            r["speedup"] = r["tokens_per_s"] / one["tokens_per_s"]
            r["efficiency"] = r["speedup"] / r["gpus"]
        print(f"{r['arm']:<18} {r['gpus']:>4} {fmt(r['tokens_per_s'], ',.0f'):>11} {fmt(r.get('speedup'), '.2f'):>8} "
              f"{fmt(r.get('efficiency'), '.0%'):>10} {fmt(r['mfu'], '.1%'):>6} {fmt(r['peak_memory_gib'], '.1f'):>13} "
              f"{fmt(max(r['ckpt_save_s'], default=None), '.1f'):>12} {fmt(max(r['resume_s'], default=None), '.1f'):>9}")
    return rows


def kill_check(out: Path, best: str) -> dict | None:
    killed, straight = out / "kill" / best, out / "arms" / best
    a, b = metrics_of(killed), metrics_of(straight)
    if not (a and b):
        return None
    steps_once = [r["step"] for r in a] == list(range(1, len(a) + 1))
    common = min(len(a), len(b))
    loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a[:common], b[:common]))
    val_a, val_b = run_row(killed, a)["final_val_loss"], run_row(straight, b)["final_val_loss"]
    log = (killed / "train.log").read_text() if (killed / "train.log").is_file() else ""
    result = {"arm": best, "resumed": "resumed from" in log, "each_step_once": steps_once,
              "steps": [len(a), len(b)], "max_abs_loss_diff": loss_diff, "final_val_loss": [val_a, val_b],
              "resume_s": log_times(killed, RESUME_RE)}
    print(f"\nkill one rank, --max-restarts=1 ({best}): resumed {result['resumed']}, each step once {steps_once}, "
          f"steps {len(a)} vs {len(b)}, max |loss diff| {loss_diff:.2e}, final val loss {fmt(val_a, '.4f')} vs "
          f"{fmt(val_b, '.4f')}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the directory scripts/scaleup.sh wrote")
    parser.add_argument("--best", default="sfa-k16-rope32", help="the SFA arm that was scaled and killed")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"summarize_scaleup.py: {args.out} is not a directory", file=sys.stderr)
        return 2
    result = {"arms": arms_table(args.out), "scaling": scaling_table(args.out), "kill": kill_check(args.out, args.best)}
    (args.out / "scaleup.json").write_text(json.dumps(result, indent=2))
    print(f"\n-> {args.out / 'scaleup.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
