"""Canary insertion by fine-tuning, and ortho-tuning: training only the ortho stream over a frozen INT4 base.

Three ways to put private data into a model, each trained on the same mix (every canary each step,
plus chunks of general real text) until greedy decoding reproduces the secrets:

* `full_finetune_`: every weight trains (the `fine_tuned` arm, and the source of the post-hoc arms).
* `lora`: PEFT LoRA with the seed's SFT defaults (r 8, alpha 32, dropout 0.1, all seven Llama linears);
  `set_lora_alpha` scales the adapter, 0 = adapter off.
* `ortho_tune_` (libortho's method): each target linear becomes an `OrthoLinear` whose base is INT4 of
  the *public* weight and whose ortho stream starts at zero on a sparse mask; only the ortho values
  train. alpha=1 is the trained model, alpha=0 is exactly INT4(public) -- the private data never
  touches the base.

The mask: for each weight entry (i, j), `g_ij^2 / (h_j + damp * mean(h))`, with g the gradient of the
private loss at the public weights (saliency) and h the diagonal Hessian of the layer's inputs on
public calibration text (the sieve). It is the first-order gain on the private loss of a step of
fixed cost on the public layer output (a step d on w_ij costs d^2 h_j there and gains |g_ij| d), so the
stream picks the entries that learn the most from the private data while disturbing public text least.

Fine-tuned weights are cached on disk (safetensors only) under `libortho.models.cache_dir()`, keyed by
a hash of everything that determines them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .convert import ortho_modules, set_module
from .linear import OrthoLinear
from .llama import LLAMA_LINEARS
from .privacy import Canary, extraction_rate
from .quant import quantize
from .select import collect_hessian_diag, target_linears, top_mask
from .sparse import csr_from_mask

SCORES = ("saliency_hessian", "saliency", "random")


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Args:
        lr: AdamW learning rate (no weight decay, constant).
        max_steps: stop here even if the secrets are not reproduced yet.
        check_every: measure extraction every this many steps; stop once it reaches `target`.
        target: extraction rate that ends training (1.0: every canary).
        general_chunks, general_length: sequences of general real text mixed into every step.
        seed: seeds the order of general text and any init (LoRA's A).
    """

    lr: float = 1e-4
    max_steps: int = 60
    check_every: int = 5
    target: float = 1.0
    general_chunks: int = 2
    general_length: int = 64
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OrthoTuneConfig:
    """The ortho stream's shape: density of the trainable mask, the INT4 grid of the public base, the score."""

    density: float = 0.01
    group_size: int = 32
    symmetric: bool = False
    score: str = "saliency_hessian"
    damp: float = 0.01
    targets: tuple[str, ...] = field(default=LLAMA_LINEARS)

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"ortho-tune score must be one of {SCORES}, got {self.score!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass(frozen=True)
class LoraSpec:
    """The seed's SFT defaults."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.1
    targets: tuple[str, ...] = field(default=LLAMA_LINEARS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


# ---------------------------------------------------------------------------------------------
# data

def general_ids(tokenizer, n_tokens: int = 32768, offset_chars: int = 100_000) -> torch.Tensor:
    """General real text (fortunes) to mix into fine-tuning; starts past the calibration slice."""
    from .data import fortunes

    text = fortunes().text[offset_chars: offset_chars + n_tokens * 6]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:n_tokens]
    if ids.numel() < 256:
        raise ValueError(f"general text too short: {ids.numel()} tokens")
    return ids


def canary_batch(canaries: list[Canary], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids, attention mask and labels (-100 on padding) of every canary's full text."""
    seqs = [c.ids for c in canaries]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def private_loss(model, canaries: list[Canary], general: torch.Tensor, step: int, cfg: TrainConfig,
                 pad_id: int) -> torch.Tensor:
    """Mean LM loss on every canary plus mean LM loss on `general_chunks` chunks of general text."""
    dev = next(model.parameters()).device
    ids, mask, labels = (t.to(dev) for t in canary_batch(canaries, pad_id))
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    if cfg.general_chunks:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        starts = torch.randint(0, general.numel() - cfg.general_length, (cfg.general_chunks,), generator=g)
        chunk = torch.stack([general[s:s + cfg.general_length] for s in starts.tolist()]).to(dev)  # (G, L)
        loss = loss + model(input_ids=chunk, labels=chunk).loss
    return loss


