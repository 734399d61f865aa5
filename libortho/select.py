"""Calibration statistics and residual selection: which entries of a weight go to the ortho stream."""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Score, validate_density
from .modules import target_linears
from .sparse import CSR, csr_from_mask


@torch.no_grad()
def collect_hessian_diag(model: nn.Module, batches: Iterable[torch.Tensor], targets, progress: bool = True
                         ) -> dict[str, torch.Tensor]:
    """diag(H) = mean over calibration tokens of x^2 for every target linear, in one forward pass.

    Args:
        model: a causal LM taking `input_ids`.
        batches: iterable of (B, T) token-id tensors (unpadded, so every token counts).
        targets: linear names to hook.
    Returns:
        {module name: (in_features,) float32}.
    """
    return _calibrate(model, batches, targets, progress, full=False)


@torch.no_grad()
def collect_hessian(model: nn.Module, batches: Iterable[torch.Tensor], targets, progress: bool = True
                    ) -> dict[str, torch.Tensor]:
    """The full H = mean over calibration tokens of x x^T for every target linear, in one forward pass.

    What GPTQ needs; its diagonal is `collect_hessian_diag`'s statistic (`hessian_diag_of`).

    Returns:
        {module name: (in_features, in_features) float32}.
    """
    return _calibrate(model, batches, targets, progress, full=True)


def hessian_diag_of(hessian: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diagonals of full Hessians: the `hessian` score's statistic without a second calibration pass."""
    return {n: torch.diagonal(h).clone() for n, h in hessian.items()}


def _calibrate(model, batches, targets, progress, full: bool) -> dict[str, torch.Tensor]:
    linears = target_linears(model, targets)
    shape = (lambda m: (m.in_features, m.in_features)) if full else (lambda m: (m.in_features,))
    sums = {n: torch.zeros(shape(m), dtype=torch.float64) for n, m in linears.items()}
    count = {"tokens": 0}
    last = {"x": None, "version": None, "stat": None}  # q/k/v (gate/up) read one input tensor: x^T x once

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (N, in)
            if not full:
                sums[name] += x.pow(2).sum(0).double().cpu()
                return
            # identity, not address: holding the tensor keeps its memory from being reused by another
            if args[0] is not last["x"] or args[0]._version != last["version"]:
                last.update(x=args[0], version=args[0]._version, stat=(x.T @ x).double().cpu())  # (in, in)
            sums[name] += last["stat"]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    from .modules import input_device

    device = input_device(model)  # where input ids go (a table in host memory is not it)
    try:
        for ids in tqdm(list(batches), desc="calibrate", disable=not progress, leave=False):
            if ids.numel() == 0:
                continue
            model(input_ids=ids.to(device), logits_to_keep=1)  # the head is not calibrated: skip its cost
            count["tokens"] += ids.numel()
    finally:
        for h in handles:
            h.remove()
        last.clear()
    if count["tokens"] == 0:
        raise ValueError("calibration data is empty: pass at least one non-empty batch of token ids")
    return {n: (s / count["tokens"]).float() for n, s in sums.items()}


def scores(residual: torch.Tensor, score: Score | str, hessian_diag: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Importance of each residual entry; the top-k become the ortho stream."""
    score = Score(score)
    if score is Score.HESSIAN:
        if hessian_diag is None:
            raise ValueError("score='hessian' needs calibration statistics (hessian_diag)")
        return residual.float().pow(2) * hessian_diag.to(residual.device).float().unsqueeze(0)
    if score is Score.MAGNITUDE:
        return residual.float().abs()
    return torch.rand(residual.shape, generator=generator, device="cpu").to(residual.device)


def top_mask(score: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the ceil(density * numel) highest scores (ties broken by torch.topk)."""
    validate_density(density)
    k = min(score.numel(), math.ceil(density * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[torch.topk(score.flatten(), k, sorted=False).indices] = True
    return mask.view(score.shape)


def select(residual: torch.Tensor, density: float, score: Score | str = Score.HESSIAN,
           hessian_diag: torch.Tensor | None = None, generator: torch.Generator | None = None) -> CSR:
    """Keep the `density` share of `residual` with the highest `score`, as CSR."""
    mask = top_mask(scores(residual, score, hessian_diag, generator), density)
    return csr_from_mask(residual, mask)
