"""The split-KV dense decode kernel (sfa.kernels.decode.dense_decode_attention) vs an fp64 reference: GQA
groups 1/2/3/8, T = 1..8 queries causal and not, odd lengths and head dims (D = 48, 24; Dv != D), a static
cache's per-sequence and shared valid lengths over poisoned free capacity, strided cache views, poisoned
outputs, the engine's choice of it, and its clear refusals."""

import math

import pytest
import torch

from models.attention import StaticStep, static_dense_attention, static_dense_sdpa
from sfa.kernels.decode import dense_decode_attention, dense_decode_into, dense_decode_refusal
from sfa.reference import dense_attention

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def reference(q, k, v, causal, kv_length=None):
    """fp64 attention of the inputs as the kernel sees them (already rounded to their dtype)."""
    return dense_attention(q.double(), k.double(), v.double(), causal=causal, kv_length=kv_length)


def cache_views(b, hkv, n_keys, d, dv, dtype, device="cpu", free=7):
    """K and V as `[:, :, :L]` views of preallocated buffers whose free tail holds NaN (as sfa/cache.py passes
    them): a key or value read past L would poison the output."""
    k_buf = torch.full((b, hkv, n_keys + free, d), float("nan"), device=device, dtype=dtype)
    v_buf = torch.full((b, hkv, n_keys + free, dv), float("nan"), device=device, dtype=dtype)
    k_buf[:, :, :n_keys] = torch.randn(b, hkv, n_keys, d, device=device).to(dtype)
    v_buf[:, :, :n_keys] = torch.randn(b, hkv, n_keys, dv, device=device).to(dtype)
    return k_buf[:, :, :n_keys], v_buf[:, :, :n_keys]


CASES = [  # b, hq, hkv, n_q, n_keys, d, dv, causal
    (2, 4, 2, 1, 37, 32, 32, True),  # GQA 2, one query, L not a multiple of the 16-key block
    (1, 6, 2, 3, 50, 48, 40, True),  # GQA 3 (rows 9 -> 16), D = 48 (the short baseline's), Dv != D
    (2, 3, 3, 2, 33, 16, 16, False),  # no GQA, not causal
    (1, 8, 1, 1, 45, 64, 32, True),  # MQA (group 8)
    (1, 4, 4, 8, 29, 48, 48, True),  # eight causal queries
    (1, 6, 2, 5, 41, 24, 64, False),  # GQA 3 x 5 queries = 15 rows, D = 24, not causal
    (1, 2, 1, 4, 23, 32, 32, True),  # GQA 2 x 4 causal queries
    (1, 2, 2, 1, 30, 32, 32, True),  # one row per program (zero-padded to 16 for both dots)
    (1, 4, 2, 2, 27, 8, 16, True),  # D = 8 < the 16 a dot needs (the tiny models' short baseline)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_the_fp64_reference(dtype, case):
    b, hq, hkv, n_q, n_keys, d, dv, causal = case
    k, v = cache_views(b, hkv, n_keys, d, dv, dtype)
    q = torch.randn(b, hq, n_q, d).to(dtype)
    out = torch.full((b, hq, n_q, dv), float("nan"), dtype=dtype)
    dense_decode_into(q, k, v, out, scale=1 / math.sqrt(d), causal=causal)
    assert not out.isnan().any(), "some output elements were never written (or a NaN past L was read)"
    assert rel_err(out, reference(q, k, v, causal)) < TOL[dtype]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_q", [1, 3])
def test_per_sequence_valid_lengths_read_only_the_valid_keys(n_q, causal):
    """A static cache of capacity 70 (several splits of 32 keys in the interpreter) holding 5, 40 and 17 keys;
    the free capacity is NaN, so a key or value read past its sequence's length shows in the output."""
    b, hq, hkv, cap, d = 3, 6, 2, 70, 48
    lengths = torch.tensor([5, 40, 17])
    k, v = torch.randn(b, hkv, cap, d), torch.randn(b, hkv, cap, d)
    for i, n in enumerate(lengths.tolist()):
        k[i, :, n:], v[i, :, n:] = float("nan"), float("nan")
    q = torch.randn(b, hq, n_q, d)
    out = dense_decode_attention(q, k, v, causal=causal, kv_length=lengths)
    assert not out.isnan().any()
    for i, n in enumerate(lengths.tolist()):
        ref = reference(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], causal)
        assert rel_err(out[i : i + 1], ref) < TOL[torch.float32], f"sequence {i} ({n} keys)"


