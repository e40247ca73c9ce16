"""Split-KV decode over the compressed cache vs the fp32 reference: GQA, several query tokens, causal
alignment to the last positions, odd cache lengths, cache views with capacity (strided), poisoned outputs."""

import math

import pytest
import torch

import sfa
from sfa.kernels import decode as decode_kernel
from sfa.kernels.decode import GPU_DECODE_CONFIG, GPU_DECODE_CONFIG_WIDE, INTERPRETER_DECODE_CONFIG, decode_into
from sfa.reference import sfa_attention_reference

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def _cache_views(b, hkv, n_keys, d, dv, k, dtype, device="cpu", capacity_extra=7):
    """Codes and V as `[:, :, :L]` views of preallocated buffers, as sfa/cache.py passes them."""
    keys = torch.randn(b, hkv, n_keys, d, device=device).to(dtype)
    code = sfa.topk_sparsify(keys, k)
    cap = n_keys + capacity_extra
    val_buf = torch.randn(b, hkv, cap, k, device=device).to(dtype)
    idx_buf = torch.randint(0, d, (b, hkv, cap, k), device=device, dtype=torch.uint8)
    v_buf = torch.randn(b, hkv, cap, dv, device=device).to(dtype)
    val_buf[:, :, :n_keys] = code.values
    idx_buf[:, :, :n_keys] = code.indices
    v = v_buf[:, :, :n_keys]
    return keys, sfa.SparseCode(val_buf[:, :, :n_keys], idx_buf[:, :, :n_keys], d), v


CASES = [  # b, hq, hkv, n_q, n_keys, d, dv, k, causal
    (2, 4, 2, 1, 37, 32, 32, 4, True),  # GQA 2, k = D/8
    (1, 6, 2, 3, 50, 64, 48, 32, True),  # three queries, k = D/2, Dv != D
    (2, 2, 2, 2, 33, 16, 16, 16, False),  # k = D, not causal
    (1, 8, 1, 1, 45, 32, 32, 1, True),  # MQA, k = 1
    (1, 4, 4, 4, 21, 32, 32, 4, True),  # no GQA, k = 4
    (1, 2, 2, 1, 30, 32, 32, 8, True),  # one row per program (replicated 16x for the dot)
]


def _config(base: dict, gather: str) -> dict | None:
    """The launch of one score gather: "default" = the shipped dispatch (None), "query_rows" / "query_columns" =
    `base` with the gather reading the query rows as they are or transposed, "wide_columns" = the plan for
    >= 16-row programs with the transposed gather."""
    if gather == "default":
        return None
    if gather == "wide_columns":
        return dict(GPU_DECODE_CONFIG_WIDE, QUERY_COLUMNS=True)
    return dict(base, QUERY_COLUMNS=gather == "query_columns")


@pytest.mark.parametrize("query_columns", [False, True])
def test_the_query_columns_option_reaches_the_kernel(monkeypatch, query_columns):
    """Both gathers give the same result, so the reference tests alone would pass with the option ignored."""
    launched = []
    kernel = decode_kernel._decode_split_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["QUERY_COLUMNS"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(decode_kernel, "_decode_split_kernel", Spy())
    keys, code, v = _cache_views(1, 2, 40, 32, 32, 4, torch.float32)
    q = sfa.topk_mask(torch.randn(1, 4, 2, 32), 4)
    decode_into(q, code.values, code.indices, v, torch.empty(1, 4, 2, 32), scale=0.2, causal=True,
                config=dict(INTERPRETER_DECODE_CONFIG, QUERY_COLUMNS=query_columns))
    assert launched == [query_columns]


@pytest.mark.parametrize("gather", ["query_rows", "query_columns"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_decode_matches_reference(dtype, case, gather):
    b, hq, hkv, n_q, n_keys, d, dv, k, causal = case
    keys, code, v = _cache_views(b, hkv, n_keys, d, dv, k, dtype)
    q = torch.randn(b, hq, n_q, d).to(dtype)
    q_masked = sfa.topk_mask(q, k)
    out = torch.full((b, hq, n_q, dv), float("nan"), dtype=dtype)
    decode_into(q_masked, code.values, code.indices, v, out, scale=1 / math.sqrt(d), causal=causal,
                config=_config(INTERPRETER_DECODE_CONFIG, gather))
    ref = sfa_attention_reference(q.float(), keys.float(), v.float(), topk_q=k, topk_k=k, causal=causal)
    assert not out.isnan().any(), "some output elements were never written"
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("batch_heads, n_keys, plan, expected", [
    (32, 32768, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=0), (64, 512)),  # capped at 64 splits
    (64, 32768, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=0), (32, 1024)),  # 33 wanted, rounded
    (32, 32768, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=1024), (32, 1024)),  # chunk minimum
    (8, 32768, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=1024), (32, 1024)),  # ... even at batch 1
    # the floor: 4 programs per SM = 66 splits at 8 KV heads, capped at 64, so the minimum chunk gives way
    (8, 32768, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=1024, min_programs_per_sm=4), (64, 512)),
    (32, 32768, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=1024, min_programs_per_sm=4), (32, 1024)),
    (32, 32768, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=768, min_programs_per_sm=4), (40, 832)),
    (4, 100, dict(programs_per_sm=16, split_cap=64, min_keys_per_split=0), (2, 64)),  # never below one block
])
def test_split_plan_on_a_132_sm_gpu(monkeypatch, batch_heads, n_keys, plan, expected):
    """The GPU split plan's arithmetic (the interpreter always uses 2-block chunks, so no kernel test reaches it)."""
    monkeypatch.setattr(decode_kernel, "interpreting", lambda: False)
    monkeypatch.setattr(decode_kernel, "num_sms", lambda device: 132)
    assert decode_kernel._split_plan(batch_heads, n_keys, 64, torch.device("cpu"), **plan) == expected


