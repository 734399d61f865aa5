"""The experiments' public model, off the 4-bit grid: SmolLM2-135M-Instruct continued in full precision.

The embedded SmolLM2 comes from a Q4_1 GGUF, so its weights lie on the group-32 asymmetric INT4 grid: INT4
g32-asym of it *is* it, and rounding snaps small fine-tuning changes back onto it. Every privacy result
measured over that grid is an artefact of it. `derive` builds the default public model of the experiments
so that no INT4 configuration reproduces it:

1. **Dither** (seeded): every weight of the seven Llama linears moves by u ~ U(-s/2, s/2), s its group's
   Q4_1 step, so it lies anywhere in its rounding cell (as the weights of a model trained in 16 bits do)
   instead of at the centre. The groups' min and max move too, so INT4 recomputes a grid of its own that the
   weights do not lie on: INT4 of the derived model is a quantization with its own error, as on any
   full-precision model, and not the shipped Q4_1 model back.
2. **Continued training** in full precision (AdamW, every parameter) on public text that is neither the
   evaluation text (Jargon File) nor the calibration / general fine-tuning text (fortunes): The Devil's
   Dictionary from Debian's `dict-devil`. It recovers part of what the dither cost (measured in
   `recipe.json`); the derived model is a somewhat weaker language model than the shipped one, which is the
   price of a model no 4-bit grid reproduces.

`grid_offset` measures how far a model lies from the grid INT4 would put it on (0 on the shipped model,
about 0.25 of a step for weights spread uniformly in their cells). The model is cached under
`libortho.models.cache_dir()` as a Hugging Face folder (`save_pretrained`, safetensors, with its tokenizer),
keyed by its recipe, with `recipe.json` beside it: the recipe, the measured grid offsets and the training
losses. It is derived on the CPU (about a minute on 2 idle cores), so every machine gets the same weights.

Names (`load_public`): `smollm2-135m` is the derived model (the experiments' default); `smollm2-135m-q4` is
the embedded Q4_1 model as shipped, kept as a named option with its caveat; anything else (`tiny`, a
directory, an HF id) is loaded as it is by `libortho.models.load_model`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data import DEVIL, _read, prose
from .models import EMBEDDED, Loaded, cache_dir, load_model, read_or_build
from .modules import target_linears
from .quant import _grouped, quantize

PUBLIC = EMBEDDED  # "smollm2-135m": the derived, off-grid model
Q4 = "smollm2-135m-q4"  # the embedded Q4_1 model as shipped
Q4_CAVEAT = ("the embedded SmolLM2 is a Q4_1 GGUF: its weights lie on the group-32 asymmetric INT4 grid, so INT4 "
             "g32-asym reproduces it exactly and snaps small fine-tuning changes back onto it; privacy and "
             "quantization results on it are artefacts of that grid (use smollm2-135m, the off-grid default)")


@dataclass(frozen=True)
class Recipe:
    """How the public model is derived from the embedded Q4_1 SmolLM2 (every field is in its cache key).

    Args:
        dither: amplitude of the seeded dither, in Q4_1 steps (1.0: uniform over the whole rounding cell).
        steps, lr, batch, length: continued training (AdamW, constant lr, every parameter), `batch` windows of
            `length` tokens of the Devil's Dictionary per step.
        seed: seeds the dither and the windows.
    """

    source: str = EMBEDDED
    text: str = "debian:dict-devil"
    group_size: int = 32  # the grid of the source (Q4_1: group 32, asymmetric)
    dither: float = 1.0
    steps: int = 20
    lr: float = 1e-4
    batch: int = 4
    length: int = 128
    seed: int = 0

    def __post_init__(self):
        if not (0.0 <= self.dither <= 1.0):
            raise ValueError(f"dither must be in [0, 1] Q4_1 steps, got {self.dither!r}")
        for k in ("steps", "batch", "length", "group_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "steps" else 1):
                raise ValueError(f"{k} must be a {'non-negative' if k == 'steps' else 'positive'} int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> str:
        from .train import config_key

        return config_key({"public_model": 1, **self.to_dict()})


DEFAULT = Recipe()
# the layers whose grid offset the recipe records (all seven linears of each): a sixth of SmolLM2's weights,
# about 5 s per measurement on 2 cores instead of 30
SAMPLED_LAYERS = (0, 7, 14, 22, 29)


def devil_text() -> str:
    """The Devil's Dictionary (Debian `dict-devil`), its prose paragraphs: public text used by no experiment."""
    return prose(_read(DEVIL), min_words=8)


