"""The static-cache decode engine (models/decoding.py) on CPU: a shape-static step gives the logits of the
full forward, greedy generation equals the uncached recompute for every family x attention kind (incl.
decoupled RoPE and its shared rotary key, chunked prefill, HF-loaded weights), the step traces into one graph (no host sync), the
last-position-only logits, batched eos checks, and the refusal of a cache that does not fit."""

import pytest
import torch

from model_helpers import TINY_ATTENTIONS, TINY_MODELS
from models import build_model, generate
from models.decoding import Decoder, cache_bytes
from models.sampling import Sampler

KINDS = {
    **TINY_ATTENTIONS,
    "sfa-decoupled": {"kind": "sfa", "topk_q": 3, "rope": "decoupled", "rope_dims": 4},
    "dense-decoupled": {"kind": "dense", "rope": "decoupled", "rope_dims": 4},
    "sfa-decoupled-shared": {"kind": "sfa", "topk_q": 3, "rope": "decoupled", "rope_dims": 4, "rope_shared": True},
    "dense-decoupled-shared": {"kind": "dense", "rope": "decoupled", "rope_dims": 4, "rope_shared": True},
}
CASES = [(f, k) for f in TINY_MODELS for k in KINDS if f == "qwen3" or "decoupled" not in k]  # GPT-2 has no RoPE


def model(family, kind):
    preset, overrides = TINY_MODELS[family]
    m = build_model(preset, KINDS[kind], **overrides).eval()
    with torch.no_grad():  # no near-ties in greedy decoding at a random init
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("family, kind", CASES)
def test_static_steps_give_the_logits_of_the_full_forward(family, kind):
    """Prefill, then steps at a device-side position over the whole (partly empty) cache: two tokens at
    once (their causal order inside the step), then one at a time."""
    m = model(family, kind)
    x = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        full, _ = m(x)
        cache = m.new_cache(2, 20)
        rows = [m(x[:, :5], cache=cache, logits_to_keep=1)[0]]
        position = torch.tensor([5])
        rows.append(m(x[:, 5:7], cache=cache, position=position)[0])
        position += 2
        for t in range(7, 13):
            rows.append(m(x[:, t : t + 1], cache=cache, position=position)[0])
            position += 1
    torch.testing.assert_close(torch.cat(rows, dim=1), full[:, 4:])
    assert cache.length == 5  # the static steps leave the host-side length alone


@pytest.mark.parametrize("prefill_chunk", [None, 2, 3])
@pytest.mark.parametrize("family, kind", CASES)
def test_greedy_equals_uncached_recompute(family, kind, prefill_chunk):
    m = model(family, kind)
    prompt = torch.randint(0, 97, (2, 7))
    cached = generate(m, prompt, 12, prefill_chunk=prefill_chunk)
    assert cached.shape == (2, 19) and torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, generate(m, prompt, 12, use_cache=False))


@pytest.mark.parametrize("make", ["gpt2", "qwen3"])
def test_hf_loaded_model_generates_as_transformers_does(make):
    from test_hf_interop import hf_gpt2, hf_qwen3

    from models import from_hf

    hf = {"gpt2": hf_gpt2, "qwen3": hf_qwen3}[make]()
    ours = from_hf(hf).eval()
    prompt = torch.randint(0, 101, (2, 5))
    theirs = hf.generate(prompt, max_new_tokens=9, do_sample=False, min_new_tokens=9, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 9, prefill_chunk=2), theirs)


def test_the_step_traces_into_one_graph_and_decodes_the_same():
    """fullgraph=True fails on any graph break, e.g. a tensor read on the host (.item(), bool()): the step
    really is device-only. aot_eager keeps it cheap on CPU; the GPU test compiles with inductor."""
    m = model("qwen3", "sfa-decoupled")
    prompt = torch.randint(0, 97, (2, 5))
    torch._dynamo.reset()
    decoder = Decoder(m, 2, 17, mode="compile", compile_options={"backend": "aot_eager", "fullgraph": True})
    with torch.no_grad():
        assert torch.equal(decoder.run(prompt, 12), generate(m, prompt, 12))
    torch._dynamo.reset()
    sampled = Decoder(m, 2, 17, mode="compile", sampler=Sampler(temperature=0.9, top_p=0.8, top_k=20),
                      compile_options={"backend": "aot_eager", "fullgraph": True})
    with torch.no_grad():
        assert sampled.run(prompt, 12).shape == (2, 17)


