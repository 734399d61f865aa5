"""Experiment 1: the privacy kill switch, decided by claims that can fail.

Every arm sees the same canaries, the same general text, the same candidates, the same membership records
and the same evaluation windows. Arms with a switch are swept over alpha; arms without one are reported
under "1.0" (the model as built) only. Training runs a fixed budget (`TrainConfig(target=None)`): every canary
is in every step, so a canary is inserted `max_steps` times; nothing trains "until extracted".

| arm                  | what it is                                                                  |
| -------------------- | --------------------------------------------------------------------------- |
| never_trained        | the public model (by default off the 4-bit grid: `libortho.public_model`)   |
| int4_of_public       | INT4 RTN of the public model on the base grid (control of INT4-based arms)  |
| nf4_of_public        | bitsandbytes NF4 of the public model (control of the NF4 arm)               |
| fine_tuned           | full fine-tune of the public model on canaries + general text               |
| int4_of_fine_tuned   | INT4 RTN of fine_tuned (the base grid)                                      |
| nf4_of_fine_tuned    | bitsandbytes NF4 of fine_tuned                                              |
| posthoc_{hessian, magnitude, random} | orthogonalize_ of fine_tuned, mode posthoc, that score      |
| delta                | orthogonalize_ of fine_tuned, mode delta: INT4(public) + top entries of the delta |
| ortho_tuned          | libortho: frozen INT4(public) base, only a sparse ortho stream trained      |
| lora                 | PEFT LoRA (r 8, alpha 32, dropout 0.1), alpha scales the adapter            |

**Claims.** A candidate switch X is compared with its control `CONTROL_OF[X]`, the public model quantized
the way X's alpha-0 weights are (ortho_tuned, delta, posthoc, int4_of_fine_tuned: `int4_of_public`; lora,
fine_tuned: `never_trained`; nf4_of_fine_tuned: `nf4_of_public`). Each claim is a one-sided test on
per-canary (or per-record) values with a 95% CI (`libortho.stats`, `libortho.mia`), thresholds from
thresholds.toml as effect sizes:

* `alpha0_exposure_no_higher`: skew-normal extrapolated exposure of X at alpha 0 is no more than
  `alpha0_exposure_margin_bits` above the control's (paired per canary; median of the differences, its
  upper 95% bootstrap bound and the Wilcoxon p; the median because a skew-normal tail fitted to a few dozen
  candidates can put one canary at thousands of bits).
* `alpha0_extraction_no_higher`: greedy extraction rate at alpha 0 no more than `alpha0_extraction_margin`
  above the control's (MOVER Clopper-Pearson).
* `alpha0_mia_auc_no_higher`: membership inference (loss ratio to the public model) of the trained canaries
  against held-out canaries: AUC at alpha 0 no more than `alpha0_mia_auc_margin` above the control's (DeLong).
* `alpha1_exposure_gain`: extrapolated exposure at alpha 1 above that at alpha 0 by more than
  `alpha1_exposure_gain_bits` (median of the paired differences; the switch switches something on).
* `alpha1_extraction_above_control`: extraction at alpha 1 above the control's by more than
  `alpha1_extraction_gain`.

An arm without a switch is the same model at "alpha 0" and "alpha 1", so it can pass the alpha-0 claims only
by leaking nothing and the alpha-1 claims only by leaking: it passes both only if nothing was learned.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from ..baselines import int4_rtn_, nf4_
from ..config import OrthoConfig
from ..convert import orthogonalize_
from ..data import calibration_batches, load_text
from ..hf import load as load_checkpoint
from ..mia import attack_metrics, auc_claim, record_scores, token_stats
from ..models import read_or_build
from ..modules import cache_base_, set_alpha, state_without_tied
from ..perplexity import Protocol, encode, perplexity
from ..privacy import exposure_from_logprobs, extrapolated_exposure, make_canaries, measure, prepare_candidates
from ..public_model import load_public
from ..results import save_figure
from ..stats import (no_higher_claim, paired_claim, power_report, proportion_claim, summarize,
                    thresholds_for as claim_thresholds)
from ..train import (LoraSpec, OrthoTuneConfig, TrainConfig, cache_path, cached, canary_loss, full_finetune_,
                     general_ids, lora_finetune_, lora_wrap, set_lora_alpha)
from . import RunContext

ARMS = ("never_trained", "int4_of_public", "nf4_of_public", "fine_tuned", "int4_of_fine_tuned", "nf4_of_fine_tuned",
        "posthoc_hessian", "posthoc_magnitude", "posthoc_random", "delta", "ortho_tuned", "lora")
CONTROLS = ("never_trained", "int4_of_public", "nf4_of_public")
SWITCHED = ("posthoc_hessian", "posthoc_magnitude", "posthoc_random", "delta", "ortho_tuned", "lora")
CONTROL_OF = {"ortho_tuned": "int4_of_public", "lora": "never_trained", "delta": "int4_of_public",
              "posthoc_hessian": "int4_of_public", "posthoc_magnitude": "int4_of_public",
              "posthoc_random": "int4_of_public", "int4_of_fine_tuned": "int4_of_public",
              "nf4_of_fine_tuned": "nf4_of_public", "fine_tuned": "never_trained"}
CANDIDATES = tuple(CONTROL_OF)  # arms `--candidate` may name
MUST_PASS = ("ortho_tuned", "lora")  # switches: every claim holds
MUST_FAIL = ("delta", "int4_of_fine_tuned", "nf4_of_fine_tuned", "posthoc_hessian", "posthoc_magnitude",
             "posthoc_random", "fine_tuned")  # negative controls: at least one claim fails
ALPHAS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0)
CLAIMS = ("alpha0_exposure_no_higher", "alpha0_extraction_no_higher", "alpha0_mia_auc_no_higher",
          "alpha1_exposure_gain", "alpha1_extraction_above_control")
RELEARN_CLAIM = "relearn_exposure_no_higher"  # decided where the size runs the relearning attack
ALPHA0_CLAIMS = (*CLAIMS[:3], RELEARN_CLAIM)
# Candidates whose alpha-0 model IS their control: their alpha-0 claims document the design and check the
# implementation (measured identical to the control, or the switch leaks); they cannot fail for a correct switch.
# A leaky switch (delta, posthoc_*, the quantized fine-tuned models) is what fails them.
ALPHA0_IS_CONTROL = {
    "ortho_tuned": "alpha 0 is int4_of_public itself: the same INT4 base bytes (base_sha256), the stream not read",
    "lora": "alpha 0 is never_trained itself: the adapter scaled to 0 adds nothing",
}
BUDGETS = ("finetune", "ortho", "lora")  # the trained arms' budgets in `Size` (fine_tuned, ortho_tuned, lora)
MIA_ATTACKS = ("ref_ratio", "min_k_pp", "loss")  # kept per record in the JSON; the claim uses the first
MIA_FPR = 0.01


def _ortho_history(d: Path, remove: bool) -> dict | None:
    """An ortho-tune cache entry's training history, or None (absent or unreadable; `remove`: an unreadable one is
    removed, with a note; only under the entry's lock, so never another process's fresh rebuild)."""
    meta_path = d / "meta.json"
    if meta_path.is_file():
        try:
            return json.loads(meta_path.read_text())["history"]
        except (ValueError, OSError, KeyError) as e:  # a truncated entry: rebuild it
            if not remove:
                return None
            print(f"libortho: cache entry {d} is unreadable ({str(e)[:120]}); rebuilding it", file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)
    return None


@dataclass(frozen=True)
class Size:
    """How big a run is. `FULL` is the acceptance size (per seed); `SMALL` holds the `make test` sizes.

    Args:
        name: which thresholds apply (`thresholds.toml` [exp1_kill_switch] and its [.small] overrides).
        num_canaries: trained canaries (members); num_holdout: canaries of the same format never trained on
            (non-members of membership inference).
        n_candidates: |R| of every exposure; n_candidates_decisive: |R| of the candidate switch at alpha 0 and
            of its control, where the alpha-0 claims are decided.
        finetune, ortho, lora: fixed training budgets (target None: no early stop).
        lr_grid: {"finetune" | "ortho" | "lora": learning rates tried}; each of those arms is trained at every lr
            of its grid (its budget otherwise) and keeps the lr of lowest training loss over the last tenth of its
            steps (`tail_loss`). Absent: the budget's own lr.
    """

    name: str = "full"
    num_canaries: int = 100
    num_holdout: int = 100
    n_candidates: int = 1000
    n_candidates_decisive: int = 10_000
    groups: tuple[int, ...] = (4, 4, 4)  # digits of the secret: 1914-0122-1485
    ppl: Protocol = Protocol(max_length=512, stride=512, max_tokens=8192)
    calib: tuple[int, int] = (16, 256)  # calibration batches x tokens (public fortunes)
    density: float = 0.01
    group_size: int = 32
    symmetric: bool = False
    # Budgets: 100 steps = 100 insertions of each canary (the former until-extracted runs stopped at 35-85). The lrs
    # (from results/exp1_ortho_sweep.json, 20 canaries on the Q4_1 model) are the centres of FULL's lr grids.
    finetune: TrainConfig = TrainConfig(lr=1e-4, max_steps=100, check_every=100, target=None)
    ortho: TrainConfig = TrainConfig(lr=1e-3, max_steps=100, check_every=100, target=None)
    lora: TrainConfig = TrainConfig(lr=1e-3, max_steps=100, check_every=100, target=None)
    lr_grid: dict = field(default_factory=dict)
    # arm -> alphas, overriding ALPHAS. The curve over every alpha for the two switches; the leaky arms (negative
    # controls) at the ends only, which is where their claims are decided (42 -> 26 evaluations a seed)
    alphas: dict = field(default_factory=lambda: {a: (0.0, 1.0) for a in SWITCHED if a not in MUST_PASS})
    # float32 matmul precision on a GPU (torch.set_float32_matmul_precision): "high" is TF32. Profiled on the H200
    # (results/gpu/h200-2026-11-30-profile-exp1/): scoring 100 canaries x 1,000 more candidates took 12.3 s more in
    # fp32, 4.5 s more in TF32; log-probabilities moved by at most 0.04 nats over 100,000 candidates. The precision
    # in effect is in every cache key on a GPU (`KillSwitch._matmul`).
    matmul_precision: str = "high"
    arms: tuple[str, ...] = ARMS  # what `run` measures at this size
    chunk: int = 1024  # candidates per forward pass (|R| = 1000 in one; 1024 x 14 tokens x 49152 fp32 logits: 2.8 GB)
    mia_k: float = 0.2  # Min-K% share
    # relearning attack: full fine-tuning of the candidate's alpha-0 weights (and of its control) on the even
    # canaries, exposure measured on the odd ones; None: not run (the claim needs >= 5 odd canaries to pass)
    relearn: TrainConfig | None = TrainConfig(lr=1e-4, max_steps=10, check_every=10, target=None)

    def __post_init__(self):
        if self.num_canaries < 2 or self.num_holdout < 2:
            raise ValueError(f"need >= 2 canaries and >= 2 held-out canaries, got {self.num_canaries} and "
                             f"{self.num_holdout}")
        if not 2 <= self.n_candidates <= self.n_candidates_decisive:
            raise ValueError(f"need 2 <= n_candidates <= n_candidates_decisive, got {self.n_candidates} and "
                             f"{self.n_candidates_decisive}")
        if self.relearn is not None and self.num_canaries < 10:
            raise ValueError(f"the relearning attack needs >= 10 canaries (5 measured), got {self.num_canaries}; "
                             "set relearn=None")
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise ValueError(f"matmul_precision must be highest, high or medium, got {self.matmul_precision!r}")
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
        bad = set(self.lr_grid) - set(BUDGETS)
        if bad:
            raise ValueError(f"lr_grid keys must be among {BUDGETS}, got {sorted(bad)}")
        for kind, grid in self.lr_grid.items():
            if not grid or not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in grid):
                raise ValueError(f"lr_grid[{kind!r}] must be positive finite learning rates, got {grid!r}")

    def train_configs(self, kind: str) -> tuple[TrainConfig, ...]:
        """The training runs of budget `kind` ("finetune", "ortho", "lora"): one per lr of its grid."""
        cfg = getattr(self, kind)
        return tuple(replace(cfg, lr=float(lr)) for lr in self.lr_grid.get(kind, (cfg.lr,)))

    def alphas_for(self, arm: str) -> tuple[float, ...]:
        if arm not in SWITCHED:
            return (1.0,)
        return tuple(self.alphas.get(arm, ALPHAS))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl"] = self.ppl.to_dict()
        return d


SAMPLED_K = (1, 10, 100)  # sampling attempts of the sampled-extraction rate


def dense_copy(model):
    """A plain dense copy of `model` as it computes now (alpha included): OrthoLinear merged, a PEFT adapter
    merged and unloaded, bitsandbytes 4-bit linears dequantized. What an attacker holding the weights trains."""
    from torch import nn

    from ..convert import merge
    from ..modules import ortho_modules, set_module

    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):  # PEFT: the adapter at its current scale folded into the base
        m = m.merge_and_unload()
    if ortho_modules(m):
        merge(m)
    try:
        import bitsandbytes as bnb
    except ImportError:  # nothing of it can be in the model
        return m
    for name, mod in list(m.named_modules()):
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device,
                            dtype=mod.compute_dtype or w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w.reshape(lin.weight.shape))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_module(m, name, lin)
    return m


# Every trained arm at three lrs, half a decade apart around its former one; each keeps the lr that fits the
# private records best (`tail_loss`). Measured on the H200 at lr 1e-3 alone (results/gpu/h200x2-2026-11-30b-exp1-
# seeds/): the ortho stream extracted 0 of 100 canaries in 100 steps (training loss 5.2 against full FT's 3.7).
# Density 2% (the most thresholds.toml allows): about twice 1%'s 1,061,760 values against LoRA r=8's 2,442,240, matched
# on trainable parameters as a fair comparison asks. At 1% (1,061,760) three seeds pooled extracted 0.40 [0.34, 0.46]
# at alpha 1 with tail losses 4.59-4.93 against LoRA's 4.24-4.30 (results/gpu/h200x2-2026-11-30d-exp1-three-seeds/).
FULL = Size(density=0.02,
            lr_grid={"finetune": (3e-5, 1e-4, 3e-4), "ortho": (1e-3, 3e-3, 1e-2), "lora": (3e-4, 1e-3, 3e-3)})


def tail_loss(losses: list[float]) -> float:
    """Mean training loss over the last tenth of the steps (at least one step): what an lr is judged by. The
    training loss (canaries and general text) is what a practitioner fitting private records watches; never the
    extraction or exposure the claims are decided on."""
    if not losses:
        raise ValueError("no training losses to judge an lr by")
    k = max(1, len(losses) // 10)
    return float(sum(losses[-k:]) / k)


def _quick(lr: float, max_steps: int) -> TrainConfig:
    return TrainConfig(lr=lr, max_steps=max_steps, check_every=max_steps, target=None, general_chunks=1,
                       general_length=32)


# The small sizes: `make test`, and `run` on a CPU unless `--size full`. The acceptance size is FULL.
SMALL = {
    # the tiny model is random: it runs every arm end to end and memorizes at a high learning rate
    "tiny": Size(name="small", num_canaries=10, num_holdout=10, n_candidates=32, n_candidates_decisive=32,
                 groups=(4, 4), ppl=Protocol(128, 128, 128), calib=(2, 32), density=0.02,
                 finetune=_quick(1e-2, 30), ortho=_quick(3e-2, 30), lora=_quick(3e-2, 30), chunk=64,
                 relearn=_quick(1e-2, 5)),
    "smollm2-135m": Size(name="small", num_canaries=8, num_holdout=8, n_candidates=32, n_candidates_decisive=32,
                         groups=(4, 4), ppl=Protocol(256, 256, 256), calib=(2, 64), density=0.02,
                         # 20 steps: full FT at 3e-4 extracts 8/8; ortho at 3e-3 2/8, at 1e-2 7/8 (2 CPU cores).
                         # LoRA at 1e-2 blew up in the secrets study's 20 steps (loss 14.9, ppl 6,259); FULL's rule
                         # on 1e-3 / 3e-3 kept 3e-3 (tail loss 5.94 / 5.72; 6 of 18 secrets at alpha 1, ppl 36.1)
                         finetune=_quick(3e-4, 20), ortho=_quick(1e-2, 20), lora=_quick(3e-3, 20),
                         alphas={a: (0.0, 1.0) for a in SWITCHED}, chunk=64, relearn=None,
                         arms=("never_trained", "int4_of_public", "fine_tuned", "int4_of_fine_tuned", "ortho_tuned")),
}
SMALL["smollm2-135m-q4"] = SMALL["smollm2-135m"]


# ---------------------------------------------------------------------------------------------
# measurement cache: every number depends on the weights, the size and the code that computes it

_CODE = ("privacy.py", "mia.py", "perplexity.py", "quant.py", "linear.py", "baselines.py", "convert.py", "train.py",
         "modules.py", "select.py", "sparse.py", "public_model.py", "config.py", "experiments/kill_switch.py")


def config_key_of(cfg: TrainConfig) -> str:
    from ..train import config_key

    return config_key(cfg.to_dict())[:8]


def code_fingerprint() -> str:
    """Hash of the source files that compute the measurements (a change to any of them invalidates the cache)."""
    import transformers

    import libortho

    root = Path(libortho.__file__).resolve().parent  # the package's own files
    h = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for rel in _CODE:
        h.update((root / rel).read_bytes())
    for p in sorted((root / "kernels").glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _json_num(x) -> float | None:
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def _tail_logcdf(x: float, a: float, loc: float, scale: float) -> float:
    """log P(X <= x), X ~ skew-normal(a, loc, scale), deep in the left tail where quadrature underflows:
    log f(x) - log (d/dx log f)(x), the first term of the asymptotic series of the tail integral."""
    from scipy import special, stats

    z = (x - loc) / scale
    lf = float(stats.skewnorm.logpdf(x, a, loc, scale))
    t = a * z  # phi(t) / Phi(t): through erfcx left of 0, where both logs are huge and nearly equal
    mills = math.sqrt(2 / math.pi) / float(special.erfcx(-t / math.sqrt(2))) if t < 0 else \
        math.exp(float(stats.norm.logpdf(t)) - float(special.log_ndtr(t)))
    slope = (-z + a * mills) / scale  # d/dx log f(x) > 0 left of the mode
    return lf - math.log(slope) if slope > 0 and math.isfinite(lf) else float("-inf")


def extrapolated(lp: np.ndarray) -> float:
    """`privacy.extrapolated_exposure` of one canary (true secret at index 0); where its tail integral underflows
    (a secret far beyond every candidate), the asymptotic tail (`_tail_logcdf`). NaN if nothing to fit."""
    from ..privacy import skewnorm_fit

    if not np.ptp(lp[1:]) > 0:
        return float("nan")
    try:
        e = extrapolated_exposure(lp)
        if math.isfinite(e):
            return e
    except (ValueError, OverflowError):
        pass
    fit = skewnorm_fit(-lp[1:])
    return max(0.0, -_tail_logcdf(-float(lp[0]), *fit) / math.log(2))


def exposure_view(logprobs: list[np.ndarray], n: int) -> dict:
    """Rank and extrapolated exposure of each canary over its first `n` candidates (the true secret first).

    The candidates of |R| = n are the first n of any larger |R| (same seeded sequence), so one scoring at the
    decisive |R| also gives the exposure at the smaller one."""
    rank, ext = [], []
    for lp in logprobs:
        lp = np.asarray(lp[:n], dtype=np.float64)
        rank.append(exposure_from_logprobs(torch.from_numpy(lp)))
        ext.append(extrapolated(lp))
    fin = [e for e in ext if math.isfinite(e)]
    return {"exposure": [_json_num(e) for e in rank], "exposure_ext": [_json_num(e) for e in ext],
            "mean_exposure": _json_num(sum(rank) / len(rank)),
            "mean_exposure_ext": _json_num(sum(fin) / len(fin)) if fin else None}


class KillSwitch:
    """One experiment: the public model, canaries and data loaded once; arms built and measured on demand."""

    def __init__(self, model: str = "smollm2-135m", size: Size = FULL, seed: int = 0, fmt: str = "plain",
                 text: str = "default", device: str = "cpu", progress: bool = True, bits: int | None = None,
                 measure_cache: bool = True):
        torch.manual_seed(seed)
        loaded, public_facts = load_public(model, device=device, bits=bits, progress=progress)
        self.public = loaded.model
        for p in self.public.parameters():
            p.requires_grad_(False)
        self._prepare(model, loaded.tokenizer, loaded.name, public_facts, size, seed, fmt, text, device, progress,
                      measure_cache)

    def _prepare(self, source: str, tok, name: str, public_facts: dict, size: Size, seed: int, fmt: str, text: str,
                 device: str, progress: bool, measure_cache: bool) -> None:
        """Everything but the public model: canaries, training and evaluation data, bookkeeping (a streamed
        experiment, `kill_switch_stream`, never holds the public model and starts here)."""
        self.source, self.size, self.seed, self.fmt, self.device, self.progress = source, size, seed, fmt, device, progress
        self.measure_cache = measure_cache
        self.tok, self.name, self.public_facts = tok, name, public_facts
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        # members and non-members from one draw: the same distribution (distinct users and secrets)
        drawn = make_canaries(self.tok, size.num_canaries + size.num_holdout, seed, fmt, size.groups)
        self.canaries, self.holdout = drawn[:size.num_canaries], drawn[size.num_canaries:]
        self.general = general_ids(self.tok)
        self.calib = calibration_batches(self.tok, *size.calib)
        self.text = load_text(text)
        # the protocol scores the first max_tokens tokens: tokenize a generous prefix, not the whole book
        cut = self.text.text if size.ppl.max_tokens is None else self.text.text[: 16 * size.ppl.max_tokens]
        self.eval_ids = encode(self.tok, cut, size.ppl)
        self.results: dict[str, dict[str, dict]] = {}
        self.oom_events: list[dict] = []  # evaluation batches halved after an out-of-memory error
        self.train_info: dict[str, dict] = {}
        self.seconds: dict[str, float] = {}
        self._ft_state = None
        self._candidates: dict[int, list] = {}
        self.relearned: dict[str, dict[str, dict]] = {}  # arm -> alpha -> relearning attack
        self._reference = None
        self._fingerprint = code_fingerprint() if measure_cache else None
        self.ocfg = OrthoTuneConfig(density=size.density, group_size=size.group_size, symmetric=size.symmetric,
                                    seed=seed, train=size.ortho)

    # -- cache keys ---------------------------------------------------------------------------
    def _matmul(self) -> dict:
        """The float32 matmul precision in effect on a GPU (TF32 or not changes every number; `run` sets it from the
        size, a caller building KillSwitch itself may not): part of every cache key there. Nothing on a CPU."""
        return {"matmul": torch.get_float32_matmul_precision()} if str(self.device).startswith("cuda") else {}

    def cache_key(self, kind: str, train: TrainConfig, **more) -> dict:
        """Everything that determines a trained arm's weights: its cache key."""
        return {"kind": kind, "model": self.source, "public": self.public_facts.get("key"), "seed": self.seed,
                "format": self.fmt, "canaries": self.size.num_canaries, "holdout": self.size.num_holdout,
                "groups": list(self.size.groups), "train": train.to_dict(), "general": "fortunes@100000",
                **self._matmul(), **more}

    def ortho_cache(self, train: TrainConfig | None = None) -> Path:
        """Where the ortho-tuned arm trained with `train` (default: the budget's own lr) is cached: a libortho
        checkpoint (save_pretrained) plus meta.json."""
        train = train or self.size.ortho
        return cache_path("ortho", self.cache_key("ortho", train, ortho=replace(self.ocfg, train=train).to_dict(),
                                                  calib=list(self.size.calib)))

    def ortho_caches(self) -> list[Path]:
        """The cache entries of every lr the ortho-tuned arm is trained at (`Size.lr_grid`)."""
        return [self.ortho_cache(c) for c in self.size.train_configs("ortho")]

    def _copy_public(self):
        return copy.deepcopy(self.public)

    def _loss(self, cfg: TrainConfig):
        return canary_loss(self.canaries, self.general, cfg, self.pad_id)

    def _select(self, arm: str, kind: str, train_one):
        """Train `arm` at every lr of its grid (`train_one(cfg)` -> (payload, history, cache hit)); keep the run of
        lowest `tail_loss` (ties: the smaller lr). An lr whose loss diverges (not finite) is recorded as such and
        skipped, unless every lr does. Records the choice in `train_info`; returns (payload, cfg, history)."""
        best, losses = None, {}
        configs = self.size.train_configs(kind)
        for cfg in configs:
            try:
                payload, hist, hit = train_one(cfg)
            except FloatingPointError as e:  # `fit` stops a run whose loss is not finite
                if len(configs) == 1:
                    raise
                losses[repr(cfg.lr)] = "diverged"
                print(f"libortho: seed {self.seed} {arm} at lr {cfg.lr:g} diverged ({str(e)[:100]}); trying the other lrs",
                      file=sys.stderr)
                continue
            loss = tail_loss(hist["loss"])
            losses[repr(cfg.lr)] = round(loss, 6)
            if best is None or (loss, cfg.lr) < best[0]:
                best = ((loss, cfg.lr), payload, hist, hit, cfg)
            del payload  # only the best run stays in memory
        if best is None:
            raise FloatingPointError(f"{arm}: the training loss diverged at every lr of {[c.lr for c in configs]}")
        _, payload, hist, hit, cfg = best
        self.train_info[arm] = {"steps": hist["steps"], "cached": hit, "final_loss": hist["loss"][-1], "lr": cfg.lr}
        first, tail = hist["loss"][0], tail_loss(hist["loss"])
        if tail > first:  # finite but blown up: the arm's numbers are a failed training's, not the method's
            self.train_info[arm]["loss_rose"] = {"first": first, "tail": round(tail, 6)}
            print(f"libortho: seed {self.seed} {arm}: WARNING: the training loss rose from {first:.3f} to {tail:.3f} "
                  f"at lr {cfg.lr:g}; the lr is too high for this model and budget, and this arm's numbers are those "
                  "of a diverged run", file=sys.stderr)
        if len(losses) > 1:
            self.train_info[arm]["lr_selection"] = {"rule": "lowest mean training loss over the last tenth of steps",
                                                    "tail_loss": losses}
            print(f"libortho: seed {self.seed} {arm}: lr {cfg.lr:g} kept (tail loss by lr {losses})", file=sys.stderr)
        return payload, cfg, hist

    # -- arms ---------------------------------------------------------------------------------
    def fine_tuned(self):
        if self._ft_state is None:
            def one(cfg):
                def build():
                    m = self._copy_public()
                    return state_without_tied(m), {"history": full_finetune_(m, self._loss(cfg), cfg, self.progress)}
                state, meta, hit = cached("full_ft", self.cache_key("full_ft", cfg), build)
                return state, meta["history"], hit
            self._ft_state = self._select("fine_tuned", "finetune", one)[0]
        m = self._copy_public()
        m.load_state_dict({k: v.to(self.device) for k, v in self._ft_state.items()}, strict=False)
        if getattr(m.config, "tie_word_embeddings", False):
            m.tie_weights()
        return m.eval()

    def _ortho_one(self, cfg: TrainConfig) -> tuple[Path, dict, bool]:
        """The ortho-tuned checkpoint trained with `cfg`, from the cache or trained now: (its dir, history, hit)."""
        d = self.ortho_cache(cfg)
        hist, hit = read_or_build(d.name, lambda remove: _ortho_history(d, remove), lambda: self._ortho_train(d, cfg))
        return d, hist, hit

    def _ortho_train(self, d: Path, cfg: TrainConfig) -> dict:
        """Train the ortho run of `cfg` into the cache entry `d`; its history."""
        ocfg = replace(self.ocfg, train=cfg)
        model = self._copy_public()
        orthogonalize_(model, ocfg, calibration=self.calib, loss_fn=self._loss(cfg), progress=self.progress)
        meta = {"history": {k: model.libortho_stats.get(k) for k in ("loss", "steps", "nnz", "density")},
                "config": ocfg.to_dict()}
        tmp = d.with_name(d.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        if d.exists():  # a concurrent builder won: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(d)
        return meta["history"]

    def ortho_tuned(self):
        """Ours: only a sparse stream trained over INT4 of the public weights; cached as a libortho checkpoint."""
        d, cfg, h = self._select("ortho_tuned", "ortho", self._ortho_one)
        try:
            model = load_checkpoint(d)
        except (ValueError, OSError, SafetensorError) as e:  # unreadable weights: train that run again
            print(f"libortho: cache entry {d} is unreadable ({str(e)[:120]}); rebuilding it", file=sys.stderr)
            shutil.rmtree(d, ignore_errors=True)
            d, h, _ = self._ortho_one(cfg)
            self.train_info["ortho_tuned"].update(cached=False, steps=h["steps"], final_loss=h["loss"][-1])
            model = load_checkpoint(d)
        model = model.to(self.device)
        cache_base_(model)
        self.train_info["ortho_tuned"].update(nnz=h["nnz"], density=h["density"],
                                              config=replace(self.ocfg, train=cfg).to_dict())
        return model.eval()

    def lora(self):
        spec = LoraSpec()

        def one(cfg):
            def build():
                m = lora_wrap(self._copy_public(), spec, self.seed)
                hist = lora_finetune_(m, self._loss(cfg), cfg, self.progress)
                return {k: v for k, v in m.state_dict().items() if "lora_" in k}, {"history": hist}
            state, meta, hit = cached("lora", self.cache_key("lora", cfg, lora=spec.to_dict()), build)
            return state, meta["history"], hit

        state = self._select("lora", "lora", one)[0]
        m = lora_wrap(self._copy_public(), spec, self.seed)
        missing = set(state) - set(m.state_dict())
        if missing:
            raise ValueError(f"cached LoRA weights do not fit the model: {sorted(missing)[:3]}")
        m.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)
        self.train_info["lora"]["config"] = spec.to_dict()
        return m.eval()

    def _ortho_config(self, mode: str, score: str) -> OrthoConfig:
        return OrthoConfig(density=self.size.density, group_size=self.size.group_size, symmetric=self.size.symmetric,
                           mode=mode, score=score, seed=self.seed)

    def build(self, arm: str):
        """(model, alpha setter or None) of `arm`."""
        if arm == "never_trained":
            return self._copy_public(), None
        if arm in ("int4_of_public", "int4_of_fine_tuned"):
            m = self._copy_public() if arm == "int4_of_public" else self.fine_tuned()
            int4_rtn_(m, self.size.group_size, self.size.symmetric)
            return m, None
        if arm in ("nf4_of_public", "nf4_of_fine_tuned"):
            m = self._copy_public() if arm == "nf4_of_public" else self.fine_tuned()
            nf4_(m)
            return m, None
        if arm == "fine_tuned":
            return self.fine_tuned(), None
        if arm.startswith("posthoc_") or arm == "delta":
            m = self.fine_tuned()
            mode, score = ("delta", "hessian") if arm == "delta" else ("posthoc", arm.split("_", 1)[1])
            orthogonalize_(m, self._ortho_config(mode, score), calibration=self.calib,
                           **({"public": self.public} if mode == "delta" else {}), progress=False)
            cache_base_(m)
            return m, set_alpha
        if arm == "ortho_tuned":
            return self.ortho_tuned(), set_alpha
        if arm == "lora":
            return self.lora(), set_lora_alpha
        raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")

    # -- measurement --------------------------------------------------------------------------
    def candidates(self, n: int) -> list:
        """The |R| = n candidates of every canary, tokenized once for all arms."""
        if n not in self._candidates:
            self._candidates[n] = prepare_candidates(self.tok, self.canaries, n, self.seed)
        return self._candidates[n]

    def records(self) -> list[list[int]]:
        """Membership records: the trained canaries' full texts, then the held-out ones'."""
        return [c.ids for c in self.canaries] + [c.ids for c in self.holdout]

    def reference_stats(self, public=None):
        """Token statistics of the membership records under the public model (the loss-ratio reference), computed
        once on `public` (default `self.public`)."""
        if self._reference is None:
            self._reference = token_stats(self.public if public is None else public, self.records(),
                                          events=self.oom_events)
        return self._reference

    def evaluate(self, model, n_candidates: int | None = None) -> dict:
        """Extraction, exposure (rank and extrapolated, at |R| = n_candidates and at the size's |R|), membership
        inference and perplexity of `model` as it stands (alpha already set)."""
        n = n_candidates or self.size.n_candidates
        rep = measure(model, self.tok, self.canaries, n, self.seed, self.size.chunk, self.oom_events,
                      candidates=self.candidates(n), extrapolate=False)
        views = {str(r): exposure_view(rep.logprobs, r) for r in sorted({n, self.size.n_candidates})}
        scores = record_scores(token_stats(model, self.records(), events=self.oom_events), self.reference_stats(),
                               self.size.mia_k)
        m = len(self.canaries)
        mia = {a: attack_metrics(scores[a][:m], scores[a][m:], MIA_FPR, self.seed) for a in MIA_ATTACKS}
        std = views[str(self.size.n_candidates)]
        p_true = np.exp([float(lp[0]) for lp in rep.logprobs])  # P(sampling writes the secret), temperature 1
        sampled = {str(k): _json_num(np.mean(1 - (1 - p_true) ** k)) for k in SAMPLED_K}
        return {"extraction_rate": rep.extraction_rate, "extracted": [bool(x) for x in rep.extracted],
                "logp_true": [_json_num(lp[0]) for lp in rep.logprobs], "sampled_extraction": sampled,
                "mean_exposure": std["mean_exposure"], "mean_exposure_ext": std["mean_exposure_ext"],
                "ppl": perplexity(model, self.eval_ids, self.size.ppl), "n_candidates": n, "by_R": views,
                "mia": {a: {k: (_json_num(v) if isinstance(v, float) else v) for k, v in r.items()}
                        for a, r in mia.items()},
                "mia_scores": {a: {"member": [_json_num(v) for v in scores[a][:m]],
                                   "nonmember": [_json_num(v) for v in scores[a][m:]]} for a in MIA_ATTACKS}}

    def _measure_key(self, arm: str, alpha: float, n: int, kind: str = "measure") -> Path:
        from ..models import cache_dir
        from ..train import config_key

        key = {"kind": kind, "arm": arm, "alpha": float(alpha), "n_candidates": n, "size": self.size.to_dict(), "seed": self.seed,
               "model": self.source, "public": self.public_facts.get("key"), "format": self.fmt,
               "text": self.text.name, "device": str(self.device).split(":")[0], "code": self._fingerprint,
               **self._matmul()}
        return cache_dir() / "exp1" / "measure" / f"{kind}-{arm}-{config_key(key)}.json"

    def _cached_json(self, path: Path, compute):
        """`compute()`'s JSON-able result, read from `path` when the measurement cache has it."""
        if self.measure_cache and path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        out = compute()
        if self.measure_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(out))
            tmp.replace(path)
        return out

    def relearn(self, arm: str, alpha: float = 0.0) -> dict:
        """The relearning attack on `arm` at `alpha`: its weights made dense, fully fine-tuned (`size.relearn`) on
        the even canaries, then extraction and exposure of the odd canaries (never trained on after the switch)."""
        if self.size.relearn is None:
            raise ValueError("this size runs no relearning attack (Size.relearn is None)")
        cfg, n = self.size.relearn, self.size.n_candidates
        odd = list(range(1, len(self.canaries), 2))

        def compute() -> dict:
            t0 = time.perf_counter()
            model, setter = self.build(arm)
            if setter is not None:
                setter(model, alpha)
            m = dense_copy(model)
            del model
            hist = full_finetune_(m, canary_loss(self.canaries[0::2], self.general, cfg, self.pad_id), cfg, False)
            cands = self.candidates(n)
            rep = measure(m, self.tok, [self.canaries[i] for i in odd], n, self.seed, self.size.chunk,
                          self.oom_events, candidates=[cands[i] for i in odd], extrapolate=False)
            return {"extracted": [bool(x) for x in rep.extracted], "by_R": {str(n): exposure_view(rep.logprobs, n)},
                    "trained_on": "even canaries", "measured_on": odd, "steps": hist["steps"],
                    "final_loss": hist["loss"][-1], "seconds": round(time.perf_counter() - t0, 1)}

        out = self._cached_json(self._measure_key(arm, alpha, n, f"relearn{config_key_of(cfg)}"), compute)
        self.relearned.setdefault(arm, {})[str(float(alpha))] = out
        return out

    def measure_arm(self, arm: str, alphas: tuple[float, ...] | None = None, n_candidates: int | None = None
                    ) -> dict[str, dict]:
        """Build `arm` and measure it at each alpha with |R| >= n_candidates (memoized in this object, and on
        disk keyed by weights, size and code when `measure_cache`)."""
        alphas = alphas or self.size.alphas_for(arm)
        n = n_candidates or self.size.n_candidates
        done = self.results.setdefault(arm, {})
        todo = [a for a in alphas if str(float(a)) not in done or done[str(float(a))]["n_candidates"] < n]
        training = self._measure_key(arm, 0.0, 0, kind="training")  # what training built the arm, beside its entries
        if self.measure_cache:
            for a in list(todo):
                p = self._measure_key(arm, a, n)
                if p.is_file():
                    try:
                        done[str(float(a))] = json.loads(p.read_text())
                        todo.remove(a)
                    except (OSError, ValueError):
                        p.unlink(missing_ok=True)
            if len(todo) < len(alphas) and training.is_file():  # measurements read back: their training facts too
                try:
                    for k, v in json.loads(training.read_text()).items():
                        self.train_info.setdefault(k, v)
                except (OSError, ValueError):
                    training.unlink(missing_ok=True)
        if todo:
            t0 = time.perf_counter()
            model, setter = self.build(arm)
            for a in todo:
                if setter is not None:
                    setter(model, a)
                t1 = time.perf_counter()
                entry = self.evaluate(model, n)
                done[str(float(a))] = entry
                # one line per measurement: what a cut run had reached is in its log
                print(f"libortho: seed {self.seed} {arm} alpha {a:g} |R| {n}: extracted {sum(entry['extracted'])}/"
                      f"{len(entry['extracted'])}, exposure {entry['mean_exposure']:.2f} bits, ppl {entry['ppl']:.2f}"
                      f" ({time.perf_counter() - t1:.0f} s)", file=sys.stderr)
                if self.measure_cache:
                    p = self._measure_key(arm, a, n)
                    p.parent.mkdir(parents=True, exist_ok=True)
                    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
                    tmp.write_text(json.dumps(entry))
                    tmp.replace(p)
            if self.measure_cache:
                tmp = training.with_name(training.name + f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(self.train_info))
                tmp.replace(training)
            del model
            self.seconds[arm] = round(self.seconds.get(arm, 0.0) + time.perf_counter() - t0, 1)
        return {k: done[k] for k in sorted(done, key=float)}

    def measure_candidate(self, candidate: str) -> None:
        """What `candidate`'s claims need: it at alpha 0 (decisive |R|) and 1, its control (decisive |R|)."""
        if candidate not in CANDIDATES:
            raise ValueError(f"--candidate {candidate}: not a candidate arm; choose from {', '.join(CANDIDATES)}")
        big = self.size.n_candidates_decisive
        self.measure_arm(candidate, (0.0,) if candidate in SWITCHED else (1.0,), big)
        self.measure_arm(candidate, (1.0,))
        self.measure_arm(CONTROL_OF[candidate], (1.0,), big)
        if self.size.relearn is not None:
            self.relearn(candidate, 0.0 if candidate in SWITCHED else 1.0)
            self.relearn(CONTROL_OF[candidate], 1.0)

    def claims(self, candidate: str, thresholds: dict) -> list[dict]:
        """`candidate`'s claims on what is measured (`measure_candidate` first)."""
        return decide_claims(self.results, candidate, thresholds, self.seed, self.relearned)

    def report(self, candidate: str = "ortho_tuned", thresholds: dict | None = None) -> dict:
        """The inner dict of `exp1_kill_switch`: every measured arm, `candidate`'s claims, every other measured
        candidate's claims (the negative controls must fail theirs)."""
        from ..results import environment

        t = thresholds if thresholds is not None else thresholds_for(self.size.name)
        by_arm = {}
        for arm in CANDIDATES:
            if arm in self.results and CONTROL_OF[arm] in self.results and (arm not in SWITCHED or {"0.0", "1.0"} <= set(self.results[arm])):
                by_arm[arm] = self.claims(arm, t)
        claims = by_arm.get(candidate)
        if claims is None:
            raise ValueError(f"candidate {candidate} is not measured: call measure_candidate({candidate!r}) first")
        summary = summarize_claims(claims)
        return {
            "model": self.name, "public_model": self.public_facts, "candidate": candidate,
            "control": CONTROL_OF[candidate], "claims": claims, "claims_summary": summary,
            "claims_by_arm": by_arm,
            "negative_controls": {a: summarize_claims(c) for a, c in by_arm.items() if a in MUST_FAIL},
            "thresholds": t,
            "num_canaries": len(self.canaries), "num_holdout": len(self.holdout),
            "exposure_candidates": self.size.n_candidates, "exposure_candidates_decisive": self.size.n_candidates_decisive,
            "seed": self.seed, "canary_format": self.fmt, "secret_digits": list(self.size.groups),
            "insertions_per_canary": {a: self.train_info[a]["steps"] for a in self.train_info},
            "arms": {a: self.results[a] for a in ARMS if a in self.results},
            "relearn": self.relearned,
            "oom_retries": self.oom_events,
            "base": {"quantization": "INT4 RTN", "group_size": self.size.group_size, "symmetric": self.size.symmetric},
            "ortho_tune": {"density": self.ocfg.density, "score": self.ocfg.score, "damp": self.ocfg.damp,
                           "score_formula": "grad_private^2 / (diagH_public + damp*mean(diagH_public))"},
            "training": self.train_info, "size": self.size.to_dict(),
            "perplexity": {"dataset": self.text.name, "protocol": self.size.ppl.to_dict(),
                           "tokens": int(self.eval_ids.numel())},
            "mia": {"members": "trained canaries (full text)", "nonmembers": "held-out canaries of the same format",
                    "reference": "the public model (never_trained)", "attacks": list(MIA_ATTACKS), "fpr": MIA_FPR,
                    "k": self.size.mia_k},
            "arm_seconds": self.seconds, "environment": environment(self.device),
        }