@pytest.mark.parametrize("n_q", [1, 4])
def test_a_shared_valid_length_is_the_static_steps_mask(n_q):
    """kv_length of shape (1,) (what the engine passes) over a NaN-poisoned tail, fp16, against both the fp64
    reference and the masked SDPA the engine falls back to (static_dense_sdpa with StaticStep's mask)."""
    b, hq, hkv, cap, d, dv = 2, 4, 2, 61, 32, 48
    k, v = cache_views(b, hkv, cap, d, dv, torch.float16, free=0)
    position = torch.tensor([40 - n_q])
    step = StaticStep.at(position, n_q, cap, needs_mask=True)
    k[:, :, 40:], v[:, :, 40:] = float("nan"), float("nan")
    q = torch.randn(b, hq, n_q, d).to(torch.float16)
    out = dense_decode_attention(q, k, v, causal=True, kv_length=step.kv_length)
    ref = reference(q, k[:, :, :40], v[:, :, :40], causal=True)
    assert rel_err(out, ref) < TOL[torch.float16]
    k[:, :, 40:], v[:, :, 40:] = 0, 0  # SDPA multiplies masked NaN values by 0: clean tail for the fallback
    assert rel_err(static_dense_sdpa(q, k, v, step.mask), ref) < TOL[torch.float16]


def test_many_splits_merged_in_several_combine_chunks():
    """150 keys in splits of 32 = 5 splits merged 2 at a time (two full chunks and a partial one); with 3 causal
    queries the last split holds keys some rows cannot see."""
    k, v = torch.randn(1, 2, 150, 32), torch.randn(1, 2, 150, 32)
    q = torch.randn(1, 4, 3, 32)
    out = torch.full((1, 4, 3, 32), float("nan"))
    dense_decode_into(q, k, v, out, scale=0.3, causal=True,
                      config=dict(BLOCK_L=16, PROGRAMS_PER_SM=1, num_warps=4, num_stages=1, COMBINE_BLOCK=2))
    ref = dense_attention(q.double(), k.double(), v.double(), causal=True, scale=0.3)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_batch_and_head_strided_cache_views():
    """A cache whose batch dim is not the outermost (a (L, B, H, D) buffer permuted) and a query that is a
    transposed (B, T, H, D) projection."""
    k = torch.randn(40, 2, 2, 48).permute(1, 2, 0, 3)
    v = torch.randn(40, 2, 2, 32).permute(1, 2, 0, 3)
    q = torch.randn(2, 3, 6, 48).transpose(1, 2)  # (B, Hq = 6, T = 3, D), head stride < token stride
    out = dense_decode_attention(q, k, v, causal=True)
    assert rel_err(out, reference(q, k, v, causal=True)) < TOL[torch.float32]


def test_the_static_step_keeps_the_sdpa_on_cpu():
    """The kernel is chosen on CUDA only (CPU would run it in the interpreter): on CPU the step is the masked
    SDPA, whose tests are tests/test_decoding.py; the GPU side is tests/test_decoding_gpu.py."""
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    step = StaticStep.at(torch.tensor([9]), 1, 20, needs_mask=True)
    assert dense_decode_refusal(q, k, v) is None  # the interpreter would take it
    assert torch.equal(static_dense_attention(q, k, v, step), static_dense_sdpa(q, k, v, step.mask))


