"""HF transformers interop, offline on tiny random models built here: logit parity with
GPT2LMHeadModel / Qwen3ForCausalLM, save/load both ways, and "sfa" as an HF attention implementation."""

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from models import build_model, from_hf, generate, to_hf
from models.hf import register_sfa_attention


def hf_gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=40, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_qwen3(tie=True, **kw):
    cfg = transformers.Qwen3Config(
        vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=40, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so the parity test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(n=11, batch=2):
    return torch.randint(0, 101, (batch, n))


@pytest.mark.parametrize("make", [hf_gpt2, hf_qwen3, lambda: hf_qwen3(tie=False)], ids=["gpt2", "qwen3", "qwen3-untied"])
def test_dense_logits_equal_transformers(make):
    hf = make()
    ours = from_hf(hf).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], hf(x).logits)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("make", [hf_gpt2, hf_qwen3], ids=["gpt2", "qwen3"])
def test_from_a_save_pretrained_directory_and_back(make, tmp_path):
    hf = make()
    hf.save_pretrained(tmp_path / "hf")
    ours = from_hf(tmp_path / "hf").eval()
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(ours(x)[0], expected)
        exported = to_hf(ours)
        torch.testing.assert_close(exported(x).logits, expected)
    exported.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected)


def test_to_hf_of_a_freshly_built_model():
    ours = build_model("qwen3_tiny", n_layer=2, vocab_size=101, max_seq_len=40).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(to_hf(ours)(x).logits, ours(x)[0])


def test_sfa_is_registered_for_attention_and_mask():
    register_sfa_attention()  # idempotent
    assert "sfa" in AttentionInterface._global_mapping
    # Without this second registration transformers 5 builds no causal mask at all for "sfa".
    assert "sfa" in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("make", [hf_qwen3, hf_gpt2], ids=["qwen3", "gpt2"])
def test_hf_model_running_sfa_equals_ours(make):
    hf = make()
    hf.config.sfa_topk = 5
    hf.set_attn_implementation("sfa")
    assert hf.config._attn_implementation == "sfa"
    ours = from_hf(make_copy(hf), attention={"kind": "sfa", "topk_q": 5}).eval()
    dense = from_hf(hf, attention="dense").eval()
    x = tokens()
    with torch.no_grad():
        hf_logits = hf(x).logits
        torch.testing.assert_close(hf_logits, ours(x)[0])
        assert (hf_logits - dense(x)[0]).abs().max() > 1e-3  # SFA really ran
        # Causal: changing the last tokens leaves earlier logits alone (the mask is not silently None).
        y = x.clone()
        y[:, -3:] = (y[:, -3:] + 1) % 101
        torch.testing.assert_close(hf(y).logits[:, :-3], hf_logits[:, :-3])


def make_copy(hf):
    copy = type(hf)(hf.config)
    copy.load_state_dict(hf.state_dict())
    return copy.eval()


def test_sfa_model_exports_running_sfa_and_survives_save(tmp_path):
    ours = from_hf(hf_qwen3(), attention={"kind": "sfa", "topk_q": 4, "topk_k": 6}).eval()
    exported = to_hf(ours)
    assert exported.config._attn_implementation == "sfa"
    assert (exported.config.sfa_topk, exported.config.sfa_topk_k) == (4, 6)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, ours(x)[0])
    exported.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sfa").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ours(x)[0])


def test_hf_generate_with_sfa_matches_ours():
    ours = from_hf(hf_qwen3(), attention={"kind": "sfa", "topk_q": 6}).eval()
    hf = to_hf(ours)
    prompt = tokens(5, batch=1)
    mine = generate(ours, prompt, 8)
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(theirs, mine)


