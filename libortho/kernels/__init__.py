"""Forward implementations of OrthoLinear: `reference` (plain torch, runs everywhere) and the Triton path.

`dual_linear_forward(module, x)` is what `OrthoLinear.forward` calls on CUDA; it returns None when the fast
path does not apply (CPU tensors, fp32 activations, a padded group layout, Triton missing), and the module
then runs its plain-torch forward.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

DECODE_MAX_ROWS = 8  # up to this many rows of x: the fused GEMV; more rows (prefill): dequantize + cuBLAS
PREFILL_BLOCK_BYTES = 256 * 2**20  # the largest dense weight block a prefill dequantizes at once
# Prefill (more than DECODE_MAX_ROWS rows): "dequant" writes a dense weight block and multiplies with cuBLAS (the
# stream scattered into it); "tensor_core" multiplies the packed base on tensor cores (`w4_gemm`, no dense weight)
# and adds the stream as an SpMM (`csr_spmm_add_`). "dequant" stays the default until a GPU run measures the other.
PREFILL_KERNELS = ("dequant", "tensor_core")
_prefill = {"kernel": "dequant"}


def set_prefill_kernel(name: str) -> str:
    """Choose the prefill kernel for every OrthoLinear (see PREFILL_KERNELS); returns the one it replaces."""
    if name not in PREFILL_KERNELS:
        raise ValueError(f"prefill kernel must be one of {PREFILL_KERNELS}, got {name!r}")
    old, _prefill["kernel"] = _prefill["kernel"], name
    return old


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from . import triton_dual  # noqa: F401
    except Exception:  # ImportError, or a Triton that cannot find a compiler
        return False
    return torch.cuda.is_available()


def applies(m, x: torch.Tensor) -> bool:
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and m.qweight.is_cuda and triton_available()):
        return False
    from .triton_dual import supported

    return supported(m.qweight, m.group_size, m.in_features)


def row_alphas(m, x2: torch.Tensor) -> torch.Tensor:
    """The per-row alpha (B,) of `m` spread over the rows of x2 (B*T, in): each batch entry's T rows share its
    value. T = 1 (decode) gives the layer's own tensor, so a CUDA graph reads its current values at replay."""
    ra = m.row_alpha
    per = x2.shape[0] // ra.numel()
    return ra if per == 1 else ra.repeat_interleave(per)


def dual_linear_forward(m, x: torch.Tensor) -> torch.Tensor | None:
    """y = base(x) + alpha * ortho(x) on the GPU, or None when the fast path does not apply. With a per-row
    alpha (`m.row_alpha`, x of shape (B, ..., in)), y[b] = base(x[b]) + row_alpha[b] * ortho(x[b])."""
    if not applies(m, x):
        return None
    if x.device.index is not None and x.device.index != torch.cuda.current_device():
        # a layer on another GPU (a model placed across several): Triton launches on the current device
        with torch.cuda.device(x.device):
            return dual_linear_forward(m, x)
    from . import triton_dual as td

    x2 = x.reshape(-1, m.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    on = m.ortho_on
    bias = None if m.bias is None else m.bias
    alpha = m.alpha if m.row_alpha is None else row_alphas(m, x2)  # () or (M,)
    if x2.shape[0] <= DECODE_MAX_ROWS:
        y = td.dual_gemv(x2, m.qweight, m.scales, m.zeros, m.group_size, m.ortho_crow, m.ortho_col,
                         m.ortho_values, alpha, bias, on)
    elif _prefill["kernel"] == "tensor_core" and m.group_size <= 128:  # its tiles are <= 128 deep; one alpha or
        # one per row (the SpMM skips rows at 0)
        y = td.w4_gemm(x2, m.qweight, m.scales, m.zeros, m.group_size, bias)
        if on:
            td.csr_spmm_add_(y, x2, m.ortho_crow, m.ortho_col, m.ortho_values, alpha)
    elif m.row_alpha is not None:
        y = _prefill_rows(m, x2, alpha, on, td)
    else:  # prefill: matrix-bound, so dequantization passes then cuBLAS products
        # in row blocks of at most PREFILL_BLOCK_BYTES: an 8B head dequantized whole is 1 GiB, a sixth of a small card
        N = m.out_features
        rows = max(1, PREFILL_BLOCK_BYTES // (m.in_features * x2.element_size()))
        y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device) if rows < N else None
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            w = td.dequant(m.qweight[r0:r1], m.scales[r0:r1], None if m.zeros is None else m.zeros[r0:r1],
                           m.group_size, x.dtype)
            if on:  # crow holds absolute offsets into col/values: a slice of it addresses the block's rows
                td.csr_scatter_add_(w, m.ortho_crow[r0:r1 + 1], m.ortho_col, m.ortho_values, m.alpha)
            if y is None:
                y = F.linear(x2, w)
            else:
                y[:, r0:r1] = F.linear(x2, w)
        if bias is not None:
            y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], m.out_features)


def _prefill_rows(m, x2: torch.Tensor, alpha: torch.Tensor, on: bool, td) -> torch.Tensor:
    """Prefill with one alpha per row of x2: the base for every row, then alpha * ortho only for the rows whose
    alpha is not 0 (found with one sync). Inside a CUDA graph capture (a decode batch of more than
    DECODE_MAX_ROWS requests) there is no sync: every row gets alpha * ortho through where(), which leaves the rows
    at 0 the base bit for bit. In row blocks, as the scalar path."""
    N = m.out_features
    capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
    rows = None if not on else (slice(None) if capturing else alpha.nonzero().flatten())
    if isinstance(rows, torch.Tensor) and rows.numel() == 0:
        rows = None
    one = torch.ones((), dtype=torch.float32, device=x2.device)
    blk = max(1, PREFILL_BLOCK_BYTES // (m.in_features * x2.element_size()))
    y = torch.empty(x2.shape[0], N, dtype=x2.dtype, device=x2.device)
    for r0 in range(0, N, blk):
        r1 = min(N, r0 + blk)
        w = td.dequant(m.qweight[r0:r1], m.scales[r0:r1], None if m.zeros is None else m.zeros[r0:r1],
                       m.group_size, x2.dtype)
        y[:, r0:r1] = F.linear(x2, w)
        if rows is not None:
            o = td.csr_scatter_add_(torch.zeros_like(w), m.ortho_crow[r0:r1 + 1], m.ortho_col, m.ortho_values, one)
            a = alpha[rows, None].to(x2.dtype)
            extra = y[rows, r0:r1] + a * F.linear(x2[rows], o)
            y[rows, r0:r1] = torch.where(a != 0, extra, y[rows, r0:r1]) if capturing else extra
    if m.bias is not None:
        y = y + m.bias.to(x2.dtype)
    return y
