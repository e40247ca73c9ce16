"""The top-k selection contract (sfa.topk_sparsify): largest |x|, ties to the lower index,
signed values kept, indices ascending, uint8 up to d = 256, straight-through gradients."""

import itertools

import pytest
import torch

from sfa import SparseCode, topk_mask, topk_sparsify
from sfa.topk import index_dtype_for


def brute_force_topk(row: list[float], k: int) -> list[int]:
    """Spell the contract out: sort columns by (-|x|, column) and keep the first k, ascending."""
    order = sorted(range(len(row)), key=lambda c: (-abs(row[c]), c))
    return sorted(order[:k])


@pytest.mark.parametrize("d,k", [(1, 1), (5, 2), (16, 1), (16, 16), (64, 8), (128, 16), (96, 7)])
def test_matches_brute_force_on_random_rows(d, k):
    x = torch.randn(6, 3, d)
    code = topk_sparsify(x, k)
    for row, idx, vals in zip(x.reshape(-1, d), code.indices.reshape(-1, k), code.values.reshape(-1, k)):
        expected = brute_force_topk(row.tolist(), k)
        assert idx.tolist() == expected
        assert torch.equal(vals, row[expected])


def test_ties_go_to_the_lower_index():
    # Many exact ties in |x|, including +a and -a, which tie in magnitude.
    x = torch.tensor([[2.0, -2.0, 1.0, 2.0, -1.0, 0.0, 2.0, 1.0]])
    for k in range(1, 9):
        code = topk_sparsify(x, k)
        assert code.indices[0].tolist() == brute_force_topk(x[0].tolist(), k), k
    assert topk_sparsify(x, 2).indices[0].tolist() == [0, 1]
    assert topk_sparsify(x, 5).indices[0].tolist() == [0, 1, 2, 3, 6]  # the four 2s, then the first 1
    assert topk_sparsify(x, 5).values[0].tolist() == [2.0, -2.0, 1.0, 2.0, 2.0]


def test_ties_on_small_integer_grid_exhaustively():
    # Every row over {-1, 0, 1}^5 and every k: ties everywhere.
    rows = torch.tensor(list(itertools.product([-1.0, 0.0, 1.0], repeat=5)))
    for k in range(1, 6):
        code = topk_sparsify(rows, k)
        for row, idx in zip(rows.tolist(), code.indices.tolist()):
            assert idx == brute_force_topk(row, k)


def test_code_fields_dtypes_and_dense_round_trip():
    x = torch.randn(2, 4, 10, 64, dtype=torch.float16)
    code = topk_sparsify(x, 8)
    assert isinstance(code, SparseCode)
    assert code.values.shape == code.indices.shape == (2, 4, 10, 8)
    assert code.values.dtype == torch.float16 and code.indices.dtype == torch.uint8
    assert code.dim == 64 and code.k == 8 and code.shape == x.shape
    assert bool((code.indices[..., 1:] > code.indices[..., :-1]).all()), "indices must be strictly ascending"
    dense = code.to_dense()
    assert dense.dtype == x.dtype and dense.shape == x.shape
    assert torch.equal(dense, torch.where(code.mask(), x, torch.zeros_like(x)))
    assert int(code.mask().sum(-1).min()) == int(code.mask().sum(-1).max()) == 8
    assert torch.equal(topk_mask(x, 8), dense)


@pytest.mark.parametrize("dim,dtype", [(1, torch.uint8), (256, torch.uint8), (257, torch.int16), (4096, torch.int16)])
def test_index_dtype_follows_the_contract(dim, dtype):
    assert index_dtype_for(dim) == dtype
    code = topk_sparsify(torch.randn(3, dim), 1)
    assert code.indices.dtype == dtype


def test_index_dtype_for_rejects_huge_dims():
    with pytest.raises(ValueError, match="too large"):
        index_dtype_for(40000)


def test_full_k_is_identity():
    x = torch.randn(5, 32)
    assert torch.equal(topk_mask(x, 32), x)


def test_gradient_reaches_only_selected_coordinates():
    x = torch.randn(4, 7, 32, requires_grad=True)
    code = topk_sparsify(x, 5)
    upstream = torch.randn(4, 7, 32)
    (code.to_dense() * upstream).sum().backward()
    mask = code.mask()
    assert torch.equal(x.grad, torch.where(mask, upstream, torch.zeros_like(upstream)))


@pytest.mark.parametrize(
    "x,k,exc,message",
    [
        (torch.randn(4, 8), 0, ValueError, r"k=0 must be in \[1, 8\]"),
        (torch.randn(4, 8), 9, ValueError, r"k=9 must be in \[1, 8\]"),
        (torch.randn(4, 8), 2.0, TypeError, "k must be an int"),
        (torch.randn(4, 8), True, TypeError, "k must be an int"),
        (torch.arange(8), 2, TypeError, "floating-point"),
        (torch.tensor(1.0), 1, ValueError, "at least one dimension"),
        ([1.0, 2.0], 1, TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_problem(x, k, exc, message):
    with pytest.raises(exc, match=message):
        topk_sparsify(x, k)


def test_sparse_code_validates_its_fields():
    with pytest.raises(ValueError, match="same shape"):
        SparseCode(values=torch.randn(2, 3), indices=torch.zeros(2, 4, dtype=torch.uint8), dim=8)
    with pytest.raises(ValueError, match=r"k=3 must be in \[1, dim=2\]"):
        SparseCode(values=torch.randn(2, 3), indices=torch.zeros(2, 3, dtype=torch.uint8), dim=2)


def test_fast_topk_sparsify_runs_what_is_registered_for_the_device(monkeypatch):
    """The KV cache codes dense keys through `fast_topk_sparsify`: the registered implementation for the keys'
    device when there is one (sfa/kernels registers the fused kernel for CUDA), else the reference."""
    from sfa import topk as topk_module
    from sfa.cache import LayerCache

    keys = torch.randn(2, 3, 5, 16)
    want = topk_sparsify(keys, 4, 6)
    calls = []

    def spy(x, k, dense_dims):  # a correct implementation that records its calls
        calls.append((tuple(x.shape), k, dense_dims))
        return topk_sparsify(x, k, dense_dims)

    monkeypatch.setitem(topk_module._FAST_TOPK_SPARSIFY, "cpu", spy)
    cache = LayerCache(2, 8, 3, 16, 16, topk=4, dtype=torch.float32, dense_dims=6)
    stored, _ = cache.append(keys, torch.randn(2, 3, 5, 16))
    cache.write(keys[:, :, :1], torch.randn(2, 3, 1, 16), torch.tensor([5]))
    assert calls == [((2, 3, 5, 16), 4, 6), ((2, 3, 1, 16), 4, 6)]
    assert torch.equal(stored.indices, want.indices) and torch.equal(stored.values, want.values)
    assert torch.equal(cache.key_indices[:, :, 5], want.indices[:, :, 0])
