"""torchrun with 2 gloo processes on CPU: a rank that dies ends the job promptly and non-zero (no hang);
with --max-restarts=1 torchrun restarts the job, which resumes from the last checkpoint and finishes."""

from __future__ import annotations

import shutil
import time

import pytest

from reliability_helpers import RunningTrain
from train_helpers import read_metrics

TORCHRUN = shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")

COMMON = ["train.batch_tokens=256", "train.micro_batch=2", "train.max_steps=8", "optim.decay_steps=8",
          "train.ckpt_every=2", "train.eval_every=4", "dist=ddp", "run_name=d"]
HOOK = "die@5:1"  # rank 1 SIGKILLs itself in step 5 (first attempt only); last checkpoint: 4
# torchrun shares its rendezvous store with the workers by default, and restarted gloo workers then read
# the dead attempt's addresses (pytorch/pytorch#135712); one store per attempt avoids it.
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_promptly(tmp_path, data_root):
    launcher = (TORCHRUN, "--standalone", "--nproc_per_node=2")
    started = time.monotonic()
    run = RunningTrain(COMMON, data_root=data_root, root=tmp_path, hook=HOOK, launcher=launcher, env=ENV)
    rc = run.finish(timeout=60)  # a hang fails here
    assert rc != 0 and time.monotonic() - started < 60
    assert "exitcode  : -9" in run.output and "rank      : 1" in run.output  # torchrun names the dead rank
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "d")][-1] == 4


@pytest.mark.slow
def test_an_elastic_restart_resumes_from_the_last_checkpoint(tmp_path, data_root):
    launcher = (TORCHRUN, "--standalone", "--nproc_per_node=2", "--max-restarts=1")
    run = RunningTrain(COMMON, data_root=data_root, root=tmp_path, hook=HOOK, launcher=launcher, env=ENV)
    assert run.finish(timeout=120) == 0, run.output[-6000:]
    assert "resumed from" in run.output and "step_00000004.pt at step 4" in run.output
    run_dir = tmp_path / "runs" / "d"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["loss"] is not None for r in records)
    assert (run_dir / "checkpoints" / "step_00000008.pt").is_file()
