"""The plain-torch twin of the fast dual-stream linear: the definition every GPU kernel is checked against.

    y = x @ dequant(base)^T + alpha * x @ ortho^T + bias

`alpha` is None or 0 means base only: the ortho tensors are not touched (the kill switch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant import dequantize_codes, unpack_int4
from ..sparse import scatter_dense


def dequant_weight(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense (out, in) weight from the packed INT4 base."""
    return dequantize_codes(unpack_int4(qweight), scales, zeros, group_size, dtype)


def csr_dense(crow, col, values, shape, dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Dense (out, in) matrix of a CSR stream; differentiable in `values`. `rows` (nnz,): precomputed row ids."""
    if rows is None:
        counts = (crow[1:] - crow[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(shape[0], device=crow.device), counts)
    return scatter_dense(rows, col.long(), values, shape, dtype)


def dual_linear(x, qweight, scales, zeros, group_size: int, crow=None, col=None, values=None,
                alpha=None, bias=None) -> torch.Tensor:
    """(..., in) -> (..., out): packed INT4 base plus alpha times the CSR ortho stream.

    Args:
        x: activations, any float dtype; the math runs in x.dtype (as the kernels do, with fp32 accumulation).
        qweight: (out, in/2) uint8, two codes per byte, low nibble first.
        scales, zeros: (out, n_groups); zeros None for a symmetric grid.
        crow, col, values: the ortho stream (CSR); ignored when alpha is None or 0.
        alpha: float or 0-dim tensor.
        bias: (out,) or None.
    """
    out_f, in_f = qweight.shape[0], qweight.shape[1] * 2
    w = dequant_weight(qweight, scales, zeros, group_size, torch.float32)
    a = float(alpha) if alpha is not None else 0.0
    if a != 0 and values is not None and values.numel():
        w = w + a * csr_dense(crow, col, values, (out_f, in_f), torch.float32)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
