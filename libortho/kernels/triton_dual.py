"""Triton kernels for the dual-stream linear, reading the packed INT4 base and the CSR ortho stream once.

- `dual_gemv`: decode shapes (few rows of x). One program owns BLOCK_N output channels: it streams their
  packed codes over K (all of it, or one of SPLIT slices) as int32 words (eight codes each, one scale per
  group), then walks the contiguous CSR segment of the same channels and adds alpha * (ortho @ x).
  HAS_ORTHO is a compile-time switch: at alpha == 0 the ortho stream is not read, nothing extra launches.
  PER_ROW (alpha a (M,) vector, one value per row of x): a program whose row has alpha 0 skips the CSR walk (its
  loads are masked off), so a batch mixing alpha 0 and 1 reads the stream only for the rows at 1.
- `csr_gemv_add_`: the ortho stream alone, added into an existing output (to pair with another base kernel).
- `dequant`: packed base -> dense weight in one pass, for prefill (many rows of x: matrix-bound, cuBLAS).
The plain-torch definition lives in `reference.py`; tests/test_kernels.py checks one against the other.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, warps, stages, SPLIT): a short list, so that autotuning every shape of a model stays
# within seconds (bench/kernel_lab.py prints the picks). SPLIT > 1 cuts K into that many slices run by separate
# programs (more programs in flight on layers with few output rows: 4096 x 14336 went 23.4 -> 21.0 us on the
# H100); the last program of a row block to finish adds the partial sums in a fixed order, so results do not
# depend on scheduling. CSR_EARLY (ortho on, SPLIT 1): issue the first CSR chunk's loads before the K loop and
# use them after it; that hid the ortho stream's latency at 4096x4096 (9.2 -> 8.6 us) and cost a little on
# the larger shapes, so the tuner chooses.
_TILES = [(16, 512, 4, 3, 1), (32, 512, 4, 3, 1), (8, 1024, 4, 3, 1), (16, 1024, 8, 2, 1), (4, 1024, 4, 3, 1),
          (16, 512, 4, 3, 2), (8, 1024, 4, 3, 2), (8, 1024, 4, 3, 4), (16, 512, 4, 3, 4)]  # H100 picks and kin
# PREFETCH (SPLIT 1): load the next tile's codes and scales before decoding this one (Triton does not pipeline
# loads that feed no dot; num_stages changes nothing here).
GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp, "CSR_EARLY": e, "PREFETCH": pf},
                              num_warps=w, num_stages=st)
                for pf in (0, 1) for e in (0, 1) for bn, bk, w, st, sp in _TILES if not ((e or pf) and sp > 1)]
MAX_SPLIT = max(t[4] for t in _TILES)
# The interpreter (CPU checks of this file) runs no inline PTX: it decodes with shifts instead (same values).
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def _prune(configs, named_args, **kw):
    """Tiles at least one group wide; the CSR_EARLY twins only where there is an ortho stream."""
    group = kw.get("GROUP", named_args.get("GROUP"))
    ortho = kw.get("HAS_ORTHO", named_args.get("HAS_ORTHO"))
    return [c for c in configs if c.kwargs["BLOCK_K"] >= group and (ortho or not c.kwargs["CSR_EARLY"])]


def rchunk(nnz: int, rows: int) -> int:
    """CSR entries per row loaded in one step: the mean row length rounded up to a power of two (16..256);
    longer rows take more steps."""
    mean = -(-nnz // max(rows, 1))
    return min(256, max(16, 1 << max(0, (mean - 1).bit_length())))


@triton.jit
def _csr_rows_dot(x_row, crow_ptr, col_ptr, val_ptr, rn, nmask, N, RCHUNK: tl.constexpr, START: tl.constexpr):
    """sum_e values[e] * x[col[e]] over each row of `rn`, from the row's START-th entry on: a (BN, RCHUNK) tile
    per step, rows side by side."""
    rs = tl.load(crow_ptr + rn, mask=nmask, other=0)
    re = tl.load(crow_ptr + rn + 1, mask=nmask, other=0)
    longest = tl.max(re - rs, axis=0)
    acc = (rs * 0).to(tl.float32)
    for j in range(START, longest, RCHUNK):
        e = rs[:, None] + j + tl.arange(0, RCHUNK)[None, :]  # (BN, RCHUNK)
        em = e < re[:, None]
        v = tl.load(val_ptr + e, mask=em, other=0.0).to(tl.float32)
        c = tl.load(col_ptr + e, mask=em, other=0).to(tl.int32)
        xv = tl.load(x_row + c, mask=em, other=0.0).to(tl.float32)
        acc += tl.sum(v * xv, axis=1)
    return acc


@triton.jit
def _nib(w, SHIFT: tl.constexpr):
    """The nibble of int32 w that sits at bits 16-SHIFT .. 19-SHIFT, as the float 128 + q: moved to bits 16..19
    under the exponent of 128 (0x43000000), where one mantissa step is 1. No int->float conversion."""
    if SHIFT > 0:
        v = w << SHIFT
    elif SHIFT < 0:
        v = w >> (-SHIFT)
    else:
        v = w
    return ((v & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)


@triton.jit
def _codes(w):
    """The eight codes of each int32 word (code i at bits 4i) as the floats 128 + q. One and, one shift-and,
    then one byte permute per code that puts its byte under the exponent byte of 128 (0x43): 11 integer
    instructions per word where shift + and-or per code took 15, and the decode is what bounds this kernel
    (streaming the same bytes without decoding runs in 5.3 vs 7.7 us at 4096 x 4096 on the H100)."""
    if INTERPRET:
        return (_nib(w, 16), _nib(w, 12), _nib(w, 8), _nib(w, 4), _nib(w, 0), _nib(w, -4), _nib(w, -8),
                _nib(w, -12))
    else:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 lo, hi, k;
            mov.b32 k, 0x43000000;
            and.b32 lo, $8, 0x0F0F0F0F;
            shr.u32 hi, $8, 4;
            and.b32 hi, hi, 0x0F0F0F0F;
            prmt.b32 $0, lo, k, 0x7044;
            prmt.b32 $1, hi, k, 0x7044;
            prmt.b32 $2, lo, k, 0x7144;
            prmt.b32 $3, hi, k, 0x7144;
            prmt.b32 $4, lo, k, 0x7244;
            prmt.b32 $5, hi, k, 0x7244;
            prmt.b32 $6, lo, k, 0x7344;
            prmt.b32 $7, hi, k, 0x7344;
            }""",
            "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)


