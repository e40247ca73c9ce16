"""Opt-in attention diagnostics: the statistics against hand-computed values, and train.py logging them."""

from __future__ import annotations

import math

import pytest
import torch

from models import build_model
from models.attention import AttentionConfig, attend, collect_attention_stats
from train_helpers import read_metrics, run_train


def test_stats_match_hand_computed_values():
    b, h, t, d = 1, 2, 6, 8
    q = torch.zeros(b, h, t, d)  # every score 0: uniform causal rows, entropy mean of log(i + 1)
    k = torch.randn(b, h, t, d)
    with collect_attention_stats() as layers:
        attend(q, k, torch.randn(b, h, t, d), AttentionConfig(kind="dense").resolved(d))
    (stats,) = layers
    assert stats["entropy"] == pytest.approx(sum(math.log(i + 1) for i in range(t)) / t, rel=1e-6)
    assert stats["max_logit"] == 0.0 and stats["q_energy_kept"] == 0.0 and stats["k_energy_kept"] == pytest.approx(1.0)
    # SFA k=2 of 8 on one-hot-heavy rows: the energy kept is computed from the kept coordinates.
    q = torch.tensor([3.0, 4.0, 0, 0, 0, 0, 0, 1.0]).expand(b, h, t, d)
    with collect_attention_stats() as layers:
        attend(q, q, q, AttentionConfig(kind="sfa", topk_q=2).resolved(d))
    assert layers[0]["q_energy_kept"] == pytest.approx(25 / 26)
    assert layers[0]["max_logit"] == pytest.approx(25 / math.sqrt(d))
    assert layers[0]["entropy"] == pytest.approx(sum(math.log(i + 1) for i in range(t)) / t, rel=1e-5)  # equal scores


def test_stats_are_collected_only_inside_the_context_and_once_per_layer():
    m = build_model("qwen3_tiny", {"kind": "sfa", "topk_q": 4, "rope": "decoupled", "rope_dims": 8},
                    n_layer=3, vocab_size=97, max_seq_len=32)
    ids = torch.randint(0, 97, (2, 16))
    m(ids)
    with collect_attention_stats() as layers:
        m(ids)
    assert len(layers) == 3
    for s in layers:
        assert 0 < s["q_energy_kept"] < 1 and 0 < s["k_energy_kept"] < 1
        assert 0 < s["entropy"] < math.log(16)


@pytest.mark.slow
def test_train_logs_diagnostics_when_asked(tmp_path, tmp_path_factory):
    data_root = tmp_path_factory.mktemp("data")
    run_train(["run_name=diag", "train.max_steps=4", "train.diagnostics_every=2", "train.eval_every=0",
               "train.batch_tokens=128", "train.micro_batch=4"], data_root=data_root, root=tmp_path)
    records = read_metrics(tmp_path / "runs" / "diag")
    logged = [r["step"] for r in records if "attn/entropy" in r]
    assert logged == [2, 4]
    r = records[1]
    assert {"attn/q_energy_kept_L0", "attn/k_energy_kept_L0", "attn/max_logit_L0", "attn/entropy_L0"} <= set(r)
    assert 0 < r["attn/q_energy_kept"] < 1  # the default job is SFA k=8 of 32


def test_unwrap_reaches_the_model_under_torch_compile():
    from training.distributed import unwrap

    m = build_model("gpt2_tiny", "dense", n_layer=1, vocab_size=97, max_seq_len=16)
    compiled = torch.compile(m)
    assert unwrap(compiled) is m and unwrap(m) is m
    assert [n for n, _ in unwrap(compiled).named_parameters()] == [n for n, _ in m.named_parameters()]
