"""Which backend `auto` picks, case by case. The expected picks were recorded from the rule as it stood
before the backends declared their own capabilities; the registry (sfa/backends.py) must reproduce every
one of them.

CUDA inputs are stand-ins carrying only shape, dtype and device (the rule reads nothing else of a dense
tensor), so the CUDA picks are checked on any machine; SparseCode keys are real codes, whose device the
rule does not read (v's device is the call's device: sfa_attention checks that q, k, v share one).
"""

from types import SimpleNamespace

import pytest
import torch

import sfa
from sfa import backends, ops

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def on(device: str, shape, dtype=BF16):
    return SimpleNamespace(shape=torch.Size(shape), dtype=dtype, device=torch.device(device))


def code(shape, k=16, dtype=BF16, dense_dims=0):
    """A SparseCode cache of keys (B, Hkv, L, D): what decode reads."""
    return sfa.topk_sparsify(torch.randn(shape).to(dtype), k, dense_dims)


# (name, q, k, v, expected). Shapes are (B, H, N, D); GQA when q has more heads than k.
CASES = [
    # Off CUDA only the reference is picked (the interpreter is for tests, far too slow to choose).
    ("cpu fp32 training", on("cpu", (2, 4, 64, 64), F32), on("cpu", (2, 4, 64, 64), F32), on("cpu", (2, 4, 64, 64), F32), "reference"),
    ("cpu bf16 decode over a code", on("cpu", (1, 8, 1, 128)), code((1, 2, 50, 128)), on("cpu", (1, 2, 50, 128)), "reference"),
    ("mps training", on("mps", (1, 4, 64, 64)), on("mps", (1, 4, 64, 64)), on("mps", (1, 4, 64, 64)), "reference"),
    # Training and prefill on CUDA: masked, in every kernel dtype and head dim up to 256.
    ("cuda bf16 MHA training", on("cuda", (2, 8, 4096, 128)), on("cuda", (2, 8, 4096, 128)), on("cuda", (2, 8, 4096, 128)), "masked"),
    ("cuda bf16 GQA training", on("cuda", (2, 8, 4096, 128)), on("cuda", (2, 2, 4096, 128)), on("cuda", (2, 2, 4096, 128)), "masked"),
    ("cuda fp16 training", on("cuda", (1, 4, 512, 64), F16), on("cuda", (1, 4, 512, 64), F16), on("cuda", (1, 4, 512, 64), F16), "masked"),
    ("cuda fp32 training", on("cuda", (1, 4, 512, 64), F32), on("cuda", (1, 4, 512, 64), F32), on("cuda", (1, 4, 512, 64), F32), "masked"),
    ("cuda D=16", on("cuda", (1, 4, 256, 16)), on("cuda", (1, 4, 256, 16)), on("cuda", (1, 4, 256, 16)), "masked"),
    ("cuda D=48 (no flash tile)", on("cuda", (1, 4, 256, 48)), on("cuda", (1, 4, 256, 48)), on("cuda", (1, 4, 256, 48)), "masked"),
    ("cuda D=256", on("cuda", (1, 4, 256, 256)), on("cuda", (1, 4, 256, 256)), on("cuda", (1, 4, 256, 256)), "masked"),
    ("cuda Dv != D", on("cuda", (1, 4, 256, 64)), on("cuda", (1, 4, 256, 64)), on("cuda", (1, 4, 256, 128)), "masked"),
    ("cuda one query, dense keys", on("cuda", (1, 8, 1, 128)), on("cuda", (1, 2, 300, 128)), on("cuda", (1, 2, 300, 128)), "masked"),
    ("cuda codes for q and k, prefill", code((1, 4, 300, 64), 8), code((1, 4, 300, 64), 8), on("cuda", (1, 4, 300, 64)), "masked"),
    # Outside the kernels' dtypes or head dims: the reference (never an error).
    ("cuda fp64", on("cuda", (1, 8, 64, 64), F64), on("cuda", (1, 8, 64, 64), F64), on("cuda", (1, 8, 64, 64), F64), "reference"),
    ("cuda D=257", on("cuda", (1, 4, 64, 257)), on("cuda", (1, 4, 64, 257)), on("cuda", (1, 4, 64, 257)), "reference"),
    ("cuda D=512 over a code", on("cuda", (1, 8, 1, 512)), code((1, 2, 50, 512)), on("cuda", (1, 2, 50, 512)), "reference"),
    ("cuda fp64 code", on("cuda", (1, 8, 1, 64), F64), code((1, 2, 50, 64), 8, F64), on("cuda", (1, 2, 50, 64), F64), "reference"),
    # Decode: keys given as a SparseCode (the compressed cache) and at most 64 query rows per KV head.
    ("cuda GQA 4 x 1 query over a code", on("cuda", (1, 8, 1, 128)), code((1, 2, 50, 128)), on("cuda", (1, 2, 50, 128)), "decode"),
    ("cuda GQA 4 x 16 queries (64 rows)", on("cuda", (1, 8, 16, 128)), code((1, 2, 50, 128)), on("cuda", (1, 2, 50, 128)), "decode"),
    ("cuda GQA 4 x 17 queries (68 rows)", on("cuda", (1, 8, 17, 128)), code((1, 2, 50, 128)), on("cuda", (1, 2, 50, 128)), "masked"),
    ("cuda MHA 64 queries over a code", on("cuda", (2, 4, 64, 64)), code((2, 4, 80, 64), 8), on("cuda", (2, 4, 80, 64)), "decode"),
    ("cuda MHA 65 queries over a code", on("cuda", (2, 4, 65, 64)), code((2, 4, 80, 64), 8), on("cuda", (2, 4, 80, 64)), "masked"),
    ("cuda fp32 decode", on("cuda", (1, 8, 1, 64), F32), code((1, 2, 50, 64), 8, F32), on("cuda", (1, 2, 50, 64), F32), "decode"),
    ("cuda fp16 decode, Dv != D", on("cuda", (1, 4, 1, 64), F16), code((1, 4, 50, 64), 8, F16), on("cuda", (1, 4, 50, 32), F16), "decode"),
    ("cuda decoupled code (dense_dims 32)", on("cuda", (1, 8, 1, 128)), code((1, 2, 50, 128), 16, BF16, 32),
     on("cuda", (1, 2, 50, 128)), "decode"),
    ("cuda D=256 over a code", on("cuda", (1, 8, 1, 256)), code((1, 2, 50, 256), 32), on("cuda", (1, 2, 50, 256)), "decode"),
]


