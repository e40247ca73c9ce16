"""The fused QK epilogue (sfa/kernels/qk_epilogue.py) against the readable ops it replaces, in fp64:
RMSNorm (F.rms_norm, weight) -> RoPE (models.qwen3.apply_rope) -> top-k mask (sfa.topk), forward and the
gradients of x and of the norm weight; then in Qwen3, fused against unfused, dense and SFA."""

import copy

import pytest
import torch
import torch.nn.functional as F

import models.attention as seam
import models.qwen3 as qwen3
import sfa
from models.qwen3 import Qwen3, Qwen3Config, RotaryEmbedding, apply_rope
from sfa.kernels.qk_epilogue import qk_norm_rope, qk_norm_rope_bwd_op, qk_norm_rope_op, selection_bytes

# fp32: the kernel and the fp64 oracle differ by fp32 rounding of a few ops per entry (plus a sum over
# rows for the weight gradient); fp16: one rounding of the output (2^-11) and of the inputs' gradient.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
EPS = 1e-6
# Rows whose selection equals sfa.topk's on the kernel's own unmasked rows (a second launch without top-k):
# all of them in the interpreter; on the GPU the two launches are separately compiled kernels, which may
# contract a multiply-add differently and so round an entry one 16-bit ulp apart and flip a near tie.
ROW_AGREEMENT = {"cpu": 1.0, "cuda": 0.999}


def unpack(selection, d):
    """The forward's recorded selection (..., D/8) uint8 as a boolean (..., D) mask: bit j of byte c is column 8c + j."""
    bits = (selection.long().unsqueeze(-1) >> torch.arange(8, device=selection.device)) & 1
    return bits.flatten(-2)[..., :d].bool()


def pack(mask):
    """unpack's inverse for D a multiple of 8: a boolean (..., D) mask as the (..., D/8) uint8 record."""
    weights = 1 << torch.arange(8, device=mask.device)
    return (mask.unflatten(-1, (-1, 8)).long() * weights).sum(-1).to(torch.uint8)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def tables(t, rotary, dtype=torch.float32):
    return RotaryEmbedding(rotary, 1e4)(0, t, dtype) if rotary else (None, None)


def oracle(x, weight, cos, sin, topk, dense_dims, support=None):
    """The unfused ops in fp64 on x (B, T, H, D); mask on `support` when given (a boolean (B, T, H, D)), else
    on the oracle's own rows rounded to x's dtype (where the kernel selects). Returns (rows, support)."""
    y = weight.double() * F.rms_norm(x.double(), (x.shape[-1],), eps=EPS)
    if cos is not None:  # apply_rope takes (B, H, T, D)
        y = apply_rope(y.transpose(1, 2), cos.double(), sin.double()).transpose(1, 2)
    if topk is None:
        return y, None
    if support is None:
        tail = sfa.topk_sparsify(y.detach().to(x.dtype)[..., dense_dims:], topk).mask()
        support = torch.cat([torch.ones_like(tail[..., :dense_dims]), tail], dim=-1)
    return y * support, support


