"""The entry point: calibrate -> select -> pack -> swap, in place, with one handler per config type.

    orthogonalize_(model, OrthoConfig(mode="posthoc"), calibration=batches)      # split a model
    orthogonalize_(tuned, OrthoConfig(mode="delta"), public=public_model)        # base from the public weights
    orthogonalize_(public, OrthoTuneConfig(...), calibration=..., loss_fn=...)   # train the stream (libortho.train)

Like torchao's `quantize_`, the handler is picked by the config's type; a new method is a new config class
registered with `register_handler`. Every handler builds its layers with `OrthoLinear.from_linear` over a
base from `quantize_base`, and a conversion either completes or leaves the model as it was.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Mode, OrthoConfig, Quantizer, Score
from .gptq import gptq_quantize
from .hf import attach_, detach_
from .linear import OrthoLinear
from .modules import FilterFn, ortho_modules, set_module, target_linears
from .quant import QuantizedTensor, check_finite, quantize
from .select import collect_hessian, collect_hessian_diag, hessian_diag_of, select

# fn(model, config, linears, **kwargs) -> {name: OrthoLinear} or ({name: OrthoLinear}, finish(model))
Handler = Callable[..., "dict[str, OrthoLinear] | tuple[dict[str, OrthoLinear], Callable[[nn.Module], None]]"]
_HANDLERS: dict[type, Handler] = {}
_STREAMED: dict[type, Callable[..., dict]] = {}


def register_handler(config_cls: type):
    """Decorator: `fn(model, config, linears, **kwargs)` handles `config_cls` configs. It returns the new layers
    (built, not yet swapped in), or (layers, finish) where `finish(model)` runs once they are in place and
    its failure swaps the original linears back."""
    def deco(fn: Handler) -> Handler:
        _HANDLERS[config_cls] = fn
        return fn
    return deco


def register_streamed(config_cls: type):
    """Decorator: `fn(model, config, *, hessian_diag, progress, **kwargs) -> stats` finishes a `config_cls` model
    that `convert_checkpoint` built with INT4 bases and empty streams (ortho-tuning trains them there)."""
    def deco(fn):
        _STREAMED[config_cls] = fn
        return fn
    return deco


def _lookup(table: dict, config):
    return next((table[c] for c in type(config).__mro__ if c in table), None)


def dense_weight(lin: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense matrix; a bitsandbytes 4-bit layer (a model loaded in 4-bit to fit a
    small card) is dequantized, so its NF4 values become the source of the INT4 base."""
    w = lin.weight
    if getattr(w, "quant_state", None) is not None:  # bnb Params4bit
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype)
    return w.detach()


