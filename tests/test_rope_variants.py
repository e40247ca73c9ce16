"""The rope and scale axes of the attention config (models/attention.py): decoupled RoPE (the first
rope_dims dims of each q/k head rotary and dense, top-k over the rest), no RoPE, 1/sqrt(k) and learned
temperatures. Library level: `dense_dims` in topk_sparsify / sfa_attention / the cache, every backend
against an fp64 oracle written out independently; model level: where RoPE goes, generation with the
decoupled compressed cache, bytes per token, config errors, HF refusals."""

import math

import pytest
import torch

import sfa
from models import AttentionConfig, build_model, from_hf, generate, to_hf
from models.attention import LogitScale
from models.qwen3 import RotaryEmbedding, apply_rope
from sfa.cache import KVCache, kv_cache_bytes_per_token
from sfa.flops import score_dim
from sfa.kernels.decode import decode_into
from sfa.reference import attention_math

QWEN = dict(n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=64, intermediate_size=96, vocab_size=97,
            max_seq_len=40)
GPT2 = dict(n_layer=2, n_head=4, d_model=64, vocab_size=97, max_seq_len=40)
DECOUPLED = dict(kind="sfa", topk_q=3, rope="decoupled", rope_dims=4)


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def oracle(q, k, v, topk, dense_dims, *, causal=True, scale=None):
    """fp64 decoupled SFA written from the definition: the leading dims kept, the top-k of the others (ties in
    |x|, frequent in fp16, to the lower column: a stable descending sort), a score = dense dot + masked dot."""
    q, k, v = q.double(), k.double(), v.double()

    def mask(x):
        tail = x[..., dense_dims:]
        first_k = tail.abs().sort(dim=-1, descending=True, stable=True).indices[..., :topk]
        keep = torch.zeros_like(tail).scatter(-1, first_k, 1.0)
        return torch.cat([x[..., :dense_dims], tail * keep], dim=-1)

    d = q.shape[-1]
    return attention_math(mask(q), mask(k), v, causal=causal, scale=scale if scale is not None else 1 / math.sqrt(d))


# --- the library: dense_dims --------------------------------------------------------------------------
def test_decoupled_code_keeps_the_leading_dims_and_selects_among_the_rest():
    x = torch.randn(3, 5, 16, requires_grad=True)
    code = sfa.topk_sparsify(x, 3, dense_dims=4)
    assert code.dense_dims == 4 and code.k == 3 and code.dim == 16
    assert code.indices.dtype == torch.uint8 and (code.indices >= 4).all()
    tail = x.detach()[..., 4:]
    expected_tail_idx = tail.abs().topk(3, dim=-1).indices.sort(dim=-1).values + 4
    assert torch.equal(code.indices.long(), expected_tail_idx)
    dense = code.to_dense()
    assert torch.equal(dense[..., :4], x.detach()[..., :4])
    assert (dense[..., 4:] != 0).sum(-1).eq(3).all()
    assert torch.equal(code.mask(), dense != 0)
    assert code.nbytes() == 3 * 5 * (3 * 4 + 3 * 1 + 4 * 4)  # fp32 values, uint8 indices, fp32 dense part
    dense.sum().backward()  # straight through: gradient at the kept coordinates only
    assert torch.equal(x.grad, code.mask().float())


def test_decoupled_code_errors_name_the_argument():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"dense_dims=8 must be an int in \[0, 7\]"):
        sfa.topk_sparsify(x, 1, dense_dims=8)
    with pytest.raises(ValueError, match=r"k=5 must be in \[1, 4\].*dense_dims=4"):
        sfa.topk_sparsify(x, 5, dense_dims=4)
    with pytest.raises(ValueError, match=r"dense_dims=3 but a SparseCode input keeps \[2\]"):
        code = sfa.topk_sparsify(torch.randn(1, 1, 4, 8), 2, dense_dims=2)
        sfa.sfa_attention(torch.randn(1, 1, 4, 8), code, torch.randn(1, 1, 4, 8), topk_q=2, dense_dims=3)
    with pytest.raises(ValueError, match=r"topk_q=7 must be in \[1, D - dense_dims = 8 - 2\]"):
        q = torch.randn(1, 1, 4, 8)
        sfa.sfa_attention(q, q, q, topk_q=7, dense_dims=2)


