"""Fused elementwise kernels of a decode step (issue 17: fewer launches per token), each beside its plain-torch twin.

- `add_rms_norm(x, h, w, eps)`: s = x + h; y = rms_norm(s) * w; returns (s, y). One kernel where the decoder
  launched a residual add and an RMSNorm at every layer boundary.
- `silu_mul(g, u)`: silu(g) * u, reading the two halves of the fused gate|up output in place. One kernel for two.
- `rope_kv_(q, k, v, cos, sin_signed, pos, k_cache, v_cache)`: rotary on the q and k heads of one decode position,
  the rotated k and v written into the static cache at `pos` (a device tensor, read at every graph replay), the
  rotated q returned. One kernel for the rotary ops, the cos/sin gather and the two cache writes.
- `decode_attention(q, k_cache, v_cache, pos)`: one query per request against the static cache, reading only the
  filled positions 0..pos (online softmax). One kernel for the mask, two matmuls, the softmax and its casts (two
  for a cache of more than 1,024 positions: splits of the positions in parallel, then their combine, as
  flash-decoding does).

- `host_rows_(out, table, ids)`: out[b] = table[ids[b]] where `table` lives in pinned host memory and `ids`
  and `out` on the GPU: the GPU reads the rows over the bus itself (pinned memory is mapped into the device's
  address space), so a decode step with its embedding table in host memory needs no token on the host, no sync,
  and can sit inside the CUDA graph.

Each public function runs the Triton kernel where it applies (CUDA tensors, or any tensor under Triton's CPU
interpreter, TRITON_INTERPRET=1) and its twin (`*_ref`) elsewhere. The kernels round where the twins round
(bf16 results of each torch op), so in fp32 they agree to float error and in bf16 to a unit in the last place.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:  # Triton is optional: the twins run without it (CPU CI)
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a Triton that cannot find a compiler
    triton = None


# -- plain-torch twins: the decoder's own ops, one by one ---------------------------------------------------

def add_rms_norm_ref(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add then RMSNorm, as two torch ops.

    Args:
        x, h: (..., H) the residual stream and what a block adds to it.
        w: (H,) the norm's weight.
        eps: the norm's epsilon.
    Returns:
        (x + h, rms_norm(x + h) * w), both (..., H) in x's dtype.
    """
    s = x + h
    return s, F.rms_norm(s, (s.shape[-1],), w, eps)


