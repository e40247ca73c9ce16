"""Run directories follow the config (issue 14): what defines a run gets its own directory, the horizon
does not (rerunning with more steps extends), and the adjustments a first run needs are made, not refused."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from test_configs import resolved
from train_helpers import REPO
from training import checkpoint as ckpt
from training.run_config import ConfigError, check_config
from training.optim import WarmupCosine, build_optimizer, build_scheduler


def out_dir(*overrides):
    return resolved(list(overrides))["out_dir"]


def test_the_default_name_is_readable_with_a_hash():
    assert re.fullmatch(r"gpt2_tiny-sfa-q8k8-[0-9a-f]{6}", resolved()["run_name"])
    shaped = resolved(["model.n_layer=2", "model.d_model=128", "attention=dense"])["run_name"]
    assert re.fullmatch(r"gpt2_tiny-L2-d128-dense-[0-9a-f]{6}", shaped)


@pytest.mark.parametrize("override", [
    "model.n_layer=2", "model.d_model=128", "attention=dense", "attention.k=4", "data=embedded_plus",
    "train.seed=2", "train.seq_len=64", "train.batch_tokens=2048", "optim.lr=1e-3", "optim.warmup_steps=3",
    "convert=eq8", "init.from_checkpoint=/some/run",
])
def test_runs_that_differ_in_what_they_train_get_their_own_directory(override):
    # The case: `model.n_layer=2 ...` used to land in the default run's directory and be refused.
    assert out_dir(override) != out_dir()


@pytest.mark.parametrize("override", [
    "train.max_steps=500", "optim.decay_steps=500", "train.eval_every=7", "train.log_every=1",
    "attention.backend=reference", "logging=offline", "train.resume=none", "data.root=/elsewhere",
])
def test_what_may_change_on_resume_keeps_the_directory(override):
    # Same directory = the rerun resumes: extending (more steps, a new decay horizon) continues the run.
    assert out_dir(override) == out_dir()


def test_a_directory_is_shared_exactly_when_the_resume_check_accepts():
    for overrides in (["model.n_layer=2"], ["train.seed=2"], ["train.max_steps=500", "optim.decay_steps=500"]):
        same_dir = out_dir(*overrides) == out_dir()
        compatible = not ckpt.config_differences(resolved(), resolved(overrides))
        assert same_dir == compatible, overrides


def test_explicit_run_name_and_out_dir_still_win():
    assert resolved(["run_name=mine"])["out_dir"] == "/tmp/sfa-test-root/runs/mine"
    assert resolved(["out_dir=/tmp/x"])["out_dir"] == "/tmp/x"


def test_a_warmup_longer_than_a_smoke_test_is_clamped_with_a_warning():
    plan = check_config(resolved(["train.max_steps=3"]), world_size=1)  # default warm-up: 10 steps
    assert (plan.warmup_steps, plan.decay_steps) == (3, 3)
    assert plan.warnings == ("optim.warmup_steps=10 is longer than the schedule (train.max_steps=3); "
                             "warming up over 3 steps instead",)
    assert check_config(resolved(), world_size=1).warnings == ()


def test_errors_name_the_key_the_user_typed():
    with pytest.raises(ConfigError, match=r"^attention.k=100 must be an int in \[1, head_dim=64\]$"):
        check_config(resolved(["attention.k=100"]), world_size=1)
    with pytest.raises(ConfigError, match=r"^attention.topk_k=100 must be"):  # set on its own: named as typed
        check_config(resolved(["attention.topk_k=100"]), world_size=1)


def test_resume_takes_a_run_directory(tmp_path):
    from training import run_setup

    run = tmp_path / "run"
    for step in (2, 4):
        ckpt.save_atomic({"step": step}, ckpt.checkpoint_path(run, step))
    check_config(resolved([f"train.resume={run}"]), world_size=1)  # accepted by the checks
    cfg = OmegaConf.create({"train": {"resume": str(run)}})
    assert run_setup.resume_from(cfg, tmp_path / "new") == ckpt.checkpoint_path(run, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.ResumeError, match=r"train.resume=.*empty: that run directory has no checkpoints/step_\*.pt"):
        run_setup.resume_from(OmegaConf.create({"train": {"resume": str(empty)}}), tmp_path / "new")


def test_a_resumed_scheduler_follows_the_new_horizon():
    model = torch.nn.Linear(2, 2)
    cfg = OmegaConf.create({"lr": 1.0, "min_lr": 0.1, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8})
    optimizer = build_optimizer(model, cfg)
    old = build_scheduler(optimizer, cfg, warmup=2, decay_steps=10)
    for _ in range(10):
        optimizer.step()
        old.step()
    assert old.get_last_lr()[0] == pytest.approx(0.1)  # at the floor of the old horizon
    state = optimizer.state_dict()
    optimizer = build_optimizer(model, cfg)
    optimizer.load_state_dict(state)
    new = build_scheduler(optimizer, cfg, warmup=2, decay_steps=40, step=10)
    expected = [WarmupCosine(2, 40, 0.1)(s) for s in range(10, 14)]
    got = []
    for _ in range(4):
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        new.step()
    assert got == pytest.approx(expected) and got[0] > 0.5  # back up the longer cosine, not stuck at 0.1


def test_a_bad_value_is_reported_fast_in_one_line(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "attention.k=100", f"root={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    output = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2
    assert len(output) == 1 and output[0].endswith("attention.k=100 must be an int in [1, head_dim=64]"), output
    assert "Traceback" not in proc.stderr
    assert seconds < 15, seconds  # ~2 s on an idle core; transformers (unused by training) is not imported


def test_importing_the_models_does_not_import_transformers():
    code = "import sys, models; assert 'transformers' not in sys.modules; models.to_hf; assert 'transformers' in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
