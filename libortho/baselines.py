"""Control arms every claim is measured against: plain INT4 round-to-nearest and bitsandbytes NF4."""
from __future__ import annotations

import torch
from torch import nn

from .llama import LLAMA_LINEARS
from .modules import set_module, target_linears
from .quant import quantize


@torch.no_grad()
def int4_rtn_(model: nn.Module, group_size: int = 64, symmetric: bool = True, clip_search: bool = False,
              pad: bool = False, targets=LLAMA_LINEARS) -> float:
    """Replace each target weight by its INT4 round-to-nearest dequantization (dense storage, INT4 values).

    Returns the storage cost in bits per weight of the quantized linears.
    """
    bits, count = 0.0, 0
    for name, lin in target_linears(model, targets).items():
        try:
            qt = quantize(lin.weight, group_size, symmetric, clip_search=clip_search, pad=pad)
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
def nf4_(model: nn.Module, targets=LLAMA_LINEARS, compute_dtype: torch.dtype | None = None) -> float:
    """Swap each target linear for bitsandbytes `Linear4bit` (NF4, double quant), in place.

    Runs on CPU (bitsandbytes >= 0.45) and CUDA. Returns bits per weight.
    """
    import bitsandbytes as bnb

    for name, lin in target_linears(model, targets).items():
        device = lin.weight.device
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype or lin.weight.dtype, quant_type="nf4",
                              compress_statistics=True, device="cpu")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().cpu(), requires_grad=False, quant_type="nf4",
                                     blocksize=NF4_BLOCKSIZE, compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.detach().cpu(), requires_grad=False)
        q = q.to(device)  # Params4bit quantizes on the move
        set_module(model, name, q)
    return nf4_bits_per_weight()