def check(x, weight, cos, sin, topk, dense_dims, tol, grad=None, own_support=True):
    """The kernel's rows, dx and d weight against the fp64 oracle. own_support=False: the oracle scores the
    selection the kernel recorded (16-bit rounding can flip a near tie), which must be what its rows kept;
    the selection itself is then checked exactly against sfa.topk_sparsify on the kernel's own unmasked rows."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = qk_norm_rope(x, weight, EPS, cos, sin, topk=topk, dense_dims=dense_dims)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    grad = torch.randn(x.shape, device=x.device).to(x.dtype) if grad is None else grad
    out.backward(grad)
    support = None
    if topk is not None and not own_support:
        rows = qk_norm_rope(x.detach(), weight.detach(), EPS, cos, sin)
        k = 0 if dense_dims + topk == x.shape[-1] else topk
        masked, selection = qk_norm_rope_op(x.detach(), weight.detach(), cos, sin, EPS, k, dense_dims, x.dtype)
        support = unpack(selection, x.shape[-1])
        assert torch.equal(masked, out) and torch.equal(masked, torch.where(support, masked, 0))
        assert (support.sum(-1) == dense_dims + topk).all()
        tail = sfa.topk_sparsify(rows[..., dense_dims:], topk).mask()
        want = torch.cat([torch.ones_like(tail[..., :dense_dims]), tail], dim=-1)
        same = (support == want).all(-1).double().mean().item()
        assert same >= ROW_AGREEMENT[x.device.type], f"the kernel's selection is sfa.topk's in only {same:.4%} of rows"
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref, support = oracle(x64, w64, cos, sin, topk, dense_dims, support)
    ref.backward(grad.double())
    assert rel_err(out, ref) < tol, "rows"
    assert rel_err(x.grad, x64.grad) < tol, "dx"
    assert rel_err(weight.grad, w64.grad) < tol, "d weight"
    return out


ROPES = {"full": lambda d: (d, 0), "decoupled": lambda d: (16, 16), "none": lambda d: (0, 0)}  # (R, dense_dims)


@pytest.mark.parametrize("topk", [None, 5], ids=["no-topk", "k5"])
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("d", [48, 80])
def test_forward_and_grads_fp32(d, rope, topk):
    rotary, dense_dims = ROPES[rope](d)
    b, t, h = 2, 5, 3  # 30 rows: not a multiple of the rows per program
    cos, sin = tables(t, rotary)
    weight = torch.rand(d) + 0.5  # not ones: the weight's gradient and its place in RoPE must be right
    check(torch.randn(b, t, h, d), weight, cos, sin, topk, dense_dims if topk else 0, TOL[torch.float32])


@pytest.mark.parametrize("rope", ["full", "decoupled"])
def test_forward_and_grads_fp16(rope):
    rotary, dense_dims = ROPES[rope](64)
    cos, sin = tables(7, rotary)
    check(torch.randn(1, 7, 5, 64).half(), torch.rand(64) + 0.5, cos, sin, 8, dense_dims, TOL[torch.float16],
          own_support=False)


def test_gqa_q_and_k_heads_share_the_tables():
    t, d = 6, 32
    cos, sin = tables(t, d)
    for heads, topk in ((4, 4), (2, 3)):  # q: 4 heads, k: 2 heads, as Qwen3Attention calls it for GQA
        check(torch.randn(2, t, heads, d), torch.rand(d) + 0.5, cos, sin, topk, 0, TOL[torch.float32])


def test_strided_input_and_gradient():
    """x a transposed view ((B, H, T, D) memory) and a transposed cotangent, as attention's backward gives it."""
    b, t, h, d = 2, 5, 3, 48
    cos, sin = tables(t, d)
    x = torch.randn(b, h, t, d).transpose(1, 2)
    grad = torch.randn(b, h, t, d).transpose(1, 2)
    assert not x.is_contiguous() and not grad.is_contiguous()
    check(x, torch.rand(d) + 0.5, cos, sin, 6, 0, TOL[torch.float32], grad=grad)


def test_ties_go_to_the_lower_column_as_in_sfa_topk():
    """Rows of a few repeated magnitudes (many exact ties), no RoPE, unit weight: the kept columns are exactly
    sfa.topk_sparsify's on the normalised rows."""
    x = torch.randint(-2, 3, (3, 4, 2, 32)).float()
    x[..., 0] = 1.0  # no all-zero row
    out = qk_norm_rope(x, torch.ones(32), EPS, topk=7)
    rows = qk_norm_rope(x, torch.ones(32), EPS)
    assert torch.equal(out, sfa.topk_mask(rows, 7))
    assert torch.equal(out != 0, sfa.topk_sparsify(rows, 7).mask() & (rows != 0))


