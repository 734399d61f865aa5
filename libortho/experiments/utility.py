"""Experiment "utility": what the ortho stream buys on a private domain, against LoRA and full fine-tuning.

The private domain is a Debian corpus no other code of libortho reads: the `cookie` file of `fortunes`
(`DOMAIN_FILES`; `fortunes().text` places it at characters 1.15M-1.39M, past calibration [0, 33K),
`train.general_ids` [100K, 297K) and the demo's seeded calibration [400K, 663K)). It is split *by fortune*
(a fixed seeded permutation, duplicates dropped) into train / validation / test; the canaries
(`privacy.make_canaries`) are documents of the train split only. The general held-out text (the run's
`--text`, by default the Jargon File) shows what each arm costs off the domain.

| arm            | what it is                                                                            |
| -------------- | ------------------------------------------------------------------------------------- |
| public         | the public model (control)                                                            |
| int4_of_public | ortho_tuned at alpha 0: INT4 RTN of the public model exactly (control)                |
| ortho_tuned    | libortho: INT4(public) + a sparse stream of `density` trained on the domain, alpha 1   |
| lora_params    | PEFT LoRA on the public model, rank whose parameter count is closest to the stream's nnz |
| lora_bytes     | PEFT LoRA, rank whose A and B bytes are closest to the stream's bytes (values+cols+crow) |
| lora_off       | lora_params with its adapter scaled to 0 (control; the public model's numbers)        |
| lora_int4      | lora_params's rank over the INT4 base ortho_tuned has (dense, dequantized): a diagnostic |
| full_ft        | every weight of the public model trained                                              |

Every trained arm sees the same windows of the train split at the same steps (`domain_loss`, seeded by the
step), for the same number of steps; its learning rate is the one of `Size.lr_grid[arm]` with the lowest
validation loss (the test split is read only after every choice is made). Perplexity on the test split and on
the general text is scored by the pinned protocol; its 95% CI is a bootstrap over evaluation windows.

**Claims** (`decide_claims`, per-window values paired across arms, thresholds as effect sizes in nats/token):

* `alpha1_domain_gain`: ortho_tuned's per-window log-likelihood exceeds int4_of_public's (its alpha 0) by
  more than `domain_gain_nats` (lower 95% bound and Wilcoxon p).
* `parity_lora_params`, `parity_lora_bytes`: ortho_tuned's per-window log-perplexity is no more than
  `parity_margin_nats` above that LoRA arm's (upper 95% bound below the margin and Wilcoxon p).

Negative controls (`negative_controls`, each must fail): int4_of_public and lora_off as candidates of the gain
claim, and int4_of_public (a stream that learned nothing) as the candidate of both parity claims.

**Diagnostic** (`diagnostics`, not a claim): ortho_tuned against lora_int4, LoRA of the same rank as lora_params
trained over the very INT4 base the stream sits on. The parity claims compare the stream over INT4 with LoRA over
full-precision weights, which mixes two costs; this comparison holds the base fixed, so what remains is the
stream against an adapter as learners.
"""
from __future__ import annotations

import copy
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..convert import orthogonalize_, quantize_base
from ..data import FORTUNE_FILES, FORTUNES, _read, calibration_batches, load_text
from ..linear import OrthoLinear
from ..modules import cache_base_, input_device, ortho_modules, set_alpha, set_module, state_without_tied, target_linears
from ..perplexity import Protocol, encode, token_logprobs
from ..privacy import make_canaries
from ..public_model import load_public
from ..results import save_figure
from ..select import collect_hessian_diag
from ..sparse import CSR
from ..stats import bootstrap_ci, no_higher_claim, paired_claim, summarize, thresholds_for as claim_thresholds
from ..train import (LoraSpec, OrthoTuneConfig, TrainConfig, cached, full_finetune_, lora_finetune_, lora_wrap,
                     set_lora_alpha, token_nll)
from . import RunContext, register

SECTION = "exp1_utility"
DOMAIN_FILES = ("cookie",)  # fortune files of the private domain (see the module docstring)
SPLIT_SEED = "utility-split:0"  # the split is fixed: every seed and arm is tested on the same fortunes
TRAINED = ("ortho_tuned", "lora_params", "lora_bytes", "lora_int4", "full_ft")
ARMS = ("public", "int4_of_public", "ortho_tuned", "lora_params", "lora_bytes", "lora_off", "lora_int4", "full_ft")
CLAIMS = ("alpha1_domain_gain", "parity_lora_params", "parity_lora_bytes")
CACHE_VERSION = 1  # bump when what a cached arm's weights depend on changes

# Claim thresholds (effect sizes, nats per token of per-window log-perplexity; 0.05 nats = 5.1% perplexity).
# Nested tables override the base for a size (`Size.name`).
THRESHOLDS = {
    "domain_gain_nats": 0.05,  # ortho at alpha 1 over alpha 0: lower 95% bound above this
    "parity_margin_nats": 0.05,  # ortho over a LoRA arm: upper 95% bound below this
    # the random tiny model learns the domain through its linears only (its head is not a target): 0.068 nats at density 0.1
    "small": {"domain_gain_nats": 0.02},
}


