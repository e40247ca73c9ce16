"""The `masked` backend (fused top-k + dense SDPA) vs the fp32 reference: forward and all gradients
over the shape matrix (GQA, causal or not, odd N, k in {1, 4, D/8, D/2, D})."""

import pytest
import torch

import sfa
from sfa.kernels.masked import masked_sfa_attention
from sfa.reference import sfa_attention_reference

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def _inputs(b, hq, hkv, n_q, n_k, d, dv, dtype, device="cpu"):
    q = torch.randn(b, hq, n_q, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, n_k, d, device=device).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, n_k, dv, device=device).to(dtype).requires_grad_()
    return q, k, v


def _check_forward_and_grads(q, k, v, topk, causal, tol):
    out = masked_sfa_attention(q, k, v, topk_q=topk, topk_k=topk, causal=causal, scale=None)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = sfa_attention_reference(q32, k32, v32, topk_q=topk, topk_k=topk, causal=causal)
    ref.backward(grad_out.float())
    assert rel_err(out, ref) < tol, "forward"
    for name, got, want in (("dq", q.grad, q32.grad), ("dk", k.grad, k32.grad), ("dv", v.grad, v32.grad)):
        assert rel_err(got, want) < tol, name
    # straight-through: q and k get gradient only at their selected coordinates
    assert ((q.grad != 0).sum(-1) <= topk).all() and ((k.grad != 0).sum(-1) <= topk).all()


SHAPES = [  # b, hq, hkv, n, d
    (1, 2, 2, 19, 32),
    (2, 4, 2, 13, 32),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("topk", [1, 4, 16, 32], ids=["k1", "k4=D/8", "k=D/2", "k=D"])
@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa"])
def test_forward_and_grads_fp32(shape, topk, causal):
    b, hq, hkv, n, d = shape
    _check_forward_and_grads(*_inputs(b, hq, hkv, n, n, d, d, torch.float32), topk, causal, TOL[torch.float32])


def test_fewer_queries_than_keys_aligns_to_the_last_positions():
    _check_forward_and_grads(*_inputs(1, 4, 2, 5, 23, 32, 16, torch.float32), 8, True, TOL[torch.float32])


def test_fp16_forward():
    q, k, v = _inputs(2, 4, 2, 17, 17, 64, 64, torch.float16)
    out = masked_sfa_attention(q, k, v, topk_q=8, topk_k=8, causal=True, scale=None)
    ref = sfa_attention_reference(q.float(), k.float(), v.float(), topk_q=8, topk_k=8, causal=True)
    assert out.dtype == torch.float16 and rel_err(out, ref) < TOL[torch.float16]


def test_sparse_codes_in_and_different_k_for_q_and_k():
    q, k, v = torch.randn(1, 2, 11, 32), torch.randn(1, 2, 11, 32), torch.randn(1, 2, 11, 32)
    out = sfa.sfa_attention(sfa.topk_sparsify(q, 4), k, v, topk_k=8, backend="masked")
    ref = sfa_attention_reference(q, k, v, topk_q=4, topk_k=8, causal=True)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b,hq,hkv,n,d,topk",
    [(2, 8, 8, 1000, 64, 8), (1, 16, 4, 2047, 128, 16), (2, 8, 2, 513, 128, 1), (1, 8, 8, 777, 128, 64),
     (1, 4, 4, 300, 128, 128)],
)
def test_gpu_bf16_forward_and_grads(b, hq, hkv, n, d, topk, causal):
    _check_forward_and_grads(*_inputs(b, hq, hkv, n, n, d, d, torch.bfloat16, "cuda"), topk, causal, TOL[torch.bfloat16])