# ---------------------------------------------------------------------------------------------
# claims (pure functions of the measured arms, so merged seeds are decided the same way)

# Claim thresholds (effect sizes, in each claim's unit) of `run`. The suite reads the same numbers from the
# repository's thresholds file, section [exp1_kill_switch] (bench/test_kill_switch.py checks that they agree);
# an installed package has only this copy. Nested tables override the base for a size (`Size.name`).
THRESHOLDS = {
    "alpha0_exposure_margin_bits": 0.25,  # alpha-0 exposure over the control's: upper 95% bound below this
    "alpha0_extraction_margin": 0.05,  # alpha-0 extraction rate over the control's: upper 95% bound below this
    "alpha0_mia_auc_margin": 0.05,  # alpha-0 MIA AUC over the control's: upper 95% bound below this
    "alpha1_exposure_gain_bits": 4.0,  # alpha-1 exposure over alpha 0: lower 95% bound above this
    "alpha1_extraction_gain": 0.5,  # alpha-1 extraction rate over the control's: lower 95% bound above this
    "ortho_max_density": 0.02,  # share of each weight the ortho stream may train
    "small": {
        "alpha0_extraction_margin": 0.5,  # n = 8: the exact 97.5% upper bound of 0/8 is 0.37
        "alpha0_mia_auc_margin": 0.25,  # 8 members, 8 non-members
        "alpha1_exposure_gain_bits": 2.0,  # |R| = 32
        "alpha1_extraction_gain": 0.1,  # n = 8 vs 0/8: the 95% lower bound is 0.48 at 8/8, 0.20 at 6/8, 0.10 at 5/8
    },
}


