"""Control arms every claim is measured against: plain INT4 round-to-nearest, bitsandbytes NF4 and HQQ."""
from __future__ import annotations

import torch
from torch import nn

from .llama import LLAMA_LINEARS
from .modules import set_module, target_linears
from .quant import quantize


@torch.no_grad()
def int4_rtn_(model: nn.Module, group_size: int = 64, symmetric: bool = True, clip_search: bool = False,
              pad: bool = False, targets=LLAMA_LINEARS, scale_dtype: torch.dtype | None = None) -> float:
    """Replace each target weight by its INT4 round-to-nearest dequantization (dense storage, INT4 values).

    `scale_dtype`: dtype the scales/zeros are stored in (default: the weight's). Returns the storage cost in
    bits per weight of the quantized linears.
    """
    bits, count = 0.0, 0
    for name, lin in target_linears(model, targets).items():
        try:
            qt = quantize(lin.weight, group_size, symmetric, scale_dtype, clip_search=clip_search, pad=pad)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        lin.weight.copy_(qt.dequantize(lin.weight.dtype))
        bits += qt.bits_per_weight() * lin.weight.numel()
        count += lin.weight.numel()
    return bits / count


NF4_BLOCKSIZE = 64


def nf4_bits_per_weight(blocksize: int = NF4_BLOCKSIZE) -> float:
    """NF4 with double quantization: 4-bit codes, an 8-bit absmax per block, an fp32 per 256 absmaxes."""
    return 4 + 8 / blocksize + 32 / (blocksize * 256)


@torch.no_grad()
def nf4_(model: nn.Module, targets=LLAMA_LINEARS, compute_dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> float:
    """Swap each target linear for bitsandbytes `Linear4bit` (NF4, double quant), in place.

    Runs on CPU (bitsandbytes >= 0.45) and CUDA. `device`: where the NF4 linears go and are quantized (default:
    each linear's own device); a layer read into host memory then never has its dense weights on the GPU.
    Returns bits per weight.
    """
    import bitsandbytes as bnb

    for name, lin in target_linears(model, targets).items():
        device_ = lin.weight.device if device is None else torch.device(device)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype or lin.weight.dtype, quant_type="nf4",
                              compress_statistics=True, device="cpu")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                     blocksize=NF4_BLOCKSIZE, compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().cpu(), requires_grad=False)
        q = q.to(device_)  # Params4bit quantizes on the move
        set_module(model, name, q)
    return nf4_bits_per_weight()


def stored_bits(*tensors: torch.Tensor | None) -> int:
    """Bits the tensors occupy as stored: numel x element size, whatever their dtype (None counts 0)."""
    return sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None)


def nf4_stored_bits_per_weight(model: nn.Module) -> float:
    """Bits per weight of every bitsandbytes `Linear4bit` in `model`, from its tensors: packed codes, 8-bit
    block absmaxes, their fp32 second-level absmaxes and offset. The two code tables (16 + 256 fp32 values per
    layer, a constant per layer rather than per weight) are not counted, as `nf4_bits_per_weight` does not."""
    import bitsandbytes as bnb

    bits = numel = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w, qs = mod.weight, mod.weight.quant_state
            bits += stored_bits(w.data, qs.absmax)
            if qs.nested:
                bits += stored_bits(qs.state2.absmax, qs.offset)
            numel += qs.shape.numel()
    if not numel:
        raise ValueError("the model holds no bitsandbytes Linear4bit; run nf4_ on it first")
    return bits / numel


HQQ_SCALE_DTYPE = torch.float16  # HQQ's default compute dtype: its scales and zeros are stored in it


@torch.no_grad()
def hqq_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 64, scale_dtype: torch.dtype = HQQ_SCALE_DTYPE
                 ) -> tuple[torch.Tensor, dict]:
    """HQQ (half-quadratic optimisation of each group's zero, Badri & Shaji 2023) of one 2-D weight, on its device.

    Args:
        w: (out_features, in_features) weight.
        bits: code width (HQQ's supported widths; 4 for the INT4 comparison).
        group_size: inputs sharing one (scale, zero); must divide in_features.
        scale_dtype: dtype HQQ stores its scales and zeros in (its compute dtype).
    Returns:
        (dequantized weight (out, in) in w's dtype, HQQ's stored tensors {"W_q", "scale", "zero"}).
    """
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if bits not in Quantizer.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of HQQ's {Quantizer.SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0 or w.shape[1] % group_size:
        raise ValueError(f"group_size must be a positive divisor of in_features {w.shape[1]}, got {group_size!r}")
    params = hqq_base_quant_config(nbits=bits, group_size=group_size)["weight_quant_params"]  # axis 1: input groups
    w_q, meta = Quantizer.quantize(w.detach(), device=w.device.type, compute_dtype=scale_dtype, **params)
    scale, zero = meta["scale"].to(scale_dtype), meta["zero"].to(scale_dtype)  # what HQQLinear keeps
    # HQQ's own dequantization, (W_q - zero) * scale, in fp32 arithmetic from the stored fp16 scale and zero
    deq = Quantizer.dequantize(w_q, {**meta, "scale": scale.float(), "zero": zero.float(),
                                     "compute_dtype": torch.float32})  # (O, I)
    return deq.to(w.dtype), {"W_q": w_q, "scale": scale, "zero": zero}


