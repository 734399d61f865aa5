"""GPTQ-style INT4: round one input column at a time and push its error onto the columns not yet rounded.

Frantar et al., "GPTQ" (2022). With H = E[x x^T] over calibration tokens (the full Hessian of the layer's
squared output error), rounding column j leaves an error e_j; the remaining columns are moved by
-e_j * Hinv[j, j:] / Hinv[j, j], which minimises the output error of the layer given what was rounded.
The grid is the one of `quant.py` -- `w ~= (q - 8) * scale + zero`, one (scale, zero) per group -- and
each group's scale is taken from the *updated* weights when the rounding reaches its first column
(the reference implementation's choice), so the result is a plain `QuantizedTensor`: the same storage,
the same dequantization, the same kernels as round-to-nearest.

No activation reordering: it would need a per-column group index that this storage format does not hold.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .llama import LLAMA_LINEARS
from .quant import OFFSET, QMAX, QMIN, QuantizedTensor, _search_clip, check_finite, check_weight, pack_int4, quant_params, \
    resolve_group_size

DAMP = 0.1  # dampening: share of mean(diag H) added to the diagonal (see note below)
# The paper's 1% assumes ~260K calibration tokens. With a few thousand, 1% overfits the calibration text:
# on SmolLM2-135M (4096 fortunes tokens), the output error on *held-out fortunes* was lowest at 10%
# (1%: up to 1.2x higher; 30%: about equal); AutoGPTQ's documentation also suggests 0.1.
BLOCK = 128  # columns rounded per block before the lazy update of the rest (speed only, same result)


def _column_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values of one column `w` (O,), exactly as quant.quantize_codes/dequantize do."""
    s = scale.float()
    z = 0.0 if zero is None else zero.float()
    q = (torch.round((w - z) / s) + OFFSET).clamp_(QMIN, QMAX)  # (O,)
    deq = (q.to(dtype) - OFFSET) * scale.to(dtype)
    if zero is not None:
        deq = deq + zero.to(dtype)
    return q.to(torch.uint8), deq.float()


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, group_size: int | None = 128, symmetric: bool = True,
                  dtype: torch.dtype | None = None, clip_search: bool = False, pad: bool = False,
                  damp: float = DAMP) -> QuantizedTensor:
    """INT4 of a 2-D weight that minimises the layer's output error on calibration inputs.

    Args:
        w: (out_features, in_features) weight.
        hessian: (in_features, in_features) E[x x^T] of the layer's inputs (`select.collect_hessian`).
        group_size, symmetric, dtype, clip_search, pad: as in `quant.quantize`; `clip_search` searches
            each group's range clip on the updated weights when its scale is set.
        damp: share of mean(diag H) added to the diagonal before inversion.
    Returns:
        QuantizedTensor in the storage format of `quant.quantize`.
    Example:
        >>> x = torch.randn(256, 64); w = torch.randn(16, 64)
        >>> qt = gptq_quantize(w, x.T @ x / 256, group_size=32)
        >>> qt.dequantize().shape
        torch.Size([16, 64])
    """
    if w.device.type != "cpu":
        return _gptq(w, hessian, group_size, symmetric, dtype, clip_search, pad, damp)
    # The column loop is thousands of tiny ops: on CPU, intra-op threads only add synchronisation
    # (measured 30x slower with 2 threads than with 1 on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq(w, hessian, group_size, symmetric, dtype, clip_search, pad, damp)
    finally:
        torch.set_num_threads(threads)


def _gptq(w, hessian, group_size, symmetric, dtype, clip_search, pad, damp) -> QuantizedTensor:
    out_f, in_f = check_weight(w)
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian must be ({in_f}, {in_f}) for a weight of shape {tuple(w.shape)}, "
                         f"got {tuple(hessian.shape)}")
    check_finite(hessian, "hessian")
    gs = resolve_group_size(group_size, in_f, pad)
    dtype = dtype or w.dtype
    device = w.device

    W = w.detach().float().clone()  # (O, I), updated in place as columns are rounded
    H = hessian.detach().to(device=device, dtype=torch.float64).clone()  # float64: the inverse must be stable
    dead = torch.diagonal(H) == 0  # inputs never active: any value is free, round zero
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    # Upper Cholesky factor of H^-1: row j holds the update direction for column j (the GPTQ trick).
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()  # (I, I)

    n_g = -(-in_f // gs)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=device)
    scales = torch.empty(out_f, n_g, dtype=dtype, device=device)
    zeros = None if symmetric else torch.empty(out_f, n_g, dtype=dtype, device=device)
    # Blocks hold whole groups, so a group's scale is always read from fully updated weights.
    block = gs * max(1, BLOCK // gs) if gs <= BLOCK else gs
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        W1, H1 = W[:, b0:b1], hinv[b0:b1, b0:b1]  # W1 is a view: updates land in W
        err = torch.empty_like(W1)  # (O, b)
        for i in range(b1 - b0):
            col = b0 + i
            if col % gs == 0:
                g, g1 = col // gs, min(col + gs, in_f) - b0
                grp = W1[:, i:g1]
                s, z = (_search_clip(grp, grp.shape[1], symmetric, dtype) if clip_search
                        else quant_params(grp, grp.shape[1], symmetric, dtype))
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            q, deq = _column_quant(W1[:, i], scales[:, g], None if zeros is None else zeros[:, g], dtype)
            codes[:, col] = q
            e = (W1[:, i] - deq) / H1[i, i]  # (O,)
            W1[:, i:] -= e.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, b1:] -= err @ hinv[b0:b1, b1:]  # lazy update of every later column
    return QuantizedTensor(pack_int4(codes), scales, zeros, gs, (out_f, in_f))


@torch.no_grad()
def gptq_(model: nn.Module, hessian: Mapping[str, torch.Tensor], group_size: int = 128, symmetric: bool = True,
          clip_search: bool = False, pad: bool = False, targets=LLAMA_LINEARS) -> dict[str, QuantizedTensor]:
    """Replace each target weight by its GPTQ INT4 dequantization, in place (the control arm of `int4_rtn_`).

    Args:
        hessian: {module name: (in, in) E[x x^T]} from `select.collect_hessian` on this model.
    Returns:
        {module name: QuantizedTensor} -- the packed weights, for bit-exact comparisons and bits/weight.
    """
    from .modules import target_linears

    out = {}
    for name, lin in target_linears(model, targets).items():
        if name not in hessian:
            raise ValueError(f"no Hessian for {name}: calibrate the model with select.collect_hessian first")
        try:
            qt = gptq_quantize(lin.weight, hessian[name], group_size, symmetric, clip_search=clip_search, pad=pad)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        lin.weight.copy_(qt.dequantize(lin.weight.dtype))
        out[name] = qt
    return out


def bits_per_weight(packed: Mapping[str, QuantizedTensor]) -> float:
    """Storage cost of a set of packed weights, weighted by their sizes."""
    n = sum(q.shape[0] * q.shape[1] for q in packed.values())
    return sum(q.bits_per_weight() * q.shape[0] * q.shape[1] for q in packed.values()) / n