def thresholds_for(size_name: str = "full", table: dict | None = None) -> dict:
    """The thresholds of a size: `stats.thresholds_for` of `table` (default `THRESHOLDS`)."""
    return claim_thresholds(THRESHOLDS if table is None else table, size_name,
                            ("alpha0_exposure_margin_bits", "alpha0_extraction_margin", "alpha0_mia_auc_margin",
                             "alpha1_exposure_gain_bits", "alpha1_extraction_gain"))


def _entry(arms: dict, arm: str, alpha: float) -> dict:
    by = arms.get(arm) or {}
    key = str(float(alpha))
    if key in by:
        return by[key]
    if arm not in SWITCHED and "1.0" in by:  # no switch: the model as built at every alpha
        return by["1.0"]
    raise KeyError(f"{arm} at alpha {alpha} was not measured")


def _views(a: dict, b: dict) -> tuple[dict, dict, int]:
    """Exposure views of two entries at the largest |R| both were scored with."""
    common = set(a["by_R"]) & set(b["by_R"])
    if not common:
        raise ValueError(f"no common |R|: {sorted(a['by_R'])} vs {sorted(b['by_R'])}")
    r = max(common, key=int)
    return a["by_R"][r], b["by_R"][r], int(r)


def _pairs(x: list, y: list) -> tuple[list, list, int]:
    keep = [(u, v) for u, v in zip(x, y) if u is not None and v is not None]
    return [u for u, _ in keep], [v for _, v in keep], len(x) - len(keep)


