"""Plain-torch INT4 quantization: the reference every faster path is checked against.

One storage format for symmetric and asymmetric grids, the one torch's int4 kernels read:

    w ~= (q - 8) * scale + zero        q in [0, 15], one (scale, zero) per group of `group_size` inputs

Symmetric grids keep `zero = None` (it is 0 and costs no bits). Scales and zeros are kept in the
model's dtype, and the codes are computed against the *stored* (dtype-rounded) scale so that
dequantization reproduces exactly what the quantizer meant.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

QMIN, QMAX, OFFSET = 0, 15, 8  # unsigned 4-bit codes, centred on 8


@dataclass
class QuantizedTensor:
    """Packed INT4 weight: `qweight` (out, in/2) uint8, `scales`/`zeros` (out, in/group_size)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    shape: tuple[int, int]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def bits_per_weight(self) -> float:
        """Storage cost: 4 bits per code plus the group's scale (and zero), in the scales' dtype."""
        meta_bits = torch.finfo(self.scales.dtype).bits * (1 if self.zeros is None else 2)
        return 4.0 + meta_bits * self.scales.shape[1] / self.shape[1]


def resolve_group_size(group_size: int | None, in_features: int, pad: bool = False) -> int:
    """`None` or -1 means one group per output channel (the whole input row).

    A group size that does not divide `in_features` is an error unless `pad=True`: then the last group
    of each row is shorter (it is quantized as if padded by repeating the row's last weight, which
    leaves its min/max unchanged) and gets its own scale.
    """
    if group_size is None or group_size == -1:
        return in_features
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, -1 or None, got {group_size!r}")
    if in_features % group_size and not pad:
        fits = [g for g in (128, 64, 32, 16) if in_features % g == 0]
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}; "
            f"use a divisor of {in_features}" + (f" (e.g. {', '.join(map(str, fits))})" if fits else "")
            + ", group_size=-1 (per channel) or pad=True"
        )
    return group_size


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def check_finite(w: torch.Tensor, what: str = "weight") -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"{what} has {bad} NaN/Inf entries; libortho cannot quantize it")


def check_weight(w: torch.Tensor) -> tuple[int, int]:
    """(out, in) of a weight INT4 can store: 2-D, finite, an even input width (two nibbles per byte)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    check_finite(w)
    out_f, in_f = w.shape
    if in_f % 2:
        raise ValueError(f"in_features must be even to pack two nibbles per byte, got {in_f}")
    return out_f, in_f


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out_f, in_f = w.shape
    pad = n_groups(in_f, group_size) * group_size - in_f
    if pad:  # repeat the last column: the short last group keeps its own min/max
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, -1, group_size)  # (O, G, gs)


def quant_params(
    w: torch.Tensor, group_size: int, symmetric: bool, dtype: torch.dtype, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zeros) for each group, from the group's range shrunk by `clip` (1.0 = no clipping)."""
    wg = _grouped(w.float(), group_size)
    if symmetric:
        amax = wg.abs().amax(-1) * clip
        scale = (amax / (OFFSET - 1)).clamp_min(1e-8)  # +-7 reach the extremes, -8 stays spare
        return scale.to(dtype), None
    lo, hi = wg.amin(-1), wg.amax(-1)
    mid, half = (hi + lo) / 2, (hi - lo) / 2 * clip
    scale = (2 * half / (QMAX - QMIN)).clamp_min(1e-8)
    zero = mid - (QMAX - QMIN) / 2 * scale + OFFSET * scale  # so q=0 -> mid - 7.5*scale
    return scale.to(dtype), zero.to(dtype)


def quantize_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Round `w` onto the grid given by stored scales/zeros; returns uint8 codes (out, in)."""
    wg = _grouped(w.float(), group_size)
    s = scales.float().unsqueeze(-1)
    z = 0.0 if zeros is None else zeros.float().unsqueeze(-1)
    q = torch.round((wg - z) / s) + OFFSET
    return q.clamp_(QMIN, QMAX).to(torch.uint8).flatten(1)[:, : w.shape[1]]


def quantize(
    w: torch.Tensor,
    group_size: int | None = 128,
    symmetric: bool = True,
    dtype: torch.dtype | None = None,
    clip_search: bool = False,
    pad: bool = False,
) -> QuantizedTensor:
    """Round-to-nearest INT4 of a 2-D weight.

    Args:
        w: (out_features, in_features) weight.
        group_size: inputs sharing one scale; -1/None for one group per output channel.
        symmetric: zero-centred grid (no zeros stored) or min/max grid with a zero per group.
        dtype: dtype of scales/zeros; defaults to `w.dtype`.
        clip_search: per group, try shrinking the range (1.0 .. 0.70) and keep the one with the
            lowest squared error -- a cheap, data-free improvement over plain min/max.
        pad: allow a group size that does not divide in_features (short last group).
    Returns:
        QuantizedTensor with packed codes.
    Example:
        >>> qt = quantize(torch.randn(8, 64), group_size=32)
        >>> qt.dequantize().shape
        torch.Size([8, 64])
    """
    out_f, in_f = check_weight(w)
    gs = resolve_group_size(group_size, in_f, pad)
    dtype = dtype or w.dtype
    if not clip_search:
        scales, zeros = quant_params(w, gs, symmetric, dtype)
    else:
        scales, zeros = _search_clip(w, gs, symmetric, dtype)
    for what, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and not torch.isfinite(t).all():  # e.g. weights near 3e38 give a range of inf in fp32
            raise ValueError(f"the INT4 {what} overflow {dtype} (largest |weight| {w.abs().max().item():.3g}): the "
                             "weights are too large to quantize; rescale them or store the scales in float32")
    codes = quantize_codes(w, scales, zeros, gs)
    return QuantizedTensor(pack_int4(codes), scales, zeros, gs, (out_f, in_f))


def _search_clip(w, gs, symmetric, dtype, grid=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)):
    wg = _grouped(w.float(), gs)
    best_err = best_s = best_z = None
    for c in grid:
        s, z = quant_params(w, gs, symmetric, dtype, clip=c)
        deq = dequantize_codes(quantize_codes(w, s, z, gs), s, z, gs, torch.float32)
        err = (_grouped(deq, gs) - wg).pow(2).sum(-1)  # (O, G); padded columns repeat, a small bias only
        if best_err is None:
            best_err, best_s, best_z = err, s, z
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    out_f, in_f = codes.shape
    q = _grouped(codes, group_size).to(dtype) - OFFSET  # (O, G, gs)
    w = q * scales.to(dtype).unsqueeze(-1)
    if zeros is not None:
        w = w + zeros.to(dtype).unsqueeze(-1)
    return w.flatten(1)[:, :in_f]


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight (out, in) in `dtype` (default: the scales' dtype)."""
    return dequantize_codes(unpack_int4(qt.qweight), qt.scales, qt.zeros, qt.group_size, dtype or qt.scales.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) uint8 codes in [0, 15] -> (..., n) bytes; element 2j in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"last dim must be even to pack, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