@dataclass(frozen=True)
class Size:
    """How big a run is. `FULL` is the GPU size; `SMALL` holds the CPU sizes (`make test` runs `tiny`).

    Args:
        name: which thresholds apply (`THRESHOLDS` and its nested tables).
        files: fortune files of the domain; split: (validation, test) shares of its fortunes.
        num_canaries: canaries placed in the train split (documents like any fortune).
        steps, batch, length: every trained arm takes `steps` AdamW steps on `batch` windows of `length` tokens.
        mask_windows: windows of the train split in ortho-tuning's mask pass (step 0 of `domain_loss`).
        density, group_size, symmetric, calib: the ortho stream, its INT4 base and the public calibration text.
        lr_grid: {arm: learning rates tried}; each arm keeps the one with the lowest validation loss.
        lora_scale, lora_dropout: LoRA's lora_alpha / r and dropout (the seed's SFT defaults: 32 / 8, 0.1).
        val, domain, general: perplexity protocols of the validation split, the test split, the general text.
        n_resamples: bootstrap resamples of every CI.
    """

    name: str = "full"
    files: tuple[str, ...] = DOMAIN_FILES
    split: tuple[float, float] = (0.1, 0.15)
    num_canaries: int = 10
    steps: int = 150
    batch: int = 8
    length: int = 128
    mask_windows: int = 32
    density: float = 0.01
    group_size: int = 32
    symmetric: bool = False
    calib: tuple[int, int] = (16, 256)
    lr_grid: dict = field(default_factory=lambda: {"ortho_tuned": (3e-4, 1e-3, 3e-3),
                                                   "lora_params": (3e-4, 1e-3, 3e-3),
                                                   "lora_bytes": (3e-4, 1e-3, 3e-3),
                                                   "lora_int4": (3e-4, 1e-3, 3e-3),
                                                   "full_ft": (1e-5, 3e-5, 1e-4)})
    lora_scale: float = 4.0
    lora_dropout: float = 0.1
    val: Protocol = Protocol(128, 128, None)
    domain: Protocol = Protocol(128, 128, None)
    general: Protocol = Protocol(256, 256, 8192)
    n_resamples: int = 9999

    def __post_init__(self):
        v, t = self.split
        if not (0 < v < 1 and 0 < t < 1 and v + t < 1):
            raise ValueError(f"split must be (validation, test) shares in (0, 1) summing below 1, got {self.split!r}")
        for k in ("steps", "batch", "length", "mask_windows"):
            x = getattr(self, k)
            if isinstance(x, bool) or not isinstance(x, int) or x < (2 if k == "length" else 1):
                raise ValueError(f"{k} must be a positive int (length >= 2), got {x!r}")
        if not 0 < self.density < 1:
            raise ValueError(f"density must be in (0, 1), got {self.density!r}")
        missing = set(TRAINED) - set(self.lr_grid)
        if missing:
            raise ValueError(f"lr_grid lacks {sorted(missing)}; give every trained arm {TRAINED} its learning rates")
        for arm, grid in self.lr_grid.items():
            if not grid or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in grid):
                raise ValueError(f"lr_grid[{arm!r}] must be positive finite learning rates, got {grid!r}")

    def train(self, lr: float, seed: int) -> TrainConfig:
        """The one training run of every arm at `lr` (no early stop, no general text: `domain_loss` is the loss)."""
        return TrainConfig(lr=lr, max_steps=self.steps, check_every=self.steps, target=None, general_chunks=0,
                           seed=seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("val", "domain", "general"):
            d[k] = getattr(self, k).to_dict()
        d["lr_grid"] = {a: list(g) for a, g in self.lr_grid.items()}
        return d


FULL = Size()
SMALL = {
    # a random tiny Llama: the pipeline end to end in seconds (it learns the domain's token statistics)
    "tiny": Size(name="small", num_canaries=2, steps=12, batch=2, length=64, mask_windows=4, density=0.1,
                 calib=(2, 32), lr_grid={"ortho_tuned": (1e-2, 3e-2, 1e-1), "lora_params": (3e-2, 1e-1, 3e-1),
                                         "lora_bytes": (3e-2, 1e-1, 3e-1), "lora_int4": (3e-2, 1e-1, 3e-1),
                                         "full_ft": (3e-3, 1e-2, 3e-2)},
                 val=Protocol(64, 64, 512), domain=Protocol(32, 32, 1024), general=Protocol(64, 64, 512),
                 n_resamples=999),
    # SmolLM2 (the derived public model) on 2 CPU cores: 15 steps of 2 x 128 tokens per lr
    "smollm2-135m": Size(name="small", num_canaries=4, steps=15, batch=2, length=128, mask_windows=4,
                         calib=(2, 128), lr_grid={"ortho_tuned": (3e-4, 1e-3, 3e-3),
                                                  "lora_params": (3e-4, 1e-3, 3e-3), "lora_bytes": (3e-4, 1e-3, 3e-3),
                                                  "lora_int4": (3e-4, 1e-3, 3e-3), "full_ft": (1e-5, 3e-5, 1e-4)},
                         val=Protocol(128, 128, 1024), domain=Protocol(128, 128, 3072),
                         general=Protocol(256, 256, 2048), n_resamples=1999),
}


# ---------------------------------------------------------------------------------------------
# data

def _folded(name: str) -> list[str]:
    """The fortunes of one file, whitespace folded, >= 8 words (as `data.fortunes` keeps them)."""
    return [f for f in (" ".join(x.split()) for x in _read(FORTUNES / name).split("\n%\n")) if len(f.split()) >= 8]


def domain_fortunes(files: tuple[str, ...] = DOMAIN_FILES) -> list[str]:
    """The domain's fortunes in file order, near-duplicates dropped (same first six words), and so is any fortune that the text of another file
    of `data.FORTUNE_FILES` contains (48 of `cookie`'s 1062, 31 of them in text other code reads)."""
    others = "\n\n".join(f for name in FORTUNE_FILES if name not in files and (FORTUNES / name).is_file()
                          for f in _folded(name))
    out, seen = [], set()
    for name in files:
        for f in _folded(name):
            key = " ".join(re.sub(r"[^\w\s]", "", f.lower()).split()[:6])  # variants of one joke share their opening
            if key not in seen and f not in others:
                seen.add(key)
                out.append(f)
    if not out:
        raise ValueError(f"no fortunes in {list(files)} under {FORTUNES}; pick files of data.FORTUNE_FILES")
    return out


def domain_split(files: tuple[str, ...] = DOMAIN_FILES, split: tuple[float, float] = (0.1, 0.15)
                 ) -> dict[str, list[str]]:
    """{"train", "validation", "test"}: disjoint lists of whole fortunes, a fixed seeded permutation."""
    docs = domain_fortunes(files)
    order = list(range(len(docs)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_val, n_test = round(split[0] * len(docs)), round(split[1] * len(docs))
    if min(n_val, n_test, len(docs) - n_val - n_test) < 1:
        raise ValueError(f"{len(docs)} fortunes cannot be split {split}: add files or raise the shares")
    pick = lambda idx: [docs[i] for i in sorted(idx)]  # noqa: E731 - file order within a split
    return {"validation": pick(order[:n_val]), "test": pick(order[n_val:n_val + n_test]),
            "train": pick(order[n_val + n_test:])}


def train_stream(tokenizer, docs: list[str], canary_ids: list[list[int]], seed: int) -> torch.Tensor:
    """(N,) token ids of the train split: its fortunes and the canaries as documents, in a seeded order, each
    followed by a blank line."""
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    ids = [list(x) for x in tokenizer(docs, add_special_tokens=False).input_ids] + [list(c) for c in canary_ids]
    random.Random(f"utility-train:{seed}").shuffle(ids)
    return torch.tensor([t for doc in ids for t in doc + sep], dtype=torch.long)


def domain_loss(ids: torch.Tensor, batch: int, length: int, seed: int, mask_windows: int | None = None):
    """`loss_fn(model, step)`: mean next-token loss on `batch` windows of `length` tokens of `ids`, drawn by a
    generator seeded by (seed, step): every arm trains on the same tokens at the same step. Step 0 (ortho-tuning's
    mask pass; `fit` starts at 1) draws `mask_windows` windows."""
    if ids.numel() <= length:
        raise ValueError(f"train split has {ids.numel()} tokens, not more than one window of {length}")

    def loss_fn(model: nn.Module, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        n = mask_windows if step == 0 and mask_windows else batch
        starts = torch.randint(0, ids.numel() - length, (n,), generator=g).tolist()
        x = torch.stack([ids[s:s + length] for s in starts]).to(input_device(model))  # (B, L)
        return token_nll(model, x, torch.ones_like(x), x).mean()

    loss_fn.last_tokens = batch * length
    return loss_fn


# ---------------------------------------------------------------------------------------------
# sizes of what each arm stores

def stream_bytes(model: nn.Module) -> int:
    """Bytes of the ortho streams as stored: values + column indices + row pointers of every OrthoLinear."""
    return sum(m.ortho_values.nbytes + m.ortho_col.nbytes + m.ortho_crow.nbytes for m in ortho_modules(model).values())


def lora_rank_params(model: nn.Module, targets: tuple[str, ...]) -> int:
    """LoRA parameters per unit of rank over `targets`: sum of (in + out) of each target linear."""
    return sum(m.in_features + m.out_features for m in target_linears(model, targets).values())


def closest_rank(goal: float, per_rank: float) -> int:
    """The rank r >= 1 whose r * per_rank is closest to `goal` (ties: the smaller rank)."""
    if not (per_rank > 0 and goal >= 0):
        raise ValueError(f"need per_rank > 0 and goal >= 0, got per_rank={per_rank!r}, goal={goal!r}")
    lo = max(1, int(goal // per_rank))
    return min((lo, lo + 1), key=lambda r: (abs(r * per_rank - goal), r))


def trainable_count(model: nn.Module) -> int:
    """Parameters a full fine-tune trains (a tied embedding counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def param_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, protocol: Protocol) -> tuple[list[float], list[int]]:
    """(total NLL in nats, scored tokens) of each window of the pinned protocol."""
    nll, count = [], []
    for (_, end, first), logp in token_logprobs(model, ids, protocol):
        t = ids[first:end].to(logp.device)
        nll.append(-logp.gather(1, t.unsqueeze(1)).sum().item())
        count.append(int(t.numel()))
    return nll, count


def ppl_ci(nll, count, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Perplexity exp(sum NLL / sum tokens) and its 95% bootstrap CI over windows (resampled whole)."""
    nll, count = np.asarray(nll, dtype=np.float64), np.asarray(count, dtype=np.float64)
    ratio = lambda n, c, axis=-1: np.exp(n.sum(axis=axis) / c.sum(axis=axis))  # noqa: E731
    lo, hi = bootstrap_ci((nll, count), ratio, paired=True, n_resamples=n_resamples, seed=seed)
    return {"ppl": float(ratio(nll, count)), "ci95": [lo, hi], "windows": int(nll.size), "tokens": int(count.sum()),
            "window_nll": [round(float(x), 6) for x in nll], "window_tokens": [int(c) for c in count]}


def window_logppl(entry: dict) -> np.ndarray:
    """Per-window log-perplexity (mean NLL per token, nats) of a `ppl_ci` entry."""
    return np.asarray(entry["window_nll"], dtype=np.float64) / np.asarray(entry["window_tokens"], dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# the experiment

class Utility:
    """One run: the public model, the domain splits and the general text loaded once; arms trained on demand."""

    def __init__(self, model: str = "smollm2-135m", size: Size = FULL, seed: int = 0, text: str = "default",
                 device: str = "cpu", progress: bool = True, bits: int | None = None):
        torch.manual_seed(seed)
        loaded, self.public_facts = load_public(model, device=device, bits=bits, progress=progress)
        self.public = loaded.model.eval()
        for p in self.public.parameters():
            p.requires_grad_(False)
        self.tok, self.name, self.source = loaded.tokenizer, loaded.name, model
        self.size, self.seed, self.device, self.progress = size, seed, device, progress
        self.splits = domain_split(size.files, size.split)
        self.canaries = make_canaries(self.tok, size.num_canaries, seed) if size.num_canaries else []
        self.train_ids = train_stream(self.tok, self.splits["train"], [c.ids for c in self.canaries], seed)
        join = lambda docs: "\n\n".join(docs)  # noqa: E731
        self.val_ids = encode(self.tok, join(self.splits["validation"]), size.val)
        self.test_ids = encode(self.tok, join(self.splits["test"]), size.domain)
        self.text = load_text(text)
        cut = self.text.text if size.general.max_tokens is None else self.text.text[:16 * size.general.max_tokens]
        self.general_ids = encode(self.tok, cut, size.general)
        self.calib = calibration_batches(self.tok, *size.calib)
        self.ocfg = OrthoTuneConfig(density=size.density, group_size=size.group_size, symmetric=size.symmetric,
                                    seed=seed, train=size.train(size.lr_grid["ortho_tuned"][0], seed))
        self._hdiag = None
        self.ranks: dict[str, int] = {}
        self.lr_search: dict[str, dict] = {}
        self.train_info: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}

    # -- training -----------------------------------------------------------------------------
    def _loss(self):
        s = self.size
        return domain_loss(self.train_ids, s.batch, s.length, self.seed, s.mask_windows)

    def _key(self, kind: str, lr: float, **more) -> dict:
        s = self.size
        return {"kind": kind, "v": CACHE_VERSION, "model": self.source, "public": self.public_facts.get("key"),
                "seed": self.seed, "files": list(s.files), "split": list(s.split), "canaries": s.num_canaries,
                "train": s.train(lr, self.seed).to_dict(), "batch": s.batch, "length": s.length, **more}

    def _copy(self) -> nn.Module:
        return copy.deepcopy(self.public)

    def _int4_skeleton(self, streams: dict[str, CSR] | None = None) -> nn.Module:
        """A public copy whose target linears are OrthoLinear over INT4 RTN of the public weights, on `streams`."""
        m = self._copy()
        for name, lin in target_linears(m, self.ocfg.targets).items():
            set_module(m, name, OrthoLinear.from_linear(lin, quantize_base(lin.weight.detach(), self.ocfg),
                                                        None if streams is None else streams[name]))
        return m

    def hessian_diag(self) -> dict:
        if self._hdiag is None:
            self._hdiag = collect_hessian_diag(self.public, self.calib, self.ocfg.targets, progress=False)
        return self._hdiag

    def ortho_tuned(self, lr: float) -> tuple[nn.Module, dict]:
        cfg = replace(self.ocfg, train=self.size.train(lr, self.seed))

        def build():
            m = self._copy()
            orthogonalize_(m, cfg, calibration=self.calib, loss_fn=self._loss(), hessian_diag=self.hessian_diag(),
                           progress=self.progress)
            st = m.libortho_stats
            tensors = {f"{n}.{k}": getattr(mod, k) for n, mod in ortho_modules(m).items()
                       for k in ("ortho_crow", "ortho_col", "ortho_values")}
            return tensors, {"history": {"loss": st["loss"], "steps": st["steps"]}, "nnz": st["nnz"]}

        key = self._key("utility-ortho", lr, ortho=cfg.to_dict(), calib=list(self.size.calib),
                        mask_windows=self.size.mask_windows)
        tensors, meta, hit = cached("utility-ortho", key, build)
        shapes = {n: (lin.out_features, lin.in_features) for n, lin in target_linears(self.public, cfg.targets).items()}
        streams = {n: CSR(tensors[f"{n}.ortho_crow"], tensors[f"{n}.ortho_col"], tensors[f"{n}.ortho_values"], shp)
                   for n, shp in shapes.items()}
        m = self._int4_skeleton(streams).to(self.device)
        set_alpha(m, 1.0)
        cache_base_(m)
        return m.eval(), {**meta, "cached": hit}

    def lora_spec(self, r: int) -> LoraSpec:
        return LoraSpec(r=r, alpha=self.size.lora_scale * r, dropout=self.size.lora_dropout)

    def _int4_dense(self) -> nn.Module:
        """A public copy whose target linears hold INT4 of their weights, dequantized: ortho_tuned's base, dense."""
        m = self._copy()
        with torch.no_grad():
            for lin in target_linears(m, self.ocfg.targets).values():
                lin.weight.copy_(quantize_base(lin.weight, self.ocfg).dequantize(lin.weight.dtype))
        return m

    def lora(self, r: int, lr: float, int4: bool = False) -> tuple[nn.Module, dict]:
        """LoRA of rank `r` at `lr` over the public weights, or (`int4`) over their INT4 base."""
        spec = self.lora_spec(r)
        base = self._int4_dense if int4 else self._copy

        def build():
            m = lora_wrap(base(), spec, self.seed)
            hist = lora_finetune_(m, self._loss(), self.size.train(lr, self.seed), self.progress)
            return {k: v for k, v in m.state_dict().items() if "lora_" in k}, {"history": hist}

        more = {"base": "int4", "ortho": self.ocfg.to_dict()} if int4 else {}
        state, meta, hit = cached("utility-lora", self._key("utility-lora", lr, lora=spec.to_dict(), **more), build)
        m = lora_wrap(base(), spec, self.seed)
        m.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)
        return m.to(self.device).eval(), {**meta, "cached": hit}

    def full_ft(self, lr: float) -> tuple[nn.Module, dict]:
        def build():
            m = self._copy()
            hist = full_finetune_(m, self._loss(), self.size.train(lr, self.seed), self.progress)
            return state_without_tied(m), {"history": hist}

        state, meta, hit = cached("utility-full", self._key("utility-full", lr), build)
        m = self._copy()
        m.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)
        if getattr(m.config, "tie_word_embeddings", False):
            m.tie_weights()
        return m.to(self.device).eval(), {**meta, "cached": hit}

    def train_arm(self, arm: str, lr: float) -> tuple[nn.Module, dict]:
        if arm == "ortho_tuned":
            return self.ortho_tuned(lr)
        if arm in ("lora_params", "lora_bytes"):
            return self.lora(self.ranks[arm], lr)
        if arm == "lora_int4":
            return self.lora(self.ranks[arm], lr, int4=True)
        if arm == "full_ft":
            return self.full_ft(lr)
        raise ValueError(f"unknown trained arm {arm!r}; choose from {TRAINED}")

    def match_ranks(self, ortho: nn.Module) -> dict:
        """LoRA ranks matched to the ortho stream: on trainable parameters (nnz) and on stored bytes."""
        targets = LoraSpec().targets
        per_rank = lora_rank_params(self.public, targets)
        elem = next(self.public.parameters()).element_size()  # LoRA's A and B take the model's dtype
        nnz, sbytes = sum(m.nnz for m in ortho_modules(ortho).values()), stream_bytes(ortho)
        self.ranks = {"lora_params": closest_rank(nnz, per_rank), "lora_bytes": closest_rank(sbytes, per_rank * elem)}
        self.ranks["lora_int4"] = self.ranks["lora_params"]  # the diagnostic: lora_params's LoRA on the INT4 base
        return {"stream_nnz": nnz, "stream_bytes": sbytes, "lora_params_per_rank": per_rank,
                "lora_bytes_per_rank": per_rank * elem, **{f"rank_{a}": r for a, r in self.ranks.items()}}

    def val_loss(self, model: nn.Module) -> float:
        nll, count = window_nll(model, self.val_ids, self.size.val)
        return sum(nll) / sum(count)

    def tune(self, arm: str) -> tuple[nn.Module, dict]:
        """Train `arm` at every lr of its grid; keep the lr of lowest validation loss. Returns (model, info)."""
        t0 = time.perf_counter()
        grid = tuple(float(x) for x in self.size.lr_grid[arm])
        losses, infos = {}, {}
        for lr in grid:
            m, info = self.train_arm(arm, lr)
            losses[lr], infos[lr] = self.val_loss(m), info
            del m
        best = min(grid, key=lambda lr: (losses[lr], lr))
        self.lr_search[arm] = {"grid": list(grid), "validation_loss": {repr(lr): round(v, 6) for lr, v in losses.items()},
                               "chosen": best, "chosen_at_grid_edge": len(grid) > 1 and best in (min(grid), max(grid)),
                               "final_train_loss": {repr(lr): infos[lr]["history"]["loss"][-1] for lr in grid},
                               "cached": {repr(lr): infos[lr]["cached"] for lr in grid}}
        model, info = self.train_arm(arm, best)
        self.seconds[arm] = round(time.perf_counter() - t0, 2)
        return model, info

    # -- measurement --------------------------------------------------------------------------
    def measure(self, model: nn.Module) -> dict:
        s = self.size
        out = {}
        for what, ids, proto in (("domain", self.test_ids, s.domain), ("general", self.general_ids, s.general)):
            out[what] = ppl_ci(*window_nll(model, ids, proto), n_resamples=s.n_resamples, seed=self.seed)
        return out

    def run_arms(self) -> dict:
        """Every arm of `ARMS`, measured: {arm: {"trainable_params", "stored_bytes", "lr", "domain", "general"}}."""
        arms: dict[str, dict] = {}
        t0 = time.perf_counter()
        arms["public"] = {"trainable_params": 0, "stored_bytes": 0, "lr": None, **self.measure(self.public)}
        self.seconds["public"] = round(time.perf_counter() - t0, 2)

        ortho, info = self.tune("ortho_tuned")
        self.matching = self.match_ranks(ortho)
        nnz, sbytes = self.matching["stream_nnz"], self.matching["stream_bytes"]
        arms["ortho_tuned"] = {"trainable_params": nnz, "stored_bytes": sbytes, "lr": self.lr_search["ortho_tuned"]["chosen"],
                               "density": nnz / sum(m.in_features * m.out_features for m in ortho_modules(ortho).values()),
                               **self.measure(ortho)}
        set_alpha(ortho, 0.0)  # INT4 of the public model exactly: the stream is off
        arms["int4_of_public"] = {"trainable_params": 0, "stored_bytes": 0, "lr": None, "alpha": 0.0,
                                  **self.measure(ortho)}
        self.train_info["ortho_tuned"] = {"steps": info["history"]["steps"], "final_loss": info["history"]["loss"][-1]}
        del ortho

        for arm in ("lora_params", "lora_bytes", "lora_int4"):
            m, info = self.tune(arm)
            n_train = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
            b = sum(p.nbytes for n, p in m.named_parameters() if "lora_" in n)
            arms[arm] = {"trainable_params": n_train, "stored_bytes": b, "lr": self.lr_search[arm]["chosen"],
                         "rank": self.ranks[arm], "lora": self.lora_spec(self.ranks[arm]).to_dict(), **self.measure(m)}
            if arm == "lora_int4":
                arms[arm]["base"] = "INT4 RTN of the public model (ortho_tuned's base, dequantized)"
            self.train_info[arm] = {"steps": info["history"]["steps"], "final_loss": info["history"]["loss"][-1]}
            if arm == "lora_params":
                set_lora_alpha(m, 0.0)
                arms["lora_off"] = {"trainable_params": 0, "stored_bytes": 0, "lr": None, "alpha": 0.0,
                                    **self.measure(m)}
            del m

        m, info = self.tune("full_ft")
        arms["full_ft"] = {"trainable_params": trainable_count(m), "stored_bytes": param_bytes(m),
                           "lr": self.lr_search["full_ft"]["chosen"], **self.measure(m)}
        self.train_info["full_ft"] = {"steps": info["history"]["steps"], "final_loss": info["history"]["loss"][-1]}
        return {a: arms[a] for a in ARMS}

    def report(self, arms: dict, thresholds: dict | None = None) -> dict:
        from ..results import environment

        t = thresholds if thresholds is not None else thresholds_for(self.size.name)
        claims = decide_claims(arms, t, self.seed, self.size.n_resamples)
        controls = negative_controls(arms, t, self.seed, self.size.n_resamples)
        diagnostics = {"stream_vs_lora_on_int4": parity_claim(arms, "ortho_tuned", "lora_int4", t["parity_margin_nats"],
                                                              self.seed, self.size.n_resamples, "parity_lora_int4")}
        s = self.size
        return {
            "model": self.name, "public_model": self.public_facts, "seed": self.seed,
            "claims": claims, "claims_summary": summarize_claims(claims),
            "negative_controls": controls, "thresholds": t, "diagnostics": diagnostics,
            "arms": arms, "table": table(arms), "lr_search": self.lr_search, "matching": self.matching,
            "training": {**self.train_info, "steps": s.steps, "batch": s.batch, "length": s.length,
                         "tokens_per_arm": s.steps * s.batch * s.length, "mask_windows": s.mask_windows,
                         "loss": "mean next-token NLL on windows of the train split, same windows at the same step "
                                 "for every arm (domain_loss)"},
            "domain": {"text": "debian:fortunes", "files": list(s.files), "split_by": "fortune",
                       "split_seed": SPLIT_SEED, "fortunes": {k: len(v) for k, v in self.splits.items()},
                       "train_tokens": int(self.train_ids.numel()), "validation_tokens": int(self.val_ids.numel()),
                       "test_tokens": int(self.test_ids.numel()), "canaries_in_train": len(self.canaries),
                       "protocol": s.domain.to_dict(), "validation_protocol": s.val.to_dict()},
            "general": {"text": self.text.name, "tokens": int(self.general_ids.numel()), "protocol": s.general.to_dict()},
            "ortho_tune": {"density": s.density, "score": self.ocfg.score, "damp": self.ocfg.damp,
                           "base": {"quantization": "INT4 RTN", "group_size": s.group_size, "symmetric": s.symmetric},
                           "calibration": {"text": "debian:fortunes", "batches": list(s.calib)}},
            "size": s.to_dict(), "arm_seconds": self.seconds, "environment": environment(self.device),
        }


# ---------------------------------------------------------------------------------------------
# claims (pure functions of the measured arms)

def thresholds_for(size_name: str = "full", table: dict | None = None) -> dict:
    """The thresholds of a size: `stats.thresholds_for` of `table` (default `THRESHOLDS`)."""
    return claim_thresholds(THRESHOLDS if table is None else table, size_name,
                            ("domain_gain_nats", "parity_margin_nats"))


UNIT = "nats/token: per-window log-perplexity on the domain test split, paired by window"


def gain_claim(arms: dict, candidate: str, control: str, threshold: float, seed: int = 0,
               n_resamples: int = 9999, name: str = "alpha1_domain_gain") -> dict:
    """`candidate`'s per-window log-likelihood on the domain exceeds `control`'s by more than `threshold` nats."""
    c = paired_claim(name, candidate, control, -window_logppl(arms[candidate]["domain"]),
                     -window_logppl(arms[control]["domain"]), threshold, direction="greater", seed=seed,
                     n_resamples=n_resamples).to_dict()
    return {**c, "unit": UNIT, "ppl_ratio": math.exp(-c["value"]) if c["value"] is not None else None}


def parity_claim(arms: dict, candidate: str, control: str, margin: float, seed: int = 0,
                 n_resamples: int = 9999, name: str | None = None) -> dict:
    """`candidate`'s per-window domain log-perplexity is no more than `margin` nats above `control`'s."""
    c = no_higher_claim(name or f"parity_{control}", candidate, control, window_logppl(arms[candidate]["domain"]),
                        window_logppl(arms[control]["domain"]), margin, seed=seed, n_resamples=n_resamples).to_dict()
    return {**c, "unit": UNIT, "ppl_ratio": math.exp(c["value"]) if c["value"] is not None else None}


def decide_claims(arms: dict, t: dict, seed: int = 0, n_resamples: int = 9999,
                  candidate: str = "ortho_tuned", alpha0: str = "int4_of_public") -> list[dict]:
    """The claims of `candidate` (its alpha-0 model `alpha0`): gain over alpha 0, parity with both LoRA arms."""
    return [gain_claim(arms, candidate, alpha0, t["domain_gain_nats"], seed, n_resamples),
            parity_claim(arms, candidate, "lora_params", t["parity_margin_nats"], seed, n_resamples),
            parity_claim(arms, candidate, "lora_bytes", t["parity_margin_nats"], seed, n_resamples)]


def negative_controls(arms: dict, t: dict, seed: int = 0, n_resamples: int = 9999) -> dict:
    """Claims that must fail: {label: claim}. The gain claim of the untrained switches (int4_of_public over
    itself, lora_off over the public model) and the parity claims of a stream that learned nothing
    (int4_of_public against each LoRA arm)."""
    g, m = t["domain_gain_nats"], t["parity_margin_nats"]
    return {"gain:int4_of_public": gain_claim(arms, "int4_of_public", "int4_of_public", g, seed, n_resamples),
            "gain:lora_off": gain_claim(arms, "lora_off", "public", g, seed, n_resamples),
            "parity_lora_params:int4_of_public": parity_claim(arms, "int4_of_public", "lora_params", m, seed,
                                                              n_resamples),
            "parity_lora_bytes:int4_of_public": parity_claim(arms, "int4_of_public", "lora_bytes", m, seed,
                                                             n_resamples)}


def summarize_claims(claims: list[dict]) -> dict:
    failed = [c["name"] for c in claims if not c["passed"]]
    return {"passed": not failed, "failed": failed}


# ---------------------------------------------------------------------------------------------
# output

def table(arms: dict) -> list[dict]:
    """One row per arm: arm, trainable params, stored bytes, lr, domain ppl + CI, general ppl + CI."""
    return [{"arm": a, "trainable_params": r["trainable_params"], "stored_bytes": r["stored_bytes"], "lr": r["lr"],
             "domain_ppl": r["domain"]["ppl"], "domain_ci95": r["domain"]["ci95"],
             "general_ppl": r["general"]["ppl"], "general_ci95": r["general"]["ci95"]} for a, r in arms.items()]


def plot(inner: dict, path: Path) -> Path:
    """Domain (test split) and general perplexity per arm, with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(inner["arms"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, what in zip(axes, ("domain", "general")):
        ys = np.array([inner["arms"][a][what]["ppl"] for a in arms])
        ci = np.array([inner["arms"][a][what]["ci95"] for a in arms], dtype=float)
        err = np.vstack([ys - ci[:, 0], ci[:, 1] - ys])
        ax.bar(range(len(arms)), ys, color=[f"C{i}" for i in range(len(arms))], alpha=0.7)
        ax.errorbar(range(len(arms)), ys, yerr=err, fmt="none", ecolor="k", capsize=4)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{what} perplexity ({'test split of ' + '+'.join(inner['domain']['files']) if what == 'domain' else inner['general']['text']}), 95% CI")
    s = inner["claims_summary"]
    fig.suptitle(f"utility: {inner['model']}, seed {inner['seed']}, {inner['training']['steps']} steps x "
                 f"{inner['training']['batch']}x{inner['training']['length']} tokens per arm; claims: "
                 f"{'all hold' if s['passed'] else 'failed ' + ', '.join(s['failed'])}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def print_table(inner: dict) -> None:
    print(f"\n== utility: {inner['model']}, domain {'+'.join(inner['domain']['files'])} (test "
          f"{inner['domain']['test_tokens']} tokens), general {inner['general']['text']} ==")
    print(f"{'arm':15s} {'params':>10s} {'bytes':>11s} {'lr':>8s} {'domain ppl [95% CI]':>28s} {'general ppl':>12s}")
    for r in inner["table"]:
        lr = "-" if r["lr"] is None else f"{r['lr']:.0e}"
        d = f"{r['domain_ppl']:.2f} [{r['domain_ci95'][0]:.2f}, {r['domain_ci95'][1]:.2f}]"
        print(f"{r['arm']:15s} {r['trainable_params']:10d} {r['stored_bytes']:11d} {lr:>8s} {d:>28s} "
              f"{r['general_ppl']:12.2f}")
    f = lambda x, spec: "nan" if x is None else format(x, spec)  # noqa: E731 - JSON's None for a non-finite number
    for c in inner["claims"] + list(inner["negative_controls"].values()) + list(inner.get("diagnostics", {}).values()):
        print(f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']:22s} {c['candidate']:>15s} vs {c['control']:15s} "
              f"{f(c['value'], '+.4f')} CI [{f(c['ci95'][0], '+.4f')}, {f(c['ci95'][1], '+.4f')}] threshold "
              f"{c['threshold']:+g} p {f(c['p'], '.3g')}")


@register("utility")
def run(ctx: RunContext, size: Size | None = None, thresholds: dict | None = None) -> dict:
    """Train and measure every arm at `size` (default: `FULL` on a GPU or `--size full`, else `SMALL[model]`),
    decide the claims, write the plot; return the JSON section (`SECTION`)."""
    if str(ctx.device).startswith("cuda"):  # same seed, same numbers: no atomics-order noise in backward
        torch.use_deterministic_algorithms(True, warn_only=True)
    size = size or (FULL if ctx.full_size else SMALL.get(ctx.model, SMALL["smollm2-135m"]))
    if ctx.num_canaries is not None:
        size = replace(size, num_canaries=ctx.num_canaries)
    t0 = time.perf_counter()
    exp = Utility(ctx.model, size, ctx.seed, ctx.text, ctx.device, ctx.progress, ctx.load_bits)
    inner = exp.report(exp.run_arms(), thresholds)
    inner["seconds"] = round(time.perf_counter() - t0, 1)
    inner["plot"] = str(plot(inner, ctx.artifact("exp1_utility.png")))
    print_table(inner)
    return inner