@pytest.mark.parametrize("backend", ["reference", "masked", "flash"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_training_backend_matches_the_fp64_oracle_forward_and_backward(backend, causal, dtype):
    b, hq, hkv, n, d, dv, topk, dd = 2, 4, 2, 19, 32, 16, 4, 8  # GQA 2, odd length, Dv != D
    q = torch.randn(b, hq, n, d).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, n, d).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, n, dv).to(dtype).requires_grad_()
    out = sfa.sfa_attention(q, k, v, topk_q=topk, causal=causal, backend=backend, dense_dims=dd)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(q64, k64, v64, topk, dd, causal=causal)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_err(out, ref) < tol
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, want) < 10 * tol
    # dq only at kept coordinates: the leading dims always, elsewhere the selected ones
    kept = sfa.topk_sparsify(q.detach(), topk, dense_dims=dd).mask()
    assert (q.grad[~kept] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_q, hq, hkv", [(1, 4, 2), (3, 2, 2), (2, 8, 1)])
def test_decode_kernel_adds_the_dense_part_of_a_cached_decoupled_code(dtype, n_q, hq, hkv):
    b, n_keys, d, dv, topk, dd = 2, 41, 32, 32, 4, 8
    keys = torch.randn(b, hkv, n_keys, d).to(dtype)
    v = torch.randn(b, hkv, n_keys, dv).to(dtype)
    cache = KVCache(1, b, n_keys + 5, hkv, d, dv, topk=topk, dtype=dtype, dense_dims=dd)  # strided views
    code, v_cached = cache[0].append(keys, v)
    assert code.dense_dims == dd and code.dense.stride(-2) == dd and code.dense.shape[-2] == n_keys
    q = torch.randn(b, hq, n_q, d).to(dtype)
    out = sfa.sfa_attention(q, code, v_cached, topk_q=topk, backend="decode")
    ref = oracle(q, keys, v, topk, dd)
    assert rel_err(out, ref) < (2e-5 if dtype == torch.float32 else 2e-3)
    # The kernel itself reads the dense part: without it the scores (and the result) change.
    q_masked = sfa.topk_mask(q, topk, dense_dims=dd)
    alone = torch.empty_like(out)
    decode_into(q_masked, code.values, code.indices, v_cached, alone, scale=1 / math.sqrt(d), causal=True)
    assert rel_err(alone, ref) > 1e-2


def test_sqrt_k_scale_is_one_over_the_kept_coordinates():
    att = AttentionConfig(**DECOUPLED, scale="sqrt_k").resolved(16)
    assert att.score_scale() == pytest.approx(1 / math.sqrt(4 + 3))
    assert AttentionConfig(kind="sfa", topk_q=3).resolved(16).score_scale() is None  # library default 1/sqrt(D)


def test_cache_bytes_and_flops_count_the_dense_part():
    # per KV head and token: 2 * rope_dims + 3k + 2 Dv bytes (bf16 values, uint8 indices)
    assert kv_cache_bytes_per_token(1, 1, 128, 128, topk=16, dense_dims=32) == 2 * 32 + 3 * 16 + 2 * 128
    assert kv_cache_bytes_per_token(1, 1, 128, 128, topk=16) == 3 * 16 + 2 * 128
    cache = KVCache(3, 2, 10, 2, 16, 16, topk=3, dtype=torch.bfloat16, dense_dims=4)
    assert cache.nbytes() == cache.bytes_per_token() * 2 * 10
    assert score_dim(128, 16, 16, dense_dims=32) == 32 + 16 * 16 / 96
    with pytest.raises(ValueError, match="dense_dims applies to the SFA cache only"):
        kv_cache_bytes_per_token(1, 1, 16, 16, dense_dims=4)


# --- the models -------------------------------------------------------------------------------------
def test_partial_rope_rotates_only_the_leading_dims_and_keeps_relative_positions():
    rope = RotaryEmbedding(4, theta=1e4)
    x = torch.randn(2, 1, 9, 12)
    cos, sin = rope(0, 9, x.dtype)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    full = RotaryEmbedding(4, theta=1e4)
    assert torch.allclose(y[..., :4], apply_rope(x[..., :4], *full(0, 9, x.dtype)))
    # The rotary part's dot product depends on the offset of the two positions only.
    q, k = torch.randn(4), torch.randn(4)
    c, s = rope(0, 20, torch.float32)

    def dot(m, n):
        return (apply_rope(q, c[m], s[m]) * apply_rope(k, c[n], s[n])).sum()

    assert torch.allclose(dot(7, 3), dot(15, 11), atol=1e-5) and not torch.allclose(dot(7, 3), dot(7, 2), atol=1e-3)
    # the table is cached and grows; slices of it equal a fresh computation
    c_long, _ = rope(30, 34, torch.float32)
    assert torch.allclose(c_long, RotaryEmbedding(4, 1e4)(0, 34, torch.float32)[0][30:34])


def test_qwen3_rope_layouts_put_rotation_where_the_config_says():
    ids = torch.randint(0, 97, (1, 12))
    for rope, rotary in (("full", 16), ("decoupled", 4), ("none", 0)):
        extra = {"rope_dims": 4} if rope == "decoupled" else {}
        m = build_model("qwen3_tiny", {"kind": "dense", "rope": rope, **extra}, **QWEN)
        assert (m.rotary.inv_freq.numel() * 2 if m.rotary is not None else 0) == rotary
        m(ids)  # runs
    # No RoPE: one attention layer sees its keys as a set, so the last position's output is invariant to
    # permuting the tokens before it (with more layers the earlier positions' own prefixes would change).
    m = build_model("qwen3_tiny", {"kind": "dense", "rope": "none"}, **{**QWEN, "n_layer": 1}).eval()
    perm = torch.cat([torch.randperm(11), torch.tensor([11])])
    a, _ = m(ids)
    b, _ = m(ids[:, perm])
    assert torch.allclose(a[0, -1], b[0, -1], atol=1e-5)
    full = build_model("qwen3_tiny", "dense", **{**QWEN, "n_layer": 1}).eval()
    full.load_state_dict(m.state_dict())
    assert not torch.allclose(full(ids)[0][0, -1], full(ids[:, perm])[0][0, -1], atol=1e-3)


@pytest.mark.parametrize("attention", [
    DECOUPLED,
    {"kind": "dense", "rope": "decoupled", "rope_dims": 4},
    {"kind": "sfa", "topk_q": 3, "rope": "none"},
    {"kind": "sfa", "topk_q": 3, "scale": "sqrt_k", "rope": "decoupled", "rope_dims": 6},
    {"kind": "sfa", "topk_q": 3, "scale": "learned"},
])
def test_cached_generation_equals_uncached_recompute(attention):
    m = build_model("qwen3_tiny", attention, **QWEN).eval()
    with torch.no_grad():
        for p in m.parameters():  # no ties in greedy decoding at a random init
            p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 97, (2, 5))
    cached = generate(m, ids, 12)
    uncached = generate(m, ids, 12, use_cache=False)
    assert torch.equal(cached, uncached)
    # and the cached logits equal a full recompute's at every generated position
    cache = m.new_cache(2, 17)
    step_logits = [m(cached[:, :5], cache=cache)[0][:, -1]]
    for t in range(5, 16):
        step_logits.append(m(cached[:, t : t + 1], cache=cache)[0][:, -1])
    full, _ = m(cached[:, :16])
    assert torch.allclose(torch.stack(step_logits, 1), full[:, 4:16], atol=1e-4, rtol=1e-4)
    assert cache.nbytes() == m.kv_cache_bytes_per_token(torch.float32) * 2 * 17