def silu_mul_ref(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, (..., I) each."""
    return F.silu(g) * u


def rope_ref(x, cos, sin_signed):
    """x * cos + rotate_half(x) * sin (rotate_half(x) * sin == roll(x) * [-sin1, sin2]), as libortho.decode."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


def rope_kv_ref_(q, k, v, cos, sin_signed, pos, k_cache, v_cache):
    """Rotary on q and k of one position, k and v written into the cache at `pos`.

    Args:
        q: (B, nh * hd), k, v: (B, nkv * hd): one decode position (rows may be views of a fused q|k|v output).
        cos, sin_signed: (S, hd) tables over all positions.
        pos: (1,) long, the position (on the device).
        k_cache, v_cache: (B, nkv, S, hd), written at `pos`.
    Returns:
        the rotated q, (B, nh, 1, hd).
    """
    B, hd = q.shape[0], k_cache.shape[-1]
    c, s = cos[pos][None, None], sin_signed[pos][None, None]  # (1, 1, 1, hd)
    qr = rope_ref(q.reshape(B, -1, 1, hd), c, s)  # (B, nh, 1, hd)
    kr = rope_ref(k.reshape(B, -1, 1, hd), c, s)  # (B, nkv, 1, hd)
    k_cache.index_copy_(2, pos, kr)
    v_cache.index_copy_(2, pos, v.reshape(B, -1, 1, hd))
    return qr


def decode_attention_ref(q, k_cache, v_cache, pos):
    """One query per request and head over the static cache, future positions masked, as libortho.decode.

    Args:
        q: (B, nh, 1, hd); k_cache, v_cache: (B, nkv, S, hd), nh a multiple of nkv (query heads j*g .. j*g+g-1
            read kv head j); pos: (1,) long, the last filled position.
    Returns:
        (B, nh, 1, hd).
    """
    B, nh, _, hd = q.shape
    nkv, S = k_cache.shape[1], k_cache.shape[2]
    ar = torch.arange(S, device=q.device)
    mask = torch.where(ar <= pos, 0.0, float("-inf"))  # (S,)
    qg = q.reshape(B, nkv, nh // nkv, hd)
    s = torch.matmul(qg, k_cache.transpose(-1, -2)).float()  # (B, nkv, g, S)
    p = torch.softmax(torch.add(mask, s, alpha=hd ** -0.5), -1).to(q.dtype)
    return torch.matmul(p, v_cache).view(B, nh, 1, hd)


def host_rows_ref_(out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """out[b] = table[ids[b]] through the host: the ids copied to the table's device (a sync when they are on a
    GPU), the rows gathered there, copied into `out` (what StaticDecoder did every token).

    Args:
        out: (B, C) destination; table: (V, C); ids: (B,) long.
    Returns:
        out.
    """
    return out.copy_(table[ids.to(table.device)], non_blocking=True)


# -- dispatch ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def applies(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors like `t`: Triton importable, and `t` on CUDA (or any device under
    the interpreter), in fp32, fp16 or bf16."""
    return (triton is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (t.is_cuda or _interpret()))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (M, C) with unit column stride (a view where one exists: a decode step's (B, 1, C) slices)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add then RMSNorm in one kernel (its twin elsewhere); see `add_rms_norm_ref`."""
    if not applies(x):
        return add_rms_norm_ref(x, h, w, eps)
    H = x.shape[-1]
    x2, h2 = _rows(x), _rows(h)
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device)  # (M, H)
    y = torch.empty_like(s)
    _add_rms_norm_kernel[(x2.shape[0],)](x2, h2, w, s, y, H, x2.stride(0), h2.stride(0), float(eps),
                                         BLOCK=triton.next_power_of_2(H))
    return s.view(x.shape), y.view(x.shape)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in one kernel (its twin elsewhere); g and u may be the two halves of one fused output."""
    if not applies(g):
        return silu_mul_ref(g, u)
    I = g.shape[-1]
    g2, u2 = _rows(g), _rows(u)
    out = torch.empty(g2.shape, dtype=g.dtype, device=g.device)  # (M, I)
    BLOCK = min(1024, triton.next_power_of_2(I))
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(I, BLOCK))](g2, u2, out, I, g2.stride(0), u2.stride(0), BLOCK=BLOCK)
    return out.view(g.shape)


def rope_kv_(q, k, v, cos, sin_signed, pos, k_cache, v_cache):
    """Rotary on q and k and the cache writes of one decode position in one kernel (its twin elsewhere); see
    `rope_kv_ref_`."""
    if not applies(q):
        return rope_kv_ref_(q, k, v, cos, sin_signed, pos, k_cache, v_cache)
    B, nkv, S, hd = k_cache.shape
    nh = q.shape[-1] // hd
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and cos.is_contiguous()
            and sin_signed.is_contiguous()):
        raise ValueError("rope_kv_: the caches and cos/sin tables must be contiguous; allocate them with torch.zeros")
    q2, k2, v2 = _rows(q), _rows(k), _rows(v)
    qr = torch.empty(B, nh, 1, hd, dtype=q.dtype, device=q.device)
    _rope_kv_kernel[(B, nh + 2 * nkv)](q2, k2, v2, cos, sin_signed, pos, qr, k_cache, v_cache,
                                       q2.stride(0), k2.stride(0), v2.stride(0), nh, nkv, S, HD=hd,
                                       BLOCK=triton.next_power_of_2(hd))
    return qr


def host_rows_(out: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """out[b] = table[ids[b]] read by the GPU from pinned host memory (its twin where the kernel does not apply:
    `out` off CUDA, `table` pageable or strided; with `strict`, a ValueError saying why instead of the twin, whose
    copy to the host would sync, and fail inside a CUDA graph capture). Row indices are not bounds-checked on the
    device (a check would need the sync this kernel exists to avoid): they must be < len(table)."""
    if out.dim() != 2 or table.dim() != 2 or ids.dim() != 1 or out.shape != (ids.shape[0], table.shape[1]):
        raise ValueError(f"host_rows_: need out (B, C), table (V, C), ids (B,); got {tuple(out.shape)}, "
                         f"{tuple(table.shape)}, {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"host_rows_: ids must be int32 or int64, got {ids.dtype}")
    why = None
    if not applies(out):
        why = f"out is {out.dtype} on {out.device} (the kernel writes fp32/fp16/bf16 on CUDA)"
    elif not _interpret() and not (ids.device == out.device and table.is_pinned()):
        why = f"ids on {ids.device} for out on {out.device}, table pinned: {table.is_pinned()}"
    elif out.stride(-1) != 1 or not table.is_contiguous():
        why = "out's rows or the table are not dense"
    if why is not None:
        if strict:
            raise ValueError(f"host_rows_: the GPU cannot gather these rows itself: {why}")
        return host_rows_ref_(out, table, ids)
    C = table.shape[1]
    BLOCK = min(1024, triton.next_power_of_2(C))
    _host_rows_kernel[(ids.shape[0], triton.cdiv(C, BLOCK))](table, ids, out, C, out.stride(0), BLOCK=BLOCK)
    return out


def decode_attention(q, k_cache, v_cache, pos, block_s: int = 64, split: int = 1024):
    """Single-query attention over the cache's filled positions (its twin elsewhere); see `decode_attention_ref`.

    A cache longer than `split` positions is read in splits of `split` positions, one program per (request,
    head, split), then one combine kernel (flash-decoding): a long context keeps every SM busy instead of one
    program per head walking all of it. Splits wholly past `pos` read nothing. The default keeps the decoder's
    default cache (1,024 positions) on the one-pass kernel, the path measured on a GPU."""
    if not (isinstance(split, int) and split >= 1 and isinstance(block_s, int) and block_s >= 1
            and block_s & (block_s - 1) == 0):
        raise ValueError(f"decode_attention: split must be a positive int and block_s a power of 2, got {split!r}, "
                         f"{block_s!r}")
    if not applies(q):
        return decode_attention_ref(q, k_cache, v_cache, pos)
    B, nh, _, hd = q.shape
    nkv, S = k_cache.shape[1], k_cache.shape[2]
    if not (q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("decode_attention: the caches must be contiguous and q's last dimension dense")
    o = torch.empty(B, nh, 1, hd, dtype=q.dtype, device=q.device)
    nsplit = triton.cdiv(S, split)
    BLOCK = triton.next_power_of_2(hd)
    if nsplit == 1:
        _decode_attention_kernel[(B, nh, 1)](q, k_cache, v_cache, pos, o, o, o, q.stride(0), q.stride(1), nh, nkv, S,
                                             S, 1, float(hd ** -0.5), HD=hd, BLOCK=BLOCK, BLOCK_S=block_s,
                                             PARTIAL=False)
        return o
    m = torch.empty(B * nh * nsplit, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(B * nh * nsplit, hd, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(B, nh, nsplit)](q, k_cache, v_cache, pos, acc, m, l, q.stride(0), q.stride(1), nh, nkv,
                                              S, split, nsplit, float(hd ** -0.5), HD=hd, BLOCK=BLOCK,
                                              BLOCK_S=block_s, PARTIAL=True)
    _decode_attention_combine_kernel[(B, nh)](m, l, acc, o, nh, nsplit, HD=hd, BLOCK=BLOCK,
                                              BLOCK_N=triton.next_power_of_2(nsplit))
    return o


# -- kernels -------------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, h_ptr, w_ptr, s_ptr, y_ptr, H, stride_x, stride_h, eps, BLOCK: tl.constexpr):
        # one program per row; the sum is rounded to the stream's dtype before the norm reads it, and the
        # normalized row before the weight multiplies it: where torch's x + h and F.rms_norm round
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < H
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * stride_h + offs, mask=m, other=0.0).to(tl.float32)
        s = (x + h).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + row * H + offs, s, mask=m)
        sf = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / H + eps)
        n = (sf * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * H + offs, (n * w).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, I, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < I
        g = tl.load(g_ptr + row * stride_g + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + offs, mask=m, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)  # silu, rounded as F.silu's output
        tl.store(o_ptr + row * I + offs, (a * u).to(o_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr,
                        stride_q, stride_k, stride_v, NH, NKV, S, HD: tl.constexpr, BLOCK: tl.constexpr):
        # one program per (request, head): heads 0..NH-1 are q (rotated, to qo), then NKV k heads (rotated, to the
        # k cache at pos), then NKV v heads (copied to the v cache at pos)
        b = tl.program_id(0)
        j = tl.program_id(1)
        pos = tl.load(pos_ptr)
        d = tl.arange(0, BLOCK)
        m = d < HD
        partner = (d + HD // 2) % HD  # roll by half: rotate_half(x) * sin == x[partner] * sin_signed
        c = tl.load(cos_ptr + pos * HD + d, mask=m, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + pos * HD + d, mask=m, other=0.0).to(tl.float32)
        if j < NH:
            src = q_ptr + b * stride_q + j * HD
            x = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
            xr = tl.load(src + partner, mask=m, other=0.0).to(tl.float32)
            t = (x * c).to(qo_ptr.dtype.element_ty).to(tl.float32)  # x * cos rounded, as torch's mul before addcmul
            tl.store(qo_ptr + (b * NH + j) * HD + d, (t + xr * sn).to(qo_ptr.dtype.element_ty), mask=m)
        elif j < NH + NKV:
            src = k_ptr + b * stride_k + (j - NH) * HD
            x = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
            xr = tl.load(src + partner, mask=m, other=0.0).to(tl.float32)
            t = (x * c).to(kc_ptr.dtype.element_ty).to(tl.float32)
            dst = kc_ptr + ((b * NKV + (j - NH)) * S + pos) * HD
            tl.store(dst + d, (t + xr * sn).to(kc_ptr.dtype.element_ty), mask=m)
        else:
            xv = tl.load(v_ptr + b * stride_v + (j - NH - NKV) * HD + d, mask=m, other=0.0)  # not `x`: a name
            dst = vc_ptr + ((b * NKV + (j - NH - NKV)) * S + pos) * HD  # keeps one type across branches
            tl.store(dst + d, xv.to(vc_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, stride_qb, stride_qh, NH, NKV, S,
                                 SPLIT, NSPLIT, scale, HD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
                                 PARTIAL: tl.constexpr):
        # one program per (request, query head, split of SPLIT positions); the split's positions up to pos in
        # blocks, online softmax in fp32: positions past pos are never read (the cache beyond them may hold
        # anything), and a split wholly past pos reads nothing. PARTIAL: the split's running max, sum and
        # unnormalized output go to m, l and o (fp32) for the combine kernel; else (one split) the output itself
        b = tl.program_id(0)
        j = tl.program_id(1)
        sid = tl.program_id(2)
        kv = j // (NH // NKV)
        pos = tl.load(pos_ptr)
        start = sid * SPLIT
        end = tl.minimum(start + SPLIT, pos + 1)  # exclusive; <= start: nothing to read
        d = tl.arange(0, BLOCK)
        dm = d < HD
        q = tl.load(q_ptr + b * stride_qb + j * stride_qh + d, mask=dm, other=0.0).to(tl.float32)
        base = (b * NKV + kv) * S * HD
        m_i = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)
        acc = tl.zeros((BLOCK,), tl.float32)
        for s0 in range(start, end, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            sm = sp < end
            m2 = sm[:, None] & dm[None, :]
            k = tl.load(k_ptr + base + sp[:, None] * HD + d[None, :], mask=m2, other=0.0).to(tl.float32)
            sc = tl.sum(k * q[None, :], axis=1) * scale  # (BLOCK_S,)
            sc = tl.where(sm, sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            p = tl.exp(sc - m_new)
            corr = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + base + sp[:, None] * HD + d[None, :], mask=m2, other=0.0).to(tl.float32)
            acc = acc * corr + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * corr + tl.sum(p, axis=0)
            m_i = m_new
        if PARTIAL:
            row = (b * NH + j) * NSPLIT + sid
            tl.store(m_ptr + row, m_i)
            tl.store(l_ptr + row, l_i)
            tl.store(o_ptr + row * HD + d, acc, mask=dm)
        else:
            tl.store(o_ptr + (b * NH + j) * HD + d, (acc / l_i).to(o_ptr.dtype.element_ty), mask=dm)

    @triton.jit
    def _decode_attention_combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, NH, NSPLIT, HD: tl.constexpr,
                                         BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
        # one program per (request, query head): the splits' partial softmaxes rescaled to their common max and
        # summed (flash-decoding's reduction); a split past pos has max -inf and weighs 0 (split 0 never is)
        b = tl.program_id(0)
        j = tl.program_id(1)
        n = tl.arange(0, BLOCK_N)
        nm = n < NSPLIT
        row = (b * NH + j) * NSPLIT
        m = tl.load(m_ptr + row + n, mask=nm, other=float("-inf"))
        w = tl.where(nm, tl.exp(m - tl.max(m, axis=0)), 0.0)  # (BLOCK_N,)
        l = tl.load(l_ptr + row + n, mask=nm, other=0.0)
        d = tl.arange(0, BLOCK)
        dm = d < HD
        acc = tl.load(acc_ptr + (row + n)[:, None] * HD + d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(o_ptr + (b * NH + j) * HD + d, out.to(o_ptr.dtype.element_ty), mask=dm)

    @triton.jit
    def _host_rows_kernel(t_ptr, ids_ptr, o_ptr, C, stride_o, BLOCK: tl.constexpr):
        # one program per (row, block of columns); the table pointer is pinned host memory, read over the bus
        b = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < C
        row = tl.load(ids_ptr + b).to(tl.int64)  # int64: a 128k x 4096 table overflows int32 offsets
        v = tl.load(t_ptr + row * C + offs, mask=m, other=0.0)
        tl.store(o_ptr + b * stride_o + offs, v.to(o_ptr.dtype.element_ty), mask=m)
