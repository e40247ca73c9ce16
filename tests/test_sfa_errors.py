"""Every bad argument of sfa_attention gets an error that names it."""

import pytest
import torch

from sfa import sfa_attention, topk_sparsify


def qkv(hq=4, hkv=2, n=8, d=16):
    return torch.randn(2, hq, n, d), torch.randn(2, hkv, n, d), torch.randn(2, hkv, n, d)


def test_wrong_rank_names_the_argument():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have rank 4 \(B, H, N, D\)"):
        sfa_attention(q[0], k, v, topk_q=2)
    with pytest.raises(ValueError, match="k must have rank 4"):
        sfa_attention(q, k[0], v, topk_q=2)
    with pytest.raises(ValueError, match="v must have rank 4"):
        sfa_attention(q, k, v[..., None], topk_q=2)


def test_heads_not_a_multiple():
    q, k, v = qkv(hq=5, hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(5\) must be a multiple of key/value heads \(2\)"):
        sfa_attention(q, k, v, topk_q=2)


@pytest.mark.parametrize("topk", [0, -1, 17])
def test_topk_out_of_range(topk):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"topk_q={topk} must be in \[1, D=16\]"):
        sfa_attention(q, k, v, topk_q=topk)
    with pytest.raises(ValueError, match=rf"topk_k={topk} must be in \[1, D=16\]"):
        sfa_attention(q, k, v, topk_q=2, topk_k=topk)


def test_topk_missing_or_not_an_int():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="topk_q is required"):
        sfa_attention(q, k, v)
    with pytest.raises(TypeError, match="topk_q must be an int"):
        sfa_attention(q, k, v, topk_q=2.5)


def test_topk_disagrees_with_code():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="topk_q=3 but the SparseCode for it holds k=2"):
        sfa_attention(topk_sparsify(q, 2), k, v, topk_q=3)


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="must share one dtype"):
        sfa_attention(q, k.double(), v, topk_q=2)
    with pytest.raises(TypeError, match="q must be floating point"):
        sfa_attention(q.long(), k, v, topk_q=2)


def test_device_mismatch():
    q, k, v = qkv()
    meta_v = torch.empty(v.shape, device="meta")
    with pytest.raises(ValueError, match="must be on one device"):
        sfa_attention(q, k, meta_v, topk_q=2)


def test_shape_mismatches():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"head dim of q \(16\) and k \(8\)"):
        sfa_attention(q, k[..., :8], v, topk_q=2)
    with pytest.raises(ValueError, match="batch sizes differ"):
        sfa_attention(q[:1], k, v, topk_q=2)
    with pytest.raises(ValueError, match="must agree in heads and length"):
        sfa_attention(q, k, v[:, :, :5], topk_q=2)
    with pytest.raises(ValueError, match=r"more queries \(8\) than keys \(4\)"):
        sfa_attention(q, k[:, :, :4], v[:, :, :4], topk_q=2)


def test_unknown_backend_lists_the_available_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; available: auto, reference"):
        sfa_attention(q, k, v, topk_q=2, backend="cudnn")


def test_bad_scale_and_bad_types():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a positive number"):
        sfa_attention(q, k, v, topk_q=2, scale=-1.0)
    with pytest.raises(TypeError, match="q must be a tensor or a SparseCode"):
        sfa_attention(q.tolist(), k, v, topk_q=2)