@pytest.mark.parametrize("make", [hf_qwen3, hf_gpt2], ids=["qwen3", "gpt2"])
def test_hf_generate_with_sfa_and_a_static_cache_matches_ours(make):
    """A StaticCache's prefill gets mask None with more (empty) cache slots than queries: HF means SDPA's
    top-left causal alignment there, not sfa_attention's bottom-right one."""
    from transformers import StaticCache

    ours = from_hf(make(), attention={"kind": "sfa", "topk_q": 6}).eval()
    hf = to_hf(ours)
    prompt = tokens(6, batch=2)
    mine = generate(ours, prompt, 8)
    cache = StaticCache(config=hf.config, max_cache_len=20)
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt), past_key_values=cache)
    assert torch.equal(theirs, mine)


def test_hf_sfa_with_a_padding_mask_uses_the_masked_reference():
    hf = hf_qwen3()
    hf.config.sfa_topk = 4
    hf.set_attn_implementation("sfa")
    x = tokens(7, batch=2)
    mask = torch.ones_like(x)
    with torch.no_grad():
        unpadded = hf(x).logits
        torch.testing.assert_close(hf(x, attention_mask=mask).logits, unpadded)
        mask[1, :2] = 0  # left padding in row 1: row 0 unchanged, row 1's real tokens see only themselves
        padded = hf(x, attention_mask=mask).logits
        torch.testing.assert_close(padded[0], unpadded[0])
        alone = hf(x[1:, 2:], position_ids=torch.arange(2, 7)[None]).logits
        torch.testing.assert_close(padded[1, 2:], alone[0])


def test_sfa_without_topk_in_the_config_is_an_error():
    hf = hf_qwen3()
    hf.set_attn_implementation("sfa")
    with pytest.raises(ValueError, match='attn_implementation "sfa" needs config.sfa_topk'):
        hf(tokens())


def test_interop_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory .* does not exist"):
        from_hf(tmp_path / "missing")
    with pytest.raises(TypeError, match="expected a directory path or a transformers model, got int"):
        from_hf(3)
    with pytest.raises(ValueError, match="short-embedding baseline has narrower q/k projections"):
        from_hf(hf_gpt2(), attention={"kind": "short", "d_short": 8})
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        from_hf(transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=10, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)))
    short = build_model("gpt2_tiny", {"kind": "short", "d_short": 8}, n_layer=1, vocab_size=50, max_seq_len=16)
    with pytest.raises(ValueError, match="short-embedding baseline .* has no HF equivalent"):
        to_hf(short)
    mapped = build_model("qwen3_tiny", {"kind": "sfa", "topk_q": 4, "feature_map": True}, n_layer=1, vocab_size=50)
    with pytest.raises(ValueError, match="feature_map adds weights HF Qwen3 has no place for"):
        to_hf(mapped)
    swept = build_model("gpt2_tiny", n_layer=1, head_dim=32, vocab_size=50, max_seq_len=16)
    with pytest.raises(ValueError, match="HF GPT-2 needs d_model == n_head \\* head_dim"):
        to_hf(swept)


def test_from_hf_keeps_the_checkpoint_dtype():
    hf = hf_gpt2().to(torch.bfloat16)
    assert next(from_hf(hf).parameters()).dtype == torch.bfloat16


def test_an_sfa_export_does_not_reload_as_dense(tmp_path, monkeypatch):
    ours = from_hf(hf_gpt2(), attention={"kind": "sfa", "topk_q": 4}).eval()
    to_hf(ours).save_pretrained(tmp_path)
    x = tokens()
    with torch.no_grad():
        expected = ours(x)[0]
        # No attn_implementation argument: the config.json written by to_hf asks for "sfa" itself.
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert reloaded.config._attn_implementation == "sfa"
        torch.testing.assert_close(reloaded(x).logits, expected)
        back = from_hf(tmp_path).eval()  # our loader defaults to what the HF model runs
        assert (back.attention.kind, back.attention.topk_q) == ("sfa", 4)
        torch.testing.assert_close(back(x)[0], expected)
    # In a process that never imported models.hf, transformers refuses rather than running dense.
    monkeypatch.delitem(AttentionInterface._global_mapping, "sfa")
    with pytest.raises(ValueError, match='attn_implementation="sfa"` is not supported'):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
