import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libortho.sparse import csr_from_mask, empty_csr, index_dtype


@given(st.integers(1, 12), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_csr_round_trip(rows, cols, p, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) < p
    csr = csr_from_mask(dense, mask)
    assert csr.crow.dtype == torch.int32 and csr.crow.numel() == rows + 1
    assert csr.nnz == int(mask.sum())
    assert torch.equal(csr.to_dense(), torch.where(mask, dense, torch.zeros(())))


def test_compact_column_indices():
    assert index_dtype(4096) == torch.int16 and index_dtype(32768) == torch.int16
    assert index_dtype(32769) == torch.int32
    assert csr_from_mask(torch.ones(2, 14336), torch.ones(2, 14336, dtype=torch.bool)).col.dtype == torch.int16


def test_empty_csr():
    e = empty_csr((3, 8), torch.float32)
    assert e.nnz == 0 and torch.equal(e.to_dense(), torch.zeros(3, 8))


def test_to_dense_is_differentiable():
    dense = torch.randn(4, 6)
    csr = csr_from_mask(dense, dense.abs() > 0.5)
    csr.values.requires_grad_(True)
    (csr.to_dense() * 2).sum().backward()
    assert torch.equal(csr.values.grad, torch.full_like(csr.values, 2.0))
