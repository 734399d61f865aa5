"""libortho as a Hugging Face transformers quantization method: `save_pretrained` / `from_pretrained`.

A converted model is an ordinary `PreTrainedModel` whose target linears are OrthoLinear. Its checkpoint is
a Hugging Face folder:

    config.json          the model config, with `quantization_config` = {"quant_method": "libortho", the
                         OrthoConfig, every layer's shape, the content sha256 of each base weight file}
    model.safetensors    the base: packed INT4 codes, scales, embeddings, norms (HF's own writer; sharded
                         with an index when large)
    ortho.safetensors    the ortho stream, whose metadata names the hash of the base it belongs to

`import libortho` registers the method, so `AutoModelForCausalLM.from_pretrained(dir)` rebuilds the model.
Without `ortho.safetensors` (or with `libortho.load(dir, with_ortho=False)`) it loads the base alone: the
stream is physically absent and only alpha=0 runs. A base file that does not match the hash recorded at
save time is refused either way; so is an ortho file saved beside another base.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import os
import types
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
# submodules, not `transformers.quantizers` / `transformers.PreTrainedModel`: this module may be imported while
# transformers.modeling_utils is itself importing (libortho/__init__.py registers us then), see _is_hf_model
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .linear import ORTHO_KEYS, is_ortho_key
from .models import SAFETENSORS_HEADER_MAX
from .modules import convert_for_runtime_, layer_specs, ortho_modules
from .sparse import CSR

QUANT_METHOD = "libortho"
ORTHO_FILE = "ortho.safetensors"
# 3: the architecture record (`ARCHITECTURE_KEYS`) and the stream's hash checked on load; format 2 has no
# architecture record, and its older checkpoints hashed the files' bytes, not the content (both still read). A
# libortho meets a newer format with a clear refusal rather than a failed check that reads as a swapped base.
FORMAT_VERSION = "3"
# the model config's fields that decide which tensors exist and their shapes (recorded at save, checked on load)
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
_WITH_ORTHO: contextvars.ContextVar[bool] = contextvars.ContextVar("libortho_with_ortho", default=True)
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float16, torch.bfloat16)}


@register_quantization_config(QUANT_METHOD)
class LibOrthoConfig(QuantizationConfigMixin):
    """What `config.json` records of a libortho model (written by `save_pretrained`, read by `from_pretrained`).

    Args:
        ortho_config: the `OrthoConfig.to_dict()` the model was converted with.
        layers: {module name: OrthoLinear.spec() plus "dtype"}, the skeleton to load into.
        base_sha256: {weight file name: content sha256 (`sha256`)} of the base files, filled in at save time.
        ortho_sha256: content sha256 of `ortho.safetensors` when it was saved, or None (saved base-only).
        architecture: the model config's shape-defining fields at save time (`ARCHITECTURE_KEYS`): an edited
            config.json (a layer more, another width) is refused on load instead of loading random weights.
    """

    REQUIRED = ("ortho_config", "layers")

    def __init__(self, ortho_config: dict | None = None, layers: dict | None = None, base_sha256: dict | None = None,
                 ortho_sha256: str | None = None, format_version: str = FORMAT_VERSION,
                 architecture: dict | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.ortho_config = ortho_config or {}
        self.layers = layers or {}
        self.base_sha256 = base_sha256
        self.ortho_sha256 = ortho_sha256
        self.format_version = format_version
        self.architecture = architecture

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        missing = [k for k in cls.REQUIRED if k not in config_dict]
        if missing:
            raise ValueError(f"the libortho quantization_config in config.json lacks {missing}: the checkpoint was "
                             "not written by libortho's save_pretrained, or was edited")
        version = str(config_dict.get("format_version", "1"))
        if not version.isdigit() or int(version) > int(FORMAT_VERSION):
            raise ValueError(f"this checkpoint has libortho format {version!r}; this libortho reads formats up to "
                             f"{FORMAT_VERSION}: upgrade libortho to load it")
        known = {"ortho_config", "layers", "base_sha256", "ortho_sha256", "format_version", "architecture"}
        config = cls(**{k: v for k, v in config_dict.items() if k in known})
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "ortho_config": self.ortho_config,
                "layers": self.layers, "base_sha256": self.base_sha256, "ortho_sha256": self.ortho_sha256,
                "architecture": self.architecture}


@register_quantizer(QUANT_METHOD)
class LibOrthoHfQuantizer(HfQuantizer):
    """Loads a libortho checkpoint into OrthoLinear skeletons; saves the base through HF's writer."""

    requires_calibration = True  # only pre-converted checkpoints: conversion needs calibration text

    def __init__(self, quantization_config: LibOrthoConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("libortho layers cannot be offloaded to disk; give accelerate more CPU memory instead")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self.checkpoint_files = [str(f) for f in (checkpoint_files or [])]
        qc = self.quantization_config
        where = Path(self.checkpoint_files[0]).parent / "config.json" if self.checkpoint_files else "config.json"
        _check_architecture(model.config, qc, where)  # before any weight is read: HF fills a missing layer randomly
        for name, spec in qc.layers.items():
            convert_for_runtime_(model, {name: spec}, _DTYPES.get(spec.get("dtype"), torch.float32), with_ortho=False)
        # the ortho stream is read from its own file after the base; HF must not report its keys as missing
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {
            rf"\.({'|'.join(ORTHO_KEYS)})$"}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        directory = Path(self.checkpoint_files[0]).parent if self.checkpoint_files else None
        _finish_load(model, self.quantization_config, directory, self.checkpoint_files, _WITH_ORTHO.get())
        return model

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        """The base: every tensor but the ortho stream (that goes to ortho.safetensors after the base)."""
        state = {k: v for k, v in model.state_dict().items() if not is_ortho_key(k)}
        return state, {"libortho": "base", "libortho_version": FORMAT_VERSION}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # the ortho values are a Parameter (ortho-tuning)


# ---------------------------------------------------------------------------------------------------------------
# attaching a converted model to transformers, saving

def _is_hf_model(model) -> bool:
    from transformers import PreTrainedModel  # at call time: modeling_utils is fully imported by then

    return isinstance(model, PreTrainedModel)


def attach_(model: nn.Module, ortho_config) -> nn.Module:
    """Mark a converted `PreTrainedModel` as a libortho model: `save_pretrained` then writes base + ortho files.
    Other modules just remember the config."""
    model.libortho_config = ortho_config
    if not _is_hf_model(model):
        return model
    qc = LibOrthoConfig(ortho_config=ortho_config.to_dict(), layers=_layers(model))
    model.config.quantization_config = qc
    model.hf_quantizer = LibOrthoHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _hook_save(model)
    return model


def _layers(model: nn.Module) -> dict[str, dict]:
    """{name: OrthoLinear.spec() + the scales' dtype}: the skeleton `from_pretrained` builds before loading."""
    mods = ortho_modules(model)
    return {n: {**spec, "dtype": str(mods[n].scales.dtype).removeprefix("torch.")}
            for n, spec in layer_specs(model).items()}


def detach_(model: nn.Module) -> nn.Module:
    """Undo `attach_` (after `merge`, the model is a plain dense model again)."""
    for attr in ("hf_quantizer", "quantization_method", "libortho_config"):
        model.__dict__.pop(attr, None)
    model.__dict__.pop("save_pretrained", None)
    if _is_hf_model(model):
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _hook_save(model: nn.Module) -> None:
    # HF's writer has no after-save hook for quantizers: the instance's save_pretrained writes the ortho file and
    # the base hashes once HF has written the base (a bound method: deepcopy rebinds it to the copy).
    model.save_pretrained = types.MethodType(_save_pretrained, model)


def _save_pretrained(self: nn.Module, save_directory, *args, **kwargs):
    d = Path(save_directory)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d} is a file; save_pretrained needs a directory")
    mods = ortho_modules(self)
    if not mods:
        raise ValueError("model has no OrthoLinear; nothing for libortho to save")
    has_ortho = all(m.has_ortho for m in mods.values())
    qc = self.config.quantization_config
    qc.layers = _layers(self)  # as the model is now (a .to(dtype) since conversion changes the scales' dtype)
    qc.base_sha256, qc.ortho_sha256 = None, None
    qc.format_version = FORMAT_VERSION  # a checkpoint loaded from an older format is saved in this one
    qc.architecture = _architecture(self.config)
    type(self).save_pretrained(self, d, *args, **kwargs)  # HF writes config.json and the base
    base = base_files(d)
    qc.base_sha256 = {f.name: sha256(f) for f in base}
    ortho_path = d / ORTHO_FILE
    if has_ortho:
        tensors = {f"{n}.{k}": getattr(m, k).detach().contiguous().cpu() for n, m in mods.items() for k in ORTHO_KEYS}
        tmp = d / f".{ORTHO_FILE}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"format": "libortho-ortho", "version": FORMAT_VERSION,
                                          "base_sha256": combined_hash(qc.base_sha256)})
        tmp.replace(ortho_path)
        qc.ortho_sha256 = sha256(ortho_path)
    elif ortho_path.exists():
        ortho_path.unlink()  # a stale stream from an earlier save must not sit beside this base
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = qc.to_dict()
    tmp = cfg_path.with_name(f".config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tmp.replace(cfg_path)
    return None


def base_files(directory: Path) -> list[Path]:
    """The weight files HF wrote: model.safetensors, or the shards its index names."""
    from .models import weight_files

    d = Path(directory)
    if not ((d / "model.safetensors.index.json").is_file() or (d / "model.safetensors").is_file()):
        raise FileNotFoundError(f"{d} holds no model.safetensors (nor an index): not a saved checkpoint")
    return weight_files(d)




def sha256(path: Path) -> str:
    """sha256 of a safetensors file's content: its header with every key sorted, then its data. safetensors writes
    the metadata dict in a varying order (a Rust HashMap), so two saves of the same tensors differ in bytes; this
    hash does not. A file whose header cannot be read is hashed as raw bytes (it then matches no recorded hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(Path(path).stat().st_size - 8, SAFETENSORS_HEADER_MAX):
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
            h.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: a crafted, deeply nested header
            return file_sha256(path)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes: what checkpoints saved before the content hash recorded."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _architecture(config) -> dict:
    return {k: getattr(config, k) for k in ARCHITECTURE_KEYS if getattr(config, k, None) is not None}


def _check_architecture(config, qc: LibOrthoConfig, where) -> None:
    now = _architecture(config)
    edited = [k for k, v in (qc.architecture or {}).items() if now.get(k) != v]  # format-2 checkpoints record none
    if edited:
        k = edited[0]
        raise ValueError(f"{where} says {k}={now.get(k)!r}, but the checkpoint was saved with "
                         f"{k}={qc.architecture[k]!r}: config.json was edited; restore it")


def combined_hash(hashes: dict[str, str]) -> str:
    """One hash naming a whole (possibly sharded) base: sha256 over 'name:hash' lines in name order."""
    return hashlib.sha256("".join(f"{k}:{hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# loading

def _finish_load(model: nn.Module, qc: LibOrthoConfig, directory: Path | None, files: list[str],
                 with_ortho: bool) -> None:
    from .config import OrthoConfig

    if directory is None:
        raise ValueError("libortho checkpoints load from a directory (no weight files were resolved)")
    recorded = qc.base_sha256 or {}
    if not recorded:
        raise ValueError(f"{directory}/config.json records no base hash: the save did not finish; save again")
    paths = {Path(f).name: Path(f) for f in files}
    actual = {n: sha256(f) for n, f in paths.items()}
    if set(actual) != set(recorded):
        raise ValueError(f"{directory}: base files {sorted(actual)} differ from the saved set {sorted(recorded)}")
    # a checkpoint saved before the content hash recorded the file's bytes: accepted when those match
    bad = [n for n in sorted(actual) if actual[n] != recorded[n] and file_sha256(paths[n]) != recorded[n]]
    if bad:
        raise ValueError(f"{directory / bad[0]} is not the base this checkpoint was saved with (sha256 "
                         f"{actual[bad[0]][:12]}… != recorded {recorded[bad[0]][:12]}…); refusing a swapped base")
    mods = ortho_modules(model)
    if set(mods) != set(qc.layers):
        raise ValueError(f"{directory}: the model has OrthoLinear layers {len(mods)} but config.json names "
                         f"{len(qc.layers)}")
    path = directory / ORTHO_FILE
    ortho = _read_ortho(path, combined_hash(recorded), qc) if with_ortho and path.is_file() else None
    # a stream of another fine-tune over the same base passes the check above; its recorded hash does not
    rec = qc.ortho_sha256
    got = sha256(path) if ortho is not None and rec else rec
    if got != rec and file_sha256(path) != rec:  # saved before the content hash: the bytes
        raise ValueError(f"{path} is not the stream this checkpoint was saved with (sha256 {got[:12]}… != "
                         f"recorded {rec[:12]}…): edited, or copied from another checkpoint; refusing it")
    for name, m in mods.items():
        if ortho is None:
            m.set_ortho_(None)
            continue
        try:
            csr = CSR(*(ortho[f"{name}.{k}"] for k in ORTHO_KEYS), (m.out_features, m.in_features))
        except KeyError as e:
            raise ValueError(f"{path} lacks {e.args[0]}") from None
        if csr.nnz != qc.layers[name]["nnz"] or csr.crow.numel() != m.out_features + 1:
            raise ValueError(f"{path}: {name} holds {csr.nnz} values, config.json says {qc.layers[name]['nnz']}")
        m.set_ortho_(csr)
        m.alpha.fill_(1.0)
    for m in mods.values():
        if not m.has_ortho:
            m.alpha.fill_(0.0)
    model.libortho_config = OrthoConfig.from_dict(qc.ortho_config)
    if _is_hf_model(model):
        _hook_save(model)


def _read_ortho(path: Path, base_hash: str, qc: LibOrthoConfig) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "libortho-ortho":
                raise ValueError(f"{path} is not a libortho ortho file (format={meta.get('format')!r})")
            if meta.get("base_sha256") != base_hash:
                raise ValueError(f"{path} belongs to a different base (its base hash {meta.get('base_sha256', '?')[:12]}"
                                 f"… != {base_hash[:12]}…); refusing to combine them")
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is truncated or not a safetensors file: {e}") from None


def load(directory: str | os.PathLike, with_ortho: bool = True, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(directory, **kwargs)` of a libortho checkpoint, in eval mode.

    Args:
        directory: a folder written by `save_pretrained` (or `libortho.save`).
        with_ortho: False loads the base alone even when ortho.safetensors is there: the model then holds no
            ortho stream and only alpha=0 is allowed.
    """
    from transformers import AutoModelForCausalLM

    d = Path(directory)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} not found: {d} is not a saved checkpoint")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg} holds a JSON {type(raw).__name__}, not an object: not a model config")
    qc = raw.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ValueError(f"{cfg}: quantization_config is not an object")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{d} is not a libortho checkpoint (quantization_config.quant_method="
                         f"{qc.get('quant_method')!r}); load it with AutoModelForCausalLM.from_pretrained")
    from .models import readable_safetensors

    for f in base_files(d):  # before transformers reads them: a truncated file is named, not a traceback
        if not readable_safetensors(f):
            raise ValueError(f"{f} is truncated or not a safetensors file: the checkpoint is damaged")
    token = _WITH_ORTHO.set(with_ortho)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, **kwargs)
    finally:
        _WITH_ORTHO.reset(token)
    return model.eval()


def save(model: nn.Module, directory: str | os.PathLike, **kwargs) -> Path:
    """`model.save_pretrained(directory)` for a converted model; returns the directory."""
    if not ortho_modules(model):
        raise ValueError("model has no OrthoLinear; convert it with orthogonalize_ before saving")
    if not _is_hf_model(model) or not hasattr(model.config, "quantization_config"):
        raise ValueError("libortho.save needs a converted Hugging Face model (PreTrainedModel)")
    model.save_pretrained(directory, **kwargs)
    return Path(directory)

