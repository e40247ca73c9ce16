"""Compare training runs: loss vs tokens, wall time and FLOPs, final loss vs KV-cache size, throughput.

    python scripts/plot_runs.py workspace/runs/*
    python scripts/plot_runs.py workspace/sweeps/2026-01-01_12-00-00/*  --out workspace/plots/k_sweep --smooth 0.9 --logx
    python scripts/plot_runs.py docs/results/quality_study_large_2026-11-27_h200x4/runs/seed*/gpt2/*   # 3 seeds per arm

Reads each run directory's metrics.jsonl (or metrics.jsonl.gz), run_info.json and config.yaml (written by
train.py). Paths that are not run directories, or whose metrics are still empty, are skipped with a warning.
Runs whose configs differ only in train.seed are one arm: their curves are drawn as the mean over seeds
with a ±1 std band, and the summary gives mean ± std of the final val loss. Legends name the real model
(layers × width × heads) and the attention. Writes PNGs and summary.json to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import yaml

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from training.checkpoint import identity_leaves  # noqa: E402
from training.run_config import model_config  # noqa: E402
from training.run_names import config_hash  # noqa: E402
from training.sinks import metrics_file, read_metrics  # noqa: E402


def warn(message: str) -> None:
    print(f"plot_runs: {message}", file=sys.stderr)


# --- reading runs ---------------------------------------------------------------------------------
def load_run(run_dir: Path) -> dict:
    """{"dir", "info", "config", "records"}; raises for a path that is not a run directory."""
    info_file = run_dir / "run_info.json"
    if metrics_file(run_dir) is None or not info_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a train.py run directory (needs metrics.jsonl and run_info.json)")
    info = json.loads(info_file.read_text())
    config_file = run_dir / "config.yaml"
    config = {}
    if config_file.is_file():
        config = yaml.safe_load(config_file.read_text()) or {}
    if "feature_map" not in info:  # run_info.json of runs before it recorded the switch
        info["feature_map"] = bool((config.get("attention") or {}).get("feature_map"))
    if "n_layer" not in info and isinstance(config.get("model"), dict):  # ... or the model's shape
        shape = model_config(config)
        info.update(n_layer=shape.n_layer, d_model=shape.d_model, n_head=shape.n_head)
    return {"dir": run_dir, "info": info, "config": config, "records": read_metrics(run_dir)}


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            run = load_run(path)
        except FileNotFoundError:
            warn(f"skipping {path}: not a run directory (no metrics.jsonl or run_info.json)")
            continue
        if not run["records"]:
            warn(f"skipping {path}: its metrics file holds no records yet")
            continue
        runs.append(run)
    return runs


# --- names and arms -------------------------------------------------------------------------------
def model_name(info: dict) -> str:
    family = str(info.get("model", "?")).split("_")[0].replace("gpt2", "GPT-2").replace("qwen3", "Qwen3")
    if "n_layer" not in info:
        return family
    return f"{family} {info['n_layer']}L×{info['d_model']}d×{info['n_head']}h"


def label(info: dict) -> str:
    """The real model and the attention, e.g. 'GPT-2 12L×768d×12h, SFA k=8 (head dim 64)'."""
    kind = info["attention"]
    if kind == "sfa":
        k = f"k={info['topk_q']}" if info["topk_q"] == info["topk_k"] else f"kq={info['topk_q']},kk={info['topk_k']}"
        detail = f"SFA {k}" + (" +fmap" if info.get("feature_map") else "")
    elif kind == "short":
        detail = f"short d={info['d_short']}"
    else:
        detail = "dense"
    shared = " (one key shared by the KV heads)" if info.get("rope_shared") else ""
    rope = {"decoupled": f", RoPE on {info.get('rope_dims')} dims{shared}", "none": ", no RoPE"}.get(info.get("rope"), "")
    scale = {"sqrt_k": ", 1/sqrt(k)", "learned": ", learned temperature"}.get(info.get("scale"), "")
    return f"{model_name(info)}, {detail}{rope}{scale} (head dim {info['head_dim']})"


def group_arms(runs: list[dict]) -> list[dict]:
    """Runs whose configs differ only in train.seed form one arm (their seeds), in first-seen order. Arms
    that would share a label get the config keys that tell them apart appended."""
    arms: dict[str, dict] = {}
    for run in runs:
        key = config_hash(run["config"], exclude=("train.seed",)) if run["config"] else str(run["dir"])
        arms.setdefault(key, {"label": label(run["info"]), "runs": []})["runs"].append(run)
    by_label: dict[str, list[dict]] = {}
    for arm in arms.values():
        by_label.setdefault(arm["label"], []).append(arm)
    for same in by_label.values():
        if len(same) < 2:
            continue
        leaves = [identity_leaves(a["runs"][0]["config"]) for a in same]
        differing = sorted(k for k in set().union(*leaves) if len({str(x.get(k)) for x in leaves}) > 1 and k != "train.seed")
        for arm, leaf in zip(same, leaves):
            arm["label"] += " " + (", ".join(f"{k.split('.')[-1]}={leaf.get(k)}" for k in differing) or str(arm["runs"][0]["dir"].name))
    for arm in arms.values():
        if len(arm["runs"]) > 1:
            arm["label"] += f" [{len(arm['runs'])} seeds]"
    return list(arms.values())


# --- curves ---------------------------------------------------------------------------------------
def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased so the start is not pulled to 0."""
    if weight <= 0:
        return values
    out, avg = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out[i] = avg / (1 - weight ** (i + 1))
    return out