def test_decoupled_model_cache_stores_the_rotary_part_dense():
    m = build_model("qwen3_tiny", {"kind": "sfa", "topk_q": 3, "rope": "decoupled", "rope_dims": 4}, **QWEN)
    cache = m.new_cache(1, 8, dtype=torch.bfloat16)
    assert cache.dense_dims == 4 and cache[0].key_dense.shape == (1, 2, 8, 4)
    per_layer_head = 2 * 4 + 3 * 3 + 2 * 16
    assert m.kv_cache_bytes_per_token() == 2 * 2 * per_layer_head


def test_learned_scale_starts_at_the_paper_scale_and_learns():
    base = build_model("qwen3_tiny", {"kind": "sfa", "topk_q": 3}, **QWEN)
    learned = build_model("qwen3_tiny", {"kind": "sfa", "topk_q": 3, "scale": "learned"}, **QWEN)
    missing, unexpected = learned.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("logit_scale.log_gain") for name in missing) and missing
    ids = torch.randint(0, 97, (2, 10))
    assert torch.equal(base(ids)[0], learned(ids)[0])
    _, loss = learned(ids, targets=ids)
    loss.backward()
    gains = [mod.log_gain for mod in learned.modules() if isinstance(mod, LogitScale)]
    assert len(gains) == 2 and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gains)
    # A head's temperature multiplies its q, so every score of that head, and no other head's.
    q = torch.randn(1, 4, 6, 16)
    scale = LogitScale(4)
    assert torch.equal(scale(q), q)
    with torch.no_grad():
        scale.log_gain[1] = math.log(2.0)
    scaled = scale(q)
    assert torch.allclose(scaled[:, 1], 2 * q[:, 1]) and torch.equal(scaled[:, [0, 2, 3]], q[:, [0, 2, 3]])
    gpt = build_model("gpt2_tiny", {"kind": "dense", "scale": "learned"}, **GPT2)
    assert any(isinstance(mod, LogitScale) for mod in gpt.modules())


