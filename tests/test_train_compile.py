"""train.compile=true end to end on CPU (backend aot_eager: traced and run through AOTAutograd, no code
generation): every SFA backend alone, and DDP / FSDP2 over 2 gloo processes, each with fullgraph=True (a
graph break fails the run) and the same loss trajectory as the eager run. The Triton backends run under
TRITON_INTERPRET=1, which is slow (about a minute and a half per run here), hence the short runs."""

from __future__ import annotations

import shutil

import pytest

from train_helpers import read_metrics, run_train

TORCHRUN = shutil.which("torchrun")
# 3 steps of 8 sequences (one process x micro-batch 4 x 2, or two x 2 x 2), evaluations at steps 2 and 3.
COMMON = ["train.max_steps=3", "optim.decay_steps=3", "train.batch_tokens=256", "train.eval_every=2",
          "train.ckpt_every=0", "train.eval_batches=1"]
COMPILED = ["train.compile=true", "train.compile_backend=aot_eager"]
# As tests/test_distributed.py: reduction order (gloo, split batches) moves the loss by ~1e-7 relative,
# and the backends agree with the reference to float rounding (fp32); a wrong graph moves it by far more.
LOSS_RTOL = 1e-5
# FSDP2's gradients are reduce-scattered sums in another order: its grad norm differs from one process's by
# 1.2e-5 relative at step 3 here, eager and compiled alike (bit-identical to each other).
GRAD_NORM_RTOL = 1e-4


@pytest.fixture(scope="module")
def eager(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("eager")
    run_train([*COMMON, "run_name=e", "train.micro_batch=4", "attention.backend=reference"], data_root=data_root,
              root=root)
    return read_metrics(root / "runs" / "e")


def assert_same_trajectory(records, eager):
    assert [r["step"] for r in records] == [r["step"] for r in eager] == [1, 2, 3]
    for a, b in zip(records, eager):
        for key, rtol in (("loss", LOSS_RTOL), ("val_loss", LOSS_RTOL), ("grad_norm", GRAD_NORM_RTOL)):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=rtol), (a["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "masked", "flash"])
def test_compiled_run_matches_eager_with_every_sfa_backend(tmp_path, data_root, eager, backend):
    import sfa

    if backend not in sfa.available_backends():
        pytest.skip(f"attention.backend={backend} is not registered here (Triton missing)")
    # diagnostics: their statistics path runs eagerly beside the compiled model
    proc = run_train([*COMMON, *COMPILED, "run_name=c", "train.micro_batch=4", f"attention.backend={backend}",
                      "train.diagnostics_every=3"], data_root=data_root, root=tmp_path, timeout=600)
    assert "torch.compile (aot_eager, fullgraph) of the model" in proc.stdout
    records = read_metrics(tmp_path / "runs" / "c")
    assert_same_trajectory(records, eager)
    assert "attn/max_logit" in records[-1]


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("mode, compiled", [("ddp", "the model"), ("fsdp2", "each block")])
def test_compiled_run_matches_eager_under_ddp_and_fsdp2(tmp_path, data_root, eager, mode, compiled):
    proc = run_train([*COMMON, *COMPILED, "run_name=c", "train.micro_batch=2", "attention.backend=reference",
                      f"dist={mode}"], data_root=data_root, root=tmp_path,
                     launcher=(TORCHRUN, "--standalone", "--nproc_per_node=2"))
    assert f"torch.compile (aot_eager, fullgraph) of {compiled}" in proc.stdout
    assert_same_trajectory(read_metrics(tmp_path / "runs" / "c"), eager)


def test_an_unknown_compile_backend_is_named():
    from test_configs import resolved
    from training.run_config import ConfigError, check_config

    cfg = resolved(["train.compile=true", "train.compile_backend=inductr"])
    with pytest.raises(ConfigError, match=r"train.compile_backend='inductr' is not a torch.compile backend; use one of .*inductor"):
        check_config(cfg, world_size=1)
    check_config(resolved(["train.compile=false", "train.compile_backend=inductr"]), world_size=1)  # unused: fine