@pytest.mark.parametrize(
    "shapes, dtypes, match",
    [
        (((1, 8, 16, 32), (1, 1, 20, 32), (1, 1, 20, 32)), None, r"= 8 x 16 exceeds 64; use sfa.dense.dense_sdpa"),
        (((1, 4, 1, 320), (1, 2, 20, 320), (1, 2, 20, 32)), None, r"D=320, Dv=32 must be <= 256"),
        (((1, 4, 1, 32), (1, 3, 20, 32), (1, 3, 20, 32)), None, r"Hq a multiple of Hkv"),
        (((1, 4, 1, 32), (1, 2, 20, 32), (1, 2, 21, 32)), None, r"do not fit together"),
        (((1, 4, 1, 32), (1, 2, 20, 32), (1, 2, 20, 32)), (torch.float32, torch.float16, torch.float16),
         r"share one dtype .* got torch.float32, torch.float16, torch.float16"),
        (((1, 4, 1, 32), (1, 2, 20, 32), (1, 2, 20, 32)), (torch.float64,) * 3, r"got torch.float64"),
        (((1, 2, 5, 32), (1, 2, 4, 32), (1, 2, 4, 32)), None, r"5 queries but only 4 keys"),
    ],
)
def test_bad_inputs_are_named(shapes, dtypes, match):
    q, k, v = (torch.randn(s, dtype=dt) for s, dt in zip(shapes, dtypes or (torch.float32,) * 3))
    with pytest.raises(ValueError, match="dense_decode_attention: .*" + match):
        dense_decode_attention(q, k, v)


def test_a_bad_kv_length_is_named():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    with pytest.raises(ValueError, match=r"kv_length must be an integer tensor of shape \(2,\) or \(1,\) .* got "
                                         r"torch.float32 \(3,\)"):
        dense_decode_attention(q, k, v, kv_length=torch.tensor([5.0, 6.0, 7.0]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "b,hq,hkv,n_q,n_keys,d,dv,causal",
    [(2, 32, 8, 1, 5003, 128, 128, True), (1, 16, 8, 4, 20011, 128, 128, True), (3, 12, 12, 2, 777, 64, 64, False),
     (1, 16, 8, 1, 9000, 48, 128, True), (2, 8, 2, 8, 3001, 24, 64, True), (1, 64, 8, 8, 4099, 256, 256, True)],
)
def test_gpu_matches_the_fp64_reference(dtype, b, hq, hkv, n_q, n_keys, d, dv, causal):
    """The GPU launch configs (tensor-core dots, pipelined loads, the split plan of 132 SMs) on bench-sized
    inputs: cache views with a NaN tail, per-sequence valid lengths, poisoned outputs."""
    k, v = cache_views(b, hkv, n_keys + 50, d, dv, dtype, device="cuda")
    lengths = torch.randint(n_keys // 2, n_keys + 50, (b,), device="cuda")
    lengths[0] = n_keys + 50
    q = torch.randn(b, hq, n_q, d, device="cuda").to(dtype)
    out = dense_decode_attention(q, k, v, causal=causal, kv_length=lengths)
    assert not out.isnan().any()
    for i, n in enumerate(lengths.tolist()):
        ref = reference(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], causal)
        assert rel_err(out[i : i + 1], ref) < TOL[dtype], f"sequence {i} ({n} keys)"


@pytest.mark.gpu
def test_gpu_static_step_that_needs_gradients_keeps_the_differentiable_sdpa():
    """The kernel has no backward: a static step run with gradients (e.g. a loss through a cached forward) takes
    the masked SDPA, so the gradients arrive; without gradients it takes the kernel, with the same values."""
    q = torch.randn(1, 4, 1, 32, device="cuda", requires_grad=True)
    k, v = torch.randn(1, 2, 40, 32, device="cuda"), torch.randn(1, 2, 40, 32, device="cuda")
    step = StaticStep.at(torch.tensor([29], device="cuda"), 1, 40, needs_mask=True)
    out = static_dense_attention(q, k, v, step)
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with torch.no_grad():
        assert rel_err(static_dense_attention(q, k, v, step), out.detach().double()) < TOL[torch.float32]
