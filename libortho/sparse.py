"""The ortho stream's storage: CSR with int32 row pointers and compact column indices."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def index_dtype(in_features: int) -> torch.dtype:
    """int16 columns whenever they fit: half the index bytes of int32 for every layer up to 32K wide."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max + 1 else torch.int32


@dataclass
class CSR:
    """Sparse (out, in) matrix. `crow` int32 (out+1,), `col` int16/int32 (nnz,), `values` (nnz,)."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / (self.shape[0] * self.shape[1])

    def rows(self) -> torch.Tensor:
        """Row index of each stored value, (nnz,) int64."""
        counts = (self.crow[1:] - self.crow[:-1]).long()
        return torch.repeat_interleave(torch.arange(self.shape[0], device=self.crow.device), counts)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return scatter_dense(self.rows(), self.col.long(), self.values, self.shape, dtype)


def scatter_dense(rows, cols, values, shape, dtype=None) -> torch.Tensor:
    """Dense matrix with `values` at (rows, cols); differentiable in `values`."""
    dtype = dtype or values.dtype
    flat = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    flat = flat.index_put((rows * shape[1] + cols,), values.to(dtype))
    return flat.view(shape)


def csr_from_mask(dense: torch.Tensor, mask: torch.Tensor) -> CSR:
    """Keep `dense` where `mask` is True, row-major order."""
    if dense.shape != mask.shape or dense.dim() != 2:
        raise ValueError(f"dense {tuple(dense.shape)} and mask {tuple(mask.shape)} must be equal 2-D shapes")
    out_f, in_f = dense.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major already
    counts = torch.bincount(rows, minlength=out_f)
    crow = torch.zeros(out_f + 1, dtype=torch.int32, device=dense.device)
    crow[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return CSR(crow, cols.to(index_dtype(in_f)), dense[rows, cols].contiguous(), (out_f, in_f))


def empty_csr(shape: tuple[int, int], dtype: torch.dtype, device=None) -> CSR:
    return CSR(
        torch.zeros(shape[0] + 1, dtype=torch.int32, device=device),
        torch.zeros(0, dtype=index_dtype(shape[1]), device=device),
        torch.zeros(0, dtype=dtype, device=device),
        shape,
    )
