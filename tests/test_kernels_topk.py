"""Fused top-k kernel: bit-identical to sfa.topk_sparsify (ties to the lower index), every slot written."""

import pytest
import torch

import sfa
from sfa.kernels.topk import fused_topk_masked, fused_topk_sparsify, kernel_supports, topk_rows_into

CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter mishandles bf16; bf16 runs in the GPU tests


def _with_ties(x: torch.Tensor) -> torch.Tensor:
    """Plant rows where the choice depends only on the tie rule: a constant row, equal +/- pairs,
    signed zeros, and a row where many entries share the k-th magnitude."""
    x = x.clone()
    rows = x.view(-1, x.shape[-1])
    d = rows.shape[-1]
    rows[0] = 0.5
    if rows.shape[0] > 1:
        rows[1, 1::2] = -rows[1, 0::2][: rows[1, 1::2].numel()]
    if rows.shape[0] > 2:
        rows[2] = 0.0
        rows[2, ::3] = -0.0
    if rows.shape[0] > 3:
        rows[3, d // 2 :] = rows[3, 0]
    return x


def _poisoned_outputs(x, k):
    values = torch.full((*x.shape[:-1], k), float("nan"), dtype=x.dtype)
    indices = torch.full((*x.shape[:-1], k), 255, dtype=torch.uint8)
    masked = torch.full(x.shape, float("nan"), dtype=x.dtype)
    return values, indices, masked


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize(
    "dim,k",
    [(16, 1), (32, 4), (64, 8), (32, 16), (32, 32), (48, 5), (100, 7), (256, 16), (6, 5), (3, 3)],
    ids=["k1", "k4", "k=D/8", "k=D/2", "k=D", "D48-k5", "D100-k7", "D256-k16", "D6-k5", "D3-k3"],  # the last two:
    # k rounded up to a power of two exceeds the row's columns, so padding keys reach the top-k slots
)
def test_matches_topk_sparsify_bit_exactly(dtype, dim, k):
    x = _with_ties(torch.randn(3, 7, dim).to(dtype))  # 21 rows: two row blocks, the second partial
    values, indices, masked = _poisoned_outputs(x, k)
    topk_rows_into(x, k, values, indices, masked)
    want = sfa.topk_sparsify(x, k)
    assert torch.equal(indices, want.indices), "selected columns differ from the contract"
    assert torch.equal(values, want.values)
    assert torch.equal(masked, want.to_dense())


def test_without_masked_output_and_strided_input():
    x = torch.randn(24, 2, 64).transpose(0, 1)  # non-contiguous rows
    code = fused_topk_sparsify(x, 8)
    want = sfa.topk_sparsify(x, 8)
    assert code.indices.dtype == torch.uint8
    assert torch.equal(code.indices, want.indices) and torch.equal(code.values, want.values)


def test_empty_input_gives_empty_code():
    code = fused_topk_sparsify(torch.randn(0, 32), 4)
    assert code.values.shape == (0, 4) and code.indices.shape == (0, 4)


def test_rows_longer_than_256_fall_back_to_pytorch():
    x = torch.randn(5, 300)
    assert not kernel_supports(x, 9)
    code, masked = fused_topk_masked(x, 9)
    want = sfa.topk_sparsify(x, 9)
    assert code.indices.dtype == torch.int16
    assert torch.equal(code.indices, want.indices) and torch.equal(masked, want.to_dense())


def test_gradient_is_straight_through_at_selected_coordinates():
    x = torch.randn(2, 3, 7, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_values, w_masked = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 32)

    code, masked = fused_topk_masked(x, 4)
    ((code.values * w_values).sum() + (masked * w_masked).sum()).backward()
    ref = sfa.topk_sparsify(x_ref, 4)
    ((ref.values * w_values).sum() + (ref.to_dense() * w_masked).sum()).backward()

    assert torch.allclose(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    assert (x.grad != 0).sum() <= 2 * 3 * 7 * 4


@pytest.mark.parametrize(
    "x,k,error,message",
    [
        (torch.randn(4, 8), 0, ValueError, "k=0 must be in [1, 8]"),
        (torch.randn(4, 8), 9, ValueError, "k=9 must be in [1, 8]"),
        (torch.randn(4, 8), 2.0, TypeError, "k must be an int"),
        (torch.ones(4, 8, dtype=torch.int32), 2, TypeError, "floating-point"),
        ([1.0, 2.0], 1, TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_problem(x, k, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        fused_topk_sparsify(x, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim,k", [(64, 8), (128, 16), (128, 1), (128, 64), (256, 32), (96, 12)])
def test_gpu_bit_exact_on_large_inputs(dtype, dim, k):
    x = _with_ties(torch.randn(4, 16, 1037, dim, device="cuda").to(dtype))
    x[0, 0, 5:9] = x[0, 0, 4]  # more ties at distinct positions
    values, indices, masked = (
        torch.full((*x.shape[:-1], k), float("nan"), dtype=dtype, device="cuda"),
        torch.full((*x.shape[:-1], k), 255, dtype=torch.uint8, device="cuda"),
        torch.full(x.shape, float("nan"), dtype=dtype, device="cuda"),
    )
    topk_rows_into(x, k, values, indices, masked)
    want = sfa.topk_sparsify(x, k)
    assert torch.equal(indices, want.indices)
    assert torch.equal(values, want.values)
    assert torch.equal(masked, want.to_dense())


def test_registered_as_the_cuda_key_coder_and_exact_with_dense_dims():
    """sfa.kernels makes this kernel what the KV cache codes CUDA keys with (sfa.topk.fast_topk_sparsify); with
    decoupled rows it must give the reference code exactly (leading dims kept, indices counted from the row start)."""
    from sfa import topk as topk_module

    assert topk_module._FAST_TOPK_SPARSIFY["cuda"] is fused_topk_sparsify
    x = _with_ties(torch.randn(3, 5, 48, device="cuda" if torch.cuda.is_available() else "cpu"))  # else interpreted
    for dense_dims, k in ((0, 6), (16, 6), (47, 1)):
        code, want = fused_topk_sparsify(x, k, dense_dims), sfa.topk_sparsify(x, k, dense_dims)
        assert code.indices.dtype == want.indices.dtype == torch.uint8
        assert torch.equal(code.indices, want.indices) and torch.equal(code.values, want.values)
        assert code.dense_dims == want.dense_dims == dense_dims
        if dense_dims:
            assert torch.equal(code.dense, want.dense)


@pytest.mark.gpu
@pytest.mark.parametrize("dense_dims", [0, 32])
def test_gpu_kv_cache_stores_the_reference_code(dense_dims):
    """A CUDA SFA cache codes its keys with the fused kernel (prefill by append, decode steps by write): the
    stored code must be the reference's, bit for bit, in bf16 with ties."""
    from sfa.cache import LayerCache

    b, h, t, d, k = 2, 8, 333, 128, 16
    keys = _with_ties(torch.randn(b, h, t + 3, d, device="cuda").to(torch.bfloat16))
    values = torch.randn(b, h, t + 3, d, device="cuda", dtype=torch.bfloat16)
    cache = LayerCache(b, t + 3, h, d, d, topk=k, dtype=torch.bfloat16, device="cuda", dense_dims=dense_dims)
    cache.append(keys[:, :, :t], values[:, :, :t])
    for pos in range(t, t + 3):
        cache.write(keys[:, :, pos : pos + 1], values[:, :, pos : pos + 1], torch.tensor([pos], device="cuda"))
    want = sfa.topk_sparsify(keys, k, dense_dims)
    assert torch.equal(cache.key_indices, want.indices)
    assert torch.equal(cache.key_values, want.values)
    if dense_dims:
        assert torch.equal(cache.key_dense, want.dense)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_special_values_come_back_bit_for_bit(dtype):
    """The code's values are rebuilt from the packed keys' bits: infinities, a NaN, signed zeros and subnormals
    (with their signs) must come back exactly, as the reference's values and at the reference's columns."""
    tiny = torch.finfo(dtype).tiny
    x = torch.randn(6, 32).to(dtype)
    x[0, [3, 9]] = torch.tensor([float("inf"), float("-inf")], dtype=dtype)
    x[1, 5] = float("nan")
    x[1, 6] = -float("inf")
    x[2] = -0.0
    x[2, 7] = 0.0
    x[3] = torch.tensor([tiny / 4, -tiny / 2] * 16, dtype=dtype)  # subnormals, both signs
    x[4, 0::2] = -x[4, 1::2]
    values, indices, masked = _poisoned_outputs(x, 8)
    topk_rows_into(x, 8, values, indices, masked)
    want = sfa.topk_sparsify(x, 8)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(indices, want.indices)
    assert torch.equal(values.view(bits), want.values.view(bits))
    assert torch.equal(masked.view(bits), want.to_dense().view(bits))