@pytest.mark.parametrize("attention, message", [
    ({"kind": "sfa", "topk_q": 3, "rope": "decoupled"}, r"attention.rope_dims=None must be an even int in \[2, 15\]"),
    ({"kind": "sfa", "topk_q": 3, "rope": "decoupled", "rope_dims": 5}, "rope_dims=5 must be an even int"),
    ({"kind": "sfa", "topk_q": 13, "rope": "decoupled", "rope_dims": 4}, r"topk_q=13 must be an int in \[1, head_dim - rope_dims = 12\]"),
    ({"kind": "sfa", "topk_q": 3, "rope_dims": 4}, "rope_dims=4 needs attention.rope=decoupled"),
    ({"kind": "sfa", "topk_q": 3, "rope": "partial"}, "attention.rope='partial' is unknown; choose one of full, decoupled, none"),
    ({"kind": "sfa", "topk_q": 3, "rope": "none", "feature_map": True}, "feature_map=True is the paper's remedy for full RoPE"),
    ({"kind": "dense", "scale": "sqrt_k"}, "scale=sqrt_k needs attention.kind=sfa"),
    ({"kind": "sfa", "topk_q": 3, "scale": "1/k"}, "attention.scale='1/k' is unknown"),
])
def test_bad_variants_fail_with_the_key_named(attention, message):
    with pytest.raises(ValueError, match=message):
        build_model("qwen3_tiny", attention, **QWEN)


def test_gpt2_has_no_rope_to_decouple():
    with pytest.raises(ValueError, match="learned absolute positions, not RoPE"):
        build_model("gpt2_tiny", DECOUPLED, **GPT2)
    build_model("gpt2_tiny", {"kind": "sfa", "topk_q": 3, "scale": "sqrt_k"}, **GPT2)  # scale applies


