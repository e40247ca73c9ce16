"""The kernels as torch.library custom ops: schema/fake/autograd checks (opcheck), torch.compile
without graph breaks (which backend `auto` picks: tests/test_backend_choice.py)."""

import math
import os

import pytest
import torch

import sfa
from sfa.kernels.decode import decode_attention_op, dense_decode_attention, dense_decode_attention_op
from sfa.kernels.topk import fused_topk_masked, topk_code_masked_op, topk_code_op


def test_opcheck_topk_ops():
    x = torch.randn(3, 5, 32, requires_grad=True)
    torch.library.opcheck(topk_code_op, (x, 4))
    torch.library.opcheck(topk_code_masked_op, (x, 4))


def test_opcheck_decode_op():
    code = sfa.topk_sparsify(torch.randn(1, 2, 19, 32), 4)
    q_masked = sfa.topk_mask(torch.randn(1, 4, 1, 32), 4)
    v = torch.randn(1, 2, 19, 32)
    torch.library.opcheck(decode_attention_op, (q_masked, code.values, code.indices, v, 1 / math.sqrt(32), True))


def test_opcheck_dense_decode_op():
    q, k, v = torch.randn(2, 4, 2, 24), torch.randn(2, 2, 19, 24), torch.randn(2, 2, 19, 32)
    torch.library.opcheck(dense_decode_attention_op, (q, k, v, 0.2, True, torch.tensor([19, 11])))


def test_dense_decode_compiles_to_its_op_without_graph_breaks():
    """A compiled static step reaches the kernel through the custom op (fullgraph fails on a graph break)."""
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    n_valid = torch.tensor([21])
    step = torch.compile(lambda q, k, v, n: dense_decode_attention(q, k, v, kv_length=n), fullgraph=True,
                         backend="aot_eager")
    torch.testing.assert_close(step(q, k, v, n_valid), sfa.dense_attention(q, k[:, :, :21], v[:, :, :21]))


def test_compile_fullgraph_through_the_ops_forward_and_backward():
    def sfa_step(q, k, v, k_cache_values, k_cache_indices, v_cache):
        _, q_masked = fused_topk_masked(q, 4)
        _, k_masked = fused_topk_masked(k, 4)
        scores = (q_masked @ k_masked.transpose(-1, -2)).softmax(-1)
        step = decode_attention_op(q_masked[:, :, -1:].detach(), k_cache_values, k_cache_indices, v_cache, 0.25, True)
        return scores @ v, step  # decode is inference-only: its op has no autograd formula

    def reference_step(q, k, v, k_cache_values, k_cache_indices, v_cache):
        q_masked, k_masked = sfa.topk_mask(q, 4), sfa.topk_mask(k, 4)  # sfa/topk.py, no Triton
        scores = (q_masked @ k_masked.transpose(-1, -2)).softmax(-1)
        cache = sfa.SparseCode(values=k_cache_values, indices=k_cache_indices, dim=16)
        step = sfa.sfa_attention_reference(q_masked[:, :, -1:].detach(), cache, v_cache, topk_q=16, topk_k=4,
                                           causal=True, scale=0.25)
        return scores @ v, step

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, step = fn(*leaves, cache.values, cache.indices, v.detach())
        out.backward(grad_out)  # a random cotangent: every output element weighs differently
        return out.detach(), step, [t.grad for t in leaves]

    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    grad_out = torch.randn(1, 2, 9, 16)
    cache = sfa.topk_sparsify(torch.randn(1, 2, 9, 16), 4)
    out, step, grads = run(torch.compile(sfa_step, fullgraph=True, backend="aot_eager"))
    want_out, want_step, want_grads = run(reference_step)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(step, want_step)
    for name, got, want in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")
    assert ((grads[0] != 0).sum(-1) <= 4).all() and ((grads[1] != 0).sum(-1) <= 4).all()  # straight-through


def test_gpu_ops_are_triton_ops_that_compile_and_differentiate():
    """Off the interpreter (so, on the GPU) the kernel ops are torch.library.triton_ops, whose implementation
    torch.compile traces into (sfa/kernels/_config.py, kernel_op). This machine has no GPU, so the traced
    implementation takes its PyTorch fallback; the launch through wrap_triton is the GPU tests' part."""
    import subprocess
    import sys

    code = (
        "import torch, sfa, sfa.kernels\n"
        "from torch._library.triton import triton_ops_to_kernels\n"
        "from sfa.kernels.topk import fused_topk_masked, topk_code_op\n"
        "ops = {'sfa::topk_code', 'sfa::topk_code_masked'}\n"
        "assert ops <= set(triton_ops_to_kernels), sorted(triton_ops_to_kernels)\n"
        # the compiled-graph cache keys on these kernels' source: an empty list would replay an edited kernel's old code
        "assert all(k.__name__ == '_topk_rows_kernel' for op in ops for k in triton_ops_to_kernels[op])\n"
        "assert all(triton_ops_to_kernels[op] for op in ops), {op: triton_ops_to_kernels[op] for op in ops}\n"
        "x = torch.randn(2, 3, 9, 16, requires_grad=True)\n"
        "f = torch.compile(lambda x: fused_topk_masked(x, 4)[1], fullgraph=True, backend='aot_eager')\n"
        "y = f(x); g = torch.randn_like(y); y.backward(g)\n"
        "want = sfa.topk_mask(x.detach(), 4)\n"
        "assert torch.equal(y, want)\n"
        "assert torch.equal(x.grad, g * (want != 0))\n"  # straight-through: the cotangent at the kept entries
        "torch.library.opcheck(topk_code_op, (x, 4))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=__file__.rsplit("/tests/", 1)[0])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_kernel_backends_are_registered():
    assert {"masked", "decode"} <= set(sfa.available_backends())


@pytest.mark.gpu
def test_gpu_compile_masked_backend_fullgraph():
    leaves = [torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda q, k, v: sfa.sfa_attention(q, k, v, topk_q=8, backend="masked"), fullgraph=True)
    f(*leaves).backward(grad_out)
    out = f(*leaves)
    # The reference sees the same bf16 values in fp32, so both select the same coordinates; the bound is
    # the bf16 one of the kernel tests (tests/test_kernels_masked.py), for the output and every gradient.
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = sfa.sfa_attention_reference(*ref_leaves, topk_q=8, topk_k=8, causal=True)
    ref.backward(grad_out.float())
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    for name, t, r in zip("qkv", leaves, ref_leaves):
        assert ((t.grad.float() - r.grad).norm() / r.grad.norm()).item() < 1e-2, f"d{name}"


def test_sfa_imports_and_runs_without_triton():
    """sfa must work where Triton is missing: only the reference backend, `auto` resolves to it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, sfa\n"
        "assert sfa.available_backends() == ['auto', 'reference'], sfa.available_backends()\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "out = sfa.sfa_attention(q, q, q, topk_q=4)\n"
        "assert torch.equal(out, sfa.sfa_attention_reference(q, q, q, topk_q=4, topk_k=4))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=__file__.rsplit("/tests/", 1)[0])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