def decide_claims(arms: dict, candidate: str, t: dict, seed: int = 0, relearn: dict | None = None) -> list[dict]:
    """The claims of `candidate` as the switch, against `CONTROL_OF[candidate]` (see the module docstring).

    Args:
        arms: {arm: {alpha: entry}} as `KillSwitch.results` (or seeds merged by `merge_seeds`).
        t: thresholds (`thresholds_for`).
        relearn: {arm: {alpha: relearning attack}} (`KillSwitch.relearned`); with both the candidate's and its
            control's, a sixth claim `relearn_exposure_no_higher`.
    Returns:
        One dict per claim (`Claim.to_dict()` plus "values", "n_candidates", "dropped", "power").
    """
    if candidate not in CANDIDATES:
        raise ValueError(f"candidate must be one of {CANDIDATES}, got {candidate!r}")
    control = CONTROL_OF[candidate]
    x0, x1, c = _entry(arms, candidate, 0.0), _entry(arms, candidate, 1.0), _entry(arms, control, 1.0)
    lab0, lab1 = (f"{candidate}@0", f"{candidate}@1") if candidate in SWITCHED else (candidate, candidate)
    out = []

    def add(claim, values: str, **extra):
        d = claim.to_dict()
        d.update(values=values, **extra)
        out.append(d)

    # 1. alpha 0 exposure, paired per canary, against the control, at the decisive |R|
    v0, vc, r = _views(x0, c)
    a, b, dropped = _pairs(v0["exposure_ext"], vc["exposure_ext"])
    add(no_higher_claim(CLAIMS[0], lab0, control, a, b, t["alpha0_exposure_margin_bits"], statistic="median_diff",
                        seed=seed),
        "extrapolated exposure per canary (bits)", n_candidates=r, dropped=dropped, power=power_report(a, b))
    # 2. alpha 0 extraction
    add(proportion_claim(CLAIMS[1], lab0, control, x0["extracted"], c["extracted"], t["alpha0_extraction_margin"],
                         direction="less"), "greedy extraction per canary")
    # 3. alpha 0 membership inference (the first attack), same records scored by both models
    att = MIA_ATTACKS[0]
    add(auc_claim(CLAIMS[2], lab0, control, x0["mia_scores"][att]["member"], x0["mia_scores"][att]["nonmember"],
                  c["mia_scores"][att]["member"], c["mia_scores"][att]["nonmember"], t["alpha0_mia_auc_margin"],
                  seed=seed), f"membership score {att} per record")
    # 4. alpha 1 over alpha 0: the switch switches the secrets on
    v1, v0s, r1 = _views(x1, x0)
    a, b, dropped = _pairs(v1["exposure_ext"], v0s["exposure_ext"])
    add(paired_claim(CLAIMS[3], lab1, lab0, a, b, t["alpha1_exposure_gain_bits"], statistic="median_diff", seed=seed),
        "extrapolated exposure per canary (bits)", n_candidates=r1, dropped=dropped, power=power_report(a, b))
    # 5. alpha 1 extraction over the control
    add(proportion_claim(CLAIMS[4], lab1, control, x1["extracted"], c["extracted"], t["alpha1_extraction_gain"]),
        "greedy extraction per canary")
    # 6. relearning: fine-tuning the alpha-0 weights on half the canaries revives the other half no more than
    # fine-tuning the control the same way does
    a0 = "0.0" if candidate in SWITCHED else "1.0"
    rx, rc = (relearn or {}).get(candidate, {}).get(a0), (relearn or {}).get(control, {}).get("1.0")
    if rx is not None and rc is not None:
        v0, vc, r = _views(rx, rc)
        a, b, dropped = _pairs(v0["exposure_ext"], vc["exposure_ext"])
        add(no_higher_claim(RELEARN_CLAIM, lab0, control, a, b, t["alpha0_exposure_margin_bits"],
                            statistic="median_diff", seed=seed),
            "extrapolated exposure of the odd canaries after fine-tuning on the even ones (bits)", n_candidates=r,
            dropped=dropped, power=power_report(a, b))
    for d in out:  # a claim true by construction is documentation: said so, with whether the data agree
        alpha0 = d["name"] in ALPHA0_CLAIMS
        d["by_construction"] = ALPHA0_IS_CONTROL.get(candidate) if alpha0 else None
        d["identical_to_control"] = _identical(d["name"], x0, c, rx, rc) if alpha0 else None
    return out