@torch.no_grad()
def hqq_(model: nn.Module, bits: int = 4, group_size: int = 64, scale_dtype: torch.dtype = HQQ_SCALE_DTYPE,
         targets=LLAMA_LINEARS) -> float:
    """Replace each target weight by its HQQ dequantization (`hqq_quantize`), in place; the modules stay
    `nn.Linear` and run wherever the model does (CPU included).

    Returns the storage cost in bits per weight, from the tensors HQQ stores (packed codes, scales, zeros).
    """
    total, count = 0, 0
    for name, lin in target_linears(model, targets).items():
        try:
            deq, stored = hqq_quantize(lin.weight, bits, group_size, scale_dtype)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        lin.weight.copy_(deq)
        total += stored_bits(*stored.values())
        count += lin.weight.numel()
    return total / count


class Int4PackLinear(nn.Module):
    """INT4 weight-only linear through torch's tinygemm kernel (`aten._weight_int4pack_mm`, what torchao's int4
    weight-only config runs on CUDA; `_weight_int4pack_mm_for_cpu` elsewhere). Its grid is libortho's:
    w = (q - 8) * scale + zero per group of inputs, so `from_ortho` takes an OrthoLinear's base as it is (the
    stream dropped): the same INT4 weights through another kernel, the engine-equal baseline of the decoder.

    Args:
        codes: (out, in) uint8 in [0, 15]; scales, zeros: (out, in / group_size) (zeros None: 0).
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        out_f, in_f = codes.shape
        # tinygemm's packing tiles `in` by 16 x inner_k_tiles (8, 4 or 2: the largest that divides it)
        tiles = next((t for t in (8, 4, 2) if in_f % (16 * t) == 0), None)
        if tiles is None or in_f % group_size or out_f % 8 or group_size not in (32, 64, 128, 256):
            raise ValueError(f"tinygemm needs in % 32 == 0, out % 8 == 0 and a group of 32, 64, 128 or 256 dividing "
                             f"in; got ({out_f}, {in_f}) with group {group_size}")
        self.in_features, self.out_features, self.group_size = in_f, out_f, group_size
        c = codes.to(torch.uint8)
        if c.is_cuda:  # two codes a byte, the even column in the high nibble
            packed = torch.ops.aten._convert_weight_to_int4pack(((c[:, 0::2] << 4) | c[:, 1::2]).contiguous(), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32).contiguous(), tiles)
        z = torch.zeros_like(scales) if zeros is None else zeros.to(scales.dtype)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", torch.stack([scales, z], -1).transpose(0, 1).contiguous())  # (G, out, 2)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_ortho(cls, m) -> "Int4PackLinear":
        """The INT4 base of OrthoLinear `m` (codes, scales, zeros, bias), its ortho stream left out."""
        from .quant import unpack_int4

        return cls(unpack_int4(m.qweight), m.scales, m.zeros, m.group_size, m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = op(x.reshape(-1, self.in_features), self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@torch.no_grad()
def int4pack_(model: nn.Module) -> int:
    """Swap every OrthoLinear of `model` (the head too) for the `Int4PackLinear` of its base, in place; returns how
    many. The model then computes INT4 of its base alone, through tinygemm."""
    from .modules import ortho_modules

    mods = ortho_modules(model)
    if not mods:
        raise ValueError("int4pack_ needs a libortho model (OrthoLinear layers); convert it first")
    built = {}
    for name, m in mods.items():  # every layer built (and checked) before any is swapped: no half-converted model
        try:
            built[name] = Int4PackLinear.from_ortho(m)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    for name, lin in built.items():
        set_module(model, name, lin)
    return len(built)
