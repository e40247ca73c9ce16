"""A model whose attention runs through the Triton custom ops compiles with torch.compile(fullgraph=True):
no graph break in the attention (the ops have fake implementations and registered autograd).
On CPU the kernels run under TRITON_INTERPRET=1 and `aot_eager` keeps the compile cheap; on GPU the same
path is exercised by tests/test_custom_ops.py::test_gpu_compile_masked_backend_fullgraph."""

import pytest
import torch

from models import AttentionConfig, build_model


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["masked", "flash"])
def test_gpt2_with_kernel_backend_compiles_fullgraph_and_matches_eager(backend):
    import sfa

    if backend not in sfa.available_backends():
        pytest.skip(f"backend {backend!r} not registered (Triton missing)")
    torch._dynamo.reset()
    model = build_model("gpt2_tiny", AttentionConfig(kind="sfa", topk_q=8, topk_k=8, backend=backend),
                        n_layer=1, n_head=2, d_model=64, head_dim=32, vocab_size=128, max_seq_len=32)
    x = torch.randint(0, 128, (1, 19))
    eager_logits, eager_loss = model(x, x)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    logits, loss = compiled(x, x)
    loss.backward()
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
