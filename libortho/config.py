"""OrthoConfig: every knob of a conversion in one validated object; the runtime backend choice beside it."""
from __future__ import annotations

import importlib
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from .llama import LLAMA_LINEARS


class Mode(str, Enum):
    POSTHOC = "posthoc"  # base = INT4(W), ortho = selected residual W - INT4(W)
    DELTA = "delta"  # base = INT4(W_public), ortho = selected entries of W_tuned - INT4(W_public)
    TUNE = "tune"  # base = INT4(W_public), ortho = sparse values trained on the private data (OrthoTuneConfig)


class Score(str, Enum):
    HESSIAN = "hessian"  # R^2 * diag(H): the published sieve
    MAGNITUDE = "magnitude"  # |R|: control
    RANDOM = "random"  # seeded uniform: control
    # ortho-tuning masks (libortho.train): g = gradient of the private loss at the public weights
    SALIENCY_HESSIAN = "saliency_hessian"  # g^2 / (diag(H) + damp * mean(diag(H)))
    SALIENCY = "saliency"  # g^2


POSTHOC_SCORES = (Score.HESSIAN, Score.MAGNITUDE, Score.RANDOM)
TUNE_SCORES = (Score.SALIENCY_HESSIAN, Score.SALIENCY, Score.RANDOM)


class Quantizer(str, Enum):
    RTN = "rtn"  # round-to-nearest: data-free
    GPTQ = "gptq"  # error-compensating rounding with the full calibration Hessian (libortho.gptq)


class Backend(str, Enum):
    """How an OrthoLinear computes; a runtime choice (`libortho.set_backend`), never stored in a checkpoint."""

    AUTO = "auto"  # the fused GPU kernel where it applies (CUDA, bf16/fp16 activations), else plain torch
    TORCH = "torch"  # plain torch (libortho.kernels.reference): runs everywhere, differentiable
    TRITON = "triton"  # the fused GPU kernel, or an error where it cannot run


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class OrthoConfig:
    """How to split each linear into an INT4 base and a sparse ortho stream.

    Args:
        density: share of each weight's entries kept in the ortho stream, in (0, 1].
        group_size: inputs sharing one INT4 scale; -1 for one group per output channel.
        symmetric: symmetric INT4 grid (no zero points) or asymmetric.
        clip_search: search a per-group range clip for the INT4 base (data-free, lower error).
        pad: allow a group size that does not divide a layer's input width (short last group).
        mode: `posthoc` or `delta` (see `Mode`); ortho-tuning is `OrthoTuneConfig` (libortho.train).
        score: selection score (see `Score`).
        seed: seed of the `random` score.
        targets: names of the linear modules to convert (Llama layout by default).
        quantizer: how the INT4 base is rounded (see `Quantizer`); `gptq` needs calibration batches.
    """

    density: float = 0.01
    # g32 asymmetric divides every Llama 3 width (576, 3072, 4096, 8192, 14336); g128 does not divide SmolLM2's
    # 576. Experiment 2 measures every grid on a model off the 4-bit grid.
    group_size: int = 32
    symmetric: bool = False
    clip_search: bool = False
    pad: bool = False
    mode: Mode = Mode.POSTHOC
    score: Score = Score.HESSIAN
    seed: int = 0
    targets: tuple[str, ...] = field(default=LLAMA_LINEARS)
    quantizer: Quantizer = Quantizer.RTN

    def __post_init__(self):
        self.mode, self.score, self.quantizer = Mode(self.mode), Score(self.score), Quantizer(self.quantizer)
        if isinstance(self.targets, str):
            raise ValueError(f"targets must be a sequence of names, got the string {self.targets!r}")
        self.targets = tuple(self.targets)
        validate_density(self.density)
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs > 0):
            raise ValueError(f"group_size must be a positive int or -1, got {gs!r}")
        for name in ("symmetric", "clip_search", "pad"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if not self.targets:
            raise ValueError("targets is empty: name at least one linear (e.g. 'q_proj')")
        self._check_mode()

    def _check_mode(self) -> None:
        if self.mode is Mode.TUNE:
            raise ValueError("mode 'tune' is OrthoTuneConfig (libortho.train), not OrthoConfig")
        if self.score not in POSTHOC_SCORES:
            raise ValueError(f"score {self.score.value!r} is an ortho-tuning mask; OrthoConfig takes "
                             f"{[s.value for s in POSTHOC_SCORES]}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, Enum):
                d[k] = v.value
        d["targets"] = list(self.targets)
        d["kind"], d["module"] = type(self).__name__, type(self).__module__
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OrthoConfig":
        """The config `to_dict` wrote (its `kind` picks the class); unknown keys are refused by name."""
        d = dict(d)
        kind, module = d.pop("kind", cls.__name__), d.pop("module", None)
        d.pop("backend", None)  # written by versions that stored the backend in the config
        if module and module.startswith("libortho.") and module not in sys.modules:
            importlib.import_module(module)  # the module that defines a subclass (e.g. OrthoTuneConfig)
        target = next((c for c in _subclasses(OrthoConfig) if c.__name__ == kind), None)
        if target is None:
            raise ValueError(f"unknown config kind {kind!r}")
        names = {f.name for f in fields(target)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{target.__name__} has no field {unknown[0]!r} (fields: {sorted(names)})")
        return target(**d)


def _subclasses(cls) -> list[type]:
    out = [cls]
    for c in cls.__subclasses__():
        out += _subclasses(c)
    return out


MAX_CANARIES = 9000  # canaries of one run, members and held-out together: one per 4-digit user id


def validate_density(density: float) -> None:
    if not _is_number(density) or not math.isfinite(density) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")


# A larger alpha amplifies the ortho stream past any fine-tuned model; 1e3 leaves room for sweeps while keeping
# bf16/fp32 logits finite (1e30 made them inf).
ALPHA_MAX = 1e3


def validate_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) and not hasattr(alpha, "__float__"):
        raise ValueError(f"alpha must be a number, got {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if not 0 <= alpha <= ALPHA_MAX:
        raise ValueError(f"alpha must be in [0, {ALPHA_MAX:g}] (0 = kill switch, 1 = fine-tuned), got {alpha!r}")
    return alpha