X_AXES = {  # name: (axis label, x of a record given the run's info)
    "tokens": ("tokens seen", lambda r, info: r["tokens"]),
    "time": ("wall time (s, summed over resumes)", lambda r, info: r["elapsed_s"]),
    "flops": ("training FLOPs executed", lambda r, info: r["tokens"] * info["flops_per_token"]),
    "dense_flops": ("dense-equivalent training FLOPs", lambda r, info: r["tokens"] * info["dense_equiv_flops_per_token"]),
}


def arm_curve(arm: dict, x_axis: str, key: str, smooth: float = 0.0):
    """(x, mean y, std y) over the arm's seeds at the steps every seed logged `key` (std 0 for one seed)."""
    x_of = X_AXES[x_axis][1]
    per_run = []
    for run in arm["runs"]:
        points = {r["step"]: (x_of(r, run["info"]), r[key]) for r in run["records"] if r.get(key) is not None}
        steps = sorted(points)
        y = np.array([points[s][1] for s in steps], dtype=float)
        per_run.append(dict(zip(steps, zip([points[s][0] for s in steps], ema(y, smooth)))))
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    xs = np.array([[p[s][0] for s in common] for p in per_run], dtype=float)
    ys = np.array([[p[s][1] for s in common] for p in per_run], dtype=float)
    return xs.mean(axis=0), ys.mean(axis=0), ys.std(axis=0, ddof=1) if len(per_run) > 1 else np.zeros(len(common))


def draw_arms(ax, arms: list[dict], x_axis: str, smooth: float, legend: bool) -> None:
    for i, arm in enumerate(arms):
        color = f"C{i % 10}"
        x, y, std = arm_curve(arm, x_axis, "loss", smooth)
        ax.plot(x, y, color=color, alpha=0.8, lw=1.2, label=arm["label"] if legend else None)
        if std.any():
            ax.fill_between(x, y - std, y + std, color=color, alpha=0.2, lw=0)
        x, y, std = arm_curve(arm, x_axis, "val_loss")
        if len(x):
            ax.errorbar(x, y, yerr=std if std.any() else None, fmt="o--", ms=3.5, lw=0.9, color=color, capsize=2)
    ax.set_xlabel(X_AXES[x_axis][0])
    ax.grid(alpha=0.3)


def set_log_y(ax) -> None:
    # Losses span less than a decade: plain numbers on every tick read better than 6 x 10^0.
    ax.set_yscale("log")
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))


def finish(fig, axes, title: str, path: Path, logx: bool, logy: bool, legend_ax=None) -> None:
    for ax in axes:
        if logx:
            ax.set_xscale("log")
        if logy:
            set_log_y(ax)
    axes[0].set_ylabel("loss (nats/token)")
    fig.suptitle(title, fontsize=11)
    if legend_ax is not None:  # outside the axes, so it never covers a curve
        handles, labels = legend_ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def curve_subtitle(smooth: float, arms: list[dict]) -> str:
    parts = ["lines: train loss" + (f" (EMA {smooth})" if smooth else ""), "dashed with markers: val loss"]
    if any(len(a["runs"]) > 1 for a in arms):
        parts.append("band / bars: ±1 std over seeds")
    return "; ".join(parts)


def plot_loss(arms, x_axis: str, title: str, path: Path, smooth: float, logx: bool, logy: bool) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    draw_arms(ax, arms, x_axis, smooth, legend=True)
    ax.set_title(curve_subtitle(smooth, arms), fontsize=8)
    finish(fig, [ax], title, path, logx, logy, legend_ax=ax)


def plot_loss_vs_flops(arms, path: Path, smooth: float, logx: bool, logy: bool) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, x_axis, name in ((axes[0], "flops", "executed (an SFA score costs k_q·k_k/D² of a dense one)"),
                             (axes[1], "dense_flops", "dense-equivalent (same model, dense scores)")):
        draw_arms(ax, arms, x_axis, smooth, legend=ax is axes[0])
        ax.set_title(name, fontsize=9)
    finish(fig, list(axes), "Loss vs training FLOPs   (" + curve_subtitle(smooth, arms) + ")", path, logx, logy,
           legend_ax=axes[0])


