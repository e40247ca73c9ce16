"""scripts/plot_runs.py on two real tiny runs (dense and SFA from one multirun)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from train_helpers import REPO, run_train

sys.path.insert(0, str(REPO / "scripts"))
import plot_runs  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sweep = root / "sweep"
    run_train(["-m", "attention=dense,sfa", "train.max_steps=4", "train.eval_every=2", "train.batch_tokens=128",
               "train.micro_batch=4", f"hydra.sweep.dir={sweep}"], data_root=root / "data", root=root)
    return sorted(p for p in sweep.iterdir() if p.is_dir())


PLOTS = ("loss_vs_tokens", "loss_vs_time", "loss_vs_flops", "loss_vs_kv_cache", "tokens_per_s", "kv_cache_bytes_per_token")


@pytest.mark.slow
def test_plots_and_summary(two_runs, tmp_path, capsys):
    result = plot_runs.main([*map(str, two_runs), "--out", str(tmp_path), "--smooth", "0.5", "--logx", "--logy"])
    for name in PLOTS:
        path = tmp_path / f"{name}.png"
        assert path.stat().st_size > 10_000
        pixels = matplotlib.image.imread(path)
        assert pixels.std() > 0.05  # not a blank canvas
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the real model (1 layer, width 64, 2 heads from TINY), not the preset's name
    assert [s["label"] for s in summary] == ["GPT-2 1L×64d×2h, dense (head dim 32)", "GPT-2 1L×64d×2h, SFA k=8 (head dim 32)"]
    for s, run in zip(summary, two_runs):
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert s["final_loss"] == last["loss"] and s["steps"] == 4 and s["final_val_loss"] == last["val_loss"]
    dense, sfa = summary
    assert sfa["kv_cache_bytes_per_token"] < dense["kv_cache_bytes_per_token"]
    table = capsys.readouterr().out
    assert "GPT-2 1L×64d×2h, SFA k=8 (head dim 32)" in table and "kv_cache_bytes_per_token" in table
    assert result["out"] == tmp_path


def test_not_a_run_dir(tmp_path):
    with pytest.raises(SystemExit):
        plot_runs.main([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a train.py run directory"):
        plot_runs.load_run(tmp_path)


# --- synthetic run directories: what train.py writes, with losses chosen here --------------------
INFO = {"model": "gpt2_tiny", "n_layer": 4, "d_model": 256, "n_head": 4, "attention": "sfa", "topk_q": 8, "topk_k": 8,
        "d_short": None, "feature_map": False, "head_dim": 64, "flops_per_token": 1e6, "dense_equiv_flops_per_token": 2e6,
        "kv_cache_bytes_per_token": 1000, "device": "cpu", "world_size": 1}


def fake_run(path: Path, losses, *, seed=1, lr=1e-3, gz=False, elapsed_offset=0.0) -> Path:
    path.mkdir(parents=True)
    config = {"model": {"preset": "gpt2_tiny"}, "attention": {"kind": "sfa", "k": 8, "topk_q": 8, "topk_k": 8},
              "optim": {"lr": lr}, "train": {"seed": seed, "seq_len": 128, "batch_tokens": 1024}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "run_info.json").write_text(json.dumps({**INFO, "seed": seed}))
    records = [{"step": i + 1, "tokens": 1024 * (i + 1), "loss": loss, "elapsed_s": elapsed_offset + i, "tokens_per_s": 1e3,
                **({"val_loss": loss + 0.5} if i == len(losses) - 1 else {})} for i, loss in enumerate(losses)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path / "metrics.jsonl.gz", "wt") as f:
            f.write(text)
    else:
        (path / "metrics.jsonl").write_text(text)
    return path


def test_an_empty_run_is_skipped_with_a_warning(tmp_path, capsys):
    good = fake_run(tmp_path / "good", [3.0, 2.0])
    empty = tmp_path / "starting"
    empty.mkdir()
    (empty / "run_info.json").write_text(json.dumps(INFO))
    (empty / "metrics.jsonl").write_text("")  # a run that has not logged its first step yet
    result = plot_runs.main([str(good), str(empty), "--out", str(tmp_path / "plots")])
    assert [s["run"] for s in result["summaries"]] == [str(good)]
    assert f"skipping {empty}: its metrics file holds no records yet" in capsys.readouterr().err


def test_gzipped_metrics_read_like_plain_ones(tmp_path):
    plain = plot_runs.main([str(fake_run(tmp_path / "a", [3.0, 2.5])), "--out", str(tmp_path / "p1")])
    gzipped = plot_runs.main([str(fake_run(tmp_path / "b", [3.0, 2.5], gz=True)), "--out", str(tmp_path / "p2")])
    assert gzipped["summaries"][0]["final_val_loss"] == plain["summaries"][0]["final_val_loss"] == 3.0


def test_the_committed_results_plot_as_docs_results_says(tmp_path):
    runs = sorted((REPO / "docs" / "results" / "quality_study_large_2026-11-27_h200x4" / "runs").glob("seed*/qwen3/dense"))
    assert len(runs) == 3 and not (runs[0] / "metrics.jsonl").exists()  # gzipped only
    result = plot_runs.main([*map(str, runs), "--out", str(tmp_path)])
    (arm,) = result["arms"]
    assert arm["label"] == "Qwen3 12L×768d×6h, dense (head dim 128) [3 seeds]" and len(arm["seeds"]) == 3


def test_seeds_of_one_arm_become_a_mean_and_a_band(tmp_path):
    a = [fake_run(tmp_path / f"sfa-s{seed}", [3.0 + d, 2.0 + d], seed=seed) for seed, d in ((1, 0.0), (2, 0.2))]
    other = fake_run(tmp_path / "sfa-lr", [3.0, 2.0], lr=3e-3)  # same label, another config: its own arm
    result = plot_runs.main([*map(str, a), str(other), "--out", str(tmp_path / "plots")])
    seeds, alone = result["arms"]
    assert seeds["seeds"] == [1, 2] and seeds["label"].endswith("lr=0.001 [2 seeds]")
    assert seeds["val_mean"] == pytest.approx(2.6) and seeds["val_std"] == pytest.approx(0.1414, abs=1e-4)
    assert alone["label"].endswith("lr=0.003") and alone["val_std"] is None
    x, mean, std = plot_runs.arm_curve(plot_runs.group_arms(plot_runs.load_runs(a))[0], "flops", "loss")
    assert list(x) == [1024 * 1e6, 2048 * 1e6]  # tokens x executed FLOPs per token
    assert list(mean) == pytest.approx([3.1, 2.1]) and list(std) == pytest.approx([0.1414, 0.1414], abs=1e-4)


def test_smoothing_is_a_debiased_ema():
    import numpy as np

    assert list(plot_runs.ema(np.array([4.0, 4.0, 4.0]), 0.9)) == pytest.approx([4.0, 4.0, 4.0])  # no pull to 0
    assert list(plot_runs.ema(np.array([1.0, 3.0]), 0.5)) == pytest.approx([1.0, (0.25 + 1.5) / 0.75])