def quantize_base(w: torch.Tensor, config: OrthoConfig, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """The INT4 base of one weight on `config`'s grid: round-to-nearest, or GPTQ with the layer's Hessian."""
    if config.quantizer is Quantizer.GPTQ:
        if hessian is None:
            raise ValueError("no Hessian for this layer; quantizer='gptq' needs select.collect_hessian")
        return gptq_quantize(w, hessian, config.group_size, config.symmetric, clip_search=config.clip_search,
                             pad=config.pad)
    return quantize(w, config.group_size, config.symmetric, clip_search=config.clip_search, pad=config.pad)


def check_model(model: nn.Module) -> None:
    """Every parameter finite (embeddings and norms too): a NaN there makes the calibration statistics NaN and
    the selection arbitrary, so it is refused before any work."""
    for name, p in model.named_parameters():
        if p.device.type != "meta" and p.is_floating_point() and not torch.isfinite(p).all():
            check_finite(p.detach(), name)


def check_calibration(model: nn.Module, batches: Iterable[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Calibration batches as a list, each a 2-D integer tensor of ids inside the model's vocabulary."""
    if batches is None:
        return None
    batches = list(batches)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dtype not in (torch.int32, torch.int64) or b.dim() != 2:
            raise ValueError(f"calibration batch {i} must be a (B, T) integer tensor of token ids, got "
                             f"{type(b).__name__} {getattr(b, 'dtype', '')} {tuple(getattr(b, 'shape', ()))}")
        if b.numel() and (int(b.min()) < 0 or (vocab is not None and int(b.max()) >= vocab)):
            raise ValueError(f"calibration batch {i} holds token ids outside [0, {vocab}): min {int(b.min())}, "
                             f"max {int(b.max())}; tokenize with the model's own tokenizer")
    return batches


@torch.no_grad()
def orthogonalize_(model: nn.Module, config: OrthoConfig | None = None, *,
                   calibration: Iterable[torch.Tensor] | None = None, filter_fn: FilterFn | None = None,
                   progress: bool = True, **kwargs) -> nn.Module:
    """Swap every target `nn.Linear` of `model` for an `OrthoLinear`, in place.

    Args:
        model: a Hugging Face Llama-family causal LM (or any module with matching linear names).
        config: how to split; its type picks the handler (`OrthoConfig`: posthoc / delta;
            `libortho.train.OrthoTuneConfig`: train the stream over the public base). Default `OrthoConfig()`.
        calibration: batches of token ids for the Hessian statistics (one forward pass, hooks only).
        filter_fn: `filter_fn(module, name) -> bool` keeps only some of the target linears.
        progress: show a progress bar.
        **kwargs: handler arguments. OrthoConfig: `public` (delta mode: the public model or its state dict),
            `hessian_diag` / `hessian` (precomputed statistics). OrthoTuneConfig: see `libortho.train`.
    Returns:
        `model`, with `model.libortho_config` and conversion time in `model.libortho_stats`. A converted
        `PreTrainedModel` saves with `save_pretrained` and loads with `from_pretrained` (libortho.hf).
    Raises:
        ValueError: bad config or input, checked before any computation; a failure part-way leaves every
            module of `model` as it was.
    Example:
        >>> orthogonalize_(model, OrthoConfig(density=0.01), calibration=[ids])   # doctest: +SKIP
        >>> with libortho.alpha(model, 0.0): ...   # privacy kill switch
    """
    config = config or OrthoConfig()
    handler = _lookup(_HANDLERS, config)
    if handler is None:
        raise ValueError(f"no handler for {type(config).__name__}; import the module that registers it")
    if ortho_modules(model):
        raise ValueError("model is already converted (it holds OrthoLinear layers); start from a dense model")
    t0 = time.perf_counter()
    linears = target_linears(model, config.targets, filter_fn)
    check_model(model)
    calibration = check_calibration(model, calibration)
    stats: dict = {}
    out = handler(model, config, linears, calibration=calibration, progress=progress, stats=stats, **kwargs)
    new, finish = out if isinstance(out, tuple) else (out, None)
    # every layer was built before any is swapped in: a failure above leaves the model untouched
    for name, mod in new.items():
        set_module(model, name, mod)
    if finish is not None:  # work that needs the new layers in place (ortho-tuning trains them)
        try:
            finish(model)
        except BaseException:
            for name, lin in linears.items():
                set_module(model, name, lin)
            raise
    attach_(model, config)
    model.libortho_stats = {"convert_seconds": time.perf_counter() - t0, "converted_linears": len(new), **stats}
    return model


@register_handler(OrthoConfig)
def _split(model: nn.Module, config: OrthoConfig, linears: dict[str, nn.Linear], *, calibration, progress, stats,
           public: nn.Module | Mapping[str, torch.Tensor] | None = None,
           hessian_diag: Mapping[str, torch.Tensor] | None = None,
           hessian: Mapping[str, torch.Tensor] | None = None) -> dict[str, OrthoLinear]:
    """posthoc: base = INT4(W), ortho = the top-`density` residual; delta: base = INT4(W_public), ortho = the
    top-`density` entries of W - INT4(W_public)."""
    t0 = time.perf_counter()
    if config.mode is Mode.DELTA and public is None:
        raise ValueError("mode='delta' needs the public weights: pass public=<model or state dict>")
    public_sd = public.state_dict() if isinstance(public, nn.Module) else public
    if public_sd is not None:
        missing = [n for n in linears if f"{n}.weight" not in public_sd]
        if missing:
            raise ValueError(f"the public weights lack {missing[0]}.weight: not the same architecture")
    calib_model = public if isinstance(public, nn.Module) and config.mode is Mode.DELTA else model
    gptq = config.quantizer is Quantizer.GPTQ
    if gptq and hessian is None:
        if calibration is None:
            raise ValueError("quantizer='gptq' needs calibration token batches (or hessian)")
        if config.mode is Mode.DELTA and not isinstance(public, nn.Module):
            raise ValueError("quantizer='gptq' in mode='delta' calibrates the public model: pass it as a module "
                             "(or pass its hessian)")
    if config.score is Score.HESSIAN and hessian_diag is None and hessian is None and calibration is None and not gptq:
        raise ValueError("score='hessian' needs calibration token batches (or hessian_diag)")
    if gptq and hessian is None:
        hessian = collect_hessian(calib_model, calibration, config.targets, progress)
    if config.score is Score.HESSIAN and hessian_diag is None:
        hessian_diag = hessian_diag_of(hessian) if hessian is not None else \
            collect_hessian_diag(calib_model, calibration, config.targets, progress)
    stats["calibrate_seconds"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(config.seed)
    new = {}
    for name, lin in tqdm(linears.items(), desc="orthogonalize", disable=not progress, leave=False):
        w = dense_weight(lin)
        try:
            check_finite(w, "weight")
            src = w if config.mode is Mode.POSTHOC else public_sd[f"{name}.weight"].to(w.device, w.dtype)
            base = quantize_base(src, config, hessian.get(name) if hessian is not None else None)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        residual = w.float() - base.dequantize(torch.float32)
        h = hessian_diag.get(name) if hessian_diag is not None else None
        new[name] = OrthoLinear.from_linear(lin, base, select(residual.to(w.dtype), config.density, config.score, h,
                                                              gen))
    return new


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Replace every OrthoLinear by a plain `nn.Linear` holding base + alpha * ortho at its current alpha, in
    place (PEFT's `merge_and_unload`); the model is then an ordinary dense model. Returns `model`."""
    mods = ortho_modules(model)
    if not mods:
        raise ValueError("model has no OrthoLinear; nothing to merge")
    for name, m in mods.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.scales.dtype,
                        device=m.qweight.device)
        lin.weight.copy_(m.merged_weight())
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        lin.requires_grad_(False)
        set_module(model, name, lin)
    return detach_(model)


def convert_checkpoint(path, config: OrthoConfig | None = None, *, calibration: Iterable[torch.Tensor] | None = None,
                       device="cpu", dtype: torch.dtype | None = None, head_bits: int = 16,
                       host_embeddings: bool = False, propagate: str = "fp", progress: bool = True,
                       **kwargs) -> nn.Module:
    """`orthogonalize_` of a checkpoint too large to load: read layer by layer, converted as it streams.

    Calibration statistics are collected one decoder layer at a time (`libortho.stream`) and each layer is
    converted as it passes, by the same handler and builder as `orthogonalize_`, and parked in host memory; the
    packed model moves to `device` at the end. The dense model never exists; peak device memory during the
    conversion is one dense layer, its quantization temporaries and the calibration activations.

    Args:
        path: a Hugging Face safetensors checkpoint directory.
        config: `OrthoConfig` (posthoc; RTN or GPTQ base), or a config registered with `register_streamed`
            (`OrthoTuneConfig`: INT4 bases of the public weights, then the stream is picked and trained on the
            assembled model with `**kwargs`, e.g. `loss_fn=`). Delta mode needs two models: `orthogonalize_`.
        calibration: token-id batches (score 'hessian' / 'saliency_hessian', quantizer 'gptq').
        device: where the converted layers live and the calibration runs.
        dtype: compute dtype (None: as stored).
        head_bits: 16 keeps the LM head dense; 4 makes it an INT4 OrthoLinear with no ortho stream (an 8B head
            is 1 GiB in bf16, 0.27 GiB in INT4), when the embeddings are not tied to it.
        host_embeddings: keep the embedding table in host memory (`HostEmbedding`).
        propagate: "fp" (statistics of the full-precision model, as `orthogonalize_` on a loaded model) or
            "quantized" (each layer calibrated on the converted layers' outputs, GPTQ's sequential scheme).
    Returns:
        the converted `PreTrainedModel`, in eval mode, ready for `save_pretrained` and generation.
    """
    from .modules import HostEmbedding
    from .stream import Checkpoint, load_embeddings, load_head, load_layer, load_norm, load_rotary, stream_calibrate

    config = config or OrthoConfig()
    finisher = _lookup(_STREAMED, config) if config.mode is Mode.TUNE else None
    if config.mode is Mode.DELTA or (config.mode is Mode.TUNE and finisher is None):
        raise ValueError(f"convert_checkpoint streams posthoc conversions and registered streamed configs, not "
                         f"mode {config.mode.value!r}; load the models and use orthogonalize_")
    if head_bits not in (4, 16):
        raise ValueError(f"head_bits must be 4 or 16, got {head_bits!r}")
    t0 = time.perf_counter()
    ckpt = Checkpoint(path)
    calibration = check_calibration(ckpt.skeleton, calibration)
    gptq = config.quantizer is Quantizer.GPTQ
    needs_stats = gptq or config.score in (Score.HESSIAN, Score.SALIENCY_HESSIAN)
    if needs_stats and calibration is None:
        raise ValueError(f"score={config.score.value!r} / quantizer={config.quantizer.value!r} need calibration "
                         "token batches")
    layers: list[nn.Module] = []
    hessian_diag: dict[str, torch.Tensor] = {}

    def on_layer(i: int, layer: nn.Module, stats: dict | None) -> nn.Module:
        check_model(layer)
        try:
            if finisher is None:
                kw = {} if stats is None else ({"hessian": stats} if gptq else {"hessian_diag": stats})
                orthogonalize_(layer, config, progress=False, **kw)
            else:  # INT4(public) bases with empty streams; the stream is picked and trained on the whole model
                for name, lin in target_linears(layer, config.targets).items():
                    set_module(layer, name, OrthoLinear.from_linear(lin, quantize_base(lin.weight.detach(), config),
                                                                    None))
                    if stats is not None:
                        hessian_diag[f"{ckpt.prefix}layers.{i}.{name}"] = stats[name].detach().cpu()
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from None
        # parked in host memory until every layer is converted: the device holds one dense layer at a time
        layers.append(layer.to("cpu"))
        return layer

    if needs_stats:
        stream_calibrate(ckpt, calibration, device, dtype, full=gptq, targets=config.targets, on_layer=on_layer,
                         propagate=propagate, progress=progress)
    else:
        for i in tqdm(range(ckpt.num_layers), desc="convert", disable=not progress, leave=False):
            on_layer(i, load_layer(ckpt, i, device, dtype), None)
    model = ckpt.skeleton
    # the head is quantized in host memory (its float32 temporaries are 2 GiB at 8B), before the layers move in
    head = load_head(ckpt, "cpu", dtype)  # tied embeddings: a copy of the table (HF re-ties it on load)
    if head_bits == 4 and not getattr(ckpt.config, "tie_word_embeddings", False):
        head = OrthoLinear.from_linear(head, quantize_base(head.weight, config), None)
    model.lm_head = head.to(device)
    for i, layer in enumerate(layers):
        model.model.layers[i] = layer.to(device)
    emb = load_embeddings(ckpt, "cpu" if host_embeddings else device, dtype)
    model.model.embed_tokens = HostEmbedding.from_embedding(emb, device) if host_embeddings else emb
    model.model.norm = load_norm(ckpt, device, dtype)
    model.model.rotary_emb = load_rotary(ckpt, device)
    model.requires_grad_(False).eval()
    stats = {"streamed": True, "propagate": propagate, "head_bits": head_bits, "host_embeddings": host_embeddings,
             "convert_seconds": time.perf_counter() - t0}
    if finisher is not None:
        stats.update(finisher(model, config, hessian_diag=hessian_diag or None, progress=progress, **kwargs))
    attach_(model, config)
    model.libortho_stats = {**stats, "seconds": time.perf_counter() - t0,
                            "converted_linears": len(ortho_modules(model))}
    return model
