"""How a model is walked: find its target linears, swap modules, and switch every OrthoLinear at once.

`OrthoLinear` (linear.py) says how one layer computes; this file says how a whole model is handled: the
skeleton builder used when a checkpoint is loaded (`convert_for_runtime_`), `alpha` and `set_alpha`, the
backend.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from .config import Backend, validate_alpha
from .linear import OrthoLinear
from .llama import LLAMA_LINEARS, is_target

FilterFn = Callable[[nn.Module, str], bool]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (top-level names included)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def target_linears(model: nn.Module, targets=LLAMA_LINEARS, filter_fn: FilterFn | None = None
                   ) -> dict[str, nn.Linear]:
    """The `nn.Linear` modules whose names end in one of `targets` (and pass `filter_fn(module, name)`)."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n, targets)
             and (filter_fn is None or filter_fn(m, n))}
    if not found:
        raise ValueError(f"model {type(model).__name__} has no linear named {list(targets)}; nothing to convert")
    return found


def ortho_modules(model: nn.Module) -> dict[str, OrthoLinear]:
    """Every OrthoLinear of `model`, by name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLinear)}


def _require(model: nn.Module) -> dict[str, OrthoLinear]:
    mods = ortho_modules(model)
    if not mods:
        raise ValueError("model has no OrthoLinear; run libortho.orthogonalize_ first")
    return mods


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids belong: a HostEmbedding's output device (its table stays on the host), else the
    embedding table's device (accelerate's hooks move inputs of an offloaded model themselves)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "out_device", None) is not None:
        return emb.out_device
    if emb is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def _is_vector(alpha) -> bool:
    return isinstance(alpha, (torch.Tensor, list, tuple)) and not (isinstance(alpha, torch.Tensor) and alpha.dim() == 0)


def set_alpha(model: nn.Module, alpha) -> nn.Module:
    """Set alpha on every OrthoLinear: 1 = the fine-tuned model, 0 = the privacy kill switch.

    Args:
        alpha: a number (every row of every batch), or a 1-D tensor / list of B numbers: one alpha per request of
            a batch, y[b] = base(x[b]) + alpha[b] * ortho(x[b]) for inputs (B, T, ...) (rows at 0 never read the
            stream where the path allows; see OrthoLinear.set_row_alpha). A number clears any per-row alphas.
    Returns:
        the model.

    Example:
        >>> set_alpha(model, torch.tensor([0.0, 1.0]))   # doctest: +SKIP
        >>> model(input_ids=ids_of_two_requests)         # request 0 at the kill switch, request 1 fine-tuned
    """
    mods = _require(model)
    if _is_vector(alpha):
        from .linear import validate_row_alpha

        a = validate_row_alpha(alpha)
        if bool(a.ne(0).any()) and not all(m.has_ortho for m in mods.values()):
            raise ValueError("model was loaded without its ortho stream; only alpha=0 is possible")
        shared: dict[torch.device, torch.Tensor] = {}  # one tensor per device, shared by its layers
        for m in mods.values():
            dev = m.alpha.device
            if dev not in shared:
                shared[dev] = a.to(dev)
            m.set_row_alpha(shared[dev])
        return model
    alpha = validate_alpha(alpha)
    if alpha != 0 and not all(m.has_ortho for m in mods.values()):
        raise ValueError("model was loaded without its ortho stream; only alpha=0 is possible")
    for m in mods.values():
        m.set_row_alpha(None)
        m.set_alpha(alpha)
    return model


@contextlib.contextmanager
def alpha(model: nn.Module, value) -> Iterator[nn.Module]:
    """Run a block at `value` (a number, or one alpha per batch entry as in `set_alpha`), then restore every
    layer's previous alpha (scalar and per-row), exceptions included.

    Example:
        >>> with libortho.alpha(model, 0.0):     # doctest: +SKIP
        ...     model.generate(...)              # the kill switch, for this block only
        >>> with libortho.alpha(model, torch.tensor([0.0, 1.0])):   # doctest: +SKIP
        ...     model(input_ids=two_requests)    # request 0 at the kill switch, request 1 fine-tuned
    """
    mods = _require(model)
    before = {n: (m.alpha.clone(), m.row_alpha) for n, m in mods.items()}
    try:
        set_alpha(model, value)
        yield model
    finally:
        for n, m in mods.items():
            m.alpha.copy_(before[n][0])
            m.row_alpha = before[n][1]


def set_backend(model: nn.Module, backend: Backend | str) -> nn.Module:
    """Choose how every OrthoLinear computes (`Backend`); a runtime choice, never saved with the model."""
    for m in _require(model).values():
        m.set_backend(backend)
    return model


def cache_base_(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Dequantize every base once and keep it (CPU speed); the packed base stays the source of truth."""
    for m in _require(model).values():
        m.cache_base_(enabled)
    return model


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """{name: OrthoLinear.spec()}: what `convert_for_runtime_` needs to rebuild the skeleton."""
    return {n: m.spec() for n, m in ortho_modules(model).items()}


def convert_for_runtime_(model: nn.Module, specs: Mapping[str, dict], dtype: torch.dtype, with_ortho: bool = True,
                         device=None) -> nn.Module:
    """Swap the modules named in `specs` for empty OrthoLinear skeletons (gpt-fast's `convert_for_runtime`):
    the shapes a checkpoint is loaded into. `with_ortho=False` leaves the stream empty (base-only)."""
    for name, spec in specs.items():
        missing = {"in_features", "out_features", "group_size", "symmetric", "bias", "nnz"} - set(spec)
        if missing:
            raise ValueError(f"layer spec of {name} lacks {sorted(missing)}")
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint names a layer {name!r} this model does not have") from None
        nnz = spec["nnz"] if with_ortho else 0
        set_module(model, name, OrthoLinear(spec["in_features"], spec["out_features"], spec["group_size"],
                                            spec["symmetric"], nnz, spec["bias"], dtype, device))
    return model


def state_without_tied(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without a tied `lm_head.weight` (safetensors refuses shared tensors; HF re-ties on load)."""
    sd = dict(model.state_dict())
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


class HostEmbedding(nn.Embedding):
    """An embedding table that stays in host memory: rows are gathered on the CPU and only they reach the
    device. A Llama-3-8B table is 1 GiB in bf16, a sixth of a 6 GiB card, for one row per token.

    `model.to(device)` moves everything else and makes `device` where this module's output goes; the table
    itself stays on the CPU. The state dict is an ordinary embedding's (`weight`).
    """

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, out_device) -> "HostEmbedding":
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta", dtype=emb.weight.dtype)
        # a buffer, not a Parameter: `model.device` (the first parameter's, what generate() builds positions on)
        # must be the device the model runs on, not the host that holds this table
        del m.weight
        m.register_buffer("weight", emb.weight.detach().cpu())
        m.out_device = torch.device(out_device)
        return m

    def _apply(self, fn, recurse=True):
        # `fn` is what .to / .cuda / .half apply to every tensor: send a probe through it to learn where the output
        # should go and which dtype the table should take, without ever moving the table off the host
        probe = fn(torch.zeros((), dtype=self.weight.dtype))
        if probe.device.type != "meta":
            self.out_device = probe.device
        if probe.dtype != self.weight.dtype:
            self.weight = self.weight.to(probe.dtype)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C) on out_device
        rows = super().forward(ids.cpu())
        return rows.to(getattr(self, "out_device", ids.device), non_blocking=True)