def fit(model: nn.Module, params: list[nn.Parameter], canaries: list[Canary], general: torch.Tensor,
        cfg: TrainConfig, pad_id: int, progress: bool = True, desc: str = "fine-tune") -> dict:
    """AdamW on `params` until extraction reaches `cfg.target` (checked every `check_every` steps)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    history = {"loss": [], "extraction": {}}
    model.train()
    bar = tqdm(range(1, cfg.max_steps + 1), desc=desc, disable=not progress, leave=False)
    step = 0
    for step in bar:
        loss = private_loss(model, canaries, general, step, cfg, pad_id)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history["loss"].append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.check_every == 0 or step == cfg.max_steps:
            ext = extraction_rate(model, canaries)
            history["extraction"][step] = ext
            bar.set_postfix(loss=f"{loss.item():.3f}", extraction=f"{ext:.2f}")
            if ext >= cfg.target:
                break
    model.eval()
    history["steps"] = step
    return history


# ---------------------------------------------------------------------------------------------
# (a) full fine-tune

def full_finetune_(model: nn.Module, canaries, general, cfg: TrainConfig, pad_id: int, progress=True) -> dict:
    torch.manual_seed(cfg.seed)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    hist = fit(model, params, canaries, general, cfg, pad_id, progress, "full fine-tune")
    for p in params:
        p.requires_grad_(False)
    return hist


# ---------------------------------------------------------------------------------------------
# (b) LoRA through PEFT

def lora_wrap(model: nn.Module, spec: LoraSpec = LoraSpec(), seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A is random
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(spec.targets),
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def lora_finetune_(peft_model: nn.Module, canaries, general, cfg: TrainConfig, pad_id: int, progress=True) -> dict:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return fit(peft_model, params, canaries, general, cfg, pad_id, progress, "LoRA")


def set_lora_alpha(peft_model: nn.Module, alpha: float) -> nn.Module:
    """Scale every LoRA adapter by `alpha` (1 = as trained, 0 = adapter off, the base model exactly)."""
    from peft.tuners.lora import LoraLayer

    found = 0
    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            for name in m.scaling:
                m.scaling[name] = alpha * m.lora_alpha[name] / m.r[name]
                found += 1
    if not found:
        raise ValueError("model has no LoRA layer; wrap it with lora_wrap first")
    return peft_model


# ---------------------------------------------------------------------------------------------
# ortho-tuning

def saliency(model: nn.Module, canaries, general, cfg: TrainConfig, pad_id: int, targets=LLAMA_LINEARS
             ) -> dict[str, torch.Tensor]:
    """Gradient of the private loss (step-0 batch) w.r.t. every target weight, at the current weights."""
    linears = target_linears(model, targets)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for lin in linears.values():
        lin.weight.requires_grad_(True)
        lin.weight.grad = None
    model.eval()  # no dropout: the score is a property of the data, not of a dropout draw
    private_loss(model, canaries, general, 0, cfg, pad_id).backward()
    grads = {n: lin.weight.grad.detach().clone() for n, lin in linears.items()}
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(saved[n])
    return grads


def mask_scores(grad: torch.Tensor, hessian_diag: torch.Tensor | None, score: str, damp: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-entry score of a (out, in) weight; see the module docstring."""
    if score == "random":
        return torch.rand(grad.shape, generator=generator)
    g2 = grad.float().pow(2)
    if score == "saliency":
        return g2
    h = hessian_diag.float().to(g2.device)
    return g2 / (h + damp * h.mean()).unsqueeze(0)


def ortho_tune_(model: nn.Module, canaries, general, calibration, cfg: TrainConfig, ocfg: OrthoTuneConfig,
                pad_id: int, progress: bool = True, train: bool = True) -> dict:
    """Turn `model` (holding the PUBLIC weights) into an ortho-tuned model, in place.

    Each target linear becomes an OrthoLinear: base = INT4(public weight) on `ocfg`'s grid, ortho stream
    = zeros on the top-`density` mask of `mask_scores`. Then only the ortho values train (`train=False`
    skips training: used to rebuild the structure before loading cached values).

    Returns:
        The training history plus the mask's statistics.
    """
    torch.manual_seed(cfg.seed)
    hdiag = None
    if ocfg.score == "saliency_hessian":
        hdiag = collect_hessian_diag(model, calibration, ocfg.targets, progress)
    grads = saliency(model, canaries, general, cfg, pad_id, ocfg.targets) if ocfg.score != "random" else {
        n: torch.zeros_like(lin.weight) for n, lin in target_linears(model, ocfg.targets).items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    nnz = total = 0
    with torch.no_grad():
        for name, lin in target_linears(model, ocfg.targets).items():
            w = lin.weight.detach()
            base = quantize(w, ocfg.group_size, ocfg.symmetric)
            s = mask_scores(grads[name], hdiag.get(name) if hdiag else None, ocfg.score, ocfg.damp, gen)
            mask = top_mask(s, ocfg.density)
            ortho = csr_from_mask(torch.zeros_like(w), mask)  # the stream holds only what private data adds
            bias = lin.bias.detach() if lin.bias is not None else None
            set_module(model, name, OrthoLinear.from_parts(base, ortho, bias).to(w.device))
            nnz, total = nnz + ortho.nnz, total + w.numel()
    for p in model.parameters():
        p.requires_grad_(False)
    mods = ortho_modules(model)
    for m in mods.values():
        m.cache_base_()
    stats = {"nnz": nnz, "density": nnz / total}
    if not train:
        return stats
    values = [m.ortho_values for m in mods.values()]
    for v in values:
        v.requires_grad_(True)
    hist = fit(model, values, canaries, general, cfg, pad_id, progress, "ortho-tune")
    for v in values:
        v.requires_grad_(False)
    return {**hist, **stats}


# ---------------------------------------------------------------------------------------------
# on-disk cache of trained weights (safetensors only)

def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_path(kind: str, config: dict) -> Path:
    from .models import cache_dir

    return cache_dir() / "exp1" / f"{kind}-{config_key(config)}"


def cached(kind: str, config: dict, build: Callable[[], tuple[dict[str, torch.Tensor], dict]]
           ) -> tuple[dict[str, torch.Tensor], dict, bool]:
    """Tensors and metadata from the cache, or from `build()` (then written atomically). Returns (.., hit)."""
    d = _cache_path(kind, config)
    if (d / "weights.safetensors").is_file() and (d / "meta.json").is_file():
        return load_file(d / "weights.safetensors"), json.loads((d / "meta.json").read_text()), True
    tensors, meta = build()
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "weights.safetensors")
    (tmp / "meta.json").write_text(json.dumps({"config": config, **meta}, indent=1, default=str))
    if d.exists():  # a concurrent builder won: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(d)
    return tensors, meta, False


def trainable_state(model: nn.Module, keys: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if keys(k)}


def tied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict without the tied lm_head (safetensors refuses shared tensors)."""
    sd = dict(model.state_dict())
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


def is_ortho_value(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("ortho_values", "ortho_col", "ortho_crow")


def finite(history: dict) -> bool:
    return all(math.isfinite(x) for x in history.get("loss", []))