def check_backward_follows_the_record(x, w, cos, sin, topk, dense_dims, tol):
    """The forward records its kept columns (D/8 bytes per row), exactly the oracle's on its rounded rows
    (fp32) or what its rows kept (16-bit, where rounding may flip a near tie); the backward applies a record,
    not a selection of its own: fed the record of a different selection, its gradients are the oracle's on it."""
    b, t, h, d = x.shape
    out, selection = qk_norm_rope_op(x, w, cos, sin, EPS, topk, dense_dims, x.dtype)
    assert selection.shape == (b, t, h, selection_bytes(d)) and selection.dtype == torch.uint8
    kept = unpack(selection, d)
    assert torch.equal(out, torch.where(kept, out, 0)) and (kept.sum(-1) == dense_dims + topk).all()
    if x.dtype == torch.float32:
        _, want = oracle(x.double(), w, cos, sin, topk, dense_dims)
        assert torch.equal(kept, want.bool())
    # Another valid selection: in every row, the first kept column past dense_dims swapped for the first dropped.
    other = kept.clone()
    tail = other[..., dense_dims:]
    first_kept, first_dropped = tail.int().argmax(-1, keepdim=True), (~tail).int().argmax(-1, keepdim=True)
    tail.scatter_(-1, first_kept, False).scatter_(-1, first_dropped, True)
    grad = torch.randn(x.shape, device=x.device).to(x.dtype)
    gx, gw = qk_norm_rope_bwd_op(grad, x, w, cos, sin, pack(other), EPS, topk, dense_dims)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref, _ = oracle(x64, w64, cos, sin, topk, dense_dims, support=other)
    ref.backward(grad.double())
    assert rel_err(gx, x64.grad) < tol and rel_err(gw, w64.grad) < tol


@pytest.mark.parametrize("rope", ["full", "decoupled"])
@pytest.mark.parametrize("d", [40, 64])
def test_recorded_selection_is_the_forwards_and_the_backward_follows_it(d, rope):
    rotary, dense_dims = ROPES[rope](d)
    cos, sin = tables(5, rotary)
    check_backward_follows_the_record(torch.randn(2, 5, 3, d), torch.rand(d) + 0.5, cos, sin, 6, dense_dims,
                                      TOL[torch.float32])


def test_keeping_every_coordinate_is_no_mask():
    x, w = torch.randn(1, 3, 2, 32), torch.rand(32) + 0.5
    cos, sin = tables(3, 8)
    assert torch.equal(qk_norm_rope(x, w, EPS, cos, sin, topk=24, dense_dims=8), qk_norm_rope(x, w, EPS, cos, sin))


def test_fp32_rows_to_fp16_output():
    x, w = torch.randn(2, 3, 2, 32), torch.rand(32) + 0.5
    cos, sin = tables(3, 32)
    out = qk_norm_rope(x, w, EPS, cos, sin, out_dtype=torch.float16)
    ref, _ = oracle(x, w, cos, sin, None, 0)
    assert out.dtype == torch.float16 and rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("call, message", [
    (lambda x, w, c, s: qk_norm_rope(x[0], w, EPS, c, s), "must be a (B, T, H, D) tensor"),
    (lambda x, w, c, s: qk_norm_rope(x, w[:-1], EPS, c, s), "weight has shape (31,)"),
    (lambda x, w, c, s: qk_norm_rope(x, w, EPS, c), "give cos and sin together"),
    (lambda x, w, c, s: qk_norm_rope(x, w, EPS, c[:2], s[:2]), "cos/sin must be (T=3, R)"),
    (lambda x, w, c, s: qk_norm_rope(x, w, EPS, c, s, topk=0), "topk=0 must be None or an int in [1,"),
    (lambda x, w, c, s: qk_norm_rope(x, w, EPS, c, s, topk=30, dense_dims=8), "topk=30"),
    (lambda x, w, c, s: qk_norm_rope(x, w, EPS, c, s, dense_dims=32), "dense_dims=32"),
    (lambda x, w, c, s: qk_norm_rope(x.double(), w, EPS, c, s), "torch.float64"),
])
def test_bad_arguments_are_named(call, message):
    cos, sin = tables(3, 8)
    with pytest.raises(ValueError) as err:
        call(torch.randn(1, 3, 2, 32), torch.ones(32), cos, sin)
    assert message in str(err.value)