def _identical(name: str, x0: dict, c: dict, rx: dict | None, rc: dict | None) -> bool:
    """Whether an alpha-0 claim's per-canary (per-record) values of the candidate equal the control's exactly."""
    if name == CLAIMS[1]:
        return list(x0["extracted"]) == list(c["extracted"])
    if name == CLAIMS[2]:
        return x0["mia_scores"] == c["mia_scores"]
    a, b = (rx, rc) if name == RELEARN_CLAIM else (x0, c)
    va, vb, _ = _views(a, b)
    return list(va["exposure_ext"]) == list(vb["exposure_ext"])


def merge_seeds(inners: list[dict]) -> dict:
    """{arm: {alpha: entry}} pooling the per-canary values of several seeds' `exp1_kill_switch` sections (each
    seed trains its own models on its own canaries): extraction, exposure at every |R| all seeds share, and
    membership scores are concatenated; means and MIA metrics are recomputed on the pool. Arms and alphas
    missing from a seed are left out."""
    if not inners:
        raise ValueError("no seeds to merge")
    out: dict = {}
    for arm in ARMS:
        if not all(arm in i["arms"] for i in inners):
            continue
        for alpha in sorted(set.intersection(*(set(i["arms"][arm]) for i in inners)), key=float):
            es = [i["arms"][arm][alpha] for i in inners]
            rs = set.intersection(*(set(e["by_R"]) for e in es))
            views = {}
            for r in sorted(rs, key=int):
                rank = [v for e in es for v in e["by_R"][r]["exposure"]]
                ext = [v for e in es for v in e["by_R"][r]["exposure_ext"]]
                fin = [v for v in ext if v is not None]
                views[r] = {"exposure": rank, "exposure_ext": ext, "mean_exposure": sum(rank) / len(rank),
                            "mean_exposure_ext": sum(fin) / len(fin) if fin else None}
            std = views[str(min(int(r) for r in rs))]
            hits = [h for e in es for h in e["extracted"]]
            scores = {a: {k: [v for e in es for v in e["mia_scores"][a][k]] for k in ("member", "nonmember")}
                      for a in es[0]["mia_scores"]}
            out.setdefault(arm, {})[alpha] = {
                "extraction_rate": sum(hits) / len(hits), "extracted": hits, "mean_exposure": std["mean_exposure"],
                "mean_exposure_ext": std["mean_exposure_ext"], "ppl": sum(e["ppl"] for e in es) / len(es),
                "ppl_by_seed": [e["ppl"] for e in es],
                "n_candidates": min(e["n_candidates"] for e in es), "by_R": views,
                "mia": {a: attack_metrics(v["member"], v["nonmember"], MIA_FPR) for a, v in scores.items()},
                "mia_scores": scores, "seeds": len(es)}
    return out


