"""The decode engine on a GPU: the CUDA-graph step (and the compiled one) decode exactly what the eager
step and the uncached recompute decode, for every family x attention kind; the step never synchronises
with the host; sampling inside the graph is seeded and honours its filters. Run with scripts/gpu_tests.sh."""

import pytest
import torch

from models import build_model, generate
from models.decoding import Decoder
from models.sampling import Sampler
from test_decoding import CASES, KINDS

pytestmark = pytest.mark.gpu

FAMILIES = {
    "gpt2": ("gpt2_tiny", dict(n_layer=2, vocab_size=512, max_seq_len=4096)),
    "qwen3": ("qwen3_tiny", dict(n_layer=2, vocab_size=512, max_seq_len=4096)),
}


def model(family, kind, dtype, device="cuda"):
    preset, overrides = FAMILIES[family]
    torch.manual_seed(0)
    m = build_model(preset, KINDS[kind], **overrides).to(device).eval()
    with torch.no_grad():  # larger weights than the init: attention and greedy choices far from ties
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(dtype)


@pytest.mark.parametrize("family, kind", CASES)
def test_graph_decoding_equals_eager_bitwise(family, kind):
    """Same kernels, same launches: the replayed graph gives the eager step's tokens exactly (bf16)."""
    m = model(family, kind, torch.bfloat16)
    prompt = torch.randint(0, 512, (3, 300), device="cuda")
    graph = generate(m, prompt, 40, mode="graph", prefill_chunk=128)
    eager = generate(m, prompt, 40, mode="eager", prefill_chunk=128)
    assert torch.equal(graph, eager)


@pytest.mark.parametrize("family, kind", [(f, k) for f, k in CASES if not k.startswith("sfa")])
def test_dense_steps_take_the_split_kv_kernel_and_graphs_replay_it(family, kind, monkeypatch):
    """On CUDA a static dense (or short) step is the split-KV decode kernel, not the masked SDPA over the whole
    capacity (the fallback raises here), and its captured graph decodes the eager step's tokens exactly."""
    import models.attention as seam

    def no_fallback(*args):
        raise AssertionError("the static dense step fell back to the masked SDPA")

    monkeypatch.setattr(seam, "static_dense_sdpa", no_fallback)
    m = model(family, kind, torch.bfloat16)
    prompt = torch.randint(0, 512, (2, 700), device="cuda")
    graph = generate(m, prompt, 40, mode="graph", prefill_chunk=256)
    assert torch.equal(graph, generate(m, prompt, 40, mode="eager", prefill_chunk=256))


@pytest.mark.parametrize("family, kind", CASES)
def test_graph_decoding_equals_the_uncached_recompute(family, kind):
    """fp32, so the recompute (other kernels: masked SFA / flash prefill over all positions) rounds alike; a
    long prompt so the decode kernel's splits past the valid length are exercised (capacity > length)."""
    m = model(family, kind, torch.float32)
    prompt = torch.randint(0, 512, (2, 2500), device="cuda")
    cached = generate(m, prompt, 24, mode="graph", prefill_chunk=1000)
    assert torch.equal(cached, generate(m, prompt, 24, use_cache=False))


def bf16_errors(family, kind, device="cuda"):
    """Relative errors against the fp32 full forward (same weights) of the bf16 full forward and of bf16 static
    steps over a cache of capacity 1024 holding 600-700 positions: (steps' error, full forward's error)."""
    m32 = model(family, kind, torch.float32, device)
    m = model(family, kind, torch.bfloat16, device)
    x = torch.randint(0, 512, (2, 700), device=device)
    with torch.no_grad():
        reference = m32(x)[0][:, 600:].float()
        full = m(x)[0][:, 600:].float()
        cache = m.new_cache(2, 1024)
        m(x[:, :600], cache=cache)
        position = torch.tensor([600], device=device)
        rows = []
        for t in range(600, 700):
            rows.append(m(x[:, t : t + 1], cache=cache, position=position)[0])
            position += 1
    steps = torch.cat(rows, dim=1).float()

    def error(y):
        return ((y - reference).norm() / reference.norm()).item()

    return error(steps), error(full)


@pytest.mark.parametrize("family, kind", [(f, k) for f, k in CASES if not k.startswith("sfa")])
def test_bf16_static_steps_are_as_accurate_as_the_full_forward(family, kind):
    """A static dense step (the split-KV decode kernel on CUDA) in bf16, held to the fp32 forward: it may be off
    by what bf16 costs the full bf16 forward (1-7% here, random weights), not more. Two bf16 runs through
    different kernels differ from each other by their rounding (1% on an H200), so comparing them directly
    with a fixed bound tests rounding, not the kernel.
    A kernel that read past the valid length would let the ~400 empty slots (score 0, value 0) into every
    softmax: several times that error (tests/test_decoding.py checks the exact mask on CPU)."""
    steps, full = bf16_errors(family, kind)
    assert steps < 1.5 * full, f"static steps {steps:.4f} vs the bf16 full forward's {full:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense", "sfa", "sfa-decoupled"])
def test_compiled_decoding_equals_eager(kind):
    torch._dynamo.reset()
    m = model("qwen3", kind, torch.float32)
    prompt = torch.randint(0, 512, (2, 200), device="cuda")
    compiled = Decoder(m, 2, 232, mode="compile")
    with torch.no_grad():
        tokens = compiled.run(prompt, 32)
    assert torch.equal(tokens, generate(m, prompt, 32, mode="eager"))


@pytest.mark.parametrize("kind", ["dense", "sfa"])
def test_the_decode_step_never_synchronises(kind):
    """CUDA's sync debug mode raises on any operation that waits for the device (.item(), a host copy, ...)."""
    m = model("qwen3", kind, torch.bfloat16)
    prompt = torch.randint(0, 512, (2, 64), device="cuda")
    for mode in ("eager", "graph"):
        decoder = Decoder(m, 2, 128, mode=mode, sampler=Sampler(temperature=0.8, top_p=0.9, top_k=50))
        with torch.no_grad():
            decoder.prefill(prompt)
            for _ in range(3):  # warm-up and capture (the capture itself synchronises once)
                decoder.step()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(20):
                    decoder.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert decoder.position.item() == 64 + 23


def test_graph_sampling_is_seeded_and_filtered():
    m = model("qwen3", "sfa", torch.bfloat16)
    prompt = torch.randint(0, 512, (4, 32), device="cuda")

    def sample(seed, **kw):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return generate(m, prompt, 30, temperature=1.0, generator=gen, mode="graph", **kw)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    # top_k=1 leaves one token to draw: the greedy choice, whatever the draw
    assert torch.equal(sample(3, top_k=1), generate(m, prompt, 30, mode="graph"))


def test_a_cache_larger_than_the_gpu_is_refused():
    m = model("qwen3", "dense", torch.bfloat16)
    allocated = torch.cuda.memory_allocated()
    with pytest.raises(ValueError, match=r"the KV cache needs .* GiB \(100000 sequences x 4096 positions"):
        Decoder(m, 100000, 4096)
    assert torch.cuda.memory_allocated() == allocated
