"""sfa_attention with the reference backend: the definition, GQA, causal alignment, gradients, codes."""

import math

import pytest
import torch

from sfa import dense_attention, sfa_attention, topk_sparsify
from sfa.reference import attention_math


def rand_qkv(b=2, hq=4, hkv=2, nq=13, nk=None, d=16, dv=None, dtype=torch.float64, grad=False):
    nk = nq if nk is None else nk
    dv = d if dv is None else dv
    q = torch.randn(b, hq, nq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, hkv, nk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, hkv, nk, dv, dtype=dtype, requires_grad=grad)
    return q, k, v


def scores_by_overlap(q, k, topk):
    """Score of every (i, j) pair written as the paper does: sum over coordinates active in both."""
    cq, ck = topk_sparsify(q, topk), topk_sparsify(k, topk)
    b, h, n, d = q.shape
    s = torch.zeros(b, h, n, k.shape[2], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                qi = dict(zip(cq.indices[bi, hi, i].tolist(), cq.values[bi, hi, i].tolist()))
                for j in range(k.shape[2]):
                    kj = dict(zip(ck.indices[bi, hi, j].tolist(), ck.values[bi, hi, j].tolist()))
                    s[bi, hi, i, j] = sum(qi[c] * kj[c] for c in qi.keys() & kj.keys())
    return s / math.sqrt(d)


@pytest.mark.parametrize("causal", [True, False])
def test_equals_the_papers_overlap_definition(causal):
    q, k, v = rand_qkv(b=1, hq=2, hkv=2, nq=6, d=8)
    s = scores_by_overlap(q, k, topk=2)
    if causal:
        s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.softmax(s, dim=-1) @ v
    out = sfa_attention(q, k, v, topk_q=2, causal=causal, backend="reference")
    torch.testing.assert_close(out, expected)


def test_pairs_without_overlap_score_zero_not_minus_infinity():
    # q uses only coordinate 0, keys only coordinate 1: every score is 0, so attention is a plain mean of v.
    q = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    q[..., 0] = 3.0
    k = torch.zeros(1, 1, 5, 4, dtype=torch.float64)
    k[..., 1] = torch.randn(5, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 3, dtype=torch.float64)
    out = sfa_attention(q, k, v, topk_q=1, causal=False, backend="reference")
    torch.testing.assert_close(out[0, 0, 0], v[0, 0].mean(0))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("nq,nk", [(13, 13), (1, 9), (3, 11)])
def test_sdpa_path_equals_written_out_math(causal, hq, hkv, nq, nk):
    q, k, v = rand_qkv(hq=hq, hkv=hkv, nq=nq, nk=nk, d=16, dv=5)
    torch.testing.assert_close(
        dense_attention(q, k, v, causal=causal), attention_math(q, k, v, causal=causal)
    )


def test_gqa_equals_repeating_kv_heads():
    q, k, v = rand_qkv(hq=6, hkv=2, nq=9, d=16)
    out = sfa_attention(q, k, v, topk_q=4, backend="reference")
    k_rep, v_rep = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    torch.testing.assert_close(out, sfa_attention(q, k_rep, v_rep, topk_q=4, backend="reference"))


def test_full_topk_is_dense_attention_exactly():
    q, k, v = rand_qkv(dtype=torch.float32, d=32)
    for causal in (True, False):
        assert torch.equal(
            sfa_attention(q, k, v, topk_q=32, causal=causal, backend="reference"),
            dense_attention(q, k, v, causal=causal),
        )


def test_different_topk_for_queries_and_keys():
    q, k, v = rand_qkv(d=16)
    expected = dense_attention(topk_sparsify(q, 3).to_dense(), topk_sparsify(k, 7).to_dense(), v)
    torch.testing.assert_close(sfa_attention(q, k, v, topk_q=3, topk_k=7), expected)


def test_sparse_codes_in_equal_dense_in():
    q, k, v = rand_qkv(d=16, nq=5, nk=11)
    cq, ck = topk_sparsify(q, 4), topk_sparsify(k, 4)
    expected = sfa_attention(q, k, v, topk_q=4)
    torch.testing.assert_close(sfa_attention(cq, ck, v), expected)
    torch.testing.assert_close(sfa_attention(q, ck, v, topk_q=4), expected)


def test_custom_scale():
    q, k, v = rand_qkv(d=16)
    out = sfa_attention(q, k, v, topk_q=4, scale=0.3)
    expected = attention_math(topk_sparsify(q, 4).to_dense(), topk_sparsify(k, 4).to_dense(), v, scale=0.3)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_are_straight_through_and_dense_for_v(causal):
    q, k, v = rand_qkv(hq=4, hkv=2, nq=7, d=16, dv=6, grad=True)
    out = sfa_attention(q, k, v, topk_q=3, topk_k=5, causal=causal)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    # Same function with the masks held fixed: gradients of dense attention at masked inputs, times the mask.
    mq, mk = topk_sparsify(q, 3).mask(), topk_sparsify(k, 5).mask()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = attention_math(q2 * mq, k2 * mk, v2, causal=causal)
    ref.backward(grad_out)
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)
    torch.testing.assert_close(v.grad, v2.grad)
    assert not q.grad[~mq].any() and not k.grad[~mk].any()
    assert (v.grad != 0).float().mean() > 0.9  # dense


def test_gradcheck_in_float64():
    q, k, v = rand_qkv(b=1, hq=2, hkv=1, nq=5, d=8, dv=4, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: sfa_attention(q, k, v, topk_q=3, backend="reference"), (q, k, v)
    )


def test_output_dtype_and_shape_with_dv_not_d():
    q, k, v = rand_qkv(dtype=torch.float32, d=16, dv=24, nq=3, nk=10)
    out = sfa_attention(q, k, v, topk_q=2)
    assert out.shape == (2, 4, 3, 24) and out.dtype == torch.float32


@pytest.mark.parametrize("causal", [True, False])
def test_kv_length_ignores_the_free_capacity_of_a_static_cache(causal):
    """Keys past kv_length[b] (a preallocated cache's unwritten tail, here garbage) take no part; the result
    equals attention over each sequence's valid prefix, queries being its last positions."""
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, nq=3, nk=20)
    lengths = torch.tensor([9, 14])
    out = sfa_attention(q, k, v, topk_q=5, causal=causal, kv_length=lengths)
    for b, n in enumerate(lengths.tolist()):
        expected = sfa_attention(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], topk_q=5, causal=causal)
        torch.testing.assert_close(out[b : b + 1], expected)
    one = sfa_attention(q, k, v, topk_q=5, causal=causal, kv_length=torch.tensor([11]))  # (1,) applies to all
    torch.testing.assert_close(one, sfa_attention(q, k[:, :, :11], v[:, :, :11], topk_q=5, causal=causal))


def test_bad_kv_length_is_named():
    q, k, v = rand_qkv(b=2, nq=1, nk=6)
    with pytest.raises(ValueError, match=r"kv_length must be a tensor of shape \(2,\) or \(1,\), got shape \(3,\)"):
        sfa_attention(q, k, v, topk_q=4, kv_length=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="kv_length must be an integer tensor, got torch.float32"):
        sfa_attention(q, k, v, topk_q=4, kv_length=torch.tensor([3.0]))