def test_opcheck_and_compile():
    x, w = torch.randn(1, 3, 2, 16, requires_grad=True), (torch.rand(16) + 0.5).requires_grad_()
    cos, sin = tables(3, 16)
    torch.library.opcheck(qk_norm_rope_op, (x, w, cos, sin, EPS, 4, 0, torch.float32))
    _, selection = qk_norm_rope_op(x.detach(), w.detach(), cos, sin, EPS, 4, 0, torch.float32)
    torch.library.opcheck(qk_norm_rope_bwd_op, (torch.randn(1, 3, 2, 16), x.detach(), w.detach(), cos, sin, selection,
                                                EPS, 4, 0))
    f = torch.compile(lambda x, w: qk_norm_rope(x, w, EPS, cos, sin, topk=4), fullgraph=True, backend="aot_eager")
    f(x, w).square().sum().backward()
    got = (x.grad, w.grad)
    x.grad = w.grad = None
    qk_norm_rope(x, w, EPS, cos, sin, topk=4).square().sum().backward()
    torch.testing.assert_close(got, (x.grad, w.grad))


# ---- the seam: sfa_attention over rows their producer masked


def test_premasked_call_reaches_the_dense_step_of_masked_without_its_topk(monkeypatch):
    import sfa.kernels.masked as masked

    q, k, v = torch.randn(1, 4, 9, 32), torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    q_masked, k_masked = sfa.topk_mask(q, 4), sfa.topk_mask(k, 3)
    want = sfa.sfa_attention_reference(q, k, v, topk_q=4, topk_k=3)
    monkeypatch.setattr(masked, "masked_features", lambda *a, **kw: pytest.fail("the masked backend took a top-k"))
    got = sfa.sfa_attention(q_masked, k_masked, v, topk_q=4, topk_k=3, backend="masked", premasked=True)
    torch.testing.assert_close(got, want)
    # the reference has no premasked entry: it masks again, which keeps every value
    torch.testing.assert_close(sfa.sfa_attention(q_masked, k_masked, v, topk_q=4, topk_k=3, premasked=True), want)


def test_which_backends_take_premasked_rows():
    from types import SimpleNamespace

    from sfa.backends import takes_premasked

    def on(device, shape, dtype=torch.bfloat16):
        return SimpleNamespace(shape=torch.Size(shape), dtype=dtype, device=torch.device(device))

    q, k = on("cuda", (2, 6, 1024, 128)), on("cuda", (2, 3, 1024, 128))
    assert takes_premasked(q, k, k)  # auto -> masked
    assert takes_premasked(q, k, k, dense_dims=16)
    assert not takes_premasked(q, k, k, backend="flash")  # takes its own codes
    assert not takes_premasked(on("cuda", (1, 2, 8, 512)), on("cuda", (1, 2, 8, 512)), on("cuda", (1, 2, 8, 512)))
    assert not takes_premasked(on("cpu", (1, 2, 8, 64)), on("cpu", (1, 2, 8, 64)), on("cpu", (1, 2, 8, 64)))
    assert takes_premasked(on("cpu", (1, 2, 8, 64)), on("cpu", (1, 2, 8, 64)), on("cpu", (1, 2, 8, 64)), backend="masked")


def test_premasked_refuses_sparse_codes():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="premasked=True means q and k are masked dense rows, not SparseCodes"):
        sfa.sfa_attention(sfa.topk_sparsify(q, 4), q, q, topk_k=4, premasked=True)


