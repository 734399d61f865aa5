"""The entry point: calibrate -> select -> pack -> swap, in place; and safetensors save / load."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .config import Mode, OrthoConfig, Quantizer, Score
from .gptq import gptq_quantize
from .linear import OrthoLinear
from .quant import check_finite, quantize
from .select import collect_hessian, collect_hessian_diag, hessian_diag_of, select, target_linears

BASE_FILE, ORTHO_FILE, CONFIG_FILE = "base.safetensors", "ortho.safetensors", "libortho.json"
FORMAT_VERSION = "1"
ORTHO_KEYS = ("ortho_crow", "ortho_col", "ortho_values")


def dense_weight(lin: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense matrix; a bitsandbytes 4-bit layer (a model loaded in 4-bit to fit a
    small card) is dequantized, so its NF4 values become the source of the INT4 base."""
    w = lin.weight
    if getattr(w, "quant_state", None) is not None:  # bnb Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype)
    return w.detach()


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` (top-level names included)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def orthogonalize_(model: nn.Module, config: OrthoConfig | None = None,
                   calibration: Iterable[torch.Tensor] | None = None,
                   public: nn.Module | Mapping[str, torch.Tensor] | None = None,
                   hessian_diag: Mapping[str, torch.Tensor] | None = None,
                   progress: bool = True, hessian: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap every target `nn.Linear` of `model` for an `OrthoLinear`, in place.

    Args:
        model: a Hugging Face Llama-family causal LM (or any module with matching linear names).
        config: how to split (density, INT4 grid, mode, score); defaults to `OrthoConfig()`.
        calibration: batches of token ids for the `hessian` score (one forward pass, hooks only).
        public: for `mode='delta'`, the public model (or its state dict) the base is built from;
            `model` then holds the fine-tuned weights.
        hessian_diag: precomputed calibration statistics (skips the calibration pass).
        progress: show a progress bar.
        hessian: precomputed full Hessians {name: (in, in)} for `quantizer='gptq'` (`select.collect_hessian`
            on the model the base is built from); their diagonals also serve the `hessian` score.
    Returns:
        `model`, with `model.libortho_config` set and conversion time in `model.libortho_stats`.
    Example:
        >>> orthogonalize_(model, OrthoConfig(density=0.01), calibration=[ids])   # doctest: +SKIP
        >>> set_alpha(model, 0.0)   # privacy kill switch
    """
    config = config or OrthoConfig()
    t0 = time.perf_counter()
    linears = target_linears(model, config.targets)
    if config.mode is Mode.DELTA and public is None:
        raise ValueError("mode='delta' needs the public weights: pass public=<model or state dict>")
    public_sd = public.state_dict() if isinstance(public, nn.Module) else public
    # Calibrate the model whose weights the base is built from.
    calib_model = public if isinstance(public, nn.Module) and config.mode is Mode.DELTA else model
    gptq = config.quantizer is Quantizer.GPTQ
    if gptq and hessian is None:
        if calibration is None:
            raise ValueError("quantizer='gptq' needs calibration token batches (or hessian)")
        if config.mode is Mode.DELTA and not isinstance(public, nn.Module):
            raise ValueError("quantizer='gptq' in mode='delta' calibrates the public model: pass it as a module "
                             "(or pass its hessian)")
        hessian = collect_hessian(calib_model, calibration, config.targets, progress)
    if config.score is Score.HESSIAN and hessian_diag is None:
        if hessian is not None:  # one calibration pass serves both
            hessian_diag = hessian_diag_of(hessian)
        elif calibration is None:
            raise ValueError("score='hessian' needs calibration token batches (or hessian_diag)")
        else:
            hessian_diag = collect_hessian_diag(calib_model, calibration, config.targets, progress)
    t_calib = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(config.seed)
    for name, lin in tqdm(linears.items(), desc="orthogonalize", disable=not progress, leave=False):
        w = dense_weight(lin)
        check_finite(w, f"weight of {name}")
        try:
            src = w if config.mode is Mode.POSTHOC else public_sd[f"{name}.weight"].to(w.device, w.dtype)
            if gptq:
                if name not in hessian:
                    raise ValueError("no Hessian for this layer; calibrate with select.collect_hessian")
                base = gptq_quantize(src, hessian[name], config.group_size, config.symmetric,
                                     clip_search=config.clip_search, pad=config.pad)
            else:
                base = quantize(src, config.group_size, config.symmetric, clip_search=config.clip_search,
                                pad=config.pad)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        residual = w.float() - base.dequantize(torch.float32)
        h = hessian_diag.get(name) if hessian_diag is not None else None
        ortho = select(residual.to(w.dtype), config.density, config.score, h, gen)
        bias = lin.bias.detach() if lin.bias is not None else None
        new = OrthoLinear.from_parts(base, ortho, bias).to(w.device)
        new.backend = config.backend.value
        set_module(model, name, new)
    model.libortho_config = config
    model.libortho_stats = {"convert_seconds": time.perf_counter() - t0, "calibrate_seconds": t_calib,
                            "converted_linears": len(linears)}
    return model


def ortho_modules(model: nn.Module) -> dict[str, OrthoLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OrthoLinear)}


def set_alpha(model: nn.Module, alpha: float) -> nn.Module:
    """Set alpha on every OrthoLinear: 1 = the fine-tuned model, 0 = the privacy kill switch."""
    mods = ortho_modules(model)
    if not mods:
        raise ValueError("model has no OrthoLinear; run libortho.orthogonalize_ first")
    for m in mods.values():
        m.set_alpha(alpha)
    return model


def cache_base_(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Dequantize every base once and keep it (CPU speed); the packed base stays the source of truth."""
    for m in ortho_modules(model).values():
        m.cache_base_(enabled)
    return model


# ---------------------------------------------------------------------------------------------
# save / load: base and ortho in separate safetensors files; the ortho file names its base's hash.

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split_state(model: nn.Module) -> tuple[dict, dict]:
    base, ortho = {}, {}
    for k, v in model.state_dict().items():
        if k.rsplit(".", 1)[-1] == "alpha":
            continue  # runtime switch, not weights
        (ortho if k.rsplit(".", 1)[-1] in ORTHO_KEYS else base)[k] = v.detach().contiguous().cpu()
    # tied weights share storage; safetensors refuses shared tensors, and HF re-ties on load.
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        base.pop("lm_head.weight", None)
    return base, ortho


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write `base.safetensors`, `ortho.safetensors` and `libortho.json` into `directory`."""
    mods = ortho_modules(model)
    if not mods:
        raise ValueError("model has no OrthoLinear; convert it with orthogonalize_ before saving")
    if not all(m.has_ortho for m in mods.values()):
        raise ValueError("model was loaded without its ortho stream; saving would lose nothing but looks like a "
                         "full model -- save the base alone with save_base() if that is what you mean")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    base, ortho = _split_state(model)
    save_file(base, d / BASE_FILE, metadata={"format": "libortho-base", "version": FORMAT_VERSION})
    base_hash = _sha256(d / BASE_FILE)
    save_file(ortho, d / ORTHO_FILE, metadata={"format": "libortho-ortho", "version": FORMAT_VERSION,
                                               "base_sha256": base_hash})
    cfg = getattr(model, "libortho_config", None) or OrthoConfig()
    meta = {
        "format": "libortho", "version": FORMAT_VERSION, "base_sha256": base_hash,
        "libortho_config": cfg.to_dict(),
        "hf_config": model.config.to_dict() if hasattr(model, "config") else None,
        "layers": {n: {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size,
                       "symmetric": m.symmetric, "bias": m.bias is not None, "nnz": m.nnz}
                   for n, m in mods.items()},
    }
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return d


def _read_safetensors(path: Path, expect_format: str) -> tuple[dict, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != expect_format:
                raise ValueError(f"{path} is not a {expect_format} file (format={meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is truncated or not a safetensors file: {e}") from None
    return tensors, meta


def load(directory: str | Path, with_ortho: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a converted model saved by `save`.

    Args:
        directory: folder with `libortho.json`, `base.safetensors` and (optionally) `ortho.safetensors`.
        with_ortho: False loads the base alone: the returned model physically holds no ortho stream
            and only alpha=0 is allowed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(directory)
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {d} is not a libortho checkpoint")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
    if meta.get("format") != "libortho":
        raise ValueError(f"{cfg_path} is not a libortho config (format={meta.get('format')!r})")
    base, _ = _read_safetensors(d / BASE_FILE, "libortho-base")
    ortho = {}
    if with_ortho:
        ortho, ometa = _read_safetensors(d / ORTHO_FILE, "libortho-ortho")
        actual = _sha256(d / BASE_FILE)
        if ometa.get("base_sha256") != actual:
            raise ValueError(f"{d / ORTHO_FILE} belongs to a different base (base_sha256 "
                             f"{ometa.get('base_sha256', '?')[:12]}… != {actual[:12]}…); refusing to combine them")
    hf = dict(meta["hf_config"])
    model_type = hf.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in hf.items() if k != "quantization_config"})
    floats = [v.dtype for k, v in base.items() if v.is_floating_point() and not k.endswith(".scales")]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or (floats[0] if floats else torch.float32))
    for name, spec in meta["layers"].items():
        nnz = spec["nnz"] if with_ortho else 0
        set_module(model, name, OrthoLinear(spec["in_features"], spec["out_features"], spec["group_size"],
                                            spec["symmetric"], nnz, spec["bias"],
                                            base[f"{name}.scales"].dtype))
    state = {**base, **ortho}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint in {d} does not match its config: {e}") from None
    allowed_missing = {k for k in missing if k.endswith(".alpha") or (not with_ortho and k.rsplit(".", 1)[-1]
                                                                       in ORTHO_KEYS) or k == "lm_head.weight"}
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"checkpoint does not match its config: missing {sorted(set(missing) - allowed_missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.libortho_config = OrthoConfig.from_dict(meta["libortho_config"])
    for m in ortho_modules(model).values():
        m.has_ortho = with_ortho
        m.alpha.fill_(1.0 if with_ortho else 0.0)
        m.backend = model.libortho_config.backend.value
    model.eval()
    return model
