"""FlashSFA (`flash` backend) against the fp32 reference: forward output and dq, dk, dv.

On CPU these run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny sizes, fp32 with exact dots;
the interpreter's tile is 16x16, so N=37/70 cross several blocks and end in a partial one, and the
causal diagonal lands mid-block. The bf16 test at real sizes is marked `gpu`.
"""

from __future__ import annotations

import math

import pytest
import torch

from sfa.kernels import flash
from sfa.kernels.flash import flash_sfa_attention
from sfa.reference import sfa_attention_reference
from sfa.topk import SparseCode, topk_sparsify

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(flash, "POISON_OUTPUTS", True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values (unwritten or overflowed elements)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(b, hq, hkv, n_q, n_k, d, dv=None, dtype=torch.float32, device=DEVICE):
    dv = dv or d
    q = torch.randn(b, hq, n_q, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, n_k, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, n_k, dv, dtype=dtype, device=device)
    return q, k, v


def run_both(q, k, v, topk_q, topk_k, causal, scale=None):
    """Output and gradients of the flash backend and of the fp32 reference on upcast copies."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flash_sfa_attention(*leaves, topk_q=topk_q, topk_k=topk_k, causal=causal, scale=scale)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sfa_attention_reference(*ref_leaves, topk_q=topk_q, topk_k=topk_k, causal=causal, scale=scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    return out, grads, ref, ref_grads


# (batch, Hq, Hkv, Nq, Nk, D, topk, causal): odd N, GQA groups of 2 and 4, k in {1, 4, D/8, D/2, D}.
CASES = [
    (1, 4, 2, 37, 37, 32, 1, True),
    (2, 4, 1, 70, 70, 32, 4, False),
    (1, 4, 2, 37, 37, 32, 4, False),  # k = D/8
    (1, 4, 2, 70, 70, 32, 16, True),  # k = D/2
    (1, 2, 2, 37, 37, 32, 32, True),  # k = D: dense attention
    (1, 2, 1, 37, 37, 64, 8, True),  # D=64, k = D/8
    (1, 2, 1, 20, 45, 32, 4, True),  # fewer queries than keys (chunked prefill alignment)
    (1, 2, 1, 20, 45, 32, 4, False),
]


@pytest.mark.parametrize("b,hq,hkv,n_q,n_k,d,topk,causal", CASES)
def test_forward_backward_match_reference_fp32(b, hq, hkv, n_q, n_k, d, topk, causal):
    q, k, v = make_inputs(b, hq, hkv, n_q, n_k, d)
    out, grads, ref, ref_grads = run_both(q, k, v, topk, topk, causal)
    assert rel_err(out, ref) < 1e-5
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(g, r) < 1e-5, name
    # Gradients reach q and k only at the selected coordinates (exact zeros elsewhere).
    if topk < d:
        assert (grads[0][~topk_sparsify(q, topk).mask()] == 0).all()
        assert (grads[1][~topk_sparsify(k, topk).mask()] == 0).all()


def test_different_topk_value_dim_and_scale():
    q, k, v = make_inputs(1, 4, 2, 37, 37, 32, dv=16)
    out, grads, ref, ref_grads = run_both(q, k, v, topk_q=8, topk_k=2, causal=True, scale=0.3)
    assert out.shape == (1, 4, 37, 16)
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_fp16_matches_fp32_reference():
    q, k, v = make_inputs(1, 2, 1, 37, 37, 32, dtype=torch.float16)
    out, grads, ref, ref_grads = run_both(q, k, v, 4, 4, causal=True)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 5e-3
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 5e-3


def test_sparse_code_inputs_get_gradients_on_their_values():
    q, k, v = make_inputs(1, 2, 1, 37, 37, 32)
    code_q, code_k = topk_sparsify(q, 4), topk_sparsify(k, 4)
    vals_q = code_q.values.clone().requires_grad_()
    vals_k = code_k.values.clone().requires_grad_()
    out = flash_sfa_attention(SparseCode(vals_q, code_q.indices, 32), SparseCode(vals_k, code_k.indices, 32), v,
                              topk_q=4, topk_k=4, causal=True, scale=None)
    ref_q, ref_k = vals_q.detach().double().requires_grad_(), vals_k.detach().double().requires_grad_()
    ref = sfa_attention_reference(SparseCode(ref_q, code_q.indices, 32), SparseCode(ref_k, code_k.indices, 32),
                                  v.double(), topk_q=4, topk_k=4, causal=True)
    assert rel_err(out, ref) < 1e-5
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (vals_q, vals_k), grad_out)
    want = torch.autograd.grad(ref, (ref_q, ref_k), grad_out.double())
    for g, w in zip(got, want):
        assert g.shape == (1, g.shape[1], 37, 4)
        assert rel_err(g, w) < 1e-5


def test_torch_compile_fullgraph_traces_the_ops():
    q, k, v = make_inputs(1, 2, 1, 20, 20, 32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def step(q, k, v):
        out, _ = torch.ops.sfa.flash_fwd(q, k, v, True, 1.0 / math.sqrt(32))
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves)
    loss.backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    from sfa.reference import dense_attention

    ref = dense_attention(*ref_leaves, causal=True)
    (ref * ref).sum().backward()
    assert abs(loss.item() - (ref * ref).sum().item()) < 1e-4 * abs((ref * ref).sum().item())
    for t, r in zip(leaves, ref_leaves):
        assert rel_err(t.grad, r.grad) < 1e-5


def test_opcheck_forward_and_backward_ops():
    q, k, v = make_inputs(1, 2, 1, 20, 20, 16)
    scale = 0.25
    # The autograd test needs inputs that require grad.
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.sfa.flash_fwd.default, (*args, True, scale),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse = torch.ops.sfa.flash_fwd(q, k, v, True, scale)
    torch.library.opcheck(torch.ops.sfa.flash_bwd.default, (torch.randn_like(out), q, k, v, out, lse, True, scale),
                          test_utils=("test_schema", "test_faketensor"))


def test_unsupported_head_dim_falls_back_to_reference_with_a_warning():
    q, k, v = make_inputs(1, 2, 1, 9, 9, 24)
    with pytest.warns(UserWarning, match=r"head dims D=24, Dv=24 not in the kernel's supported set"):
        out = flash_sfa_attention(q, k, v, topk_q=3, topk_k=3, causal=True)
    ref = sfa_attention_reference(q, k, v, topk_q=3, topk_k=3, causal=True)
    assert torch.equal(out, ref)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(flash, "interpreting", lambda: False)
    q, k, v = make_inputs(1, 1, 1, 4, 4, 32, device="cpu")
    with pytest.raises(RuntimeError, match=r"flash backend: the Triton kernels need CUDA tensors \(got device cpu\)"):
        flash_sfa_attention(q, k, v, topk_q=4, topk_k=4, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,hq,hkv,causal", [(1000, 64, 8, 2, True), (4096, 128, 4, 4, True),
                                                (1537, 128, 4, 1, False), (2048, 64, 4, 4, False)])
def test_bf16_on_gpu_matches_fp32_reference(n, d, hq, hkv, causal):
    q, k, v = make_inputs(2, hq, hkv, n, n, d, dtype=torch.bfloat16, device="cuda")
    topk = d // 8
    out, grads, ref, ref_grads = run_both(q, k, v, topk, topk, causal)
    errors = {"out": rel_err(out, ref), **{name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)}}
    print(f"\nbf16 N={n} D={d} Hq={hq} Hkv={hkv} causal={causal} k={topk}: "
          + " ".join(f"{name} {e:.2e}" for name, e in errors.items()))
    for name, e in errors.items():
        assert e < 1e-2, name
    assert (grads[0][~topk_sparsify(q, topk).mask()] == 0).all()
    assert (grads[1][~topk_sparsify(k, topk).mask()] == 0).all()


def test_registered_as_the_flash_backend_of_sfa_attention():
    import sfa

    assert "flash" in sfa.available_backends()
    q, k, v = make_inputs(1, 2, 1, 37, 37, 32)
    out = sfa.sfa_attention(q, k, v, topk_q=4, causal=True, backend="flash")
    ref = sfa_attention_reference(q.double(), k.double(), v.double(), topk_q=4, topk_k=4, causal=True)
    assert rel_err(out, ref) < 1e-5