# ---- in the model: Qwen3 with the fused epilogue equals Qwen3 with the unfused ops

TINY = dict(n_layer=2, n_head=4, n_kv_head=2, head_dim=48, d_model=64, intermediate_size=96, vocab_size=97,
            max_seq_len=48)
ATTENTIONS = {
    "dense": None,
    "dense-norope": {"kind": "dense", "rope": "none"},
    "sfa-masked": {"kind": "sfa", "topk_q": 5, "topk_k": 4, "backend": "masked"},
    "sfa-masked-decoupled": {"kind": "sfa", "topk_q": 5, "topk_k": 4, "backend": "masked", "rope": "decoupled",
                             "rope_dims": 16},
    "sfa-reference": {"kind": "sfa", "topk_q": 5, "topk_k": 4, "backend": "reference"},
    "short": {"kind": "short", "d_short": 16},
    # a shared rotary key has a split QK-norm, which the fused pass does not do: it keeps the unfused ops
    "sfa-masked-shared": {"kind": "sfa", "topk_q": 5, "topk_k": 4, "backend": "masked", "rope": "decoupled",
                          "rope_dims": 16, "rope_shared": True},
}


def _logits_and_grads(model, x, mode, monkeypatch):
    monkeypatch.setattr(qwen3, "QK_EPILOGUE", mode)
    model = copy.deepcopy(model)
    calls = []
    original = sfa.sfa_attention

    def spy(q, k, v, **kw):
        calls.append((kw.get("premasked", False), (q != 0).sum(-1).max().item()))
        return original(q, k, v, **kw)

    fused = []
    original_epilogue = qwen3.qk_norm_rope

    def epilogue_spy(*args, **kw):
        fused.append(1)
        return original_epilogue(*args, **kw)

    monkeypatch.setattr(seam.sfa, "sfa_attention", spy)
    monkeypatch.setattr(qwen3, "qk_norm_rope", epilogue_spy)
    logits, _ = model(x)
    logits.backward(torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)))
    monkeypatch.setattr(seam.sfa, "sfa_attention", original)
    monkeypatch.setattr(qwen3, "qk_norm_rope", original_epilogue)
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}, calls, len(fused)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_qwen3_fused_epilogue_equals_the_unfused_ops(attention, monkeypatch):
    model = Qwen3(Qwen3Config(**TINY), ATTENTIONS[attention])
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):  # not ones: the norm weights' gradients must flow through the kernel
            p.data.uniform_(0.5, 1.5)
    x = torch.randint(0, 97, (2, 11))
    want, want_grads, unfused_calls, none_fused = _logits_and_grads(model, x, "off", monkeypatch)
    got, grads, calls, n_fused = _logits_and_grads(model, x, "on", monkeypatch)
    shared = bool(ATTENTIONS[attention] and ATTENTIONS[attention].get("rope_shared"))
    assert none_fused == 0 and n_fused == (0 if shared else 2 * TINY["n_layer"])  # q and k of every layer
    assert rel_err(got, want.double()) < TOL[torch.float32]
    for name, g in want_grads.items():
        assert rel_err(grads[name], g.double()) < 1e-4, name  # the logits' error, through two layers' backward
    if ATTENTIONS[attention] and ATTENTIONS[attention].get("kind") == "sfa":
        # masked takes pre-masked rows: the epilogue's top-k replaces its own; the reference masks for itself
        takes = ATTENTIONS[attention]["backend"] == "masked" and not shared
        assert [premasked for premasked, _ in calls] == [takes] * TINY["n_layer"]
        assert not any(premasked for premasked, _ in unfused_calls)
        if takes:
            kept = 5 + ATTENTIONS[attention].get("rope_dims", 0)
            assert all(nonzero <= kept for _, nonzero in calls)


