"""The models on a GPU in bf16, where `auto` picks the Triton backends (masked for training/prefill,
decode over the compressed cache): results against the fp32 reference backend on the same weights."""

import pytest
import torch

import sfa
from models import build_model, generate

pytestmark = pytest.mark.gpu

SHAPES = {
    "gpt2_tiny": dict(n_layer=2, vocab_size=512, max_seq_len=256),
    "qwen3_tiny": dict(n_layer=2, vocab_size=512, max_seq_len=256),
}


def pair(preset, attention):
    """The same weights as a bf16 model on `auto` and an fp32 model on the reference backend."""
    fast = build_model(preset, {**attention, "backend": "auto"}, **SHAPES[preset]).cuda().eval()
    oracle = build_model(preset, {**attention, "backend": "reference"}, **SHAPES[preset]).cuda().eval()
    oracle.load_state_dict(fast.state_dict())
    return fast.to(torch.bfloat16), oracle


def backends_used(fn):
    used = []
    original = sfa.ops.choose_backend

    def spy(*args, **kw):
        used.append(original(*args, **kw))
        return used[-1]

    sfa.ops.choose_backend = spy
    try:
        fn()
    finally:
        sfa.ops.choose_backend = original
    return used


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("preset", list(SHAPES))
def test_bf16_sfa_training_step_matches_the_fp32_reference(preset):
    fast, oracle = pair(preset, {"kind": "sfa", "topk_q": 8})
    x = torch.randint(0, 512, (2, 200), device="cuda")
    used = backends_used(lambda: fast.train()(x, x)[1].backward())
    assert used and all(b != "reference" for b in used), used
    _, loss_ref = oracle.train()(x, x)
    loss_ref.backward()
    logits_fast, loss_fast = fast(x, x)
    assert abs(loss_fast.item() - loss_ref.item()) < 2e-2 * loss_ref.item()
    embed = "transformer.wte.weight" if preset == "gpt2_tiny" else "model.embed_tokens.weight"
    g_fast = dict(fast.named_parameters())[embed].grad
    g_ref = dict(oracle.named_parameters())[embed].grad
    assert relative_error(g_fast, g_ref) < 5e-2


@pytest.mark.parametrize("preset", list(SHAPES))
def test_decode_over_the_compressed_cache_on_gpu(preset):
    fast, oracle = pair(preset, {"kind": "sfa", "topk_q": 8})
    bf16_reference = build_model(preset, {"kind": "sfa", "topk_q": 8, "backend": "reference"}, **SHAPES[preset])
    bf16_reference.load_state_dict(oracle.state_dict())
    bf16_reference = bf16_reference.cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, 512, (3, 150), device="cuda")

    def decode(model):
        cache = model.new_cache(3, 150)
        assert cache[0].key_values.dtype == torch.bfloat16 and cache[0].key_indices.dtype == torch.uint8
        model(x[:, :130], cache=cache)
        return torch.cat([model(x[:, t : t + 1], cache=cache)[0] for t in range(130, 150)], dim=1)

    with torch.no_grad():
        steps = []
        used = backends_used(lambda: steps.append(decode(fast)))
        assert "decode" in used, used
        expected = oracle(x)[0][:, 130:]
        bf16_error = relative_error(bf16_reference(x)[0][:, 130:], expected)  # what bf16 itself costs
        assert relative_error(steps[0], decode(bf16_reference)) < 3e-2
        assert relative_error(steps[0], expected) < 1.2 * bf16_error + 1e-2


def test_generate_on_gpu_runs_for_every_kind():
    for attention in ({"kind": "dense"}, {"kind": "sfa", "topk_q": 8}, {"kind": "short", "d_short": 32}):
        m = build_model("qwen3_tiny", attention, **SHAPES["qwen3_tiny"]).cuda().to(torch.bfloat16).eval()
        out = generate(m, torch.randint(0, 512, (2, 16), device="cuda"), 32)
        assert out.shape == (2, 48) and out.device.type == "cuda"
