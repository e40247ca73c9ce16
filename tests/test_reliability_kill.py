"""A run SIGKILLed anywhere (in a step, in evaluation, inside a checkpoint write, at a random moment) and
resumed loses only the steps since its last complete checkpoint, never reads a torn one, and ends with
exactly the straight run's metrics. SIGTERM / SIGINT stop with a checkpoint and exit 128 + signal."""

from __future__ import annotations

import random
import signal
import time

import pytest

from reliability_helpers import RunningTrain
from train_helpers import read_metrics, run_train
from training.checkpoint import list_checkpoints

# 12 one-micro-batch steps, checkpoints and evaluations every 4; dropout so the RNG state must resume too.
COMMON = ["train.batch_tokens=128", "train.micro_batch=4", "train.max_steps=12", "optim.decay_steps=12",
          "train.ckpt_every=4", "train.eval_every=4", "model.dropout=0.1", "run_name=r"]
COMPARED = ("loss", "lr", "grad_norm", "val_loss", "tokens")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("straight")
    run_train(COMMON, data_root=data_root, root=root)
    return read_metrics(root / "runs" / "r")


def resume_and_compare(root, data_root, straight, expect_from_step):
    proc = run_train(COMMON, data_root=data_root, root=root)
    assert f"step_{expect_from_step:08d}.pt at step {expect_from_step}" in proc.stdout
    assert not list((root / "runs" / "r" / "checkpoints").glob(".*.tmp"))  # partial saves are cleaned up
    resumed = read_metrics(root / "runs" / "r")
    assert [r["step"] for r in resumed] == list(range(1, 13))  # records redone after the checkpoint: once each
    for key in COMPARED:
        assert [r.get(key) for r in resumed] == [r.get(key) for r in straight], key  # exact on CPU
    return proc.stdout


@pytest.mark.slow
def test_sigkill_in_a_step_in_eval_and_in_a_checkpoint_write_then_resume(tmp_path, data_root, straight):
    """Three kills in a row in one run dir, each at a known point after the step-4 checkpoint and before
    the step-8 one, each resumed from step 4; the last resume runs to the end."""
    run_dir = tmp_path / "runs" / "r"
    for n, (hook, where) in enumerate([
        ("pause_in_step@7", "step at step 7"),               # mid-run: steps 5-6 logged, then lost
        ("pause_in_eval@8", "eval at step 8"),               # step 8 trained, killed before its checkpoint
        ("pause_in_ckpt_write@8", "checkpoint write at step 8"),  # file written, not yet renamed
    ]):
        run = RunningTrain(COMMON, data_root=data_root, root=tmp_path, hook=hook)
        run.wait_for(f"SFA_TEST_HOOK: paused in {where}")
        run.signal(signal.SIGKILL)
        assert run.finish() == -signal.SIGKILL
        if n:
            assert "step_00000004.pt at step 4" in run.output
        assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000004.pt"]
        assert read_metrics(run_dir)[-1]["step"] > 4  # logged past the checkpoint: the resume must drop those
    assert list((run_dir / "checkpoints").glob(".step_00000008.pt.*.tmp"))  # the half-done save: a temp file
    output = resume_and_compare(tmp_path, data_root, straight, 4)
    assert "removed .step_00000008.pt." in output and "interrupted" in output


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(tmp_path, data_root, straight):
    rng = random.Random(20261127)  # fixed seed: a random point, the same one on every CI run
    step, delay = rng.randint(5, 11), rng.uniform(0, 0.3)  # after the first checkpoint, somewhere in a step
    run = RunningTrain(COMMON, data_root=data_root, root=tmp_path)
    run.wait_for(f"step {step} |")
    time.sleep(delay)
    run.signal(signal.SIGKILL)
    run.finish()
    last = list_checkpoints(tmp_path / "runs" / "r")
    resume_and_compare(tmp_path, data_root, straight, int(last[-1].stem[5:]))


@pytest.mark.slow
def test_sigint_then_sigterm_save_checkpoints_and_the_resumes_match(tmp_path, data_root, straight):
    """Ctrl-C at step 3, resume, SIGTERM at step 6, resume to the end: the straight run's metrics."""
    run_dir = tmp_path / "runs" / "r"
    for hook_step, sig, resumed_from in ((3, signal.SIGINT, None), (6, signal.SIGTERM, 3)):
        run = RunningTrain(COMMON, data_root=data_root, root=tmp_path, hook=f"pause_in_step@{hook_step}")
        run.wait_for(f"SFA_TEST_HOOK: paused in step at step {hook_step}")
        run.signal(sig)
        assert run.finish() == 128 + sig  # a clean stop, but not a finished run
        name = signal.Signals(sig).name
        assert f"received {name}: stopping after this step with a checkpoint" in run.output
        assert f"stopped by {name} at step {hook_step}; checkpoint" in run.output
        assert f"step_{hook_step:08d}.pt saved; run the same command again to resume" in run.output
        if resumed_from:
            assert f"step_{resumed_from:08d}.pt at step {resumed_from}" in run.output
        assert list_checkpoints(run_dir)[-1].name == f"step_{hook_step:08d}.pt"
        assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, hook_step + 1))
    resume_and_compare(tmp_path, data_root, straight, 6)
