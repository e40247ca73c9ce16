"""Checkpoint files: atomic writes, discovery, pruning, refusal messages, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt

CONFIG = {
    "model": {"preset": "gpt2_tiny", "n_layer": None},
    "attention": {"kind": "sfa", "k": 8, "topk_q": 8, "topk_k": 8, "backend": "auto", "tag": "sfa-q8k8"},
    "data": {"source": "embedded", "tokenizer": "gpt2", "root": "/a"},
    "optim": {"lr": 6e-4},
    "train": {"seq_len": 128, "batch_tokens": 4096, "seed": 1, "max_steps": 10},
}


def payload(step=5, **extra):
    return {"format_version": ckpt.FORMAT_VERSION, "step": step, "world_size": 1, "config": CONFIG,
            "w": torch.arange(4.0), **extra}


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = ckpt.checkpoint_path(tmp_path, 5)
    ckpt.save_atomic(payload(), path)
    assert [p.name for p in path.parent.iterdir()] == ["step_00000005.pt"]
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.arange(4.0))


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 5)
    ckpt.save_atomic(payload(), path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic(payload(w=torch.zeros(4)), path)
    assert [p.name for p in path.parent.iterdir()] == ["step_00000005.pt"]
    assert torch.equal(ckpt.load_checkpoint(path)["w"], torch.arange(4.0))


def test_latest_and_prune_ignore_temp_files(tmp_path):
    for step in (5, 10, 15):
        ckpt.save_atomic(payload(step), ckpt.checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoints" / ".step_00000020.pt.abc.tmp").write_bytes(b"torn")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000015.pt"
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000010.pt", "step_00000015.pt"]
    assert ckpt.latest_checkpoint(tmp_path / "nothing") is None


def test_newer_format_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({**payload(), "format_version": ckpt.FORMAT_VERSION + 1}, path)
    with pytest.raises(ValueError, match=rf"format version {ckpt.FORMAT_VERSION + 1}, newer than this code reads"):
        ckpt.load_checkpoint(path)


def test_foreign_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a training checkpoint of this project"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.ResumeError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_other_model_config_is_refused_with_the_differing_keys():
    other = {**CONFIG, "attention": {**CONFIG["attention"], "topk_q": 4, "k": 4}}
    with pytest.raises(ValueError, match=r"attention.k: checkpoint 8 vs now 4[\s\S]*attention.topk_q: checkpoint 8 vs now 4"):
        ckpt.check_compatible(payload(), other, 1, "c.pt")
    other = {**CONFIG, "model": {"preset": "gpt2_small", "n_layer": None}}
    with pytest.raises(ValueError, match=r"model.preset: checkpoint 'gpt2_tiny' vs now 'gpt2_small'"):
        ckpt.check_compatible(payload(), other, 1, "c.pt")


def test_conversion_weight_and_prepared_data_dir_are_part_of_the_identity():
    # A restarted conversion run with another lambda, or on another prepared folder, is another experiment.
    other = {**CONFIG, "convert": {"match_weight": 1.0, "layers": "all"}}
    saved = payload()
    saved["config"] = {**CONFIG, "convert": {"match_weight": 0.0, "layers": "all"}}
    with pytest.raises(ValueError, match=r"convert.match_weight: checkpoint 0.0 vs now 1.0"):
        ckpt.check_compatible(saved, other, 1, "c.pt")
    saved["config"] = {**CONFIG, "data": {**CONFIG["data"], "dir": "/prepared/a"}}
    with pytest.raises(ValueError, match=r"data.dir: checkpoint '/prepared/a' vs now '/prepared/b'"):
        ckpt.check_compatible(saved, {**CONFIG, "data": {**CONFIG["data"], "dir": "/prepared/b"}}, 1, "c.pt")


def test_allowed_changes_and_world_size():
    # The horizon may move (extending a run): max_steps, and the decay_steps docs/training.md tells people to set.
    changed = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 99}, "optim": {**CONFIG["optim"], "decay_steps": 99},
               "attention": {**CONFIG["attention"], "backend": "reference"}, "data": {**CONFIG["data"], "root": "/b"}}
    ckpt.check_compatible(payload(), changed, 1, "c.pt")
    with pytest.raises(ValueError, match="written by 1 processes but this run has 2"):
        ckpt.check_compatible(payload(), CONFIG, 2, "c.pt")


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ckpt.capture_rng_state()
    path = ckpt.save_atomic({"rng": state}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.restore_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