@pytest.mark.parametrize("n_q", [1, 3])
def test_many_splits_merged_in_several_combine_chunks(n_q):
    """150 keys in splits of 32 (interpreter config) = 5 splits, merged 2 at a time: two full chunks and a
    partial one; with 3 causal queries the last split holds keys some rows cannot see."""
    b, hq, hkv, d, k = 1, 4, 2, 32, 4
    keys, code, v = _cache_views(b, hkv, 150, d, d, k, torch.float32)
    q = torch.randn(b, hq, n_q, d)
    out = torch.full((b, hq, n_q, d), float("nan"))
    decode_into(sfa.topk_mask(q, k), code.values, code.indices, v, out, scale=1 / math.sqrt(d), causal=True,
                config=dict(BLOCK_L=16, PROGRAMS_PER_SM=1, num_warps=4, num_stages=1, COMBINE_BLOCK=2))
    ref = sfa_attention_reference(q, keys, v, topk_q=k, topk_k=k, causal=True)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_through_sfa_attention_with_dense_keys_and_custom_scale():
    q, keys, v = torch.randn(1, 4, 2, 32), torch.randn(1, 2, 29, 32), torch.randn(1, 2, 29, 32)
    out = sfa.sfa_attention(q, keys, v, topk_q=8, topk_k=4, scale=0.3, backend="decode")
    ref = sfa_attention_reference(q, keys, v, topk_q=8, topk_k=4, causal=True, scale=0.3)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_batch_strided_cache_view():
    """A cache whose batch dim is not the outermost (e.g. a (L, B, H, k) buffer permuted)."""
    keys = torch.randn(2, 2, 40, 32)
    code = sfa.topk_sparsify(keys, 4)
    values = code.values.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    indices = code.indices.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    v = torch.randn(40, 2, 2, 32).permute(1, 2, 0, 3)
    q = torch.randn(2, 4, 1, 32)
    out = sfa.sfa_attention(q, sfa.SparseCode(values, indices, 32), v, topk_q=4, backend="decode")
    ref = sfa_attention_reference(q, keys, v, topk_q=4, topk_k=4, causal=True)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_too_many_query_rows_is_a_clear_error():
    q, keys, v = torch.randn(1, 8, 16, 32), torch.randn(1, 1, 20, 32), torch.randn(1, 1, 20, 32)
    with pytest.raises(ValueError, match="exceeds 64; use backend='masked'"):
        sfa.sfa_attention(q, keys, v, topk_q=4, backend="decode")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "b,hq,hkv,n_q,n_keys,d,k,causal",
    [(2, 32, 8, 1, 5003, 128, 16, True), (1, 16, 8, 4, 20011, 128, 16, True), (3, 8, 8, 2, 777, 64, 8, False),
     (1, 32, 4, 1, 9000, 128, 64, True), (2, 8, 2, 16, 3001, 64, 1, True), (2, 16, 8, 8, 4099, 128, 16, True)],
)
@pytest.mark.parametrize("gather", ["default", "query_rows", "query_columns", "wide_columns"])
def test_gpu_decode_matches_reference(dtype, b, hq, hkv, n_q, n_keys, d, k, causal, gather):
    keys, code, v = _cache_views(b, hkv, n_keys, d, d, k, dtype, device="cuda")
    q = torch.randn(b, hq, n_q, d, device="cuda").to(dtype)
    out = torch.full((b, hq, n_q, d), float("nan"), dtype=dtype, device="cuda")
    decode_into(sfa.topk_mask(q, k), code.values, code.indices, v, out, scale=1 / math.sqrt(d), causal=causal,
                config=_config(GPU_DECODE_CONFIG, gather))
    ref = sfa_attention_reference(q.float(), keys.float(), v.float(), topk_q=k, topk_k=k, causal=causal)
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dense_dims", [0, 6])
@pytest.mark.parametrize("n_q", [1, 2])
def test_n_valid_reads_only_each_sequences_valid_keys(n_q, dense_dims, causal):
    """A static cache: the buffers hold capacity 70 (several splits), the sequences only 19 and 53 keys; the
    rest is garbage and must not count, so the result equals the reference over each valid prefix."""
    b, hq, hkv, cap, d, k = 2, 4, 2, 70, 32, 4
    keys, v = torch.randn(b, hkv, cap, d), torch.randn(b, hkv, cap, d)
    code = sfa.topk_sparsify(keys, k, dense_dims)
    q = torch.randn(b, hq, n_q, d)
    lengths = torch.tensor([19, 53])
    out = sfa.sfa_attention(q, code, v, topk_q=k, backend="decode", kv_length=lengths, causal=causal)
    _assert_matches_each_valid_prefix(out, q, keys, v, lengths, k, dense_dims, causal)


