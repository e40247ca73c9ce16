"""attention.rope_shared: decoupled RoPE whose rotary key is one projection per token shared by every KV head
(DeepSeek MLA's). The q/k a Qwen3 layer hands to attention against a hand-written reference, the training
backends agreeing on it, the bytes (the shared part once per token and layer), the compressed cache storing
it once and the decode kernel reading it through a stride-0 view, config errors and HF refusals. Greedy
generation against the uncached recompute is in tests/test_decoding.py's table."""

import pytest
import torch

import sfa
from models import build_model, from_hf, to_hf
from sfa.cache import KVCache, kv_cache_bytes_per_token
from test_rope_variants import oracle, rel_err

QWEN = dict(n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=64, intermediate_size=96, vocab_size=97,
            max_seq_len=40)
SHARED = dict(kind="sfa", topk_q=3, rope="decoupled", rope_dims=4, rope_shared=True)
DENSE_SHARED = dict(kind="dense", rope="decoupled", rope_dims=4, rope_shared=True)


def attention_inputs(model, x, monkeypatch):
    """q, k, v (and the attention config) as layer 0 hands them to models.attention.attend."""
    import models.qwen3 as qwen3

    seen, original = [], qwen3.attend

    def spy(q, k, v, config, **kw):
        seen.append((q, k, v, config))
        return original(q, k, v, config, **kw)

    monkeypatch.setattr(qwen3, "attend", spy)
    model(x)
    return seen[0]


