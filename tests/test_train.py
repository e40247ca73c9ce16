"""train.py end to end on CPU: files written, loss going down, exact resume, refusals, multirun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from train_helpers import read_metrics, run_train

METRIC_KEYS = {
    "step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "elapsed_s", "flops_per_token",
    "dense_equiv_flops_per_token", "mfu", "kv_cache_bytes_per_token", "peak_memory_bytes",
}


@pytest.mark.slow
def test_a_tiny_run_writes_config_metrics_and_checkpoints(tmp_path, data_root):
    proc = run_train(["run_name=tiny", "train.max_steps=6", "train.eval_every=3", "train.ckpt_every=3",
                      "train.batch_tokens=256", "train.micro_batch=4"], data_root=data_root, root=tmp_path)
    run_dir = tmp_path / "runs" / "tiny"
    assert f"run dir: {run_dir}" in proc.stdout
    assert "gpt2_tiny (1L x 64d x 2h) + sfa-q8k8" in proc.stdout  # the real shape, not only the preset
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["attention"]["topk_q"] == 8 and config["train"]["max_steps"] == 6
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # Hydra's own output lands in the run dir too

    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert METRIC_KEYS <= set(r)
        assert r["mfu"] is None  # CPU: no peak to compare with
        assert r["peak_memory_bytes"] > 0 and r["tokens_per_s"] > 0
        assert r["dense_equiv_flops_per_token"] > r["flops_per_token"] > 0
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert records[2]["val_perplexity"] == pytest.approx(torch.tensor(records[2]["val_loss"]).exp().item(), rel=1e-6)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["tokens"] == 256 and records[-1]["tokens"] == 6 * 256

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["grad_accum"] == 256 // (4 * 32)
    assert (info["n_layer"], info["d_model"], info["n_head"], info["seed"]) == (1, 64, 2, 1337)
    from models import build_model

    model = build_model("gpt2_tiny", {"kind": "sfa", "topk_q": 8}, n_layer=1, d_model=64, n_head=2)
    assert records[0]["kv_cache_bytes_per_token"] == model.kv_cache_bytes_per_token(torch.bfloat16)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000003.pt", "step_00000006.pt"]
    payload = torch.load(run_dir / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "loaders", "rng", "step", "tokens_seen", "config", "format_version"} <= set(payload)
    assert payload["step"] == 6 and payload["tokens_seen"] == 6 * 256


@pytest.mark.slow
def test_resumed_run_repeats_the_straight_run_exactly(tmp_path, data_root):
    common = ["train.batch_tokens=256", "train.micro_batch=4", "train.ckpt_every=5", "train.eval_every=5",
              "optim.decay_steps=20", "attention=sfa", "model.dropout=0.1"]  # dropout: RNG state must resume too
    run_train([*common, "run_name=straight", "train.max_steps=20"], data_root=data_root, root=tmp_path)
    run_train([*common, "run_name=split", "train.max_steps=10"], data_root=data_root, root=tmp_path)
    proc = run_train([*common, "run_name=split", "train.max_steps=20"], data_root=data_root, root=tmp_path)
    assert "resumed from" in proc.stdout and "step_00000010.pt at step 10" in proc.stdout

    straight = read_metrics(tmp_path / "runs" / "straight")
    split = read_metrics(tmp_path / "runs" / "split")
    assert [r["step"] for r in split] == list(range(1, 21))  # one trajectory, no duplicated steps
    for key in ("loss", "lr", "grad_norm", "val_loss", "tokens"):
        assert [r.get(key) for r in split] == [r.get(key) for r in straight], key  # exact, not approximate


@pytest.mark.slow
def test_resume_refuses_another_config(tmp_path, data_root):
    common = ["run_name=r", "train.batch_tokens=128", "train.micro_batch=4", "train.max_steps=2"]
    run_train(common, data_root=data_root, root=tmp_path)
    proc = run_train([*common, "attention.k=4", "train.max_steps=3"], data_root=data_root, root=tmp_path, check=False)
    assert proc.returncode != 0
    assert "was trained with another config" in proc.stdout
    assert "attention.topk_q: checkpoint 8 vs now 4" in proc.stdout
    assert "Traceback" not in proc.stdout and proc.returncode == 2
    # The fix the message suggests works: without run_name the run gets a directory named after its config.
    assert "leave out run_name=/out_dir=" in proc.stdout
    proc = run_train([*common[1:], "attention.k=4", "train.max_steps=3"], data_root=data_root, root=tmp_path)
    assert "run dir: " + str(tmp_path / "runs" / "gpt2_tiny-L1-d64-h2-sfa-q4k4-") in proc.stdout
    # train.resume=none will not mix a fresh run's checkpoints with the old ones
    from training import run_setup

    cfg = OmegaConf.create({"train": {"resume": "none"}})
    with pytest.raises(ValueError, match=r"train.resume=none but .* holds checkpoints of an earlier run \(newest step_00000002.pt\)"):
        run_setup.resume_from(cfg, tmp_path / "runs" / "r")
    assert run_setup.resume_from(cfg, tmp_path / "runs" / "elsewhere") is None


@pytest.mark.slow
def test_the_same_command_with_more_steps_extends_the_run_on_the_new_schedule(tmp_path, data_root):
    common = ["train.batch_tokens=128", "train.micro_batch=4", "train.eval_every=0"]  # default run name
    first = run_train([*common, "train.max_steps=4", "optim.decay_steps=4"], data_root=data_root, root=tmp_path)
    # docs/training.md's way to extend: raise max_steps and move the decay horizon with it
    second = run_train([*common, "train.max_steps=8", "optim.decay_steps=8"], data_root=data_root, root=tmp_path)
    run_dir = first.stdout.split("run dir: ")[1].split()[0]
    assert f"run dir: {run_dir}" in second.stdout and "at step 4" in second.stdout
    assert "optim.decay_steps 4 -> 8" in second.stdout
    records = read_metrics(Path(run_dir))
    assert [r["step"] for r in records] == list(range(1, 9))
    from training.optim import WarmupCosine

    lr, schedule = 1.5e-3, WarmupCosine(2, 8, 0.1)  # train.yaml's lr and min_lr; TINY's 2 warm-up steps
    assert [r["lr"] for r in records[4:]] == pytest.approx([lr * schedule(s) for s in range(4, 8)])
    assert records[3]["lr"] == pytest.approx(lr * WarmupCosine(2, 4, 0.1)(3))  # the first part kept its own
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)  # the wall clock continues from the checkpoint


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_run_dir(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    run_train(["-m", "attention=dense,sfa", "train.max_steps=2", "train.batch_tokens=128", "train.micro_batch=4",
               f"hydra.sweep.dir={sweep}"], data_root=data_root, root=tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    assert jobs[0].name.startswith("0_attention=dense,") and jobs[1].name.startswith("1_attention=sfa,")
    assert "train.max_steps=2" in jobs[0].name and "data.root" not in jobs[0].name
    configs = [yaml.safe_load((job / "config.yaml").read_text()) for job in jobs]
    assert [c["attention"]["kind"] for c in configs] == ["dense", "sfa"]
    assert [c["out_dir"] for c in configs] == [str(job) for job in jobs]
    for job in jobs:
        assert [r["step"] for r in read_metrics(job)] == [1, 2]
        assert (job / "checkpoints" / "step_00000002.pt").is_file()
    dense, sparse = (read_metrics(job)[0]["flops_per_token"] for job in jobs)
    assert sparse < dense


@pytest.mark.slow
def test_a_bad_value_stops_train_py_before_training(tmp_path, data_root):
    proc = run_train(["train.batch_tokens=100"], data_root=data_root, root=tmp_path, check=False)
    assert proc.returncode != 0
    assert "train.batch_tokens=100 is not divisible by" in proc.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("metrics.jsonl"))


@pytest.mark.slow
def test_time_limit_stops_with_a_checkpoint(tmp_path, data_root):
    proc = run_train(["run_name=t", "train.max_steps=1000", "train.time_limit_s=0.001", "train.batch_tokens=128",
                      "train.micro_batch=4"], data_root=data_root, root=tmp_path)
    assert "train.time_limit_s=0.001 reached at step 1" in proc.stdout
    run_dir = tmp_path / "runs" / "t"
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert "val_loss" in read_metrics(run_dir)[0]
    assert (run_dir / "checkpoints" / "step_00000001.pt").is_file()