def test_logits_to_keep_returns_the_last_rows():
    m = model("qwen3", "sfa")
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full, _ = m(x)
        torch.testing.assert_close(m(x, logits_to_keep=1)[0], full[:, -1:])
        torch.testing.assert_close(m(x, logits_to_keep=3)[0], full[:, -3:])
    with pytest.raises(ValueError, match="logits_to_keep cannot be combined with targets"):
        m(x, x, logits_to_keep=1)
    with pytest.raises(ValueError, match=r"logits_to_keep must be an int >= 0 \(0 = every position\), got -1"):
        m(x, logits_to_keep=-1)


def test_bad_positions_are_named():
    m = model("gpt2", "dense")
    x = torch.randint(0, 97, (1, 1))
    with pytest.raises(ValueError, match="position is the write position in a KV cache: pass cache= as well"):
        m(x, position=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"position must be an int64 tensor of shape \(1,\), got \(\) torch.int64"):
        m(x, cache=m.new_cache(1, 4), position=torch.tensor(0))


def test_batched_eos_checks_give_the_same_tokens_as_checking_every_step():
    m = model("gpt2", "sfa")
    prompt = torch.randint(0, 97, (2, 3))
    free = generate(m, prompt, 20)
    eos = int(free[1, 6])  # row 1 produces it at its fourth step
    every = generate(m, prompt, 20, eos_token_id=eos, eos_check_every=1)
    batched = generate(m, prompt, 20, eos_token_id=eos, eos_check_every=16)
    assert torch.equal(every, batched)
    for row in range(2):  # each row as produced freely up to its first eos, then eos
        hits = (free[row, 3:] == eos).nonzero()
        if len(hits):
            first = 3 + hits[0].item()
            assert torch.equal(batched[row, : first + 1], free[row, : first + 1])
            assert (batched[row, first:] == eos).all()
    # Every row done at the fourth step: the result stops there although the host looks only every 16 steps.
    same = prompt[1:].expand(2, 3)
    stopped = generate(m, same, 20, eos_token_id=eos, eos_check_every=16)
    first = 3 + (free[1, 3:] == eos).nonzero()[0].item()
    assert torch.equal(stopped, free[1:, : first + 1].expand(2, -1))


def test_a_cache_that_does_not_fit_is_refused_before_allocating(monkeypatch):
    import models.decoding as decoding

    m = model("qwen3", "sfa")
    need = cache_bytes(m, 4, 40)
    assert need == m.kv_cache_bytes_per_token(torch.float32) * 4 * 40
    monkeypatch.setattr(decoding, "available_bytes", lambda device: need - 1)
    allocated = []
    monkeypatch.setattr(type(m), "new_cache", lambda *a, **k: allocated.append(1))
    with pytest.raises(ValueError, match=rf"the KV cache needs 0.00 GiB \(4 sequences x 40 positions x "
                                         rf"{m.kv_cache_bytes_per_token(torch.float32)} bytes per token\) but cpu has"):
        Decoder(m, 4, 40)
    assert not allocated
    monkeypatch.setattr(decoding, "available_bytes", lambda device: need)
    Decoder(m, 4, 40)
    assert allocated


def test_decoder_steps_by_hand_and_checks_its_inputs():
    m = model("qwen3", "dense")
    prompt = torch.randint(0, 97, (2, 4))
    decoder = Decoder(m, 2, 10)
    with torch.no_grad():
        decoder.prefill(prompt, chunk=3)
        for _ in range(5):
            decoder.step()
    assert decoder.position.tolist() == [9]
    # against the uncached path (a full forward per token), not generate(), which runs this same Decoder
    assert torch.equal(decoder.tokens[:, :10], generate(m, prompt, 6, use_cache=False))
    with pytest.raises(ValueError, match="already prefilled"):
        decoder.prefill(prompt)
    with pytest.raises(ValueError, match=r"prompts \(3, 4\) need batch 2 and at most 9 positions"):
        Decoder(m, 2, 10).prefill(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mode='graph' captures CUDA graphs; the model is on cpu"):
        Decoder(m, 2, 10, mode="graph")
    with pytest.raises(ValueError, match="prefill_chunk must be a positive int, got 0"):
        generate(m, prompt, 3, prefill_chunk=0)
