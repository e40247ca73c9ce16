"""scripts/plot_runs.py on two real tiny runs (dense and SFA from one multirun)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image
import pytest

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


@pytest.mark.slow
def test_plots_and_summary(two_runs, tmp_path, capsys):
    result = plot_runs.main([*map(str, two_runs), "--out", str(tmp_path)])
    for name in ("loss_vs_tokens", "loss_vs_time", "tokens_per_s", "kv_cache_bytes_per_token"):
        path = tmp_path / f"{name}.png"
        assert path.stat().st_size > 10_000
        pixels = matplotlib.image.imread(path)
        assert pixels.std() > 0.05  # not a blank canvas
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["label"] for s in summary] == ["gpt2_tiny dense (d=32)", "gpt2_tiny sfa k=8 (d=32)"]
    for s, run in zip(summary, two_runs):
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert s["final_loss"] == last["loss"] and s["steps"] == 4 and s["final_val_loss"] == last["val_loss"]
    dense, sfa = summary
    assert sfa["kv_cache_bytes_per_token"] < dense["kv_cache_bytes_per_token"]
    table = capsys.readouterr().out
    assert "gpt2_tiny sfa k=8 (d=32)" in table and "kv_cache_bytes_per_token" in table
    assert result["out"] == tmp_path


def test_not_a_run_dir(tmp_path):
    with pytest.raises(SystemExit):
        plot_runs.main([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a train.py run directory"):
        plot_runs.load_run(tmp_path)
