"""scripts/summarize_seeds.py: per-arm mean/std over seed directories, difference to dense, errors."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import summarize_seeds  # noqa: E402


def write_run(root: Path, family: str, arm: str, val_losses: list[float]) -> None:
    run = root / family / arm
    run.mkdir(parents=True)
    records = [{"step": 1, "loss": 9.0}] + [{"step": 10 * (i + 1), "loss": 5.0, "val_loss": v} for i, v in enumerate(val_losses)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


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
    run = tmp_path / "noval" / "gpt2" / "dense"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    with pytest.raises(ValueError, match="no val_loss record"):
        summarize_seeds.main([str(tmp_path / "noval")])


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
