"""Non-finite steps (skip | stop), preflight checks on the run directory and the disk, ENOSPC in a
checkpoint write, a torn checkpoint, the test-hook syntax and the new config keys' messages."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import namedtuple

import pytest
import torch

from train_helpers import read_metrics, run_train
from training import checkpoint as ckpt
from training import faults
from training.run_config import ConfigError, check_config

# ---------------------------------------------------------------------------------------- unit level


def test_hook_syntax(monkeypatch):
    monkeypatch.setenv(faults.HOOK_ENV, "pause_in_eval@8, die@5:1,nan_loss")
    assert faults.test_hook("pause_in_eval", 8) and not faults.test_hook("pause_in_eval", 7)
    assert faults.test_hook("die", 5, rank=1) and not faults.test_hook("die", 5, rank=0)
    assert faults.test_hook("nan_loss", 1) and faults.test_hook("nan_loss", 99)
    monkeypatch.setenv(faults.HOOK_ENV, "die@five")
    with pytest.raises(ValueError, match=r"SFA_TEST_HOOK: cannot parse 'die@five'; expected name\[@step\]\[:rank\]"):
        faults.test_hook("die", 5)
    monkeypatch.delenv(faults.HOOK_ENV)
    assert not faults.test_hook("die", 5)


def test_hooks_that_kill_fire_on_the_first_attempt_only(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert faults.first_attempt()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert not faults.first_attempt()


def test_stop_signals_set_a_flag_and_restore_the_old_handlers():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    stopper = faults.StopSignals().install()
    try:
        assert signal.getsignal(signal.SIGTERM) == stopper._handle and not stopper.requested
        signal.raise_signal(signal.SIGTERM)  # handled: sets the flag, the process lives on
        assert stopper.requested and stopper.received == signal.SIGTERM
        error = faults.StoppedBySignal(stopper.received, 7, "c.pt")
        assert str(error) == "stopped by SIGTERM at step 7; checkpoint c.pt saved; run the same command again to resume"
    finally:
        faults.restore_signals()  # what train() does on the way out, even after an exception
    assert signal.getsignal(signal.SIGTERM) == before


def test_nonfinite_cause_names_loss_or_gradients():
    assert faults.NonFiniteGuard.cause(2.5, 1.0, []) is None
    assert faults.NonFiniteGuard.cause(float("nan"), float("nan"), ["w"]) == "loss is nan"
    assert faults.NonFiniteGuard.cause(1.0, float("inf"), ["h.0.attn.q.weight"]) == (
        "gradient norm is inf (non-finite gradient in h.0.attn.q.weight)")
    many = faults.NonFiniteGuard.cause(1.0, float("nan"), [f"p{i}" for i in range(7)])
    assert many.endswith("p0, p1, p2, p3, p4 and 2 more)")


def test_skip_policy_counts_and_stops_after_n_in_a_row():
    guard = faults.NonFiniteGuard("skip", max_consecutive=2)
    assert guard.decide(1, None) and not guard.should_stop()
    assert not guard.decide(2, "loss is nan") and not guard.should_stop()
    assert guard.decide(3, None) and guard.consecutive == 0 and guard.skipped == 1  # a good step resets the run
    assert not guard.decide(4, "loss is nan") and not guard.decide(5, "loss is nan")
    assert guard.should_stop() and guard.skipped == 3
    assert "2 non-finite steps in a row (train.nonfinite_max_consecutive=2)" in guard.stop_message(5, "loss is nan", "x.pt")
    restored = faults.NonFiniteGuard("skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped == 3


def test_stop_policy_stops_at_the_first():
    guard = faults.NonFiniteGuard("stop", max_consecutive=5)
    assert not guard.decide(7, "loss is inf") and guard.should_stop()
    assert guard.stop_message(7, "loss is inf", "c.pt").startswith(
        "non-finite step 7: loss is inf; stopping (train.nonfinite=stop). Checkpoint c.pt holds the last good weights")


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="ignore"), "train.nonfinite must be one of skip, stop; got 'ignore'"),
    (dict(max_consecutive=0), "train.nonfinite_max_consecutive must be a positive integer, got 0"),
])
def test_guard_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        faults.NonFiniteGuard(**kwargs)


def test_nonfinite_gradients_are_named_from_the_per_parameter_norms():
    from training.optim import clip_gradients

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    names = [name for name, _ in model.named_parameters()]
    model(torch.ones(1, 2)).sum().backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    total, norms = clip_gradients(model.parameters(), float("inf"))
    assert torch.allclose(total, expected) and faults.nonfinite_names(names, norms.tolist()) == []
    model[1].bias.grad.fill_(float("nan"))
    total, norms = clip_gradients(model.parameters(), 1.0)
    assert total.isnan() and faults.nonfinite_names(names, norms.tolist()) == ["1.bias"]


def test_preflight_out_dir_refuses_a_file_where_a_folder_is_expected(tmp_path):
    faults.preflight_out_dir(tmp_path / "fine")
    assert (tmp_path / "fine" / "checkpoints").is_dir() and not list((tmp_path / "fine").rglob(".write_probe*"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(faults.PreflightError, match=r"out_dir: cannot write to .*file/run \(Not a directory\)"):
        faults.preflight_out_dir(tmp_path / "file" / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    with pytest.raises(faults.PreflightError, match=r"out_dir: cannot write to .*run/checkpoints"):
        faults.preflight_out_dir(tmp_path / "run")


def test_preflight_out_dir_refuses_a_read_only_location():
    # Tests run as root, where chmod does not stop writes; /proc refuses new entries to everyone.
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc")
    with pytest.raises(faults.PreflightError, match="out_dir: cannot write to /proc/sfa_run"):
        faults.preflight_out_dir(__import__("pathlib").Path("/proc/sfa_run"))


def test_preflight_disk_space(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 5 * 10**8))  # 0.5 GB free
    assert faults.preflight_disk_space(tmp_path, n_params=1_000_000, min_free_gb=0.1) == 5 * 10**8
    with pytest.raises(faults.PreflightError, match=r"has 0.5 GB free but this run needs 1 GB .*train.min_free_gb=1"):
        faults.preflight_disk_space(tmp_path, n_params=1_000_000, min_free_gb=1)
    # 124M parameters: two checkpoints of ~1.5 GB each are needed whatever min_free_gb says
    with pytest.raises(faults.PreflightError, match=r"needs 2.98 GB \(two checkpoints of ~1.49 GB"):
        faults.preflight_disk_space(tmp_path, n_params=124_000_000, min_free_gb=0)


class _FullDisk:
    """A file that takes `room` bytes, then fails like a full disk."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_enospc_in_a_checkpoint_write_is_named_and_leaves_no_torn_file(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 2)
    ckpt.save_atomic({"format_version": 1, "w": torch.ones(4)}, ckpt.checkpoint_path(tmp_path, 1))
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), room=1000))
    with pytest.raises(OSError, match=r"no space left on the device writing checkpoint .*step_00000002.pt .*"
                                      r"the partial file was removed and earlier checkpoints are intact") as info:
        ckpt.save_atomic({"format_version": 1, "w": torch.zeros(100_000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_00000001.pt"]  # no temp file, no torn file


def test_enospc_on_a_real_full_filesystem(tmp_path):
    """The same through the kernel: a 64 KiB tmpfs (needs mount rights; skipped without them)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(OSError, match="no space left on the device writing checkpoint"):
            ckpt.save_atomic({"format_version": 1, "w": torch.zeros(100_000)}, mnt / "checkpoints" / "step_00000001.pt")
        assert list((mnt / "checkpoints").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_torn_checkpoint_is_refused_by_name(tmp_path):
    path = ckpt.save_atomic({"format_version": 1, "w": torch.ones(1000)}, ckpt.checkpoint_path(tmp_path, 3))
    path.write_bytes(path.read_bytes()[:700])
    with pytest.raises(ValueError, match=r"train.resume: .*step_00000003.pt is unreadable \(truncated or corrupt"):
        ckpt.load_checkpoint(path)


def _config(**train):
    from test_configs import resolved

    cfg = resolved()
    cfg["train"].update(train)
    return cfg


@pytest.mark.parametrize("train, message", [
    (dict(nonfinite="ignore"), "train.nonfinite must be skip or stop; got 'ignore'"),
    (dict(nonfinite_max_consecutive=0), "train.nonfinite_max_consecutive must be a positive integer, got 0"),
    (dict(min_free_gb=-1), "train.min_free_gb must be a number of GB >= 0, got -1"),
])
def test_new_config_keys_are_checked(train, message):
    with pytest.raises(ConfigError, match=message):
        check_config(_config(**train), world_size=1)


# ------------------------------------------------------------------------------------ train.py end to end

COMMON = ["train.batch_tokens=128", "train.micro_batch=4", "train.max_steps=6", "train.ckpt_every=2", "run_name=n"]


def _run(tmp_path, data_root, args, hook, monkeypatch, check=True):
    monkeypatch.setenv(faults.HOOK_ENV, hook)  # run_train passes the environment on to train.py
    return run_train([*COMMON, *args], data_root=data_root, root=tmp_path, check=check)


@pytest.mark.slow
def test_skip_policy_skips_a_nan_loss_and_goes_on(tmp_path, data_root, monkeypatch):
    proc = _run(tmp_path, data_root, ["train.nonfinite=skip"], "nan_loss@3", monkeypatch)
    assert "non-finite step 3: loss is nan; update skipped (1 in a row, 1 in this run)" in proc.stdout
    records = read_metrics(tmp_path / "runs" / "n")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[2]["loss"] is None and records[2]["nonfinite"] == "loss is nan"
    assert [r["nonfinite_skipped"] for r in records] == [0, 0, 1, 1, 1, 1]
    # had the NaN gradients been applied, every later loss would be NaN
    assert all(r["loss"] is not None and "nonfinite" not in r for r in records[3:])
    assert ckpt.load_checkpoint(tmp_path / "runs" / "n" / "checkpoints" / "step_00000006.pt")["nonfinite"] == {"skipped": 1}


@pytest.mark.slow
def test_stop_policy_checkpoints_the_last_good_weights_and_exits_non_zero(tmp_path, data_root, monkeypatch):
    proc = _run(tmp_path, data_root, ["train.nonfinite=stop", "train.keep_checkpoints=0"], "nan_grad@3", monkeypatch, check=False)
    assert proc.returncode == 3
    assert "non-finite step 3: gradient norm is nan (non-finite gradient in " in proc.stdout
    assert "stopping (train.nonfinite=stop). Checkpoint" in proc.stdout and "step_00000003.pt holds the last good" in proc.stdout
    run_dir = tmp_path / "runs" / "n"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    good, stopped = (ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir, s)) for s in (2, 3))
    assert stopped["model"].keys() == good["model"].keys()
    for name, tensor in stopped["model"].items():  # step 3's update was not applied
        assert torch.equal(tensor, good["model"][name]), name


@pytest.mark.slow
def test_unwritable_or_full_out_dir_fails_before_training(tmp_path, data_root):
    run_dir = tmp_path / "runs" / "n"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder should be")
    proc = run_train(COMMON, data_root=data_root, root=tmp_path, check=False)
    assert proc.returncode != 0 and "out_dir: cannot write to" in proc.stdout and "checkpoints" in proc.stdout
    assert not (run_dir / "metrics.jsonl").exists()

    proc = run_train([*COMMON, "run_name=full", "train.min_free_gb=1e9"], data_root=data_root, root=tmp_path, check=False)
    assert proc.returncode != 0 and "GB free but this run needs 1e+09 GB" in proc.stdout
    assert "step 1 |" not in proc.stdout and not (tmp_path / "runs" / "full" / "metrics.jsonl").exists()



@pytest.mark.parametrize("field, value", [("tokenizer_sha256", "0" * 64), ("tokenizer", "qwen")])
def test_meta_json_of_another_tokenizer_is_refused(tmp_path, field, value):
    """A prepared folder whose meta.json names another tokenizer (or another version of its file)."""
    import json

    from data.format import DataFormatError
    from data.prepare import ensure_prepared

    out = ensure_prepared("embedded", "gpt2", root=tmp_path, max_tokens=2000, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(DataFormatError, match=rf"was prepared with {field}='{value}', but '.*' was asked for; delete "):
        ensure_prepared("embedded", "gpt2", root=tmp_path, max_tokens=2000)
