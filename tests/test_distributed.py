"""torchrun with 2 gloo processes on CPU: replicas stay bit-identical and the loss matches one process
with the same global batch (the loader hands rank r the windows r, r+2, ... of the same order)."""

from __future__ import annotations

import json
import shutil

import pytest

from train_helpers import read_metrics, run_train

TORCHRUN = shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")

# 8 sequences of 32 tokens per step: 1 process x micro-batch 4 x 2 accumulation steps, or 2 x 2 x 2.
COMMON = ["train.max_steps=6", "optim.decay_steps=6", "train.batch_tokens=256", "train.eval_every=3",
          "train.ckpt_every=3", "train.rank_checksums=true", "train.micro_batch=2"]
# Float sums in a different order (gloo's all-reduce, two half-batch backward passes) move the loss by
# ~1e-7 relative; a data or sync bug moves it by 1e-3 or more.
LOSS_RTOL = 1e-5
# The float64 sum of all parameters after the last step (whose update no logged loss sees) differs from
# one process's by 8e-5 (DDP) and 7e-4 (FSDP2) here, from reduction order; a lost, doubled or
# unsynchronised shard moves it by a whole shard's sum (here -80 and -30 of the model's -110).
PARAM_SUM_ATOL = 1e-2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("single")
    run_train([*COMMON, "run_name=one", "train.micro_batch=4"], data_root=data_root, root=root)  # last wins
    return root / "runs" / "one"


@pytest.fixture(scope="module")
def single(single_run):
    return read_metrics(single_run)


def checksum(run_dir, rank):
    return json.loads((run_dir / "rank_checksums" / f"rank{rank}.json").read_text())


def torchrun(n):
    return (TORCHRUN, "--standalone", f"--nproc_per_node={n}")  # standalone: a free local rendezvous port


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, data_root):
    """run dir of a 2-process run per mode, each run once for the module."""
    runs = {}

    def get(mode):
        if mode not in runs:
            root = tmp_path_factory.mktemp(mode)
            run_train([*COMMON, "run_name=two", f"dist={mode}"], data_root=data_root, root=root, launcher=torchrun(2))
            runs[mode] = root / "runs" / "two"
        return runs[mode]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gloo_processes_match_one(two_process_runs, single, single_run, mode):
    run_dir = two_process_runs(mode)
    two = read_metrics(run_dir)
    assert [r["step"] for r in two] == [r["step"] for r in single]
    for a, b in zip(two, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_RTOL)
        assert a["tokens"] == b["tokens"]
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=LOSS_RTOL)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["world_size"], info["dist"], info["grad_accum"]) == (2, mode, 2)
    sums = [checksum(run_dir, r) for r in (0, 1)]
    whole = checksum(single_run, 0)["sum"]
    assert all(s["step"] == 6 for s in sums)
    if mode == "ddp":  # replicas: identical bytes on both ranks, each the whole model
        assert sums[0]["sha256"] == sums[1]["sha256"]
        assert sums[0]["sum"] == pytest.approx(whole, abs=PARAM_SUM_ATOL)
    else:  # shards: together the whole model, neither alone
        assert sums[0]["sum"] + sums[1]["sum"] == pytest.approx(whole, abs=PARAM_SUM_ATOL)
        assert all(abs(s["sum"] - whole) > 100 * PARAM_SUM_ATOL for s in sums)


@pytest.mark.slow
def test_ddp_resume_continues_the_same_trajectory(tmp_path, data_root, two_process_runs):
    straight = read_metrics(two_process_runs("ddp"))
    run_train([*COMMON, "run_name=two", "dist=ddp", "train.max_steps=3"], data_root=data_root, root=tmp_path,
              launcher=torchrun(2))
    run_train([*COMMON, "run_name=two", "dist=ddp"], data_root=data_root, root=tmp_path, launcher=torchrun(2))
    split = read_metrics(tmp_path / "runs" / "two")
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]  # exact: same ops in the same order
