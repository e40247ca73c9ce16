"""Mean and spread of each quality-study arm's final val loss over seeds.

Each argument is one seed's study directory laid out as scripts/quality_study.sh writes it,
<dir>/<family>/<arm>/metrics.jsonl (+ config.yaml). An arm's final val loss is the last logged `val_loss`;
`--metric best` takes each run's lowest logged `val_loss` instead (for multi-epoch runs that may overfit).
A run that stopped before its train.max_steps (a time limit, a signal) is left out, and named on stderr: its
last val loss is not a final one. `--at-step N` takes every run's val loss at step N instead, finished or not
(how a gap grows during training; a run cut late still counts at the steps it reached).
Prints a table per family (n, mean, sample std, min, max, and the mean difference to the family's dense arm
with its standard error) and writes the same as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.sinks import read_metrics  # noqa: E402  (plain or gzipped metrics.jsonl)
from run_finished import finished  # noqa: E402  (scripts/ is on sys.path: this file's folder)


METRICS = ("final", "best")


def run_val_loss(metrics: Path, metric: str = "final", step: int | None = None) -> float | None:
    """The run's last (`final`) or lowest (`best`) logged val loss (`metrics`: its metrics.jsonl[.gz]); with
    `step`, its val loss at that step (None if it logged none there)."""
    records = [r for r in read_metrics(metrics.parent) if "val_loss" in r]
    if not records:
        raise ValueError(f"{metrics}: no val_loss record (did the run evaluate?)")
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    if step is not None:
        return next((float(r["val_loss"]) for r in records if r.get("step") == step), None)
    losses = [r["val_loss"] for r in records]
    return float(losses[-1] if metric == "final" else min(losses))


def collect(study_dirs: list[Path], metric: str = "final", step: int | None = None) -> dict[str, dict[str, list[float]]]:
    """{family: {arm: [final (or best, or at `step`) val loss per seed]}}"""
    table: dict[str, dict[str, list[float]]] = {}
    for study in study_dirs:
        if not study.is_dir():
            raise FileNotFoundError(f"study directory not found: {study}")
        found = sorted({p.parent / "metrics.jsonl" for p in study.glob("*/*/metrics.jsonl*")})
        if not found:
            raise ValueError(f"{study}: no <family>/<arm>/metrics.jsonl inside (is this a quality_study.sh output?)")
        for metrics in found:
            family, arm = metrics.parent.parent.name, metrics.parent.name
            if step is None and not finished(metrics.parent):
                print(f"summarize_seeds: left out {metrics.parent}: it did not reach its train.max_steps", file=sys.stderr)
                continue
            loss = run_val_loss(metrics, metric, step)
            if loss is None:
                print(f"summarize_seeds: left out {metrics.parent}: no val loss at step {step}", file=sys.stderr)
                continue
            table.setdefault(family, {}).setdefault(arm, []).append(loss)
    if not table:
        what = f"with a val loss at step {step}" if step is not None else "finished (each stopped before its train.max_steps)"
        raise ValueError(f"no run {what} in {', '.join(map(str, study_dirs))}")
    return table


def summarize(table: dict[str, dict[str, list[float]]]) -> dict:
    out = {}
    for family, arms in table.items():
        dense = arms.get("dense")
        rows = {}
        for arm, losses in sorted(arms.items()):
            row = {"n": len(losses), "mean": statistics.fmean(losses), "min": min(losses), "max": max(losses),
                   "std": statistics.stdev(losses) if len(losses) > 1 else None, "val_losses": losses}
            if dense and arm != "dense" and len(losses) > 1 and len(dense) > 1:
                # Difference of means with its standard error (independent seeds per arm).
                row["minus_dense"] = row["mean"] - statistics.fmean(dense)
                row["minus_dense_se"] = math.sqrt(statistics.variance(losses) / len(losses) + statistics.variance(dense) / len(dense))
            rows[arm] = row
        out[family] = rows
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("studies", nargs="+", type=Path, help="one quality_study.sh output directory per seed")
    p.add_argument("--metric", choices=METRICS, default="final", help="each run's last (final) or lowest (best) val loss")
    p.add_argument("--at-step", type=int, metavar="N", help="each run's val loss at step N (finished or not)")
    p.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = p.parse_args(argv)
    summary = summarize(collect(args.studies, args.metric, args.at_step))
    what = f"val loss at step {args.at_step}" if args.at_step is not None else f"{args.metric} val loss"
    for family, rows in summary.items():
        print(f"\n{family}: {what} over seeds")
        print(f"{'arm':<18}{'n':>3}{'mean':>9}{'std':>8}{'min':>8}{'max':>8}{'- dense':>9}{'± se':>8}")
        for arm, r in rows.items():
            std = f"{r['std']:8.4f}" if r["std"] is not None else f"{'-':>8}"
            diff = f"{r['minus_dense']:+9.4f}{r['minus_dense_se']:8.4f}" if "minus_dense" in r else f"{'':>17}"
            print(f"{arm:<18}{r['n']:>3}{r['mean']:9.4f}{std}{r['min']:8.4f}{r['max']:8.4f}{diff}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"studies": [str(s) for s in args.studies], "metric": args.metric, "at_step": args.at_step, "families": summary}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