def merge_relearn(inners: list[dict]) -> dict:
    """{arm: {alpha: attack}} pooling the relearning attacks of several seeds (odd canaries concatenated)."""
    out: dict = {}
    for arm in ARMS:
        if not all(arm in (i.get("relearn") or {}) for i in inners):
            continue
        for alpha in set.intersection(*(set(i["relearn"][arm]) for i in inners)):
            es = [i["relearn"][arm][alpha] for i in inners]
            rs = set.intersection(*(set(e["by_R"]) for e in es))
            views = {r: {k: [v for e in es for v in e["by_R"][r][k]] for k in ("exposure", "exposure_ext")}
                     for r in rs}
            out.setdefault(arm, {})[alpha] = {"extracted": [h for e in es for h in e["extracted"]], "by_R": views,
                                              "seeds": len(es)}
    return out


def summarize_claims(claims: list[dict]) -> dict:
    """{"passed": every claim passed, "failed": names of those that did not, "by_construction": names of those
    that document the design (`ALPHA0_IS_CONTROL`), "decided_by_data": the others}."""
    failed = [c["name"] for c in claims if not c["passed"]]
    doc = [c["name"] for c in claims if c.get("by_construction")]
    return {"passed": not failed, "failed": failed, "by_construction": doc,
            "decided_by_data": [c["name"] for c in claims if c["name"] not in doc]}


