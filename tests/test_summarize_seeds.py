"""scripts/summarize_seeds.py: per-arm mean/std over seed directories, difference to dense, errors."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import summarize_seeds  # noqa: E402


def write_run(root: Path, family: str, arm: str, val_losses: list[float], max_steps: int | None = None) -> Path:
    """A run dir as train.py leaves it: val loss every 10 steps; train.max_steps is the last of them unless given."""
    run = root / family / arm
    run.mkdir(parents=True)
    records = [{"step": 1, "loss": 9.0}] + [{"step": 10 * (i + 1), "loss": 5.0, "val_loss": v} for i, v in enumerate(val_losses)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (run / "config.yaml").write_text(f"train:\n  max_steps: {max_steps or 10 * len(val_losses)}\n")
    return run


def test_means_spreads_and_difference_to_dense(tmp_path, capsys):
    dense, sfa = [5.0, 5.2, 5.1], [4.9, 5.0, 5.3]
    for seed, (d, s) in enumerate(zip(dense, sfa)):
        write_run(tmp_path / f"seed{seed}", "gpt2", "dense", [6.0, d])  # the last val_loss counts
        write_run(tmp_path / f"seed{seed}", "gpt2", "sfa-k8", [6.1, s])
    out = tmp_path / "seeds.json"
    summary = summarize_seeds.main([str(tmp_path / f"seed{i}") for i in range(3)] + ["--out", str(out)])
    row = summary["gpt2"]["sfa-k8"]
    assert row["n"] == 3 and row["val_losses"] == sfa
    assert row["mean"] == pytest.approx(statistics.fmean(sfa))
    assert row["std"] == pytest.approx(statistics.stdev(sfa))
    assert row["minus_dense"] == pytest.approx(statistics.fmean(sfa) - statistics.fmean(dense))
    assert row["minus_dense_se"] == pytest.approx(math.sqrt(statistics.variance(sfa) / 3 + statistics.variance(dense) / 3))
    assert "minus_dense" not in summary["gpt2"]["dense"]
    assert json.loads(out.read_text())["families"]["gpt2"]["dense"]["n"] == 3
    assert "sfa-k8" in capsys.readouterr().out


def test_one_seed_has_no_spread(tmp_path):
    write_run(tmp_path / "s", "qwen3", "dense", [5.0])
    row = summarize_seeds.main([str(tmp_path / "s")])["qwen3"]["dense"]
    assert row["n"] == 1 and row["std"] is None


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="study directory not found"):
        summarize_seeds.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no <family>/<arm>/metrics.jsonl"):
        summarize_seeds.main([str(tmp_path / "empty")])
    run = write_run(tmp_path / "noval", "gpt2", "dense", [], max_steps=10)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    with pytest.raises(ValueError, match="no run finished .* in .*noval"):
        summarize_seeds.main([str(tmp_path / "noval")])
    with pytest.raises(ValueError, match="no val_loss record"):
        summarize_seeds.run_val_loss(run / "metrics.jsonl")


def test_a_run_cut_before_its_max_steps_is_left_out_and_named(tmp_path, capsys):
    """A time limit stopped seed 2's SFA run at step 20 of 30: its last val loss (lower than a finished run's
    at that step would be, and not a final one) must not enter the mean."""
    for seed in (1, 2):
        write_run(tmp_path / f"seed{seed}", "qwen3", "dense", [6.0, 5.0, 4.0])
    write_run(tmp_path / "seed1", "qwen3", "sfa-k16", [6.1, 5.1, 4.1])
    cut = write_run(tmp_path / "seed2", "qwen3", "sfa-k16", [6.2, 5.2], max_steps=30)
    summary = summarize_seeds.main([str(tmp_path / "seed1"), str(tmp_path / "seed2")])
    assert summary["qwen3"]["sfa-k16"]["val_losses"] == [4.1]
    assert summary["qwen3"]["dense"]["n"] == 2
    assert f"left out {cut}" in capsys.readouterr().err


def test_best_metric_takes_each_runs_lowest_val_loss(tmp_path):
    """A multi-epoch run that overfits: `final` is its last val loss, `best` its lowest."""
    write_run(tmp_path / "s1", "gpt2", "dense", [6.0, 4.5, 4.8])
    write_run(tmp_path / "s2", "gpt2", "dense", [5.0, 4.7, 4.6])
    dirs = [str(tmp_path / "s1"), str(tmp_path / "s2")]
    assert summarize_seeds.main(dirs)["gpt2"]["dense"]["val_losses"] == [4.8, 4.6]
    assert summarize_seeds.main(dirs + ["--metric", "best"])["gpt2"]["dense"]["val_losses"] == [4.5, 4.6]


def test_gzipped_metrics_as_docs_results_keeps_them(tmp_path):
    import gzip

    for seed, loss in enumerate([5.0, 5.2]):
        write_run(tmp_path / f"seed{seed}", "gpt2", "dense", [6.0, loss])
        plain = tmp_path / f"seed{seed}" / "gpt2" / "dense" / "metrics.jsonl"
        with gzip.open(plain.with_name("metrics.jsonl.gz"), "wt") as f:
            f.write(plain.read_text())
        plain.unlink()
    summary = summarize_seeds.main([str(tmp_path / "seed0"), str(tmp_path / "seed1")])
    assert summary["gpt2"]["dense"]["val_losses"] == [5.0, 5.2]


def test_at_step_counts_every_run_that_reached_the_step(tmp_path, capsys):
    """--at-step: the cut run counts at a step it reached (its val loss there), and is named where it did not."""
    write_run(tmp_path / "seed1", "qwen3", "sfa-k16", [6.1, 5.1, 4.1])
    write_run(tmp_path / "seed2", "qwen3", "sfa-k16", [6.2, 5.2], max_steps=30)
    dirs = [str(tmp_path / "seed1"), str(tmp_path / "seed2")]
    assert summarize_seeds.main(dirs + ["--at-step", "20"])["qwen3"]["sfa-k16"]["val_losses"] == [5.1, 5.2]
    assert summarize_seeds.main(dirs + ["--at-step", "30"])["qwen3"]["sfa-k16"]["val_losses"] == [4.1]
    assert "no val loss at step 30" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no run with a val loss at step 35"):
        summarize_seeds.main(dirs + ["--at-step", "35"])