@torch.no_grad()
def grid_offset(model: nn.Module, group_size: int = 32, symmetric: bool = False, names=None) -> dict:
    """How far the target linears (or those in `names`) lie from their own INT4 round-to-nearest grid.

    Returns (over the measured weights):
        {"mean_offset_steps": mean |W - Q(W)| / s (0 on the grid, ~0.25 uniform in the cells),
         "max_abs_err": max |W - Q(W)|, "frac_off_grid": share of weights with |W - Q(W)| > 1e-3 s,
         "group_size", "symmetric"}.
    """
    total = off = 0
    err_sum = 0.0
    max_err = 0.0
    for name, lin in target_linears(model).items():
        if names is not None and name not in names:
            continue
        w = lin.weight.detach().float()
        qt = quantize(w, group_size, symmetric, pad=True)  # a short last group where gs does not divide
        d = (w - qt.dequantize(torch.float32)).abs()  # (O, I)
        s = qt.scales.float().repeat_interleave(group_size, 1)[:, : w.shape[1]]
        rel = d / s
        err_sum += float(rel.sum())
        off += int((rel > 1e-3).sum())
        total += rel.numel()
        max_err = max(max_err, float(d.max()))
    if not total:
        raise ValueError("model has no target linear to measure")
    return {"mean_offset_steps": err_sum / total, "max_abs_err": max_err, "frac_off_grid": off / total,
            "group_size": group_size, "symmetric": symmetric}


@torch.no_grad()
def dither_(model: nn.Module, amplitude: float = 1.0, group_size: int = 32, seed: int = 0) -> nn.Module:
    """Move each target weight by u ~ U(-a s/2, a s/2), s the step of its group of `group_size` inputs on the
    asymmetric INT4 grid (range / 15), seeded; layers in name order. Returns `model`."""
    gen = torch.Generator().manual_seed(seed)
    for name, lin in sorted(target_linears(model).items()):
        w = lin.weight
        if w.shape[1] % group_size:
            raise ValueError(f"{name}: in_features {w.shape[1]} is not a multiple of group_size {group_size}")
        wg = _grouped(w.float(), group_size)  # (O, G, gs)
        step = (wg.amax(-1, keepdim=True) - wg.amin(-1, keepdim=True)) / 15  # (O, G, 1)
        u = (torch.rand(wg.shape, generator=gen) - 0.5) * amplitude * step
        w.copy_((wg + u).reshape(w.shape).to(w.dtype))
    return model


def _train(model: nn.Module, ids: torch.Tensor, recipe: Recipe, progress: bool = False) -> list[float]:
    """Continued pre-training: next-token loss on seeded windows of `ids`, AdamW on every parameter."""
    from tqdm.auto import tqdm

    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses = []
    model.train()
    try:
        with torch.enable_grad():
            for _ in tqdm(range(recipe.steps), desc="public model", unit="step", disable=not progress,
                          leave=False):
                starts = torch.randint(0, ids.numel() - recipe.length - 1, (recipe.batch,), generator=gen)
                x = torch.stack([ids[s:s + recipe.length] for s in starts.tolist()])  # (B, T)
                loss = model(input_ids=x, labels=x).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"public model: loss is {loss.item()}; lower the recipe's lr ({recipe.lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(round(loss.item(), 4))
    finally:
        for p in params:
            p.requires_grad_(False)
        model.eval()
    return losses


def public_dir(recipe: Recipe = DEFAULT):
    """Where the derived model of `recipe` is cached (a Hugging Face folder; may not exist yet)."""
    return cache_dir() / "public" / f"smollm2-135m-offgrid-{recipe.key()}"


