"""Experiment 1: the privacy kill switch, measured with extraction, exposure and perplexity, against controls.

Every arm sees the same canaries, the same general text, the same candidates and the same evaluation
windows. Arms with a switch are swept over alpha; arms without one are reported under "1.0" (the
model as built) only.

| arm                  | what it is                                                                  |
| -------------------- | --------------------------------------------------------------------------- |
| never_trained        | the public model                                                            |
| fine_tuned           | full fine-tune of the public model on canaries + general text               |
| int4_of_fine_tuned   | INT4 RTN of fine_tuned (the base grid below)                                 |
| nf4_of_fine_tuned    | bitsandbytes NF4 of fine_tuned                                              |
| posthoc_{hessian, magnitude, random} | orthogonalize_ of fine_tuned, mode posthoc, that score      |
| delta                | orthogonalize_ of fine_tuned, mode delta: INT4(public) + top entries of the delta |
| ortho_tuned          | libortho: frozen INT4(public) base, only a sparse ortho stream trained      |
| lora                 | PEFT LoRA (r 8, alpha 32, dropout 0.1), alpha scales the adapter            |

The INT4 grid is group 32 asymmetric for every arm: the embedded SmolLM2 weights come from a Q4_1
GGUF (group-32 asymmetric 4-bit), so INT4(public) on that grid *is* the public model and alpha=0 of
`ortho_tuned` equals `never_trained` bit for bit. On a model not published in 4-bit, alpha=0 is INT4 of
the public weights, which differs from them by the usual quantization error.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..baselines import int4_rtn_, nf4_
from ..config import OrthoConfig
from ..convert import orthogonalize_
from ..data import calibration_batches, load_text
from ..hf import load as load_checkpoint
from ..models import load_model
from ..modules import cache_base_, set_alpha, state_without_tied
from ..perplexity import Protocol, encode, perplexity
from ..privacy import make_canaries, measure
from ..results import save_figure
from ..train import (LoraSpec, OrthoTuneConfig, TrainConfig, cache_path, cached, canary_loss, full_finetune_,
                     general_ids, lora_finetune_, lora_wrap, set_lora_alpha, until_extracted)
from . import RunContext, register

ARMS = ("never_trained", "fine_tuned", "int4_of_fine_tuned", "nf4_of_fine_tuned", "posthoc_hessian",
        "posthoc_magnitude", "posthoc_random", "delta", "ortho_tuned", "lora")
MAIN_ARMS = ("never_trained", "fine_tuned", "ortho_tuned")
SWITCHED = ("posthoc_hessian", "posthoc_magnitude", "posthoc_random", "delta", "ortho_tuned", "lora")
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Size:
    """How big a run is. `FULL` is the acceptance size; the `make test` sizes are in bench/."""

    num_canaries: int = 20
    n_candidates: int = 1000  # |R|, true secret included
    groups: tuple[int, ...] = (4, 4, 4)  # digits of the secret: 1914-0122-1485
    ppl: Protocol = Protocol(max_length=512, stride=512, max_tokens=8192)
    calib: tuple[int, int] = (16, 256)  # calibration batches x tokens (public fortunes)
    density: float = 0.01
    group_size: int = 32
    symmetric: bool = False
    # learning rates measured on SmolLM2-135M, 20 canaries: every run reaches 20/20 in 35-85 steps. Ortho-tuning
    # at 3e-3 overshoots (alpha-1 ppl 20.34); 1e-3, LoRA's rate, gives 18.14 (results/exp1_ortho_sweep.json)
    finetune: TrainConfig = TrainConfig(lr=1e-4, max_steps=300, check_every=5)
    ortho: TrainConfig = TrainConfig(lr=1e-3, max_steps=300, check_every=5)
    lora: TrainConfig = TrainConfig(lr=1e-3, max_steps=300, check_every=5)
    alphas: dict = field(default_factory=dict)  # arm -> alphas, overriding ALPHAS
    chunk: int = 256  # candidates per forward pass

    def alphas_for(self, arm: str) -> tuple[float, ...]:
        if arm not in SWITCHED:
            return (1.0,)
        return tuple(self.alphas.get(arm, ALPHAS))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl"] = self.ppl.to_dict()
        return d


FULL = Size()


def _quick(lr: float, max_steps: int) -> TrainConfig:
    return TrainConfig(lr=lr, max_steps=max_steps, check_every=2, general_chunks=1, general_length=32)


# The small sizes: `make test`, and `run` on a CPU unless `--size full`. The acceptance size is FULL.
# SmolLM2's ortho rate: 3e-3 and 1e-2 both reach 3/3 in 14 steps; alpha-1 ppl 34.7 vs 151.4 (2 CPU cores).
SMALL = {
    # the tiny model is random: it is here to run every arm end to end, not to memorize
    "tiny": Size(num_canaries=2, n_candidates=8, groups=(4, 4), ppl=Protocol(128, 128, 128), calib=(2, 32),
                 finetune=_quick(3e-3, 4), ortho=_quick(3e-2, 4), lora=_quick(1e-2, 4), chunk=8),
    "smollm2-135m": Size(num_canaries=3, n_candidates=16, groups=(4, 4), ppl=Protocol(256, 256, 256),
                         calib=(2, 64), density=0.02, finetune=_quick(3e-4, 30), ortho=_quick(3e-3, 40),
                         lora=_quick(3e-3, 30),
                         alphas={"ortho_tuned": (0.0, 1.0)}, chunk=16),
}


class KillSwitch:
    """One experiment: the public model, canaries and data loaded once; arms built and measured on demand."""

    def __init__(self, model: str = "smollm2-135m", size: Size = FULL, seed: int = 0, fmt: str = "plain",
                 text: str = "default", device: str = "cpu", progress: bool = True, bits: int | None = None):
        torch.manual_seed(seed)
        self.source, self.size, self.seed, self.fmt, self.device, self.progress = model, size, seed, fmt, device, progress
        loaded = load_model(model, device=device, bits=bits)
        self.public, self.tok, self.name = loaded.model, loaded.tokenizer, loaded.name
        for p in self.public.parameters():
            p.requires_grad_(False)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.canaries = make_canaries(self.tok, size.num_canaries, seed, fmt, size.groups)
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
        self.ocfg = OrthoTuneConfig(density=size.density, group_size=size.group_size, symmetric=size.symmetric,
                                    seed=seed, train=size.ortho)

    # -- cache keys ---------------------------------------------------------------------------
    def cache_key(self, kind: str, train: TrainConfig, **more) -> dict:
        """Everything that determines a trained arm's weights: its cache key."""
        return {"kind": kind, "model": self.source, "seed": self.seed, "format": self.fmt,
                "canaries": self.size.num_canaries, "groups": list(self.size.groups), "train": train.to_dict(),
                "general": "fortunes@100000", **more}

    def ortho_cache(self) -> Path:
        """Where the ortho-tuned arm is cached: a libortho checkpoint (save_pretrained) plus meta.json."""
        return cache_path("ortho", self.cache_key("ortho", self.size.ortho, ortho=self.ocfg.to_dict(),
                                                  calib=list(self.size.calib)))

    def _copy_public(self):
        return copy.deepcopy(self.public)

    def _loss(self, cfg: TrainConfig):
        return canary_loss(self.canaries, self.general, cfg, self.pad_id)

    # -- arms ---------------------------------------------------------------------------------
    def fine_tuned(self):
        if self._ft_state is None:
            def build():
                m = self._copy_public()
                hist = full_finetune_(m, self._loss(self.size.finetune), self.size.finetune, self.progress,
                                      until_extracted(self.canaries))
                return state_without_tied(m), {"history": hist}
            state, meta, hit = cached("full_ft", self.cache_key("full_ft", self.size.finetune), build)
            self._ft_state = state
            self.train_info["fine_tuned"] = {"steps": meta["history"]["steps"], "cached": hit}
        m = self._copy_public()
        m.load_state_dict({k: v.to(self.device) for k, v in self._ft_state.items()}, strict=False)
        if getattr(m.config, "tie_word_embeddings", False):
            m.tie_weights()
        return m.eval()

    def ortho_tuned(self):
        """Ours: only a sparse stream trained over INT4 of the public weights; cached as a libortho checkpoint."""
        d = self.ortho_cache()
        meta_path, hit = d / "meta.json", True
        model = None
        if meta_path.is_file():
            try:
                model, meta = load_checkpoint(d), json.loads(meta_path.read_text())
            except (ValueError, OSError) as e:  # a truncated entry: rebuild it
                print(f"libortho: cache entry {d} is unreadable ({str(e)[:120]}); rebuilding it", file=sys.stderr)
                shutil.rmtree(d, ignore_errors=True)
        if model is None:
            hit = False
            model = self._copy_public()
            orthogonalize_(model, self.ocfg, calibration=self.calib, loss_fn=self._loss(self.size.ortho),
                           measure=until_extracted(self.canaries), progress=self.progress)
            meta = {"history": {k: model.libortho_stats.get(k) for k in ("loss", "measure", "steps", "nnz",
                                                                          "density")}, "config": self.ocfg.to_dict()}
            tmp = d.with_name(d.name + f".tmp{os.getpid()}")
            model.save_pretrained(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if d.exists():  # a concurrent builder won: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rename(d)
        model = model.to(self.device)
        cache_base_(model)
        h = meta["history"]
        self.train_info["ortho_tuned"] = {"steps": h["steps"], "cached": hit, "nnz": h["nnz"],
                                          "density": h["density"], "config": self.ocfg.to_dict()}
        return model.eval()

    def lora(self):
        spec = LoraSpec()

        def build():
            m = lora_wrap(self._copy_public(), spec, self.seed)
            hist = lora_finetune_(m, self._loss(self.size.lora), self.size.lora, self.progress,
                                  until_extracted(self.canaries))
            return {k: v for k, v in m.state_dict().items() if "lora_" in k}, {"history": hist}

        state, meta, hit = cached("lora", self.cache_key("lora", self.size.lora, lora=spec.to_dict()), build)
        m = lora_wrap(self._copy_public(), spec, self.seed)
        missing = set(state) - set(m.state_dict())
        if missing:
            raise ValueError(f"cached LoRA weights do not fit the model: {sorted(missing)[:3]}")
        m.load_state_dict({k: v.to(self.device) for k, v in state.items()}, strict=False)
        self.train_info["lora"] = {"steps": meta["history"]["steps"], "cached": hit, "config": spec.to_dict()}
        return m.eval()

    def _ortho_config(self, mode: str, score: str) -> OrthoConfig:
        return OrthoConfig(density=self.size.density, group_size=self.size.group_size, symmetric=self.size.symmetric,
                           mode=mode, score=score, seed=self.seed)

    def build(self, arm: str):
        """(model, alpha setter or None) of `arm`."""
        if arm == "never_trained":
            return self._copy_public(), None
        if arm == "fine_tuned":
            return self.fine_tuned(), None
        if arm == "int4_of_fine_tuned":
            m = self.fine_tuned()
            int4_rtn_(m, self.size.group_size, self.size.symmetric)
            return m, None
        if arm == "nf4_of_fine_tuned":
            m = self.fine_tuned()
            nf4_(m)
            return m, None
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
    def evaluate(self, model) -> dict:
        rep = measure(model, self.tok, self.canaries, self.size.n_candidates, self.seed, self.size.chunk,
                      self.oom_events)
        return {"extraction_rate": rep.extraction_rate, "mean_exposure": rep.mean_exposure,
                "ppl": perplexity(model, self.eval_ids, self.size.ppl),
                "extracted": sum(rep.extracted), "exposures": [round(e, 3) for e in rep.exposures]}

    def measure_arm(self, arm: str, alphas: tuple[float, ...] | None = None) -> dict[str, dict]:
        """Build `arm` and measure it at each alpha (memoized: a second call adds only missing alphas)."""
        alphas = alphas or self.size.alphas_for(arm)
        done = self.results.setdefault(arm, {})
        todo = [a for a in alphas if str(float(a)) not in done]
        if todo:
            t0 = time.perf_counter()
            model, setter = self.build(arm)
            for a in todo:
                if setter is not None:
                    setter(model, a)
                done[str(float(a))] = self.evaluate(model)
            del model
            self.seconds[arm] = round(self.seconds.get(arm, 0.0) + time.perf_counter() - t0, 1)
        return {k: done[k] for k in sorted(done, key=float)}

    def privacy_ratio(self, arm: str) -> float | None:
        """extraction(alpha 1) / max(extraction(alpha 0), 1/n): bounded by n."""
        r = self.results.get(arm, {})
        if "1.0" not in r or "0.0" not in r:
            return None
        return r["1.0"]["extraction_rate"] / max(r["0.0"]["extraction_rate"], 1 / len(self.canaries))

    def report(self) -> dict:
        """The inner dict of `exp1_kill_switch`."""
        from ..results import environment

        return {
            "model": self.name, "num_canaries": len(self.canaries), "exposure_candidates": self.size.n_candidates,
            "seed": self.seed, "canary_format": self.fmt, "secret_digits": list(self.size.groups),
            "arms": {a: {k: {m: v[m] for m in ("extraction_rate", "mean_exposure", "ppl", "extracted")}
                         for k, v in self.results[a].items()} for a in ARMS if a in self.results},
            "privacy_ratio": {a: self.privacy_ratio(a) for a in SWITCHED if self.privacy_ratio(a) is not None},
            "per_canary_exposure": {a: {k: v["exposures"] for k, v in r.items()} for a, r in self.results.items()},
            "oom_retries": self.oom_events,
            "base": {"quantization": "INT4 RTN", "group_size": self.size.group_size,
                     "symmetric": self.size.symmetric,
                     "why": "the embedded SmolLM2 is a Q4_1 GGUF (group-32 asymmetric): INT4(public) on this grid "
                            "is the public model itself, so alpha=0 of ortho_tuned equals never_trained exactly"},
            "ortho_tune": {"density": self.ocfg.density, "score": self.ocfg.score, "damp": self.ocfg.damp,
                           "score_formula": "grad_private^2 / (diagH_public + damp*mean(diagH_public))"},
            "training": self.train_info, "size": self.size.to_dict(),
            "perplexity": {"dataset": self.text.name, "protocol": self.size.ppl.to_dict(),
                           "tokens": int(self.eval_ids.numel())},
            "arm_seconds": self.seconds, "environment": environment(self.device),
        }


def plot(inner: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    metrics = (("extraction_rate", "extraction rate"), ("mean_exposure", "mean exposure (bits)"),
               ("ppl", "perplexity (held-out)"))
    for ax, (key, label) in zip(axes, metrics):
        for i, (arm, by_alpha) in enumerate(inner["arms"].items()):
            xs = sorted(by_alpha, key=float)
            ys = [by_alpha[x][key] for x in xs]
            color = f"C{i % 10}"
            if arm in SWITCHED and len(xs) > 1:
                ax.plot([float(x) for x in xs], ys, "o-", color=color, label=arm,
                        lw=2.5 if arm == "ortho_tuned" else 1.2)
            else:
                ax.axhline(ys[-1], color=color, ls="--", lw=1, label=f"{arm} (no alpha)")
        ax.set_xlabel("alpha")
        ax.set_title(label)
        if key == "ppl":
            ax.set_yscale("log")
    axes[1].axhline(math.log2(inner["exposure_candidates"]), color="gray", lw=0.5, ls=":")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    env = inner.get("environment", {})
    fig.suptitle(f"Exp 1 kill switch: {inner['model']}, {inner['num_canaries']} canaries, |R|="
                 f"{inner['exposure_candidates']}, seed {inner['seed']} ({env.get('date', '')}, "
                 f"{env.get('gpu') or env.get('machine', '')})", fontsize=10)
    return save_figure(fig, path, dpi=110)


@register("kill_switch")
def run(ctx: RunContext, size: Size | None = None, arms: tuple[str, ...] = ARMS) -> dict:
    """Build and measure every arm; write its plot to `ctx.artifact('exp1_kill_switch.png')`; return the JSON section."""
    size = size or (FULL if ctx.full_size else SMALL.get(ctx.model, SMALL["smollm2-135m"]))
    if str(ctx.device).startswith("cuda"):  # same seed, same numbers: no atomics-order noise in backward
        torch.use_deterministic_algorithms(True, warn_only=True)
    if ctx.num_canaries:
        size = replace(size, num_canaries=ctx.num_canaries)
    exp = KillSwitch(ctx.model, size, ctx.seed, ctx.canary_format, ctx.text, ctx.device, ctx.progress, ctx.load_bits)
    for arm in tqdm(arms, desc="exp1 arms", disable=not ctx.progress):
        exp.measure_arm(arm)
    inner = exp.report()
    inner["plot"] = str(plot(inner, ctx.artifact("exp1_kill_switch.png")))
    _print_table(inner)
    return inner


def _print_table(inner: dict) -> None:
    print(f"\n== Exp 1 kill switch: {inner['model']}, {inner['num_canaries']} canaries, "
          f"|R|={inner['exposure_candidates']} ==")
    print(f"{'arm':22s} {'alpha':>5s} {'extract':>8s} {'exposure':>9s} {'ppl':>9s}")
    for arm, by_alpha in inner["arms"].items():
        for a, r in by_alpha.items():
            print(f"{arm:22s} {a:>5s} {r['extraction_rate']:8.2f} {r['mean_exposure']:9.2f} {r['ppl']:9.2f}")
    for arm, ratio in inner["privacy_ratio"].items():
        print(f"privacy ratio {arm}: {ratio:.1f}")
