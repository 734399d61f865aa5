"""A packed model larger than one GPU, its layers placed across several with accelerate.

`device_map(config, max_memory)` asks accelerate's `infer_auto_device_map` where each decoder layer of the
*packed* model goes (INT4 codes, scales, the ortho stream: sizes measured on a meta skeleton of OrthoLinear,
not estimated from the dense model), and refuses a placement that would spill to host memory or disk.
`dispatch(model, device_map)` then attaches accelerate's hooks, so the Hugging Face forward and `generate`
move activations from one GPU to the next.

Example:
    >>> cfg = model_config("meta-llama/Meta-Llama-3-70B-Instruct").to_config()          # doctest: +SKIP
    >>> dm = device_map(cfg, {0: "30GiB", 1: "30GiB"})                                  # doctest: +SKIP
    >>> model = dispatch(shape_only.build(cfg, device_map=dm), dm)                       # doctest: +SKIP
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import OrthoLinear
from .llama import LLAMA_LINEARS
from .modules import set_module


def packed_skeleton(config, density: float = 0.01, group_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                    head_bits: int = 4, symmetric: bool = True) -> nn.Module:
    """A meta-device Llama whose target linears (and, with head_bits 4, the head) are OrthoLinear skeletons
    with `density` of their entries in the stream: the packed model's tensors, with no memory behind them."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_LINEARS]
    for n in targets:
        lin = model.get_submodule(n)
        nnz = int(round(density * lin.in_features)) * lin.out_features
        set_module(model, n, OrthoLinear(lin.in_features, lin.out_features, group_size, symmetric, nnz,
                                         lin.bias is not None, dtype, "meta"))
    if head_bits == 4:
        head = model.get_output_embeddings()
        model.lm_head = OrthoLinear(head.in_features, head.out_features, group_size, symmetric, 0, False, dtype, "meta")
    return model


def device_map(config, max_memory: dict, density: float = 0.01, group_size: int = 128,
               dtype: torch.dtype = torch.bfloat16, head_bits: int = 4) -> dict[str, int | str]:
    """{module name: GPU index} for the packed model within `max_memory` ({gpu index: "24GiB" or bytes}).

    Decoder layers are never split across devices. Raises ValueError, naming what is left over, when the model
    does not fit the GPUs given (accelerate would put the rest in host memory or on disk).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    if not max_memory or any(isinstance(k, str) and k in ("cpu", "disk") for k in max_memory):
        raise ValueError(f"max_memory must name GPUs only (e.g. {{0: '30GiB', 1: '30GiB'}}), got {max_memory!r}")
    model = packed_skeleton(config, density, group_size, dtype, head_bits)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dm = infer_auto_device_map(model, max_memory={**max_memory, "cpu": 0, "disk": 0}, no_split_module_classes=no_split)
    spilled = sorted(n for n, d in dm.items() if d in ("cpu", "disk"))
    if spilled:
        total = compute_module_sizes(model)[""] / 2**30
        raise ValueError(f"the packed model ({total:.1f} GiB) does not fit {len(max_memory)} GPU(s) with "
                         f"max_memory {max_memory}: {spilled[0]} and {len(spilled) - 1} more would go to host memory; "
                         "give more GPUs or more memory per GPU")
    return dm


def device_of(dm: dict, name: str):
    """The device `dm` gives module `name` (its longest prefix in the map)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in dm:
            d = dm[key]
            return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
    raise ValueError(f"device map places no module containing {name!r}")


def dispatch(model: nn.Module, dm: dict) -> nn.Module:
    """Attach accelerate's hooks for `dm` (the modules already sit on their devices): inputs of each placed
    module move to its device, the output returns to the first device."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=dm)