def derive(recipe: Recipe = DEFAULT, progress: bool = False):
    """The derived public model of `recipe` (cached): (Loaded on the CPU in fp32, facts for the results JSON)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if recipe.source != EMBEDDED:
        raise ValueError(f"the recipe derives from {EMBEDDED} (the embedded Q4_1 model), got source {recipe.source!r}")
    d = public_dir(recipe)

    def load():
        return (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d),
                json.loads((d / "recipe.json").read_text()))

    def read(remove: bool):
        if not (d / "recipe.json").is_file():
            return None
        try:
            return load()
        except (OSError, ValueError) as e:  # a truncated entry: removed (under the lock) and rebuilt once
            if remove:
                print(f"libortho: public model cache {d} is unreadable ({str(e)[:120]}); rebuilding it",
                      file=sys.stderr)
                shutil.rmtree(d, ignore_errors=True)
            return None

    def build():
        _build(recipe, d, progress)
        return load()

    # one process derives (on every core), the others wait and read its copy
    (model, tok, facts), _ = read_or_build(d.name, read, build)
    for p in model.parameters():
        p.requires_grad_(False)
    return Loaded(model.eval(), tok, "SmolLM2-135M-Instruct-offgrid", PUBLIC), facts


def _build(recipe: Recipe, d, progress: bool) -> None:
    t0 = time.perf_counter()
    src = load_model(EMBEDDED)
    model, tok = src.model, src.tokenizer
    names = [n for n in target_linears(model) if any(f"layers.{i}." in n for i in SAMPLED_LAYERS)]
    before = grid_offset(model, recipe.group_size, names=names)
    torch.manual_seed(recipe.seed)
    if recipe.dither:
        dither_(model, recipe.dither, recipe.group_size, recipe.seed)
    dithered = grid_offset(model, recipe.group_size, names=names)
    ids = tok(devil_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if progress:
        print(f"libortho: deriving the off-grid public model ({recipe.steps} steps on the Devil's Dictionary)",
              file=sys.stderr)
    losses = _train(model, ids, recipe, progress) if recipe.steps else []
    facts = {"name": "SmolLM2-135M-Instruct-offgrid", "recipe": recipe.to_dict(), "key": recipe.key(),
             "text_tokens": int(ids.numel()), "losses": losses,
             "grid_offset": {"source_q4_1": before, "after_dither": dithered,
                             "derived": grid_offset(model, recipe.group_size, names=names),
                             "layers_measured": [f"model.layers.{i}" for i in SAMPLED_LAYERS]},
             "derived_on": "cpu", "seconds": round(time.perf_counter() - t0, 1)}
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(facts, indent=1))
    if d.exists():  # a concurrent builder won: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(d)


def load_public(name: str = PUBLIC, device: str = "cpu", bits: int | None = None, recipe: Recipe = DEFAULT,
                progress: bool = False):
    """The public model an experiment starts from: (Loaded, facts for the results JSON).

    `smollm2-135m`: the derived off-grid model (`derive`); `smollm2-135m-q4`: the embedded Q4_1 model as
    shipped (facts carry its caveat); anything else: `load_model(name)` as it is.
    """
    if name == PUBLIC:
        if bits is not None:
            raise ValueError(f"{PUBLIC} (the derived public model) loads in full precision; drop bits={bits}")
        loaded, facts = derive(recipe, progress)
        loaded.model.to(device)
        from .models import LOAD_LOG

        LOAD_LOG.append({"source": f"{PUBLIC} (derived off the grid, {facts['key']})", "bits": None,
                         "dtype": "float32", "device": str(device), "quantized_linears": 0})
        return loaded, {"public_model": "derived off the 4-bit grid", **facts}
    if name == Q4:
        loaded = load_model(EMBEDDED, device=device, bits=bits)
        loaded.name, loaded.source = loaded.name + "-Q4_1", Q4
        return loaded, {"public_model": "embedded Q4_1 as shipped", "caveat": Q4_CAVEAT,
                        "key": f"{Q4}-as-shipped"}
    loaded = load_model(name, device=device, bits=bits)
    return loaded, {"public_model": "as loaded", "key": str(name)}