def test_qwen3_epilogue_switch_rejects_an_unknown_mode(monkeypatch):
    monkeypatch.setattr(qwen3, "QK_EPILOGUE", "fast")
    with pytest.raises(ValueError, match="SFA_QK_EPILOGUE='fast' is unknown; set it to one of auto, on, off"):
        Qwen3(Qwen3Config(**TINY))  # when the model is built, whatever layout it has


def test_qwen3_auto_keeps_the_unfused_ops_off_cuda(monkeypatch):
    monkeypatch.setattr(qwen3, "QK_EPILOGUE", "auto")
    calls = []
    monkeypatch.setattr(qwen3, "qk_norm_rope", lambda *a, **kw: calls.append(1))
    Qwen3(Qwen3Config(**TINY))(torch.randint(0, 97, (1, 4)))
    assert calls == []


# ---- GPU: bf16 at the study shape's head dim


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [None, 16])
@pytest.mark.parametrize("rope", list(ROPES))
def test_gpu_bf16_forward_and_grads(rope, topk):
    rotary, dense_dims = ROPES[rope](128)
    b, t, h, d = 4, 1023, 6, 128
    cos, sin = tables(t, rotary)
    cos, sin = (None, None) if cos is None else (cos.cuda(), sin.cuda())
    x = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    check(x, torch.rand(d, device="cuda") + 0.5, cos, sin, topk, dense_dims if topk else 0, TOL[torch.bfloat16],
          own_support=False)


@pytest.mark.gpu
@pytest.mark.parametrize("rope", ["full", "decoupled"])
def test_gpu_bf16_backward_follows_the_recorded_selection(rope):
    rotary, dense_dims = ROPES[rope](128)
    cos, sin = tables(1023, rotary)
    x = torch.randn(4, 1023, 6, 128, device="cuda", dtype=torch.bfloat16)
    check_backward_follows_the_record(x, torch.rand(128, device="cuda") + 0.5, cos.cuda(), sin.cuda(), 16,
                                      dense_dims, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [None, 16])
@pytest.mark.parametrize("rope", ["full", "decoupled"])
def test_gpu_inductor_compiled_epilogue_equals_eager(rope, topk):
    """What the op costs a compiled graph is its business; what it computes is not: inductor (fullgraph) and
    eager agree on the rows and both gradients, q-like strides, bf16 (the reason for this test: a kernel
    inductor recompiles as a user kernel, as kernel_op would have it, must compile there too)."""
    rotary, dense_dims = ROPES[rope](128)
    cos, sin = (t.cuda() for t in tables(1023, rotary))
    x = torch.randn(2, 6, 1023, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    w = (torch.rand(128, device="cuda") + 0.5).requires_grad_()
    cotangent = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)

    def run(fn):
        x.grad = w.grad = None
        out = fn(x, w)
        out.backward(cotangent)
        return out.detach(), x.grad, w.grad

    def epilogue(x, w):
        return qk_norm_rope(x, w, EPS, cos, sin, topk=topk, dense_dims=dense_dims if topk else 0)

    got = run(torch.compile(epilogue, fullgraph=True))
    want = run(epilogue)
    for name, g, e in zip(("rows", "dx", "dweight"), got, want):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["dense", "sfa-masked"])
def test_gpu_qwen3_bf16_autocast_fused_equals_unfused(attention, monkeypatch):
    torch.manual_seed(0)
    model = Qwen3(Qwen3Config(**{**TINY, "head_dim": 128, "max_seq_len": 512}), ATTENTIONS[attention]).cuda()
    x = torch.randint(0, 97, (2, 500), device="cuda")
    out = {}
    for mode in ("off", "auto"):
        monkeypatch.setattr(qwen3, "QK_EPILOGUE", mode)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out[mode] = model(x)[0].float()
    # bf16 rounds the unfused path's normalised rows once more (before the weight); a flipped near tie in
    # the top-k moves a few scores, so the bound is a bf16 one on the logits as a whole.
    assert rel_err(out["auto"], out["off"].double()) < 2e-2
