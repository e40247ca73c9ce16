"""torchrun with 2 gloo processes on CPU: replicas stay bit-identical and the loss matches one process
with the same global batch (the loader hands rank r the windows r, r+2, ... of the same order)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

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
    """run dir of a 2-process run per mode (and extra overrides), each run once for the module."""
    runs = {}

    def get(mode, *extra):
        if (mode, extra) not in runs:
            root = tmp_path_factory.mktemp(mode)
            run_train([*COMMON, "run_name=two", f"dist={mode}", *extra], data_root=data_root, root=root,
                      launcher=torchrun(2))
            runs[mode, extra] = root / "runs" / "two"
        return runs[mode, extra]

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


# FSDP2 in bf16 computes with bf16 copies of every weight (MixedPrecisionPolicy: norm gains, biases and
# embeddings too); DDP under autocast keeps fp32 weights and casts only the matmul inputs. Both round to
# bf16's 8-bit mantissa (2^-9 ~ 2e-3 relative per value), in different places. Measured over these 6 steps:
# loss within 5e-5 and grad norm within 6e-4 (relative). Bounds with room: 1e-3 on the loss, 1e-2 on the
# grad norm (a sum of squares of many rounded values). A data bug (both ranks reading rank 0's windows)
# moved the loss by 1.3e-3 to 4.8e-3 from step 2 on and the grad norm by 10-33%.
BF16_LOSS_RTOL = 1e-3
BF16_GRAD_NORM_RTOL = 1e-2


@pytest.mark.slow
def test_fsdp2_with_bf16_mixed_precision_matches_ddp(two_process_runs):
    """train.dtype=bf16 on CPU (gloo all-gathers bf16): FSDP2 with bf16 parameters and fp32 gradient
    reduction against DDP with bf16 autocast over fp32 weights, same data, same steps."""
    ddp = read_metrics(two_process_runs("ddp", "train.dtype=bf16"))
    fsdp2 = read_metrics(two_process_runs("fsdp2", "train.dtype=bf16"))
    assert [r["step"] for r in fsdp2] == [r["step"] for r in ddp] == list(range(1, 7))
    for a, b in zip(fsdp2, ddp):
        assert a["loss"] == pytest.approx(b["loss"], rel=BF16_LOSS_RTOL), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=BF16_GRAD_NORM_RTOL), a["step"]
        if "val_loss" in b:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=BF16_LOSS_RTOL)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_fsdp2_gathers_weights_in_the_compute_dtype_and_keeps_fp32_shards(compute_dtype, tmp_path):
    """wrap_model in a one-process gloo group: inside a block's forward its weights are `compute_dtype`;
    the sharded parameters and their gradients stay fp32 (what the optimizer updates)."""
    import torch.distributed as torch_dist

    from models import build_model
    from training.distributed import DistInfo, transformer_blocks, wrap_model

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model("gpt2_tiny", {"kind": "dense"}, n_layer=1, d_model=32, n_head=2, vocab_size=64,
                            max_seq_len=8)
        info = DistInfo(mode="fsdp2", rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        model = wrap_model(model, info, compute_dtype)
        seen = []
        block = transformer_blocks(model)[0]  # its layers run while the block's weights are gathered
        for layer in block.modules():
            if not list(layer.children()) and list(layer.parameters(recurse=False)):
                layer.register_forward_hook(lambda m, args, out: seen.extend(p.dtype for p in m.parameters()))
        x = torch.randint(0, 64, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute_dtype == torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        assert seen and set(seen) == {compute_dtype}
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    finally:
        torch_dist.destroy_process_group()