@triton.jit
def _wtile(qw_ptr, s_ptr, rn, nmask, rw, rg, k0, k_hi, K, stride_qn, stride_sn, GROUP: tl.constexpr):
    """The (BN, KW) int32 code words and (BN, GPT) scales of the tile at k0; nothing is read past k_hi.
    The codes are read once: evict_first keeps x and the CSR stream in L2 instead."""
    kw = k0 // 8 + rw
    if INTERPRET:  # the interpreter makes (vector & scalar comparison) int32, which it refuses as a load mask
        live, live_g = (k0 + rw * 0) < k_hi, (k0 + rg * 0) < k_hi
    else:
        live = k0 < k_hi
        live_g = live
    w = tl.load(qw_ptr + rn[:, None] * stride_qn + kw[None, :], mask=nmask[:, None] & ((kw < K // 8) & live)[None, :],
                other=0, eviction_policy="evict_first")
    g = k0 // GROUP + rg
    s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :],
                mask=nmask[:, None] & ((g < K // GROUP) & live_g)[None, :], other=0.0, eviction_policy="evict_first")
    return w, s


@triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "HAS_ORTHO", "PER_ROW", "RCHUNK", "GROUP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _dual_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, crow_ptr, col_ptr, val_ptr, alpha_ptr, b_ptr, y_ptr,
                      ws_ptr, cnt_ptr, N, K, stride_qn, stride_sn, stride_xm, stride_ym,
                      GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_ORTHO: tl.constexpr,
                      HAS_BIAS: tl.constexpr, RCHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT: tl.constexpr, CSR_EARLY: tl.constexpr, PREFETCH: tl.constexpr, PER_ROW: tl.constexpr):
    """qw_ptr: the packed codes as int32 words (N, K/8): word j of a row holds k = 8j .. 8j+7, code i at bits
    4i (the same bytes as the uint8 layout, little-endian). Per word, with the codes as 128 + q:
    sum_i (q_i - 8) x_i = sum_i (128 + q_i) x_i - 136 sum_i x_i, the second term computed once per word column
    and shared by every row (fp32 throughout; the cancellation costs about 6 of its 24 bits).
    SPLIT > 1: program (n, m, s) sums K slice s into ws[s, m, n-block]; cnt[m, n-block] counts the slices done.
    PER_ROW: alpha_ptr holds one alpha per row m; a row at 0 reads nothing of the CSR stream."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    sid = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output channels
    nmask = rn < N
    KW: tl.constexpr = BLOCK_K // 8  # words per row per tile
    GPT: tl.constexpr = BLOCK_K // GROUP  # groups per tile
    WPG: tl.constexpr = GROUP // 8  # words per group
    rw = tl.arange(0, KW)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, GPT)
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCK_N, KW), dtype=tl.float32)
    if HAS_ORTHO and PER_ROW:
        a_row = tl.load(alpha_ptr + m).to(tl.float32)
    if HAS_ORTHO and CSR_EARLY:  # loads in flight during the K loop
        rs = tl.load(crow_ptr + rn, mask=nmask, other=0)
        re = tl.load(crow_ptr + rn + 1, mask=nmask, other=0)
        if PER_ROW:  # a row at alpha 0: its rows read as empty, so these loads are masked off
            re = tl.where(a_row != 0, re, rs)
        e0 = rs[:, None] + tl.arange(0, RCHUNK)[None, :]
        em0 = e0 < re[:, None]
        v0 = tl.load(val_ptr + e0, mask=em0, other=0.0)
        c0 = tl.load(col_ptr + e0, mask=em0, other=0)
    if SPLIT == 1:
        k_lo = 0
        k_hi = K
    else:  # slices of whole tiles
        span = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        k_lo = sid * span
        k_hi = tl.minimum(K, k_lo + span)
    if PREFETCH:
        w, s = _wtile(qw_ptr, s_ptr, rn, nmask, rw, rg, k_lo, k_hi, K, stride_qn, stride_sn, GROUP)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            wn, sn = _wtile(qw_ptr, s_ptr, rn, nmask, rw, rg, k0 + BLOCK_K, k_hi, K, stride_qn, stride_sn, GROUP)
        else:
            w, s = _wtile(qw_ptr, s_ptr, rn, nmask, rw, rg, k0, k_hi, K, stride_qn, stride_sn, GROUP)
        xx = tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)  # (BK,) contiguous
        # x[8j + i] for i = 4 i2 + 2 i1 + i0, as eight (KW,) vectors
        xe, xo = tl.split(tl.reshape(xx, (KW, 2, 2, 2)))
        xee, xeo = tl.split(xe)
        xoe, xoo = tl.split(xo)
        x0, x4 = tl.split(xee)
        x2, x6 = tl.split(xeo)
        x1, x5 = tl.split(xoe)
        x3, x7 = tl.split(xoo)
        xs = (x0 + x1) + (x2 + x3) + ((x4 + x5) + (x6 + x7))  # (KW,) sum of x over each word
        p = tl.broadcast_to((-136.0 * xs)[None, :], (BLOCK_N, KW))
        q0, q1, q2, q3, q4, q5, q6, q7 = _codes(w)  # (BN, KW) each: 128 + code i of every word
        p += q0 * x0[None, :]
        p += q1 * x1[None, :]
        p += q2 * x2[None, :]
        p += q3 * x3[None, :]
        p += q4 * x4[None, :]
        p += q5 * x5[None, :]
        p += q6 * x6[None, :]
        p += q7 * x7[None, :]
        acc += p * tl.reshape(tl.broadcast_to(s.to(tl.float32)[:, :, None], (BLOCK_N, GPT, WPG)), (BLOCK_N, KW))
        if HAS_ZERO:  # w = (q - 8) s + z: plus z times the sum of x over the group
            g = k0 // GROUP + rg
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=nmask[:, None] & (g < K // GROUP)[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GPT, WPG)), (BLOCK_N, KW)) * xs[None, :]
        if PREFETCH:
            w = wn
            s = sn
    y = tl.sum(acc, axis=1)  # (BN,)
    if HAS_ORTHO and CSR_EARLY and PER_ROW:
        if a_row != 0:  # a runtime branch, uniform over the program: a row at alpha 0 skips the walk
            xv = tl.load(x_row + c0.to(tl.int32), mask=em0, other=0.0).to(tl.float32)
            o = tl.sum(v0.to(tl.float32) * xv, axis=1)
            o += _csr_rows_dot(x_row, crow_ptr, col_ptr, val_ptr, rn, nmask, N, RCHUNK, RCHUNK)
            y += a_row * o
    elif HAS_ORTHO and CSR_EARLY:
        xv = tl.load(x_row + c0.to(tl.int32), mask=em0, other=0.0).to(tl.float32)
        o = tl.sum(v0.to(tl.float32) * xv, axis=1)
        o += _csr_rows_dot(x_row, crow_ptr, col_ptr, val_ptr, rn, nmask, N, RCHUNK, RCHUNK)  # rows past 1 chunk
        y += tl.load(alpha_ptr).to(tl.float32) * o
    elif HAS_ORTHO and PER_ROW:
        if sid == 0:
            if a_row != 0:
                y += a_row * _csr_rows_dot(x_row, crow_ptr, col_ptr, val_ptr, rn, nmask, N, RCHUNK, 0)
    elif HAS_ORTHO:  # the same channels' CSR rows, contiguous in memory: read once, added before the store
        if sid == 0:  # (split: by the first slice's program, in parallel with the other slices)
            y += tl.load(alpha_ptr).to(tl.float32) * _csr_rows_dot(x_row, crow_ptr, col_ptr, val_ptr, rn, nmask,
                                                                   N, RCHUNK, 0)
    if SPLIT > 1:
        M = tl.num_programs(1)
        tl.store(ws_ptr + (sid * M + m) * N + rn, y, mask=nmask)
        tl.debug_barrier()  # every thread's partial stored before the (single-thread, release) count below
        c = cnt_ptr + m * tl.num_programs(0) + pid_n
        if tl.atomic_add(c, 1, sem="acq_rel") == SPLIT - 1:  # the last slice of this row block: reduce
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in tl.static_range(SPLIT):  # fixed order: the same sum whichever program gets here
                y += tl.load(ws_ptr + (j * M + m) * N + rn, mask=nmask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(c, 0)  # ready for the next call (and for a CUDA graph's next replay)
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _csr_gemv_add_kernel(x_ptr, crow_ptr, col_ptr, val_ptr, alpha_ptr, y_ptr, N, stride_xm, stride_ym,
                         RCHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    m = tl.program_id(1)
    dot = _csr_rows_dot(x_ptr + m * stride_xm, crow_ptr, col_ptr, val_ptr, rn, nmask, N, RCHUNK, 0)
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
    """The kernels need whole groups, a power-of-two group of 32..256, K a multiple of 32, and rows of codes
    that read as int32 words (4-byte aligned)."""
    return (qweight.is_cuda and in_features % group_size == 0 and group_size >= 32
            and group_size & (group_size - 1) == 0 and group_size <= 256 and in_features % 32 == 0
            and qweight.stride(1) == 1 and qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0)


_SPLIT_BUFFERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_buffers(device: torch.device, rows: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial sums, counters) for split-K: fp32 room for MAX_SPLIT slices of a (rows, out) output, and zeroed
    int32 slice counters, one per (row of x, block of outputs). The kernel consumes the partials and sets each
    counter back to 0 before it ends, so one pair per device serves every layer, allocated once (not per call,
    and never inside a CUDA graph capture). Layers run in stream order; two split GEMVs running concurrently on
    different streams of one device would share it (not supported)."""
    need = rows * out_features
    bufs = _SPLIT_BUFFERS.get(device)
    if bufs is None or bufs[1].numel() < need:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dual_gemv: run each layer shape once before CUDA graph capture")
        n = max(need, 1 << 16)
        bufs = _SPLIT_BUFFERS[device] = (torch.empty(MAX_SPLIT * n, dtype=torch.float32, device=device),
                                         torch.zeros(n, dtype=torch.int32, device=device))
    return bufs


def dual_gemv(x2, qweight, scales, zeros, group_size, crow, col, values, alpha_t, bias, has_ortho: bool,
              config: triton.Config | None = None):
    """x2 (M, K) contiguous rows -> (M, N) in x2.dtype. `alpha_t`: a 0-dim tensor (one alpha) or an (M,) float32
    tensor (one alpha per row of x2). `config`: one of GEMV_CONFIGS instead of the tuner's pick (the parity tests
    run every kind of tile this way)."""
    M, K = x2.shape
    per_row = has_ortho and alpha_t.dim() == 1
    if per_row and alpha_t.numel() != M:
        raise ValueError(f"dual_gemv: per-row alpha has {alpha_t.numel()} values for {M} rows of x")
    N = qweight.shape[0]
    qw = qweight.view(torch.int32)  # (N, K/8): the same bytes, read a word at a time
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    ws, cnt = split_buffers(x2.device, M, N)
    dummy = scales
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M, meta["SPLIT"])  # noqa: E731
    kernel, extra = _dual_gemv_kernel, {}
    if config is not None:
        kernel, extra = _dual_gemv_kernel.fn, dict(config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
    kernel[grid](
        x2, qw, scales, zeros if zeros is not None else dummy,
        crow if has_ortho else dummy, col if has_ortho else dummy, values if has_ortho else dummy,
        alpha_t if has_ortho else dummy, bias if bias is not None else dummy, y, ws, cnt,
        N, K, qw.stride(0), scales.stride(0), x2.stride(0), y.stride(0),
        GROUP=group_size, HAS_ZERO=zeros is not None, HAS_ORTHO=has_ortho, HAS_BIAS=bias is not None,
        RCHUNK=rchunk(values.numel(), N) if has_ortho else 16, PER_ROW=per_row, **extra)
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


# -- prefill on tensor cores ---------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): tiles of the W4A16 GEMM (Triton's matmul tutorial kin, all >= 64
# deep so a tile holds whole groups of 32/64); the tuner picks per (M bucket, N, K). The 16- and 32-row tiles are
# for batched decode (9..32 requests: one pass over the weights where the GEMV would read them once per row).
GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                              num_stages=st)
                for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                          (64, 64, 128, 4, 3), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3),
                                          (16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (16, 128, 64, 4, 4),
                                          (32, 128, 128, 4, 3))]


