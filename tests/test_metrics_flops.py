"""FLOP formulas against hand counts and brute-force enumeration; MFU, peaks, memory."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from sfa.flops import (
    attention_forward_flops_per_token,
    mean_keys_per_query,
    score_dim,
    training_flops_per_token,
)
from training.device_peaks import bf16_peak_flops, detect_peak_flops
from training.metrics import flops_per_token, matmul_params, mfu, peak_memory_bytes


def count_attention_flops_by_loop(n_layer, n_head, seq_len, qk_dim, v_dim):
    """Multiply-adds of a naive causal attention, counted one loop iteration at a time."""
    flops = 0
    for _layer, _head, i in itertools.product(range(n_layer), range(n_head), range(seq_len)):
        for _j in range(i + 1):  # causal: keys 0..i
            flops += 2 * qk_dim  # q_i . k_j
            flops += 2 * v_dim  # p_ij * v_j accumulated into the output
    return flops / seq_len  # per token


@pytest.mark.parametrize("seq_len", [1, 3, 8])
def test_dense_attention_flops_match_a_counted_loop(seq_len):
    got = attention_forward_flops_per_token(n_layer=2, n_head=3, head_dim=4, v_head_dim=5, seq_len=seq_len)
    assert got == pytest.approx(count_attention_flops_by_loop(2, 3, seq_len, 4, 5))


def test_hand_count_gpt2_small_dense_attention():
    # 12 layers x 12 heads x (2*64 + 2*64) FLOPs per key x (1024+1)/2 keys per query
    got = attention_forward_flops_per_token(n_layer=12, n_head=12, head_dim=64, v_head_dim=64, seq_len=1024)
    assert got == 12 * 12 * 256 * 512.5


def test_expected_overlap_matches_enumeration_of_all_supports():
    d, kq, kk = 6, 2, 3
    overlaps = [len(set(a) & set(b)) for a in itertools.combinations(range(d), kq) for b in itertools.combinations(range(d), kk)]
    assert Fraction(sum(overlaps), len(overlaps)) == Fraction(kq * kk, d)
    assert score_dim(d, kq, kk) == kq * kk / d


def test_sfa_scales_only_the_score_term():
    dense = attention_forward_flops_per_token(n_layer=1, n_head=1, head_dim=64, v_head_dim=64, seq_len=7)
    sfa = attention_forward_flops_per_token(n_layer=1, n_head=1, head_dim=64, v_head_dim=64, seq_len=7, topk_q=8, topk_k=8)
    keys = mean_keys_per_query(7)
    assert dense - sfa == pytest.approx(2 * (64 - 8 * 8 / 64) * keys)
    full = attention_forward_flops_per_token(n_layer=1, n_head=1, head_dim=64, v_head_dim=64, seq_len=7, topk_q=64, topk_k=64)
    assert full == dense  # top-k = D is dense


def test_non_causal_and_bad_arguments():
    assert mean_keys_per_query(10, causal=False) == 10
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        mean_keys_per_query(0)
    with pytest.raises(ValueError, match=r"topk_q=9 must be in \[1, head_dim=8\]"):
        score_dim(8, 9, 2)
    with pytest.raises(ValueError, match="give both topk_q and topk_k or neither"):
        score_dim(8, 2, None)
    with pytest.raises(ValueError, match="matmul_params must be >= 0"):
        training_flops_per_token(-1, 0.0)


def test_training_is_three_forwards():
    assert training_flops_per_token(1000, 500.0) == 3 * (2 * 1000 + 500.0)


def test_matmul_params_of_gpt2_by_hand():
    from models import build_model

    model = build_model("gpt2_tiny", None, n_layer=2)
    d, v = model.config.d_model, model.config.vocab_size
    per_block = 3 * d * d + d * d + 2 * 4 * d * d  # qkv, out proj, MLP up and down
    assert matmul_params(model) == 2 * per_block + v * d  # the tied LM head is a matmul too


def test_model_flops_sfa_vs_dense_equivalent():
    from models import build_model

    seq = 128
    sfa_model = build_model("gpt2_tiny", {"kind": "sfa", "topk_q": 8}, n_layer=2)
    dense_model = build_model("gpt2_tiny", None, n_layer=2)
    s, d = flops_per_token(sfa_model, seq), flops_per_token(dense_model, seq)
    assert d["flops_per_token"] == d["dense_equiv_flops_per_token"]
    assert s["dense_equiv_flops_per_token"] == d["flops_per_token"]
    saved = 3 * 2 * 4 * (64 - 1) * (seq + 1) / 2 * 2  # 3x, 2 layers, 4 heads, (D - k^2/D) dims, mean keys, 2 FLOPs
    assert d["flops_per_token"] - s["flops_per_token"] == pytest.approx(saved)


def test_short_baseline_counts_its_narrow_scores():
    from models import build_model

    short = build_model("gpt2_tiny", {"kind": "short", "d_short": 32}, n_layer=1)
    f = flops_per_token(short, 64)
    attn = attention_forward_flops_per_token(n_layer=1, n_head=4, head_dim=32, v_head_dim=64, seq_len=64)
    assert f["flops_per_token"] == training_flops_per_token(matmul_params(short), attn)
    assert f["flops_per_token"] == f["dense_equiv_flops_per_token"]


def test_mfu():
    assert mfu(1e9, 1e5, None) is None
    assert mfu(1e9, 1e5, 1e15) == pytest.approx(0.1)
    assert mfu(1e9, float("nan"), 1e15) is None


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_table(name, peak):
    assert bf16_peak_flops(name) == peak


def _proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (the kernel's own counters, in kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="the oracle is Linux's /proc/self/status")
def test_cpu_has_no_peak_and_reports_the_peak_rss_in_bytes():
    cpu = torch.device("cpu")
    assert detect_peak_flops(cpu) == ("cpu", None)
    mib = 2**20
    # The kernel's high-water mark of the resident set (VmHWM) is an independent record of the same peak:
    # a unit slip (KiB for bytes) or another counter (children, current RSS) misses it by far more than 8 MiB.
    assert abs(peak_memory_bytes(cpu) - _proc_status_bytes("VmHWM")) < 8 * mib
    # Grow the resident set 64 MiB past the old peak: the reported peak must follow...
    before = peak_memory_bytes(cpu)
    grow = before - _proc_status_bytes("VmRSS") + 64 * mib
    big = torch.ones(grow // 4)  # written, so resident
    grown = peak_memory_bytes(cpu)
    assert grown >= before + 48 * mib
    del big  # a large block goes back to the OS at once
    # ...and stay when the memory is given back (a peak, not the current RSS).
    assert _proc_status_bytes("VmRSS") < grown - 32 * mib
    assert peak_memory_bytes(cpu) >= grown