def rms(t, weight, eps):
    return t / (t.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight


def rope(t, theta):
    """RoPE over all of t's last dim (t is (B, T, H, r)), written out: pairs (i, i + r/2) rotated by
    pos * theta^(-2i/r)."""
    r, n = t.shape[-1], t.shape[-3]
    angle = (torch.arange(float(n))[:, None] * theta ** (-torch.arange(0, r, 2.0) / r))[:, None]
    a, b = t[..., : r // 2], t[..., r // 2 :]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)


@pytest.mark.parametrize("attention", [SHARED, DENSE_SHARED])
def test_layer_hands_attention_one_rotary_key_for_every_head_and_split_norms(attention, monkeypatch):
    m = build_model("qwen3_tiny", attention, **QWEN)
    attn = m.model.layers[0].self_attn
    with torch.no_grad():  # norm weights away from 1, so a wrong or shared norm weight shows
        for norm in (attn.q_norm, attn.k_norm):
            for part in (norm.rotary, norm.content):
                part.weight.copy_(1 + 0.5 * torch.randn_like(part.weight))
    assert attn.k_rope_proj.weight.shape == (4, 64) and attn.k_proj.weight.shape == (2 * 12, 64)
    x = torch.randint(0, 97, (1, 7))
    q, k, v, config = attention_inputs(m, x, monkeypatch)

    h = m.model.layers[0].input_layernorm(m.model.embed_tokens(x)).detach()
    eps, theta = m.config.rms_norm_eps, m.config.rope_theta
    with torch.no_grad():
        q_raw = (h @ attn.q_proj.weight.T).view(1, 7, 4, 16)
        q_ref = torch.cat([rope(rms(q_raw[..., :4], attn.q_norm.rotary.weight, eps), theta),
                           rms(q_raw[..., 4:], attn.q_norm.content.weight, eps)], dim=-1)
        shared = rope(rms((h @ attn.k_rope_proj.weight.T)[:, :, None], attn.k_norm.rotary.weight, eps), theta)
        content = rms((h @ attn.k_proj.weight.T).view(1, 7, 2, 12), attn.k_norm.content.weight, eps)
        k_ref = torch.cat([shared.expand(-1, -1, 2, -1), content], dim=-1)
    torch.testing.assert_close(q, q_ref.transpose(1, 2))
    torch.testing.assert_close(k, k_ref.transpose(1, 2))
    assert torch.equal(k[:, 0, :, :4], k[:, 1, :, :4])  # exactly one key per token: a cache can store it once
    assert config.dense_dims == (4 if attention["kind"] == "sfa" else 0)


def test_training_backends_agree_on_the_shared_layout():
    """Loss and every gradient of the shared layout through the reference, masked and flash backends (the
    kernels interpreted on CPU): attend's decoupled path serves it unchanged."""
    torch.manual_seed(0)
    x = torch.randint(0, 97, (2, 9))
    results = {}
    for backend in ("reference", "masked", "flash"):
        torch.manual_seed(1)
        m = build_model("qwen3_tiny", {**SHARED, "backend": backend}, **QWEN)
        _, loss = m(x, targets=x)
        loss.backward()
        results[backend] = loss.detach(), {n: p.grad for n, p in m.named_parameters()}
    ref_loss, ref_grads = results["reference"]
    assert ref_grads["model.layers.0.self_attn.k_rope_proj.weight"].abs().sum() > 0
    for backend in ("masked", "flash"):
        loss, grads = results[backend]
        torch.testing.assert_close(loss, ref_loss)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, msg=f"{backend}: {name}")


# --- bytes --------------------------------------------------------------------------------------
def test_bytes_count_the_shared_part_once_per_layer():
    # the study shape (3 KV heads, D = Dv = 128), bf16: 2r + Hkv (3k + 2Dv) per token and layer
    assert kv_cache_bytes_per_token(1, 3, 128, 128, topk=16, dense_dims=32, shared_dense=True) == 64 + 3 * 304 == 976
    assert kv_cache_bytes_per_token(1, 3, 128, 128, topk=16, dense_dims=64, shared_dense=True) == 128 + 3 * 304
    assert kv_cache_bytes_per_token(1, 3, 128, 128, topk=16, dense_dims=32) == 3 * (64 + 304)  # per head
    assert kv_cache_bytes_per_token(2, 3, 128, 128, topk=16, dense_dims=32, shared_dense=True, dtype=torch.float32) \
        == 2 * (4 * 32 + 3 * (16 * 5 + 4 * 128))
    with pytest.raises(ValueError, match="shared_dense=True needs dense_dims > 0"):
        kv_cache_bytes_per_token(1, 3, 128, 128, topk=16, shared_dense=True)


@pytest.mark.parametrize("attention, per_layer", [
    (SHARED, 2 * 4 + 2 * (3 * 3 + 2 * 16)),  # the rotary part once, the code and values per KV head
    (DENSE_SHARED, 2 * 2 * (16 + 16)),  # the dense kind keeps a plain per-head cache
])
def test_model_bytes_are_what_its_cache_allocates(attention, per_layer):
    m = build_model("qwen3_tiny", attention, **QWEN)
    assert m.kv_cache_bytes_per_token() == 2 * per_layer
    for dtype in (torch.bfloat16, torch.float32):
        cache = m.new_cache(3, 7, dtype=dtype)
        assert cache.nbytes() == m.kv_cache_bytes_per_token(dtype) * 3 * 7 == cache.bytes_per_token() * 3 * 7
    if attention["kind"] == "sfa":
        assert cache[0].key_dense.shape == (3, 1, 7, 4)
    else:
        assert cache[0].keys.shape == (3, 2, 7, 16)


# --- the cache ----------------------------------------------------------------------------------
def shared_keys(b, hkv, n, d, dd, dtype=torch.float32):
    keys = torch.randn(b, hkv, n, d).to(dtype)
    keys[..., :dd] = torch.randn(b, 1, n, dd).to(dtype)  # the same leading dims in every head
    return keys


def test_cache_stores_the_shared_part_once_and_gives_it_back_to_every_head():
    b, hkv, d, dv, topk, dd = 2, 3, 16, 8, 3, 4
    keys, v = shared_keys(b, hkv, 9, d, dd), torch.randn(b, hkv, 9, dv)
    expected = sfa.topk_sparsify(keys, topk, dense_dims=dd).to_dense()
    appended = KVCache(1, b, 12, hkv, d, dv, topk=topk, dtype=torch.float32, dense_dims=dd, shared_dense=True)[0]
    appended.append(keys[:, :, :5], v[:, :, :5])
    code, values = appended.append(keys[:, :, 5:], v[:, :, 5:])
    written = KVCache(1, b, 12, hkv, d, dv, topk=topk, dtype=torch.float32, dense_dims=dd, shared_dense=True)[0]
    written.write(keys[:, :, :6], v[:, :, :6], torch.arange(6))
    code_w, _ = written.write(keys[:, :, 6:], v[:, :, 6:], torch.arange(6, 9))
    assert appended.key_dense.shape == (b, 1, 12, dd)
    assert code.dense.shape == (b, hkv, 9, dd) and code.dense.stride(1) == 0  # one copy, read by every head
    assert torch.equal(code.to_dense(), expected) and torch.equal(values, v)
    assert torch.equal(code_w.to_dense()[:, :, :9], expected)


@pytest.mark.parametrize("n_q, hq", [(1, 6), (2, 3)])
def test_decode_kernel_reads_the_shared_part_through_a_stride_zero_view(n_q, hq):
    b, hkv, n_keys, d, dv, topk, dd = 2, 3, 21, 32, 16, 4, 8
    keys, v = shared_keys(b, hkv, n_keys, d, dd), torch.randn(b, hkv, n_keys, dv)
    cache = KVCache(1, b, n_keys + 3, hkv, d, dv, topk=topk, dtype=torch.float32, dense_dims=dd, shared_dense=True)
    code, v_cached = cache[0].append(keys, v)
    q = torch.randn(b, hq, n_q, d)
    out = sfa.sfa_attention(q, code, v_cached, topk_q=topk, backend="decode")
    assert rel_err(out, oracle(q, keys, v, topk, dd)) < 2e-5


def test_model_refuses_a_cache_of_the_other_layout():
    shared = build_model("qwen3_tiny", SHARED, **QWEN)
    per_head = build_model("qwen3_tiny", {k: v for k, v in SHARED.items() if k != "rope_shared"}, **QWEN)
    x = torch.randint(0, 97, (1, 3))
    with pytest.raises(ValueError, match=r"shared_dense=False\) does not fit .* shared_dense=True\)"):
        shared(x, cache=per_head.new_cache(1, 8))


# --- config errors and HF -----------------------------------------------------------------------
@pytest.mark.parametrize("attention, message", [
    ({"kind": "sfa", "topk_q": 3, "rope_shared": True}, r"attention.rope_shared=True needs attention.rope=decoupled \(got full\)"),
    ({"kind": "dense", "rope": "none", "rope_shared": True}, r"rope_shared=True needs attention.rope=decoupled \(got none\)"),
    ({"kind": "short", "d_short": 8, "rope": "decoupled", "rope_dims": 4, "rope_shared": True},
     "attention.rope_shared=True applies to kind=dense or sfa"),
    ({**SHARED, "rope_shared": "yes"}, "attention.rope_shared='yes' must be true or false"),
])
def test_bad_rope_shared_fails_naming_what_was_typed(attention, message):
    with pytest.raises(ValueError, match=message):
        build_model("qwen3_tiny", attention, **QWEN)


def test_hydra_names_the_shared_variant_and_checks_it():
    from test_configs import resolved

    from training.run_config import ConfigError, check_config

    cfg = resolved(["model=qwen3_tiny", "attention=sfa", "attention.k=16", "attention.rope=decoupled",
                    "attention.rope_dims=32", "attention.rope_shared=true"])
    assert cfg["attention"]["tag"] == "sfa-q16k16-rope32s"
    assert check_config(cfg, world_size=1).attention.shared_dense
    assert resolved(["attention=dense", "attention.rope=decoupled", "attention.rope_dims=32"])["attention"]["tag"] \
        == "dense-rope32"
    with pytest.raises(ConfigError, match=r"attention.rope_shared=True needs attention.rope=decoupled \(got full\)"):
        check_config(resolved(["model=qwen3_tiny", "attention=sfa", "attention.rope_shared=true"]), world_size=1)


def test_hf_refuses_the_shared_layout():
    with pytest.raises(ValueError, match="to_hf: attention.rope_shared=True"):
        to_hf(build_model("qwen3_tiny", SHARED, **QWEN))
    hf = to_hf(build_model("qwen3_tiny", "dense", **QWEN))
    with pytest.raises(ValueError, match="from_hf: attention.rope_shared=True"):
        from_hf(hf, DENSE_SHARED)


# --- GPU (scripts/gpu_tests.sh): the decode kernel over a shared rotary key at Qwen3 shapes, bf16 ---------
@pytest.mark.gpu
@pytest.mark.parametrize("b, hq, hkv, n_q, n_keys, topk, dd", [(2, 6, 3, 1, 20011, 16, 64), (1, 16, 8, 4, 9000, 16, 32)])
def test_gpu_decode_over_a_shared_rotary_key(b, hq, hkv, n_q, n_keys, topk, dd):
    d = 128
    keys = shared_keys(b, hkv, n_keys, d, dd, torch.bfloat16).cuda()
    v = torch.randn(b, hkv, n_keys, d, device="cuda").to(torch.bfloat16)
    cache = KVCache(1, b, n_keys + 9, hkv, d, d, topk=topk, device="cuda", dense_dims=dd, shared_dense=True)
    code, v_cached = cache[0].append(keys, v)
    assert code.dense.stride(1) == 0
    q = torch.randn(b, hq, n_q, d, device="cuda").to(torch.bfloat16)
    out = sfa.sfa_attention(q, code, v_cached, topk_q=topk)  # auto picks decode for a code
    assert rel_err(out, oracle(q, keys, v, topk, dd)) < 1e-2  # bf16, as tests/test_rope_variants.py's GPU_TOL