def plot_final_vs_kv(arms, summaries_by_arm, path: Path, logy: bool) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (arm, s) in enumerate(zip(arms, summaries_by_arm)):
        if s["val_mean"] is None:
            continue
        ax.errorbar(s["kv_cache_bytes_per_token"], s["val_mean"], yerr=s["val_std"], fmt="o", ms=7, capsize=3,
                    color=f"C{i % 10}", label=arm["label"])
    ax.set_xlabel("KV-cache bytes per token (bf16, all layers)")
    ax.set_ylabel("final val loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_title("lower left is better" + ("; bars: ±1 std over seeds" if any(len(a["runs"]) > 1 for a in arms) else ""),
                 fontsize=8)
    if logy:
        set_log_y(ax)
    fig.suptitle("Final val loss vs KV-cache size", fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_bars(names, values, y_label: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values = [v or 0 for v in values]
    bars = ax.bar(range(len(names)), values, color=[f"C{i % 10}" for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=7)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


# --- summaries ------------------------------------------------------------------------------------
def summarize(run: dict) -> dict:
    records, info = run["records"], run["info"]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    # the first steps include warm-up (allocations, compilation); the median of the rest is steady state
    speeds = [r["tokens_per_s"] for r in records[len(records) // 5 :] if r.get("tokens_per_s")]
    mfus = [r["mfu"] for r in records[len(records) // 5 :] if r.get("mfu") is not None]
    return {
        "run": str(run["dir"]),
        "label": label(info),
        "seed": info.get("seed", (run["config"].get("train") or {}).get("seed")),
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


def summarize_arm(arm: dict) -> dict:
    rows = [summarize(run) for run in arm["runs"]]
    vals = [r["final_val_loss"] for r in rows if r["final_val_loss"] is not None]
    speeds = [r["median_tokens_per_s"] for r in rows if r["median_tokens_per_s"]]
    return {
        "label": arm["label"], "seeds": [r["seed"] for r in rows], "runs": rows,
        "val_mean": statistics.fmean(vals) if vals else None,
        "val_std": statistics.stdev(vals) if len(vals) > 1 else None,
        "median_tokens_per_s": statistics.median(speeds) if speeds else None,
        "kv_cache_bytes_per_token": rows[0]["kv_cache_bytes_per_token"],
        "flops_per_token": rows[0]["flops_per_token"],
    }


def format_table(rows: list[dict], columns) -> str:
    table = [[name for name, _ in columns]]
    for row in rows:
        table.append(["-" if row.get(name) is None else fmt.format(row[name]) for name, fmt in columns])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in table)


RUN_COLUMNS = [("label", "{}"), ("seed", "{}"), ("steps", "{}"), ("tokens", "{:,}"), ("final_loss", "{:.4f}"),
               ("best_val_loss", "{:.4f}"), ("median_tokens_per_s", "{:,.0f}"), ("median_mfu", "{:.1%}"),
               ("flops_per_token", "{:.3g}"), ("kv_cache_bytes_per_token", "{:,}")]
ARM_COLUMNS = [("label", "{}"), ("n", "{}"), ("val_mean", "{:.4f}"), ("val_std", "{:.4f}")]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl[.gz] and run_info.json)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "workspace" / "plots", help="output folder")
    parser.add_argument("--smooth", type=float, default=0.0, metavar="W",
                        help="EMA weight for the train-loss curves, 0 (off) to <1 (TensorBoard's slider); val points are never smoothed")
    parser.add_argument("--logx", action="store_true", help="log-scale x axes (tokens, time, FLOPs)")
    parser.add_argument("--logy", action="store_true", help="log-scale loss axes")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")

    runs = load_runs(args.runs)
    if not runs:
        parser.error("none of the given paths is a run directory with metrics")
    arms = group_arms(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    arm_summaries = [summarize_arm(arm) for arm in arms]
    plot_loss(arms, "tokens", "Loss vs tokens", args.out / "loss_vs_tokens.png", args.smooth, args.logx, args.logy)
    plot_loss(arms, "time", "Loss vs wall time", args.out / "loss_vs_time.png", args.smooth, args.logx, args.logy)
    plot_loss_vs_flops(arms, args.out / "loss_vs_flops.png", args.smooth, args.logx, args.logy)
    plot_final_vs_kv(arms, arm_summaries, args.out / "loss_vs_kv_cache.png", args.logy)
    names = [a["label"] for a in arms]
    plot_bars(names, [s["median_tokens_per_s"] for s in arm_summaries], "tokens / s (median, all processes)",
              "Training throughput" + (" (median over seeds)" if any(len(a["runs"]) > 1 for a in arms) else ""),
              args.out / "tokens_per_s.png")
    plot_bars(names, [s["kv_cache_bytes_per_token"] for s in arm_summaries], "bytes per token (bf16, all layers)",
              "KV-cache size", args.out / "kv_cache_bytes_per_token.png")
    summaries = [row for s in arm_summaries for row in s["runs"]]
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=2))
    (args.out / "arms.json").write_text(json.dumps([{k: v for k, v in s.items() if k != "runs"} for s in arm_summaries], indent=2))
    print(format_table(summaries, RUN_COLUMNS))
    if any(len(a["runs"]) > 1 for a in arms):
        print("\nfinal val loss over seeds (mean, sample std)")
        print(format_table([{**s, "n": len(s["runs"])} for s in arm_summaries], ARM_COLUMNS))
    print(f"plots, summary.json and arms.json in {args.out}")
    return {"summaries": summaries, "arms": arm_summaries, "out": args.out}


if __name__ == "__main__":
    main()
