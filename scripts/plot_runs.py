"""Compare training runs: loss vs tokens, loss vs wall time, throughput, KV-cache bytes per token.

    python scripts/plot_runs.py workspace/runs/gpt2_tiny-dense workspace/runs/gpt2_tiny-sfa-q8k8
    python scripts/plot_runs.py workspace/sweeps/2026-01-01_12-00-00/*  --out workspace/plots/k_sweep

Reads each run directory's metrics.jsonl and run_info.json (written by train.py), labels runs by attention
kind and k (or d_short), prints a summary table and writes PNGs plus summary.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_run(run_dir: Path) -> dict:
    metrics_file, info_file = run_dir / "metrics.jsonl", run_dir / "run_info.json"
    if not metrics_file.is_file() or not info_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a train.py run directory (needs metrics.jsonl and run_info.json)")
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_file} holds no records yet")
    info = json.loads(info_file.read_text())
    config_file = run_dir / "config.yaml"
    if "feature_map" not in info and config_file.is_file():  # run_info.json of runs before it recorded the switch
        import yaml

        info["feature_map"] = bool((yaml.safe_load(config_file.read_text()).get("attention") or {}).get("feature_map"))
    return {"dir": run_dir, "info": info, "records": records}


def label(info: dict) -> str:
    kind = info["attention"]
    if kind == "sfa":
        k = f"k={info['topk_q']}" if info["topk_q"] == info["topk_k"] else f"kq={info['topk_q']},kk={info['topk_k']}"
        detail = f"sfa {k}" + (" +fmap" if info.get("feature_map") else "")
    elif kind == "short":
        detail = f"short d={info['d_short']}"
    else:
        detail = "dense"
    return f"{info.get('model', '?')} {detail} (d={info['head_dim']})"


def summarize(run: dict) -> dict:
    records, info = run["records"], run["info"]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    # the first steps include warm-up (allocations, compilation); the median of the rest is steady state
    speeds = [r["tokens_per_s"] for r in records[len(records) // 5 :] if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in records[len(records) // 5 :] if r.get("mfu") is not None]
    return {
        "run": str(run["dir"]),
        "label": label(info),
        "steps": records[-1]["step"],
        "tokens": records[-1]["tokens"],
        "final_loss": records[-1]["loss"],
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "median_tokens_per_s": statistics.median(speeds) if speeds else None,
        "median_mfu": statistics.median(mfus) if mfus else None,
        "flops_per_token": info["flops_per_token"],
        "dense_equiv_flops_per_token": info["dense_equiv_flops_per_token"],
        "kv_cache_bytes_per_token": info["kv_cache_bytes_per_token"],
        "peak_memory_bytes": max(r.get("peak_memory_bytes") or 0 for r in records),
        "device": info["device"],
        "world_size": info["world_size"],
    }


def plot_curves(runs, x_key, x_label, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        records = run["records"]
        line, = ax.plot([r[x_key] for r in records], [r["loss"] for r in records], alpha=0.6, label=f"{label(run['info'])} train")
        val = [(r[x_key], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color(), label=f"{label(run['info'])} val")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(summaries, key, y_label, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [s["label"] for s in summaries]
    values = [s[key] or 0 for s in summaries]
    bars = ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(y_label)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(summaries) -> str:
    columns = [("label", "{}"), ("steps", "{}"), ("tokens", "{:,}"), ("final_loss", "{:.4f}"),
               ("best_val_loss", "{:.4f}"), ("median_tokens_per_s", "{:,.0f}"), ("median_mfu", "{:.1%}"),
               ("flops_per_token", "{:.3g}"), ("kv_cache_bytes_per_token", "{:,}")]
    rows = [[name for name, _ in columns]]
    for s in summaries:
        rows.append(["-" if s[name] is None else fmt.format(s[name]) for name, fmt in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "workspace" / "plots", help="output folder")
    args = parser.parse_args(argv)

    runs = [load_run(d) for d in args.runs if d.is_dir() and (d / "metrics.jsonl").exists()]
    skipped = [str(d) for d in args.runs if not (d.is_dir() and (d / "metrics.jsonl").exists())]
    if skipped:
        print(f"skipping (no metrics.jsonl): {', '.join(skipped)}", file=sys.stderr)
    if not runs:
        parser.error("none of the given paths is a run directory with metrics.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = [summarize(run) for run in runs]
    plot_curves(runs, "tokens", "tokens seen", args.out / "loss_vs_tokens.png")
    plot_curves(runs, "elapsed_s", "wall time (s)", args.out / "loss_vs_time.png")
    plot_bars(summaries, "median_tokens_per_s", "tokens / s (median, all processes)", args.out / "tokens_per_s.png")
    plot_bars(summaries, "kv_cache_bytes_per_token", "KV-cache bytes per token (bf16, all layers)",
              args.out / "kv_cache_bytes_per_token.png")
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=2))
    print(format_table(summaries))
    print(f"plots and summary.json in {args.out}")
    return {"summaries": summaries, "out": args.out}


if __name__ == "__main__":
    main()
