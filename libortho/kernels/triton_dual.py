"""Triton kernels for the dual-stream linear, reading the packed INT4 base and the CSR ortho stream once.

- `dual_gemv`: decode shapes (few rows of x). One program owns BLOCK_N output channels: it streams their
  packed codes over all of K (two codes per byte, low nibble first, one scale per group), then walks the
  contiguous CSR segment of the same channels and adds alpha * (ortho @ x) before the single store.
  HAS_ORTHO is a compile-time switch: at alpha == 0 the ortho stream is not read, nothing extra launches.
- `csr_gemv_add_`: the ortho stream alone, added into an existing output (to pair with another base kernel).
- `dequant`: packed base -> dense weight in one pass, for prefill (many rows of x: matrix-bound, cuBLAS).
The plain-torch definition lives in `reference.py`; tests/test_kernels.py checks one against the other.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, warps, stages, EW). EW=0: per-group partial dots reduced every K step, codes converted
# with cvt. EW=1: an elementwise (BLOCK_N, BLOCK_K/2) accumulator reduced once at the end, codes turned into
# floats by bit tricks (q | 0x4B000000 is the float 2^23 + q), sparing the int->float unit. A short list:
# autotuning every shape of a model must stay within seconds.
_TILES = [(16, 512, 4, 3, 0), (8, 1024, 4, 3, 0), (32, 512, 8, 3, 0), (16, 1024, 8, 2, 0), (4, 1024, 4, 3, 0),
          (16, 512, 4, 3, 1), (8, 1024, 4, 3, 1), (16, 1024, 8, 2, 1), (8, 2048, 8, 2, 1)]
GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "EW": ew}, num_warps=w, num_stages=st)
                for bn, bk, w, st, ew in _TILES]


def rchunk(nnz: int, rows: int) -> int:
    """CSR entries per row loaded in one step: the mean row length rounded up to a power of two (16..256);
    longer rows take more steps."""
    mean = -(-nnz // max(rows, 1))
    return min(256, max(16, 1 << max(0, (mean - 1).bit_length())))


@triton.jit
def _csr_rows_dot(x_row, crow_ptr, col_ptr, val_ptr, rn, nmask, N, RCHUNK: tl.constexpr):
    """sum_e values[e] * x[col[e]] over each row of `rn`: a (BN, RCHUNK) tile per step, rows side by side."""
    rs = tl.load(crow_ptr + rn, mask=nmask, other=0)
    re = tl.load(crow_ptr + rn + 1, mask=nmask, other=0)
    longest = tl.max(re - rs, axis=0)
    acc = (rs * 0).to(tl.float32)
    for j in range(0, longest, RCHUNK):
        e = rs[:, None] + j + tl.arange(0, RCHUNK)[None, :]  # (BN, RCHUNK)
        em = e < re[:, None]
        v = tl.load(val_ptr + e, mask=em, other=0.0).to(tl.float32)
        c = tl.load(col_ptr + e, mask=em, other=0).to(tl.int32)
        xv = tl.load(x_row + c, mask=em, other=0.0).to(tl.float32)
        acc += tl.sum(v * xv, axis=1)
    return acc


@triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "HAS_ORTHO", "RCHUNK"])
@triton.jit
def _dual_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, crow_ptr, col_ptr, val_ptr, alpha_ptr, b_ptr, y_ptr,
                      N, K, stride_qn, stride_sn, stride_xm, stride_ym,
                      GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_ORTHO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, RCHUNK: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EW: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output channels
    nmask = rn < N
    HK: tl.constexpr = BLOCK_K // 2  # bytes per row per tile
    GPT: tl.constexpr = BLOCK_K // GROUP  # groups per tile
    HG: tl.constexpr = GROUP // 2  # bytes per group
    rj = tl.arange(0, HK)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, GPT)
    x_row = x_ptr + m * stride_xm
    if EW:
        acc = tl.zeros((BLOCK_N, HK), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, GPT), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kb = k0 // 2 + rj  # (HK,) byte columns
        qb = tl.load(qw_ptr + rn[:, None] * stride_qn + kb[None, :],
                     mask=nmask[:, None] & (kb < K // 2)[None, :], other=0)  # (BN, HK) uint8
        xx = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)  # (BK,) contiguous
        xe, xo = tl.split(tl.reshape(xx, (HK, 2)))  # even / odd inputs: low / high nibbles
        g = k0 // GROUP + rg
        gmask = nmask[:, None] & (g < (K + GROUP - 1) // GROUP)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        if EW:
            q32 = qb.to(tl.int32)
            lo = ((q32 & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # q - 8, exact
            hi = ((q32 >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            sb = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GPT, HG)), (BLOCK_N, HK))
            acc += (lo * xe[None, :] + hi * xo[None, :]) * sb
            if HAS_ZERO:
                z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
                zb = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GPT, HG)), (BLOCK_N, HK))
                acc += zb * (xe + xo)[None, :]
        else:
            lo = (qb & 0xF).to(tl.float32) - 8.0
            hi = (qb >> 4).to(tl.float32) - 8.0
            part = lo * xe[None, :] + hi * xo[None, :]  # (BN, HK)
            part = tl.sum(tl.reshape(part, (BLOCK_N, GPT, HG)), axis=2)  # (BN, GPT) per-group dot
            acc += part * s
            if HAS_ZERO:
                xs = tl.sum(tl.reshape(xx, (GPT, GROUP)), axis=1)  # (GPT,) sum of x over each group
                z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
                acc += z * xs[None, :]
    y = tl.sum(acc, axis=1)  # (BN,)
    if HAS_ORTHO:  # the same channels' CSR rows, contiguous in memory: read once, added before the store
        y += tl.load(alpha_ptr).to(tl.float32) * _csr_rows_dot(x_row, crow_ptr, col_ptr, val_ptr, rn, nmask, N,
                                                               RCHUNK)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _csr_gemv_add_kernel(x_ptr, crow_ptr, col_ptr, val_ptr, alpha_ptr, y_ptr, N, stride_xm, stride_ym,
                         RCHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    m = tl.program_id(1)
    dot = _csr_rows_dot(x_ptr + m * stride_xm, crow_ptr, col_ptr, val_ptr, rn, nmask, N, RCHUNK)
    yp = y_ptr + m * stride_ym + rn
    y = tl.load(yp, mask=nmask, other=0.0).to(tl.float32) + tl.load(alpha_ptr).to(tl.float32) * dot
    tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _csr_scatter_add_kernel(w_ptr, crow_ptr, col_ptr, val_ptr, alpha_ptr, N, K, RCHUNK: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """w[r, col[e]] += alpha * values[e] for a dense (N, K) w; columns are unique within a row (CSR)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rs = tl.load(crow_ptr + rn, mask=nmask, other=0)
    re = tl.load(crow_ptr + rn + 1, mask=nmask, other=0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    for j in range(0, tl.max(re - rs, axis=0), RCHUNK):
        e = rs[:, None] + j + tl.arange(0, RCHUNK)[None, :]
        em = e < re[:, None]
        v = tl.load(val_ptr + e, mask=em, other=0.0).to(tl.float32)
        c = tl.load(col_ptr + e, mask=em, other=0).to(tl.int64)
        p = w_ptr + rn[:, None].to(tl.int64) * K + c
        tl.store(p, (tl.load(p, mask=em, other=0.0).to(tl.float32) + alpha * v).to(w_ptr.dtype.element_ty), mask=em)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sn,
                    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    HK: tl.constexpr = BLOCK_K // 2
    kb = tl.program_id(1) * HK + tl.arange(0, HK)
    mask = (rn < N)[:, None] & (kb < K // 2)[None, :]
    qb = tl.load(qw_ptr + rn[:, None] * stride_qn + kb[None, :], mask=mask, other=0)
    g = (2 * kb) // GROUP
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
    lo = ((qb & 0xF).to(tl.float32) - 8.0) * s
    hi = ((qb >> 4).to(tl.float32) - 8.0) * s
    if HAS_ZERO:
        z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        lo += z
        hi += z
    w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # interleave: element 2j low nibble, 2j+1 high
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(w_ptr + rn[:, None] * K + rk[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(rn < N)[:, None] & (rk < K)[None, :])


def supported(qweight: torch.Tensor, group_size: int, in_features: int) -> bool:
    """The kernels need whole groups, a power-of-two group of at least 32, and K a multiple of 32."""
    return (qweight.is_cuda and in_features % group_size == 0 and group_size >= 32
            and group_size & (group_size - 1) == 0 and group_size <= 256 and in_features % 32 == 0)


def dual_gemv(x2, qweight, scales, zeros, group_size, crow, col, values, alpha_t, bias, has_ortho: bool):
    """x2 (M, K) contiguous rows -> (M, N) in x2.dtype."""
    M, K = x2.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    dummy = scales
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)  # noqa: E731
    _dual_gemv_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else dummy,
        crow if has_ortho else dummy, col if has_ortho else dummy, values if has_ortho else dummy,
        alpha_t if has_ortho else dummy, bias if bias is not None else dummy, y,
        N, K, qweight.stride(0), scales.stride(0), x2.stride(0), y.stride(0),
        GROUP=group_size, HAS_ZERO=zeros is not None, HAS_ORTHO=has_ortho, HAS_BIAS=bias is not None,
        RCHUNK=rchunk(values.numel(), N) if has_ortho else 16)
    return y


def csr_gemv_add_(y, x2, crow, col, values, alpha_t, block_n: int = 16):
    """y (M, N) += alpha * x2 @ ortho^T, in place."""
    M, N = y.shape
    _csr_gemv_add_kernel[(triton.cdiv(N, block_n), M)](x2, crow, col, values, alpha_t, y, N, x2.stride(0),
                                                       y.stride(0), RCHUNK=rchunk(values.numel(), N),
                                                       BLOCK_N=block_n, num_warps=4)
    return y


def csr_scatter_add_(w, crow, col, values, alpha_t, block_n: int = 16):
    """Dense w (N, K) += alpha * ortho, in place (prefill: one dense weight for cuBLAS)."""
    N, K = w.shape
    _csr_scatter_add_kernel[(triton.cdiv(N, block_n),)](w, crow, col, values, alpha_t, N, K,
                                                        RCHUNK=rchunk(values.numel(), N), BLOCK_N=block_n,
                                                        num_warps=4)
    return w


def dequant(qweight, scales, zeros, group_size, dtype) -> torch.Tensor:
    N, K = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty(N, K, dtype=dtype, device=qweight.device)
    BN, BK = 16, 256
    _dequant_kernel[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        qweight, scales, zeros if zeros is not None else scales, w, N, K, qweight.stride(0), scales.stride(0),
        GROUP=group_size, HAS_ZERO=zeros is not None, BLOCK_N=BN, BLOCK_K=BK, num_warps=4)
    return w