def test_hf_refuses_layouts_it_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="to_hf: attention.rope=decoupled has no HF Qwen3 equivalent"):
        to_hf(build_model("qwen3_tiny", DECOUPLED, **QWEN))
    with pytest.raises(ValueError, match="to_hf: attention.scale=learned has no HF equivalent"):
        to_hf(build_model("qwen3_tiny", {"kind": "dense", "scale": "learned"}, **QWEN))
    hf = to_hf(build_model("qwen3_tiny", "dense", **QWEN))
    with pytest.raises(ValueError, match="from_hf: HF weights were trained with RoPE on every q/k dim"):
        from_hf(hf, {"kind": "sfa", "topk_q": 3, "rope": "none"})
    m = from_hf(hf, {"kind": "dense", "scale": "learned"})  # a unit temperature: the HF function exactly
    ids = torch.randint(0, 97, (1, 7))
    assert torch.allclose(m(ids)[0], hf(ids).logits, atol=1e-5)


def test_hydra_config_names_the_variant_and_passes_the_checks():
    from test_configs import resolved

    from training.run_config import ConfigError, check_config

    cfg = resolved(["model=qwen3_tiny", "attention=sfa", "attention.k=16", "attention.rope=decoupled",
                    "attention.rope_dims=16", "attention.scale=sqrt_k"])
    assert cfg["attention"]["tag"] == "sfa-q16k16-rope16-sqrtk"
    plan = check_config(cfg, world_size=1)
    assert plan.attention.dense_dims == 16 and plan.attention.score_scale() == pytest.approx(1 / math.sqrt(32))
    assert resolved(["attention=dense", "attention.rope=none"])["attention"]["tag"] == "dense-nope"
    with pytest.raises(ConfigError, match="learned absolute positions"):
        check_config(resolved(["attention.rope=decoupled", "attention.rope_dims=16"]), world_size=1)


# --- GPU (scripts/gpu_tests.sh): bf16 kernels at Qwen3 shapes against the fp64 oracle ------------------
GPU_TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2}  # as tests/test_kernels_masked.py and _decode.py


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["masked", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, hq, hkv, n, d, topk, dd", [(2, 16, 8, 1031, 128, 16, 32), (1, 12, 6, 777, 64, 8, 16)])
def test_gpu_training_backends_decoupled(backend, dtype, b, hq, hkv, n, d, topk, dd):
    q = torch.randn(b, hq, n, d, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(b, hkv, n, d, device="cuda").to(dtype).requires_grad_()
    v = torch.randn(b, hkv, n, d, device="cuda").to(dtype).requires_grad_()
    out = sfa.sfa_attention(q, k, v, topk_q=topk, backend=backend, dense_dims=dd)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle(q64, k64, v64, topk, dd)
    assert rel_err(out, ref) < GPU_TOL[dtype]
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, want) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, hq, hkv, n_q, n_keys, d, topk, dd", [(2, 16, 8, 1, 20011, 128, 16, 32),
                                                                   (1, 32, 4, 4, 9000, 128, 16, 16),
                                                                   (3, 8, 8, 2, 777, 64, 8, 16)])
def test_gpu_decode_decoupled(dtype, b, hq, hkv, n_q, n_keys, d, topk, dd):
    keys = torch.randn(b, hkv, n_keys, d, device="cuda").to(dtype)
    v = torch.randn(b, hkv, n_keys, d, device="cuda").to(dtype)
    cache = KVCache(1, b, n_keys + 9, hkv, d, d, topk=topk, dtype=dtype, device="cuda", dense_dims=dd)
    code, v_cached = cache[0].append(keys, v)
    q = torch.randn(b, hq, n_q, d, device="cuda").to(dtype)
    out = sfa.sfa_attention(q, code, v_cached, topk_q=topk)  # auto picks decode for a code
    assert rel_err(out, oracle(q, keys, v, topk, dd)) < GPU_TOL[dtype]