def _prune_gemm(configs, named_args, **kw):
    """Tiles at least one group deep, and no taller than the rows there are (rounded up to 16)."""
    group = kw.get("GROUP", named_args.get("GROUP"))
    rows = max(16, named_args.get("M_BUCKET", kw.get("M_BUCKET", 16)))
    keep = [c for c in configs if c.kwargs["BLOCK_K"] >= group and c.kwargs["BLOCK_M"] <= max(rows, 64)]
    return keep or configs[:1]



@triton.autotune(configs=GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP", "HAS_ZERO"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
@triton.jit
def _w4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_qn, stride_sn,
                    stride_ym, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y (M, N) = x (M, K) @ base^T (+ bias): each (BLOCK_N, BLOCK_K) tile of the packed base (uint8 (N, K/2), low
    nibble = even k) is dequantized in registers to x's dtype exactly as `dequant` writes it (fp32 (q - 8) s + z,
    then rounded), and multiplied on tensor cores (tl.dot, fp32 accumulation). The dense weight never exists."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n  # grouped order: GROUP_M row blocks share each weight tile while it is in L2
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x N may pass 2**31 (a long pass of a head)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    HK: tl.constexpr = BLOCK_K // 2  # bytes per row per tile
    GPT: tl.constexpr = BLOCK_K // GROUP  # groups per tile
    BPG: tl.constexpr = GROUP // 2  # bytes per group
    rk = tl.arange(0, BLOCK_K)
    rb = tl.arange(0, HK)
    rg = tl.arange(0, GPT)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of 32 and of GROUP; a tile past K is masked
        a = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=mmask[:, None] & (k0 + rk < K)[None, :],
                    other=0.0)
        qb = tl.load(qw_ptr + rn[:, None] * stride_qn + (k0 // 2 + rb)[None, :],
                     mask=nmask[:, None] & (k0 // 2 + rb < K // 2)[None, :], other=0)
        g = k0 // GROUP + rg
        gmask = nmask[:, None] & (g < K // GROUP)[None, :]
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GPT, BPG)), (BLOCK_N, HK))
        lo = ((qb & 0xF).to(tl.float32) - 8.0) * s
        hi = ((qb >> 4).to(tl.float32) - 8.0) * s
        if HAS_ZERO:
            z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            z = tl.reshape(tl.broadcast_to(z[:, :, None], (BLOCK_N, GPT, BPG)), (BLOCK_N, HK))
            lo += z
            hi += z
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(a.dtype)  # element 2j low nibble, 2j+1 high
        if INTERPRET:  # the interpreter's dot misreads bf16 operands: the same rounded values, in fp32
            acc = tl.dot(a.to(tl.float32), tl.trans(w).to(tl.float32), acc)
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _csr_spmm_add_kernel(xt_ptr, crow_ptr, col_ptr, val_ptr, alpha_ptr, y_ptr, M, N, stride_xk, stride_ym,
                         PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y (M, N) += alpha * x @ ortho^T, the stream as a CSR SpMM: a program owns BLOCK_N channels x BLOCK_M rows of
    x and walks its channels' entries side by side; entry (n, c) reads row c of x^T (K, M), BLOCK_M contiguous
    values (x^T is small: it stays in L2). PER_ROW: alpha (M,), one per row of x."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    nmask = rn < N
    mmask = rm < M
    rs = tl.load(crow_ptr + rn, mask=nmask, other=0)
    re = tl.load(crow_ptr + rn + 1, mask=nmask, other=0)
    if PER_ROW:  # rows at alpha 0 are left as they are: nothing of the stream reaches them
        a = tl.load(alpha_ptr + rm, mask=mmask, other=0.0).to(tl.float32)
        mmask = mmask & (a != 0)
        if tl.max(mmask.to(tl.int32), axis=0) == 0:  # a block of rows all at alpha 0 reads nothing
            re = rs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.max(re - rs, axis=0)):
        e = rs + j
        em = e < re
        v = tl.load(val_ptr + e, mask=em, other=0.0).to(tl.float32)  # (BN,)
        c = tl.load(col_ptr + e, mask=em, other=0).to(tl.int64)
        xv = tl.load(xt_ptr + c[None, :] * stride_xk + rm[:, None], mask=mmask[:, None] & em[None, :], other=0.0)
        acc += xv.to(tl.float32) * v[None, :]
    if PER_ROW:
        acc *= a[:, None]
    else:
        acc *= tl.load(alpha_ptr).to(tl.float32)
    yp = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    ymask = mmask[:, None] & nmask[None, :]
    tl.store(yp, (tl.load(yp, mask=ymask, other=0.0).to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=ymask)


def w4_gemm(x2, qweight, scales, zeros, group_size, bias=None, config: triton.Config | None = None) -> torch.Tensor:
    """x2 (M, K) -> (M, N) = x2 @ base^T (+ bias) on tensor cores, the base read packed. `config`: one of
    GEMM_CONFIGS instead of the tuner's pick (parity tests)."""
    M, K = x2.shape
    N = qweight.shape[0]
    y = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel, extra = _w4_gemm_kernel, {}
    if config is not None:
        kernel, extra = _w4_gemm_kernel.fn, dict(config.kwargs, num_warps=config.num_warps,
                                                 num_stages=config.num_stages)
    kernel[grid](x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, y,
                 M, N, K, min(1 << max(0, (M - 1).bit_length()), 4096), x2.stride(0), qweight.stride(0),
                 scales.stride(0), y.stride(0), GROUP=group_size, HAS_ZERO=zeros is not None,
                 HAS_BIAS=bias is not None, **extra)
    return y


def csr_spmm_add_(y, x2, crow, col, values, alpha_t, block_m: int = 64, block_n: int = 32):
    """y (M, N) += alpha * x2 @ ortho^T in place; alpha_t a 0-dim tensor or (M,), one per row of x2."""
    M, N = y.shape
    xt = x2.t().contiguous()  # (K, M): each stream entry reads one contiguous row of it
    _csr_spmm_add_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m))](
        xt, crow, col, values, alpha_t, y, M, N, xt.stride(0), y.stride(0), PER_ROW=alpha_t.dim() == 1,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y