@pytest.mark.parametrize("dense_dims", [0, 6])
def test_query_columns_with_decoupled_codes_and_n_valid(dense_dims):
    """The transposed-query gather beside a decoupled code's dense part, on a static cache with 3 causal queries
    (GROUP x T = 6 real rows padded to 8: the padding columns must score nothing)."""
    b, hq, hkv, cap, d, k, n_q = 2, 4, 2, 70, 32, 4, 3
    keys, v = torch.randn(b, hkv, cap, d), torch.randn(b, hkv, cap, d)
    code = sfa.topk_sparsify(keys, k, dense_dims)
    q = torch.randn(b, hq, n_q, d)
    lengths = torch.tensor([19, 53])
    out = torch.full((b, hq, n_q, d), float("nan"))
    decode_into(sfa.topk_mask(q, k, dense_dims), code.values, code.indices, v, out, scale=1 / math.sqrt(d),
                causal=True, k_dense=code.dense, n_valid=lengths,
                config=_config(INTERPRETER_DECODE_CONFIG, "query_columns"))
    _assert_matches_each_valid_prefix(out, q, keys, v, lengths, k, dense_dims, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense_dims", [0, 32])
@pytest.mark.parametrize("gather", ["query_columns", "wide_columns"])
def test_gpu_query_columns_with_decoupled_codes_and_n_valid(dtype, dense_dims, gather):
    """As the engine calls it (a static cache's n_valid), 16 query heads over 8 KV heads, 8 tokens (16 rows)."""
    b, hq, hkv, cap, d, k, n_q = 2, 16, 8, 3000, 128, 16, 8
    keys = torch.randn(b, hkv, cap, d, device="cuda").to(dtype)
    v = torch.randn(b, hkv, cap, d, device="cuda").to(dtype)
    code = sfa.topk_sparsify(keys, k, dense_dims)
    q = torch.randn(b, hq, n_q, d, device="cuda").to(dtype)
    lengths = torch.tensor([1001, 2999], device="cuda")
    out = torch.full((b, hq, n_q, d), float("nan"), dtype=dtype, device="cuda")
    decode_into(sfa.topk_mask(q, k, dense_dims), code.values, code.indices, v, out, scale=1 / math.sqrt(d),
                causal=True, k_dense=code.dense, n_valid=lengths, config=_config(GPU_DECODE_CONFIG, gather))
    _assert_matches_each_valid_prefix(out, q, keys, v, lengths, k, dense_dims, True)


def _assert_matches_each_valid_prefix(out, q, keys, v, lengths, k, dense_dims, causal):
    """Each sequence's output against the fp32 reference over its first lengths[i] keys, within out's dtype's TOL."""
    assert not out.isnan().any(), "some output elements were never written"
    for i, n in enumerate(lengths.tolist()):
        ref = sfa_attention_reference(q[i : i + 1].float(), keys[i : i + 1, :, :n].float(), v[i : i + 1, :, :n].float(),
                                      topk_q=k, topk_k=k, dense_dims=dense_dims, causal=causal)
        assert rel_err(out[i : i + 1], ref) < TOL[out.dtype]


def test_kv_length_is_refused_by_a_backend_without_it_and_auto_falls_back():
    q, keys, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="backend 'masked' does not take kv_length; use one of decode, reference"):
        sfa.sfa_attention(q, keys, v, topk_q=4, backend="masked", kv_length=torch.tensor([5]))
    out = sfa.sfa_attention(q, keys, v, topk_q=4, kv_length=torch.tensor([5]))
    ref = sfa_attention_reference(q, keys[:, :, :5], v[:, :, :5], topk_q=4, topk_k=4)
    assert rel_err(out, ref) < TOL[torch.float32]
