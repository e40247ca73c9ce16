"""Steady-state training throughput of finished runs: a table and a JSON file.

    python scripts/summarize_throughput.py RUN_DIR [RUN_DIR ...] --out throughput.json

For each run dir (written by train.py): the median tokens/s over the steps after the first fifth (compile,
autotune and allocator warm-up excluded) and without evaluation steps, plus its device, attention, k and
peak memory. train.py times windows of steps (between its reads of the device), so each record carries its
window's tokens/s. The first run is the baseline for the ratio column, so list the dense run first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.sinks import read_metrics  # noqa: E402  (plain or gzipped metrics.jsonl)


def steady_state(run_dir: Path, warmup_steps: int = 0) -> dict:
    """Medians over the records after the first fifth and after the first `warmup_steps` steps (pass the
    run's train.log_every to drop the first window of steps, which holds compilation)."""
    records = read_metrics(run_dir)
    skip = max(len(records) // 5, warmup_steps)
    steps = [r for r in records[skip:] if "val_loss" not in r and "tokens_per_s" in r]
    if not steps:
        raise SystemExit(f"{run_dir}: no training steps in metrics.jsonl to measure")
    info = json.loads((run_dir / "run_info.json").read_text())
    return {
        "run": run_dir.name, "device": info.get("device"), "attention": info.get("attention"),
        "topk": info.get("topk_q"), "steps_measured": len(steps),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "step_time_s": statistics.median(r["step_time_s"] for r in steps),
        "mfu": statistics.median(r["mfu"] for r in steps) if steps[0].get("mfu") is not None else None,
        "peak_memory_gib": max(r.get("peak_memory_bytes") or 0 for r in steps) / 2**30,
        "kv_cache_bytes_per_token": info.get("kv_cache_bytes_per_token"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args()
    rows = [steady_state(r) for r in args.runs]
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio_to_first"] = row["tokens_per_s"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"{'run':<28} {'attention':<9} {'k':>4} {'tokens/s':>12} {'ratio':>6} {'MFU':>6} {'peak GiB':>9}  device")
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['run']:<28} {r['attention']:<9} {r['topk'] or '-':>4} {r['tokens_per_s']:>12,.0f} "
              f"{r['ratio_to_first']:>6.2f} {mfu:>6} {r['peak_memory_gib']:>9.1f}  {r['device']}")


if __name__ == "__main__":
    main()
