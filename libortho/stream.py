"""Layer-streamed calibration: a checkpoint read shard by shard, one decoder layer on the device at a time.

A Llama-3-8B checkpoint is 16 GB in bf16; a gtx4050 has 6 GiB. `stream_calibrate` never builds the model:
it embeds the calibration tokens (rows gathered on the CPU), then for each decoder layer loads that layer's
tensors from the safetensors shards (`safe_open`, so only those bytes are read), runs every calibration
activation through it with the model's rotary embedding and causal mask, collects the layer's Hessians
from hooks on its linears, hands them to `on_layer` (where the caller quantizes / packs the layer), and
keeps the outputs as the next layer's inputs. What stays on the device: one layer, the activations (or one
batch of them, with `act_device="cpu"`) and that layer's Hessians -- the GPTQ reference implementation's
sequential scheme, as a library function.

`load_offloaded` is the other half: the full-precision model for evaluation, with accelerate placing what
does not fit the budget in host memory.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .llama import LLAMA_LINEARS, is_target

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PROPAGATE = ("quantized", "fp")


class Checkpoint:
    """A Hugging Face safetensors checkpoint directory, read lazily (never the whole model in memory).

    Args:
        path: a directory holding config.json and model.safetensors, or model.safetensors.index.json plus
            its shards (what `save_pretrained` writes).
    Attributes:
        config: the transformers config (AutoConfig).
        weight_map: {tensor name: shard file name}.
        skeleton: the causal LM instantiated on the meta device (module types and names, no memory).
        prefix: what precedes `layers.{i}.` in tensor names (`model.` for a ...ForCausalLM checkpoint).
    Example:
        >>> ckpt = Checkpoint("ckpt/")                                # doctest: +SKIP
        >>> ckpt.layer_names(0)[:1], ckpt.tensor("model.norm.weight").shape   # doctest: +SKIP
    """

    def __init__(self, path):
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint directory {p} not found: pass a directory written by save_pretrained")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: pass a Hugging Face checkpoint directory "
                                    "(save_pretrained writes config.json beside the weights)")
        if (p / INDEX).is_file():
            self.weight_map = dict(json.loads((p / INDEX).read_text())["weight_map"])
            missing = sorted({f for f in self.weight_map.values() if not (p / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{p / INDEX} names shard {missing[0]}, which is not in {p} "
                                        f"({len(missing)} missing): copy or re-download every shard")
        elif (p / SINGLE).is_file():
            with safe_open(p / SINGLE, framework="pt") as f:
                self.weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{p} has no weights ({SINGLE} or {INDEX}): only safetensors checkpoints are "
                                    "streamed; re-save the model with save_pretrained")
        self.config = AutoConfig.from_pretrained(p)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config)  # also sets _attn_implementation
        base = getattr(self.skeleton, "model", None)
        if not all(hasattr(base, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
            raise ValueError(f"{p}: model_type {self.config.model_type!r} is not a Llama-family decoder "
                             "(model.layers / embed_tokens / norm / rotary_emb); stream.py reads Llama-family checkpoints")
        self.prefix = next((pre for pre in ("model.", "") if f"{pre}embed_tokens.weight" in self.weight_map), None)
        if self.prefix is None:
            raise ValueError(f"{p}: no model.embed_tokens.weight among {len(self.weight_map)} tensors: "
                             "not a Llama-family causal LM checkpoint")

    @property
    def num_layers(self) -> int:
        return len(self.skeleton.model.layers)

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype of the stored weights (read from the embedding table's header)."""
        from safetensors import safe_open

        name = f"{self.prefix}embed_tokens.weight"
        with safe_open(self.path / self.weight_map[name], framework="pt") as f:
            return f.get_slice(name)[:1].dtype

    def layer_names(self, i: int) -> list[str]:
        """The checkpoint tensor names of decoder layer `i` (checked present)."""
        if not 0 <= i < self.num_layers:
            raise ValueError(f"layer index must be in [0, {self.num_layers}), got {i!r}")
        names = [f"{self.prefix}layers.{i}.{k}" for k in self.skeleton.model.layers[i].state_dict()]
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ValueError(f"{self.path}: tensor {missing[0]} of layer {i} is missing from the checkpoint "
                             f"({len(missing)} of {len(names)} missing): the checkpoint is incomplete")
        return names

    def tensors(self, names: Iterable[str], device="cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Load `names` (opening each shard once), cast to `dtype` when given, on `device`."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for n in names:
            if n not in self.weight_map:
                raise ValueError(f"{self.path}: no tensor {n!r} in the checkpoint ({len(self.weight_map)} tensors)")
            by_shard.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for shard, group in by_shard.items():
            with safe_open(self.path / shard, framework="pt", device=str(torch.device(device))) as f:
                for n in group:
                    t = f.get_tensor(n)
                    out[n] = t if dtype is None else t.to(dtype)
        return out

    def tensor(self, name: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensors([name], device, dtype)[name]


def _as_checkpoint(ckpt) -> Checkpoint:
    return ckpt if isinstance(ckpt, Checkpoint) else Checkpoint(ckpt)


def _load_module(ckpt: Checkpoint, meta: nn.Module, prefix: str, device, dtype) -> nn.Module:
    """A copy of the meta module `meta` with its tensors `prefix + key` loaded from the checkpoint."""
    module = copy.deepcopy(meta, memo={id(ckpt.config): ckpt.config})  # share the config, copy the rest
    keys = list(meta.state_dict())
    sd = ckpt.tensors([prefix + k for k in keys], device, dtype)
    module.load_state_dict({k: sd[prefix + k] for k in keys}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_layer(ckpt: Checkpoint | str, i: int, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Decoder layer `i` (a LlamaDecoderLayer for Llama 3 / SmolLM2) built from its shard tensors only.

    Args:
        ckpt: a Checkpoint or its directory.
        i: layer index.
        device, dtype: where and how to hold it (dtype None: as stored).
    """
    ckpt = _as_checkpoint(ckpt)
    ckpt.layer_names(i)  # checks presence before anything is read
    return _load_module(ckpt, ckpt.skeleton.model.layers[i], f"{ckpt.prefix}layers.{i}.", device, dtype)


def load_embeddings(ckpt: Checkpoint | str, device="cpu", dtype: torch.dtype | None = None) -> nn.Embedding:
    """The input embedding table (8B: 128256 x 4096, 1 GiB in bf16; the host is the place for it)."""
    ckpt = _as_checkpoint(ckpt)
    return _load_module(ckpt, ckpt.skeleton.model.embed_tokens, f"{ckpt.prefix}embed_tokens.", device, dtype)


def load_norm(ckpt: Checkpoint | str, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """The final norm before the head."""
    ckpt = _as_checkpoint(ckpt)
    return _load_module(ckpt, ckpt.skeleton.model.norm, f"{ckpt.prefix}norm.", device, dtype)


def load_head(ckpt: Checkpoint | str, device="cpu", dtype: torch.dtype | None = None) -> nn.Linear:
    """The LM head; with tied embeddings (SmolLM2, Llama 3.2) its weight is the embedding table."""
    ckpt = _as_checkpoint(ckpt)
    meta = ckpt.skeleton.lm_head
    name = "lm_head.weight"
    if name not in ckpt.weight_map:
        if not getattr(ckpt.config, "tie_word_embeddings", False):
            raise ValueError(f"{ckpt.path}: no lm_head.weight and tie_word_embeddings is false: the checkpoint is incomplete")
        name = f"{ckpt.prefix}embed_tokens.weight"
    head = nn.Linear(meta.in_features, meta.out_features, bias=False, device="meta")
    head.load_state_dict({"weight": ckpt.tensor(name, device, dtype)}, assign=True)
    return head.eval().requires_grad_(False)


def load_rotary(ckpt: Checkpoint | str, device="cpu") -> nn.Module:
    """The model's rotary embedding (LlamaRotaryEmbedding of its config: rope_theta, llama3 scaling)."""
    ckpt = _as_checkpoint(ckpt)
    return type(ckpt.skeleton.model.rotary_emb)(config=ckpt.config).to(device)


def attention_inputs(config, rotary: nn.Module, hidden: torch.Tensor) -> dict:
    """The keyword arguments a decoder layer needs for unpadded sequences starting at position 0, built
    as LlamaModel.forward builds them: positions, (cos, sin) of the rotary embedding, the causal mask
    (None for sdpa, which then attends causally itself).

    Args:
        hidden: (B, T, C) the layer's input.
    """
    from transformers.masking_utils import create_causal_mask

    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
    # the cache argument is `cache` in transformers 5.24 and `past_key_values` in 5.17: name what this one takes
    kw = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, position_ids=pos, **kw)
    return {"attention_mask": mask, "position_ids": pos, "position_embeddings": rotary(hidden, pos)}


def _run(layer: nn.Module, h: torch.Tensor, config, rotary) -> torch.Tensor:
    out = layer(h, **attention_inputs(config, rotary, h))
    return out[0] if isinstance(out, tuple) else out  # transformers 5 returns a tensor, 4.x a tuple


def _check_batches(batches) -> list[torch.Tensor]:
    out = []
    for k, ids in enumerate(batches):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"calibration batch {k} must be a (B, T) tensor of token ids, got "
                             f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}")
        if ids.numel():
            out.append(ids)
    if not out:
        raise ValueError("calibration data is empty: pass at least one non-empty batch of token ids")
    return out


class _HessianHooks:
    """Forward pre-hooks accumulating sum x x^T (or sum x^2) per target linear, in float32 on the layer's
    device. Linears that read the same input tensor (q/k/v, gate/up) share one accumulator: computed once,
    stored once (8B: 0.98 GiB per layer instead of 1.17)."""

    def __init__(self, linears: dict[str, nn.Linear], full: bool):
        self.full, self.acc = full, {}
        self.last = None  # (input tensor, its version, name of the linear that accumulated it)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name):
        def fn(_mod, args):
            x = args[0]
            last = self.last
            if last is not None and x is last[0] and x._version == last[1]:  # same input as the previous linear
                if name not in self.acc:
                    self.acc[name] = self.acc[last[2]]  # alias: computed once, stored once
                if self.acc[name] is self.acc[last[2]]:
                    return
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (N, in)
            acc = self.acc.get(name)
            if acc is None:
                self.acc[name] = flat.T @ flat if self.full else flat.pow(2).sum(0)  # (in, in) or (in,)
            elif self.full:
                acc.addmm_(flat.T, flat)  # in place: no second (in, in) matrix (8B down_proj: 784 MiB)
            else:
                acc.add_(flat.pow(2).sum(0))
            self.last = (x, x._version, name)  # identity, not address: holding x keeps it from being reused
        return fn

    def means(self, tokens: int) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        self.last = None
        for t in {id(t): t for t in self.acc.values()}.values():
            t.div_(tokens)
        return self.acc


def _layer_statistics(layer, i, hidden, tokens, cfg, rotary, full, targets, act_device) -> dict:
    """Run every batch through `layer` with hooks on its target linears; the mean statistics. With
    `act_device`, each batch's output replaces its input in `hidden` (one set of activations at a time)."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and is_target(n, targets)}
    if not linears:
        raise ValueError(f"layer {i} has no linear named {list(targets)}; nothing to calibrate")
    device = next(layer.parameters()).device
    hooks = _HessianHooks(linears, full)
    try:
        for b, h in enumerate(hidden):
            out = _run(layer, h.to(device), cfg, rotary)  # (B, T, C)
            if act_device is not None:
                hidden[b] = out.to(act_device)
            del out
    finally:
        stats = hooks.means(tokens)
    return stats


def _propagate(layer, hidden, device, cfg, rotary, act_device) -> None:
    """Replace each batch of `hidden` by its output through `layer`, in place. The layer runs on `device`;
    if `on_layer` moved it elsewhere (the CPU, to keep converted layers off a small card), it comes to
    `device` for this pass and goes back."""
    first = next(itertools.chain(layer.parameters(), layer.buffers()), None)
    home = first.device if first is not None else device
    if home != device:
        layer.to(device)
    for b in range(len(hidden)):
        hidden[b] = _run(layer, hidden[b].to(device), cfg, rotary).to(act_device)
    if home != device:
        layer.to(home)


@torch.no_grad()
def stream_calibrate(ckpt: Checkpoint | str, batches: Iterable[torch.Tensor], device="cpu",
                     dtype: torch.dtype | None = None, full: bool = True, targets=LLAMA_LINEARS,
                     on_layer: Callable[[int, nn.Module, dict], nn.Module | None] | None = None,
                     propagate: str = "quantized", keep: bool = False, act_device=None,
                     progress: bool = True) -> dict[str, torch.Tensor] | None:
    """Calibrate a checkpoint layer by layer: H = mean over calibration tokens of x x^T (or its diagonal)
    for every target linear, with one decoder layer on `device` at a time.

    Args:
        ckpt: a Checkpoint or its directory.
        batches: (B, T) token-id tensors, unpadded (every token counts; each sequence starts at position 0).
        device: where each layer runs ("cuda", "cpu").
        dtype: compute dtype of the layers and activations (None: as stored). Statistics are float32.
        full: full (in, in) Hessians (GPTQ) or their diagonals (in,) (the `hessian` score).
        targets: linear names to hook.
        on_layer: called as `on_layer(i, layer, hessians)` once layer i is calibrated, with `hessians`
            keyed by names relative to the layer (`self_attn.q_proj`, as `layer.named_modules()` gives them),
            so `orthogonalize_(layer, config, hessian=hessians)` converts it in place. Linears reading one
            input (q/k/v, gate/up) get the same tensor object: treat them as read-only. It may change the
            layer in place or return a replacement module, and keep a reference to what it wants to keep:
            stream_calibrate drops its own references (and the Hessians) once the layer has propagated. It may
            also move the layer (`layer.to("cpu")`: converted layers then do not pile up on a small card);
            the second pass of propagate="quantized" brings it to `device` and puts it back.
        propagate: what feeds layer i+1. "quantized" (the default, GPTQ's choice): the outputs of layer i
            after `on_layer`, so each layer is calibrated on the activations the converted model will really
            produce and corrects the errors of the layers before it; costs a second pass through the layer.
            "fp": the outputs of the original layer i (one pass; the Hessians then equal those of
            `select.collect_hessian` on the full-precision model, whatever `on_layer` does).
            Without `on_layer` both are the same single pass.
        keep: also return every Hessian, on the CPU, keyed by full module name (`model.layers.3.mlp.up_proj`,
            as `select.collect_hessian` names them). Off by default: at 8B the full Hessians are 32 layers
            x 7 linears of up to 14336^2 floats.
        act_device: where activations wait between layers (default: `device`). "cpu" bounds the device's
            share to one batch: use it when B * T * hidden * 2 bytes does not fit beside a layer.
        progress: show a progress bar over layers.
    Returns:
        {full module name: float32 statistic} when `keep`, else None.
    Example:
        >>> packed = []
        >>> def pack(i, layer, h):                                    # doctest: +SKIP
        ...     orthogonalize_(layer, OrthoConfig(quantizer="gptq"), hessian=h, progress=False)
        ...     packed.append(layer.to("cpu"))
        >>> stream_calibrate("ckpt/", batches, device="cuda", dtype=torch.bfloat16, act_device="cpu",
        ...                  on_layer=pack)                           # doctest: +SKIP
    """
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {PROPAGATE}, got {propagate!r}")
    batches = _check_batches(batches)
    ckpt = _as_checkpoint(ckpt)
    for i in range(ckpt.num_layers):  # every layer's tensors present, before any computation
        ckpt.layer_names(i)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # compare equal to the devices tensors report
        device = torch.device("cuda", torch.cuda.current_device())
    act_device = torch.device(act_device) if act_device is not None else device
    dtype = dtype or ckpt.stored_dtype
    cfg = ckpt.config
    # Embedding rows gathered on the CPU: the table (1 GiB at 8B) never reaches the device.
    table = ckpt.tensor(f"{ckpt.prefix}embed_tokens.weight", "cpu")  # (V, C) as stored: never cast whole
    hidden = [nn.functional.embedding(ids.cpu(), table).to(act_device, dtype) for ids in batches]  # each (B, T, C)
    del table
    tokens = sum(ids.numel() for ids in batches)
    rotary = load_rotary(ckpt, device)
    two_pass = on_layer is not None and propagate == "quantized"
    kept = {}
    for i in tqdm(range(ckpt.num_layers), desc="stream calibrate", disable=not progress, leave=False):
        layer = load_layer(ckpt, i, device, dtype)
        hessians = _layer_statistics(layer, i, hidden, tokens, cfg, rotary, full, targets,
                                     None if two_pass else act_device)
        if on_layer is not None:
            replaced = on_layer(i, layer, hessians)
            if isinstance(replaced, nn.Module):
                layer = replaced
            del replaced
        if keep:
            kept.update({f"{ckpt.prefix}layers.{i}.{n}": t.cpu() for n, t in hessians.items()})
        del hessians
        if two_pass:
            _propagate(layer, hidden, device, cfg, rotary, act_device)
        del layer  # nothing else refers to it: the next layer loads into its memory
    return kept if keep else None


OFFLOAD_HEADROOM_GIB = 2.5  # beside offloaded weights: activations, the logits of a 512-token window, the context


def offload_budget_gib(budget_gib: float | None, default: float = 6.0) -> float:
    """GiB an offloaded full-precision model's weights may take on the device under a profile's `budget_gib`."""
    return max(0.5, (budget_gib or default) - OFFLOAD_HEADROOM_GIB)


def load_offloaded(path, budget_gib: float, dtype: torch.dtype = torch.bfloat16, device="cuda",
                   cpu_gib: float | None = None, offload_folder=None) -> nn.Module:
    """The full-precision model for evaluation inside a GPU budget: accelerate places what fits
    `budget_gib` on the GPU and the rest in host memory (streamed to the GPU layer by layer at each forward).

    Args:
        path: checkpoint directory (or HF id).
        budget_gib: GPU memory the weights may take (leave room for activations and the CUDA context).
        dtype: weight dtype.
        device: "cuda" / "cuda:N" (offloaded) or "cpu" (a plain load: nothing to offload).
        cpu_gib: host memory for offloaded weights (default: accelerate's measure of what is free);
            beyond it, weights go to `offload_folder` on disk.
    Returns:
        the model in eval mode; on CUDA its placement is in `model.hf_device_map`.
    """
    from transformers import AutoModelForCausalLM

    if not (isinstance(budget_gib, (int, float)) and math.isfinite(budget_gib) and budget_gib > 0):
        raise ValueError(f"budget_gib must be a positive number of GiB, got {budget_gib!r}")
    dev = torch.device(device)
    if dev.type == "cpu":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: load_offloaded places weights on a CUDA GPU (none available here); "
                         "pass device='cpu'")
    max_memory = {dev.index or 0: f"{budget_gib}GiB"}
    if cpu_gib is not None:
        max_memory["cpu"] = f"{cpu_gib}GiB"
    else:
        from accelerate.utils import get_max_memory

        max_memory["cpu"] = get_max_memory()["cpu"]
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                offload_folder=offload_folder).eval()


def release(model: nn.Module) -> int:
    """Free `model`'s device memory now, whoever still refers to the module: accelerate's hooks (and the maps
    they keep of tied and offloaded weights) outlive a `del` of an offloaded model, which then holds its
    on-device share (GiBs on a 6 GiB card) until the next garbage collection finds every cycle. Every parameter
    and buffer is emptied in place, so the module is unusable afterwards.

    Returns:
        the bytes torch's allocator still holds on the current CUDA device afterwards (0 without CUDA).
    """
    import gc

    try:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(model, recurse=True)
    except ImportError:  # no accelerate: no hooks to remove
        pass
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = torch.empty(0, dtype=t.dtype)
            if getattr(t, "quant_state", None) is not None:  # bitsandbytes 4-bit: absmax and its second level
                t.quant_state = None
        for m in model.modules():  # tensors held as plain attributes: OrthoLinear's dense caches
            for name in ("_base_cache", "_merged", "_rows_cache"):
                if getattr(m, name, None) is not None:
                    setattr(m, name, None)
    gc.collect()
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def load_nf4(path, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """The checkpoint with bitsandbytes NF4 linears (`baselines.nf4_`: block 64, double quantization, the quantizer
    of the in-memory NF4 arms), built layer by layer: each decoder layer is read into host memory
    (`stream.load_layer`), its linears moved to `device` and quantized there, its norms after them; the head stays
    in `dtype` (bitsandbytes leaves it unquantized) and the embedding table in host memory (`HostEmbedding`). The
    device holds the NF4 model and one layer's weights in transit, never a dense layer: `load_model(bits=4)` would
    place the 8B embedding table (1 GiB) there first, over a 6 GiB budget.

    Returns:
        a LlamaForCausalLM in eval mode, nothing trainable, `is_loaded_in_4bit` set (PEFT then wraps its linears
        with its bitsandbytes LoRA layers, as on a `from_pretrained` 4-bit load).
    """
    from .baselines import nf4_
    from .modules import HostEmbedding

    ckpt = Checkpoint(path)
    model = ckpt.skeleton  # meta: every part is replaced below
    for i in range(ckpt.num_layers):
        layer = load_layer(ckpt, i, "cpu", dtype)  # bitsandbytes quantizes on the move: one copy to the device
        nf4_(layer, compute_dtype=dtype, device=device)
        model.model.layers[i] = layer.to(device)
    model.lm_head = load_head(ckpt, device, dtype)
    model.model.embed_tokens = HostEmbedding.from_embedding(load_embeddings(ckpt, "cpu", dtype), device)
    model.model.norm = load_norm(ckpt, device, dtype)
    model.model.rotary_emb = load_rotary(ckpt, device)
    model.is_loaded_in_4bit = True
    return model.requires_grad_(False).eval()
