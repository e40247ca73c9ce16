"""The short-embedding baseline: Q and K projected to d_short per head, V and the output unchanged,
softmax scale 1/sqrt(d_short)."""

import math

import pytest
import torch

from models import AttentionConfig, build_model

SHORT = {"kind": "short", "d_short": 8}


def test_gpt2_short_projects_only_q_and_k_narrower():
    dense = build_model("gpt2_tiny", n_layer=1, d_model=64, n_head=4, vocab_size=50, max_seq_len=16)
    short = build_model("gpt2_tiny", SHORT, n_layer=1, d_model=64, n_head=4, vocab_size=50, max_seq_len=16)
    attn = short.transformer.h[0].attn
    assert attn.c_attn.out_features == 4 * 8 + 4 * 8 + 4 * 16
    assert attn.c_proj.in_features == 4 * 16
    # q and k lose (16 - 8) columns per head each, weights and biases.
    assert dense.num_params() - short.num_params() == 2 * 4 * (16 - 8) * (64 + 1)


def test_qwen3_short_narrows_q_k_and_their_norms_and_rope():
    m = build_model("qwen3_tiny", SHORT, n_layer=1, vocab_size=50, max_seq_len=16)
    attn = m.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features) == (4 * 8, 2 * 8)
    assert (attn.v_proj.out_features, attn.o_proj.in_features) == (2 * 64, 4 * 64)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (8,)
    assert m.rotary.inv_freq.shape == (4,)


@pytest.mark.parametrize("preset", ["gpt2_tiny", "qwen3_tiny"])
def test_short_attention_scores_with_scale_one_over_sqrt_d_short(preset):
    m = build_model(preset, SHORT, n_layer=1, vocab_size=50, max_seq_len=16).eval()
    seen = {}
    import models.gpt2 as gpt2_module
    import models.qwen3 as qwen3_module

    module = gpt2_module if preset == "gpt2_tiny" else qwen3_module
    original = module.attend

    def spy(q, k, v, config, **kw):
        out = original(q, k, v, config, **kw)
        seen.update(q=q, k=k, v=v, out=out)
        return out

    module.attend = spy
    try:
        m(torch.randint(0, 50, (2, 6)))
    finally:
        module.attend = original
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert q.shape[-1] == k.shape[-1] == 8 and v.shape[-1] == 64
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(seen["out"], scores.softmax(-1) @ v)


def test_short_cache_and_accounting_use_d_short_for_keys():
    m = build_model("qwen3_tiny", SHORT, n_layer=3, vocab_size=50, max_seq_len=16)
    assert m.kv_cache_bytes_per_token(torch.bfloat16) == 3 * 2 * (8 + 64) * 2
    assert m.attention_flops_dims()["head_dim"] == 8 and m.attention_flops_dims()["v_head_dim"] == 64


def test_d_short_must_fit_the_head():
    with pytest.raises(ValueError, match=r"attention.d_short=65 must be an int in \[1, head_dim=64\]"):
        AttentionConfig(kind="short", d_short=65).resolved(64)
    with pytest.raises(ValueError, match="attention.d_short is only meaningful for kind='short', not 'sfa'"):
        AttentionConfig(kind="sfa", topk_q=4, d_short=8).resolved(64)
