"""training/loop.py in-process: steps that do not log never wait on the device."""

from __future__ import annotations

import collections

import pytest
import torch
from hydra import compose, initialize_config_dir

from train_helpers import TINY
from training import loop
from training.run_setup import setup
from training.hydra_setup import CONFIG_DIR, register_resolvers


def compose_run(tmp_path, *overrides):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[*TINY, f"root={tmp_path}", f"data.root={tmp_path / 'data'}",
                                           "train.batch_tokens=128", "train.micro_batch=4", *overrides])


# Every way Python code reads a tensor's value on the host (on a GPU each one waits for the device).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def count_host_reads(monkeypatch) -> collections.Counter:
    counts = collections.Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.slow
def test_steps_between_log_steps_do_not_read_the_device(tmp_path, monkeypatch):
    """A run of 8 steps reads tensors on the host exactly as often as a run of 3: only setup, the last
    step (its log line, evaluation, checkpoint) and the end read; the 5 extra steps read nothing."""
    counts = {}
    for steps in (3, 8):
        cfg = compose_run(tmp_path, f"train.max_steps={steps}", "train.log_every=100", "train.eval_every=0",
                          "train.ckpt_every=0", "model.dropout=0.1", f"run_name=s{steps}")
        with monkeypatch.context() as patch:
            reads = count_host_reads(patch)
            summary = loop.train(cfg, tmp_path / f"s{steps}")
        assert summary["step"] == steps
        counts[steps] = reads
    assert counts[8] == counts[3], f"host reads: 3 steps {dict(counts[3])}, 8 steps {dict(counts[8])}"


@pytest.mark.gpu
def test_a_gpu_step_does_not_synchronize(tmp_path):
    """torch's own detector of device synchronisations, around train_step on CUDA (after a warm-up step)."""
    from training import distributed as dist

    cfg = compose_run(tmp_path, "train.max_steps=5", "train.device=cuda", "train.dtype=bf16", "run_name=g")
    info = dist.setup(cfg.dist, cfg.train.device)
    try:
        run = setup(cfg, tmp_path / "g", info)
        run.model.train()
        loop.train_step(run)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                loop.train_step(run)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            run.batches.close()
    finally:
        dist.teardown()


@pytest.mark.slow
def test_a_nonfinite_step_between_log_steps_never_changes_the_weights(tmp_path, monkeypatch):
    """train.nonfinite=stop, a NaN gradient at step 3, the host reading the device only at steps 2 and 4
    (checkpoints): step 3 and step 4 (the device already knew the run would stop) leave the weights and
    the optimizer state as step 2 left them; the run stops at step 4 naming step 3."""
    from train_helpers import read_metrics, run_train
    from training import checkpoint as ckpt
    from training import faults

    monkeypatch.setenv(faults.HOOK_ENV, "nan_grad@3")
    proc = run_train(["run_name=n", "train.max_steps=8", "train.log_every=100", "train.eval_every=0",
                      "train.ckpt_every=2", "train.keep_checkpoints=0", "train.nonfinite=stop",
                      "train.batch_tokens=128", "train.micro_batch=4"],
                     data_root=tmp_path / "data", root=tmp_path, check=False)
    assert proc.returncode == 3
    assert "non-finite step 3: gradient norm is nan (non-finite gradient in " in proc.stdout
    assert "step_00000004.pt holds the last good weights" in proc.stdout
    run_dir = tmp_path / "runs" / "n"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "nonfinite" in records[2] and records[3]["update_skipped"] == "stopping after non-finite step 3"
    good, stopped = (ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, s)) for s in (2, 4))
    for name, tensor in stopped["model"].items():
        assert torch.equal(tensor, good["model"][name]), name
    for key, state in stopped["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, good["optimizer"]["state"][key][name]), (key, name)
