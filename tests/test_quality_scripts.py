"""scripts/quality_study.sh and scripts/quality_seeds.sh on the CPU at toy sizes: the arm list, the (seed, arm)
queue over two workers, skipping finished runs on a second call, STOP_AFTER_S, and the errors that name the problem."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = ("train.max_steps=2 train.eval_every=1 train.eval_batches=1 model.n_layer=1 train.seq_len=64 "
       "train.batch_tokens=256 train.micro_batch=4 optim.warmup_steps=1")


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"scripts/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_the_arm_list_is_the_studys_arms():
    arms = run("quality_study.sh", "--list-arms").stdout.splitlines()
    assert [" ".join(a.split()[:2]) for a in arms] == [
        "gpt2 dense", "gpt2 sfa-k2", "gpt2 sfa-k4", "gpt2 sfa-k8", "gpt2 sfa-k16", "gpt2 short-d32",
        "qwen3 dense", "qwen3 sfa-k16", "qwen3 sfa-k16-fmap", "qwen3 short-d64",
        "qwen3 sfa-k16-nope", "qwen3 sfa-k16-rope16", "qwen3 sfa-k16-rope32", "qwen3 sfa-k8-rope32",
        "qwen3 sfa-k16-rope16-tlearn", "qwen3 dense-rope16", "qwen3 dense-rope32",
        "qwen3 short-d48", "qwen3 short-d32",
        "qwen3 sfa-k12-rope32", "qwen3 sfa-k16-rope32s", "qwen3 sfa-k16-rope64s", "qwen3 sfa-k24-rope32s", "qwen3 dense-rope64s"]
    assert "attention.feature_map=true" in arms[8]


def test_every_arm_passes_the_config_checks_with_its_study():
    from test_configs import resolved

    from training.run_config import check_config

    for line in run("quality_study.sh", "--list-arms").stdout.splitlines():
        family, arm, *overrides = line.split("#")[0].split()
        plan = check_config(resolved([f"experiment=study_large_{family}", *overrides]), world_size=1)
        if "rope" in arm and "nope" not in arm:
            assert plan.attention.rope == "decoupled" and f"rope{plan.attention.rope_dims}" in arm


@pytest.mark.slow
def test_seeds_queue_runs_every_seed_and_arm_then_skips_them(tmp_path):
    out = tmp_path / "qs"
    env = dict(NGPU="2", ARMS="gpt2/dense gpt2/sfa-k8", OVERRIDES=TOY)
    first = run("quality_seeds.sh", str(out), "1", "2", **env)
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((out / "seeds_final.json").read_text())["families"]["gpt2"]
    assert sorted(summary) == ["dense", "sfa-k8"] and all(r["n"] == 2 for r in summary.values())
    # The two seeds differ (init and data order), the two arms differ (attention).
    assert summary["dense"]["val_losses"][0] != summary["dense"]["val_losses"][1]
    assert summary["dense"]["val_losses"] != summary["sfa-k8"]["val_losses"]
    for seed in ("1", "2"):
        config = (out / f"seed{seed}" / "gpt2" / "sfa-k8" / "config.yaml").read_text()
        assert f"seed: {seed}" in config and "k: 8" in config
    assert (out / "plots_gpt2" / "loss_vs_tokens.png").exists()

    again = run("quality_seeds.sh", str(out), "1", "2", **env)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 4, again.stdout


@pytest.mark.slow
def test_stop_after_starts_no_run_past_the_deadline(tmp_path):
    done = run("quality_seeds.sh", str(tmp_path / "qs"), "1", NGPU="1", ARMS="gpt2/dense", OVERRIDES=TOY, STOP_AFTER_S="0")
    assert done.returncode == 1 and "no run finished" in done.stderr
    assert "STOP_AFTER_S=0 reached: seed 1 gpt2/dense and later runs not started" in done.stdout
    assert not (tmp_path / "qs" / "seed1").exists()


@pytest.mark.slow
def test_an_arm_with_a_checkpoint_continues_from_it(tmp_path):
    """A run cut off by a time limit leaves a checkpoint (the SIGTERM handler saves one); the next call of the
    same arm continues from it. Here the cut is a run of 2 of the 3 steps, checkpointed at its end."""
    toy = TOY.replace("train.max_steps=2", "").split()
    first = run("quality_study.sh", "--one", str(tmp_path), "gpt2", "dense", *toy, "train.max_steps=2")
    assert first.returncode == 0, first.stdout + first.stderr
    again = run("quality_study.sh", "--one", str(tmp_path), "gpt2", "dense", *toy, "train.max_steps=3")
    assert again.returncode == 0, again.stdout + again.stderr
    log = (tmp_path / "gpt2" / "dense" / "train.log").read_text()
    assert "resumed from" in log and "at step 2" in log, log[-2000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "gpt2" / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3


def test_errors_name_the_problem(tmp_path):
    bad_arm = run("quality_seeds.sh", str(tmp_path), "1", ARMS="gpt2/nope", NGPU="1")
    assert bad_arm.returncode == 2 and "ARMS='gpt2/nope' matches no arm" in bad_arm.stderr
    no_seed = run("quality_seeds.sh", str(tmp_path), NGPU="1")
    assert no_seed.returncode == 2 and "give at least one seed" in no_seed.stderr
    one = run("quality_study.sh", "--one", str(tmp_path), "gpt2", "nope")
    assert one.returncode == 2 and "no arm 'gpt2 nope'" in one.stderr
    study = run("quality_study.sh", "--one", str(tmp_path), "gpt2", "dense", STUDY="nosuch")
    assert study.returncode == 2 and "STUDY=nosuch has no configs/experiment/nosuch_gpt2.yaml" in study.stderr