@pytest.mark.parametrize("q, k, v, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_auto_picks(q, k, v, expected):
    dense_dims = k.dense_dims if isinstance(k, sfa.SparseCode) else 0  # what sfa_attention resolves and passes
    assert ops.choose_backend(q, k, v, dense_dims=dense_dims) == expected


def test_the_registry_decides(monkeypatch):
    """auto walks the registry: a backend registered with a higher priority wins where its capabilities
    fit and nowhere else; one registered without a priority is never picked."""
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    backends.register_backend("wide_only", lambda *a, **kw: None, backends.Capabilities(devices=("cuda",), head_dims=(512,)),
                              priority=100)
    backends.register_backend("unranked", lambda *a, **kw: None)
    wide = on("cuda", (1, 4, 64, 512))
    assert ops.choose_backend(wide, wide, wide) == "wide_only"
    narrow = on("cuda", (1, 4, 64, 64))
    assert ops.choose_backend(narrow, narrow, narrow) == "masked"
    cpu = on("cpu", (1, 4, 64, 64))
    assert ops.choose_backend(cpu, cpu, cpu) == "reference"
    assert {"wide_only", "unranked"} <= set(sfa.available_backends())


def test_a_backend_without_decoupled_rows_is_skipped_for_them(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    backends.register_backend("plain_rows", lambda *a, **kw: None, backends.Capabilities(dense_dims=False), priority=100)
    q = on("cuda", (1, 4, 64, 64))
    assert ops.choose_backend(q, q, q, dense_dims=0) == "plain_rows"
    assert ops.choose_backend(q, q, q, dense_dims=16) == "masked"


def test_a_call_with_kv_length_goes_only_to_backends_that_take_it(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    backends.register_backend("no_length", lambda *a, **kw: None, backends.Capabilities(), priority=100)
    q = on("cpu", (1, 4, 8, 64))
    assert ops.choose_backend(q, q, q) == "no_length"
    assert ops.choose_backend(q, q, q, kv_length=True) == "reference"
    real = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="backend 'no_length' does not take kv_length; use one of"):
        sfa.sfa_attention(real, real, real, topk_q=2, backend="no_length", kv_length=torch.tensor([3]))


def test_auto_is_not_a_backend_name():
    with pytest.raises(ValueError, match="'auto' is the rule"):
        sfa.register_backend("auto", lambda *a, **kw: None)


def test_every_pick_is_a_registered_backend():
    assert {c[-1] for c in CASES} <= set(sfa.available_backends())


def test_auto_on_cpu_runs_the_reference():
    q, k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    assert torch.equal(
        sfa.sfa_attention(q, k, v, topk_q=4),
        sfa.sfa_attention_reference(q, k, v, topk_q=4, topk_k=4, causal=True),
    )


@pytest.mark.gpu
def test_gpu_auto_picks_decode_for_a_cache_and_masked_for_prefill():
    q = torch.randn(1, 8, 1, 128, device="cuda", dtype=BF16)
    cache = sfa.topk_sparsify(torch.randn(1, 2, 300, 128, device="cuda", dtype=BF16), 16)
    v = torch.randn(1, 2, 300, 128, device="cuda", dtype=BF16)
    assert ops.choose_backend(q, cache, v) == "decode"
    q_long = torch.randn(1, 8, 300, 128, device="cuda", dtype=BF16)
    assert ops.choose_backend(q_long, cache.to_dense(), v) == "masked"