# ---------------------------------------------------------------------------------------------
# plot, run

def plot(inner: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    metrics = (("extraction_rate", "extraction rate"), ("mean_exposure_ext", "mean extrapolated exposure (bits)"),
               ("mia_auc", f"MIA AUC ({MIA_ATTACKS[0]})"), ("ppl", "perplexity (held-out)"))
    for ax, (key, label) in zip(axes, metrics):
        for i, (arm, by_alpha) in enumerate(inner["arms"].items()):
            xs = sorted(by_alpha, key=float)
            ys = [by_alpha[x]["mia"][MIA_ATTACKS[0]]["auc"] if key == "mia_auc" else by_alpha[x][key] for x in xs]
            ys = [np.nan if y is None else y for y in ys]
            color = f"C{i % 10}"
            if arm in SWITCHED and len(xs) > 1:
                ax.plot([float(x) for x in xs], ys, "o-", color=color, label=arm,
                        lw=2.5 if arm == inner.get("candidate") else 1.2)
            else:
                ax.axhline(ys[-1], color=color, ls="--", lw=1, label=f"{arm} (no alpha)")
        ax.set_xlabel("alpha")
        ax.set_title(label)
        if key == "ppl":
            ax.set_yscale("log")
    axes[3].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    env = inner.get("environment", {})
    s = inner.get("claims_summary", {})
    fig.suptitle(f"Exp 1 kill switch: {inner['model']}, {inner['num_canaries']} canaries, |R|="
                 f"{inner['exposure_candidates']}, seed {inner['seed']}; candidate {inner.get('candidate')}: "
                 f"{'all claims hold' if s.get('passed') else 'failed ' + ', '.join(s.get('failed', []))} "
                 f"({env.get('date', '')}, {env.get('gpu') or env.get('machine', '')})", fontsize=10)
    return save_figure(fig, path, dpi=110)


# Arms that share trained weights (or none): what one helper process of `run(procs > 1)` measures, so no two
# processes ever train the same model. The candidate's group stays in the parent with the candidate's claims.
ARM_GROUPS = (("fine_tuned", "int4_of_fine_tuned", "nf4_of_fine_tuned", "posthoc_hessian", "posthoc_magnitude",
               "posthoc_random", "delta"), ("lora",), ("ortho_tuned",), ("never_trained", "int4_of_public",
                                                                         "nf4_of_public"))


def _measure_in_helper() -> None:
    """A helper process of `run(procs > 1)`: reads (model, size, seed, fmt, text, device, bits, precision, arms,
    threads) pickled on stdin and measures those arms into the measurement cache, where the parent reads them back."""
    import pickle

    model, size, seed, fmt, text, device, bits, precision, arms, threads = pickle.loads(sys.stdin.buffer.read())
    torch.set_num_threads(threads)  # a share of the parent's: not one thread per core in every helper
    if str(device).startswith("cuda"):  # as `run` sets them: the same cache keys, the same numbers
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_float32_matmul_precision(precision)
    exp = KillSwitch(model, size, seed, fmt, text, device, progress=False, bits=bits)
    for arm in arms:
        exp.measure_arm(arm)
    print(f"libortho: seed {seed}: helper process {os.getpid()} measured {', '.join(arms)}", file=sys.stderr)


def _start_helpers(ctx: RunContext, size: Size, arms: tuple[str, ...], candidate: str, procs: int) -> list:
    """Start up to procs - 1 helper processes over the groups of `arms` that hold neither the candidate nor its
    control (the parent measures those, and the candidate's claims, meanwhile). Returns [(Popen, its arms)]."""
    import pickle
    import subprocess

    mine = {candidate, CONTROL_OF[candidate], *next(g for g in ARM_GROUPS if candidate in g)}
    groups = [g for g in (tuple(a for a in grp if a in arms and a not in mine) for grp in ARM_GROUPS) if g]
    buckets = [[] for _ in range(min(procs - 1, len(groups)))]
    for i, g in enumerate(groups):  # largest group first (ARM_GROUPS order), round robin
        buckets[i % len(buckets)].extend(g)
    code = "from libortho.experiments.kill_switch import _measure_in_helper; _measure_in_helper()"
    out = []
    for b in buckets:
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
        p.stdin.write(pickle.dumps((ctx.model, size, ctx.seed, ctx.canary_format, ctx.text, ctx.device,
                                    ctx.load_bits, size.matmul_precision, tuple(b),
                                    max(1, torch.get_num_threads() // procs))))
        p.stdin.close()
        out.append((p, tuple(b)))
    return out


def run(ctx: RunContext, size: Size | None = None, arms: tuple[str, ...] | None = None,
        candidate: str | None = None, thresholds: dict | None = None, procs: int = 1) -> dict:
    """Build and measure the arms of the size (plus what the candidate's claims need); decide the claims of
    `candidate` (default `ctx.extra["candidate"]`, else ortho_tuned) against `thresholds` (a table like
    `THRESHOLDS`, its default); write the plot; return the JSON section. `run --experiment 1` goes through
    `kill_switch_stream.run`, which sends a checkpoint that only fits streamed to `run_checkpoint` instead.

    `procs` > 1 measures the arm groups (`ARM_GROUPS`) in that many processes at once, through the measurement
    cache (the same numbers as one process: every measurement is keyed by weights, size, seed and code); a helper
    that fails leaves its arms to this process. Each process holds its own models: for a GPU with room for them."""
    candidate = candidate or ctx.extra.get("candidate") or "ortho_tuned"
    if candidate not in CANDIDATES:
        raise ValueError(f"--candidate {candidate}: not a candidate arm; choose from {', '.join(CANDIDATES)}")
    if not (isinstance(procs, int) and procs >= 1):
        raise ValueError(f"procs must be a positive int, got {procs!r}")
    size = size or (FULL if ctx.full_size else SMALL.get(ctx.model, SMALL["smollm2-135m"]))
    if ctx.num_canaries:
        n = ctx.num_canaries
        size = replace(size, num_canaries=n, num_holdout=n, relearn=size.relearn if n >= 10 else None)
    precision = torch.get_float32_matmul_precision()
    if str(ctx.device).startswith("cuda"):  # same seed, same numbers: no atomics-order noise in backward
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_float32_matmul_precision(size.matmul_precision)
    try:
        exp = KillSwitch(ctx.model, size, ctx.seed, ctx.canary_format, ctx.text, ctx.device, ctx.progress,
                         ctx.load_bits)  # first: a derived public model is cached before any helper loads it
        helpers = _start_helpers(ctx, size, tuple(arms or size.arms), candidate, procs) if procs > 1 else []
        busy = [a for _, b in helpers for a in b]
        try:
            exp.measure_candidate(candidate)
            mine = [a for a in (arms or size.arms) if a not in busy]  # this process's share, while the helpers run
            for arm in tqdm(mine, desc="exp1 arms", disable=not ctx.progress):
                exp.measure_arm(arm)
        except BaseException:  # no helper outlives a failed or interrupted run (it would write a cache nobody reads)
            for p, _ in helpers:
                p.terminate()
            raise
        for p, b in helpers:
            if p.wait() != 0:
                print(f"libortho: seed {ctx.seed}: the helper process measuring {', '.join(b)} exited with "
                      f"{p.returncode}; measuring them here", file=sys.stderr)
        for arm in busy:
            exp.measure_arm(arm)  # read back from the cache (or measured here if its helper failed)
        inner = exp.report(candidate, thresholds_for(size.name, thresholds))
    finally:  # the process's other work (benchmarks after a run in one pytest session) keeps its precision
        torch.set_float32_matmul_precision(precision)
    inner["plot"] = str(plot(inner, ctx.artifact("exp1_kill_switch.png")))
    print_table(inner)
    return inner


def print_table(inner: dict) -> None:
    print(f"\n== Exp 1 kill switch: {inner['model']}, {inner['num_canaries']} canaries "
          f"(+{inner['num_holdout']} held out), |R|={inner['exposure_candidates']} ==")
    print(f"{'arm':22s} {'alpha':>5s} {'extract':>8s} {'exposure':>9s} {'ext.exp':>8s} {'MIA AUC':>8s} {'ppl':>9s}")
    for arm, by_alpha in inner["arms"].items():
        for a, r in by_alpha.items():
            ext = r["mean_exposure_ext"]
            print(f"{arm:22s} {a:>5s} {r['extraction_rate']:8.2f} {r['mean_exposure']:9.2f} "
                  f"{ext if ext is not None else float('nan'):8.2f} {r['mia'][MIA_ATTACKS[0]]['auc']:8.3f} "
                  f"{r['ppl']:9.2f}")
    print(f"claims of {inner['candidate']} (control {inner['control']}):")
    f = lambda x, spec: "nan" if x is None else format(x, spec)  # noqa: E731
    for c in inner["claims"]:
        doc = (" (by construction; measured identical to the control)" if c.get("identical_to_control") else
               " (by construction, yet NOT identical to the control: the switch leaks)") if c.get("by_construction") else ""
        print(f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']:34s} {c['statistic']} {f(c['value'], '+.3f')} "
              f"CI [{f(c['ci95'][0], '+.3f')}, {f(c['ci95'][1], '+.3f')}] threshold {c['threshold']:+g} "
              f"p {f(c['p'], '.3g')}{doc}")
    for arm, s in inner["negative_controls"].items():
        print(f"negative control {arm}: {'passes every claim (!)' if s['passed'] else 'fails ' + ', '.join(s['failed'])}")
