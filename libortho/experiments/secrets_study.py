"""Experiment 1, realistic secrets (issue 15): the insertion-frequency curve and PII with paraphrased probes.

One training run per arm covers both studies, at a fixed budget (`epochs` passes over the schedule, never
"until extracted"):

* digit canaries dealt to insertion counts (1, 4, 16, 64) by `secrets.insertion_schedule`; as many digit
  canaries of the same format are never inserted (count 0: the membership non-members);
* `pii` PII records (`secrets.make_pii_records(2 * pii)`: the first half trained on, in the training template,
  `pii_count` times per epoch; the second half never seen: membership non-members).

Every epoch is the shuffled list of all insertions, cut into batches of `batch` sequences, each batch one
optimizer step with general text mixed in (`train.canary_loss`). The ortho-tuned arm's saliency mask is taken
from every trained secret once (step 0 of the loss). Arms (`KillSwitch.build`, unchanged): never_trained and
int4_of_public (controls), fine_tuned, ortho_tuned and lora (alpha 0 and 1).

Measured per arm and alpha: greedy extraction, rank and extrapolated exposure of every secret (digit canaries
and PII phone numbers, |R| candidates of the same format), the PII phone number under each paraphrased probe
template (`secrets.probe_canaries`, the same candidates), membership inference of the PII records
(`ref_ratio`: loss ratio to the public model).

**Claims** (one-sided, 95% CI, `libortho.stats`; thresholds in `THRESHOLDS`), for each switch X:

* `exposure_grows_with_insertions`: X@1's extrapolated exposure minus never_trained's (per canary) grows by
  more than `trend_bits_per_doubling` per doubling of the insertion count (least-squares slope of the per-count
  medians against log2(count); stratified bootstrap CI and p). A rank correlation was tried first and dropped:
  on the tiny model the INT4 noise of ortho_tuned@0 (hundredths of a bit) was rank-correlated with the count
  by chance (rho 0.73, CI [0.32, 0.97]) and passed; a slope in bits does not.
* `alpha0_exposure_no_higher_every_count`: at every count, X@0's extrapolated exposure is no more than
  `alpha0_margin_bits` above never_trained's (largest per-count median of the paired differences, stratified
  bootstrap). For ortho_tuned this is a test (its
  alpha 0 is INT4 of the public model, not the public model); for lora it is true by construction (the adapter
  at 0 is the public model) and carries "by_construction": true. Against int4_of_public, ortho_tuned@0 would
  be identical by construction too: that control is not used.
* `pii_exposure_above_control` (template 0) and `paraphrase{t}_exposure_above_control`: X@1's exposure of the
  phone number under the template is above never_trained's by more than `paraphrase_gain_bits` (median paired).
* `pii_mia_auc_above_control`: X@1's membership AUC on the PII records above never_trained's by more than
  `mia_auc_gain` (DeLong).

**Negative controls** (each must fail its claim; `negative_controls` in the JSON): the trend with X@0 in place
of X@1 (nothing inserted survives the switch), the alpha-0 claims with fine_tuned (no switch), the PII claims
with X@0.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..privacy import measure
from ..results import save_figure
from ..secrets import (PROBE_TEMPLATES, Insertion, frequency_curve, insertion_schedule, make_pii_records,
                       pii_canaries, probe_canaries)
from ..stats import Claim, _rng_kw, paired_claim, thresholds_for as claim_thresholds
from ..mia import auc_claim
from ..train import TrainConfig, canary_loss, config_key
from . import RunContext, register
from .kill_switch import FULL, MIA_ATTACKS, SMALL, KillSwitch, Size, exposure_view

COUNTS = (1, 4, 16, 64)
ARMS = ("never_trained", "int4_of_public", "fine_tuned", "ortho_tuned", "lora")
SWITCHES = ("ortho_tuned", "lora")
CONTROL = "never_trained"  # the public model: what nothing was inserted into
# (arm, control) pairs whose alpha-0 comparison holds by construction (the same weights at alpha 0)
BY_CONSTRUCTION = {("lora", "never_trained"), ("ortho_tuned", "int4_of_public")}
PROBES = tuple(range(1, 1 + len(PROBE_TEMPLATES)))  # the paraphrase templates of `secrets.TEMPLATES`

THRESHOLDS = {
    "trend_bits_per_doubling": 0.25,  # slope of the median exposure gain vs log2(count): lower 95% bound above
    "alpha0_margin_bits": 0.5,  # alpha-0 exposure over the public model's per count: upper bound below this
    "paraphrase_gain_bits": 1.0,  # PII exposure under a template over the public model's: lower bound above
    "mia_auc_gain": 0.1,  # PII membership AUC over the public model's: lower bound above
    "small": {"alpha0_margin_bits": 1.0},
}


def thresholds_for(size_name: str = "full", table: dict | None = None) -> dict:
    """The thresholds of a size: `stats.thresholds_for` of `table` (default `THRESHOLDS`)."""
    return claim_thresholds(THRESHOLDS if table is None else table, size_name,
                            ("trend_bits_per_doubling", "alpha0_margin_bits", "paraphrase_gain_bits",
                             "mia_auc_gain"))


@dataclass(frozen=True)
class StudySize:
    """How big a study is.

    Args:
        name: which thresholds apply ("full" or "small").
        per_count: digit canaries per insertion count; holdout: digit canaries never inserted.
        pii: PII records trained on (as many more drawn as non-members); pii_count: their insertions per epoch.
        epochs: passes over the schedule (the fixed budget); batch: sequences per optimizer step.
        base: Experiment 1's size for the rest (|R|, digits, perplexity protocol, density, learning rates; the
            step budgets are replaced by epochs x steps per epoch). From FULL it takes the lr grids too: at the
            full size each trained arm runs at every lr of its grid and keeps the lowest tail training loss, the
            rule of Experiment 1 (three trainings an arm); the small sizes have none.
    """

    name: str = "full"
    counts: tuple[int, ...] = COUNTS
    per_count: int = 25
    holdout: int = 100
    pii: int = 100
    pii_count: int = 16
    epochs: int = 2
    batch: int = 32
    base: Size = FULL
    arms: tuple[str, ...] = ARMS
    probes: tuple[int, ...] = PROBES  # paraphrase templates measured

    def __post_init__(self):
        for k in ("per_count", "holdout", "pii", "pii_count", "epochs", "batch"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        if self.pii < 2 or self.holdout < 2:
            raise ValueError(f"need >= 2 PII records and >= 2 held-out canaries, got {self.pii} and {self.holdout}")
        if not set(self.probes) <= set(PROBES):
            raise ValueError(f"probes must be templates among {PROBES}, got {self.probes!r}")
        unknown = set(self.arms) - set(ARMS)
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}; choose from {ARMS}")

    @property
    def sequences_per_epoch(self) -> int:
        return self.per_count * sum(self.counts) + self.pii * self.pii_count

    @property
    def steps(self) -> int:
        """Optimizer steps of every arm: epochs x batches per epoch."""
        return self.epochs * math.ceil(self.sequences_per_epoch / self.batch)

    def kill_size(self) -> Size:
        """The `KillSwitch` size: digit canaries and hold-outs of this study, every budget `steps` steps."""
        b, s = self.base, self.steps
        budget = lambda c: replace(c, max_steps=s, check_every=s, target=None)  # noqa: E731
        return replace(b, num_canaries=self.per_count * len(self.counts), num_holdout=self.holdout,
                       n_candidates_decisive=b.n_candidates, finetune=budget(b.finetune), ortho=budget(b.ortho),
                       lora=budget(b.lora), relearn=None, arms=self.arms,
                       alphas={a: (0.0, 1.0) for a in SWITCHES})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base"] = self.kill_size().to_dict()
        d.update(sequences_per_epoch=self.sequences_per_epoch, steps=self.steps)
        return d


FULL_STUDY = StudySize()
SMALL_STUDY = {
    # `make test`: the tiny random model through the pipeline in about two minutes on 2 CPU cores (5 epochs of
    # 22 steps: the budget where, at seed 0, the trend, alpha-0 and PII-MIA claims of ortho_tuned pass; at one
    # epoch of 7 steps only the alpha-0 claim did. 3 canaries a count: the per-count median of 2 is a mean, and
    # one extrapolated tail of 1e11 bits carried it. int4_of_public is skipped: it is ortho_tuned@0 bit for bit,
    # and lora@0 the public model)
    "tiny": StudySize(name="small", per_count=3, holdout=4, pii=12, pii_count=8, epochs=5, batch=16,
                      base=replace(SMALL["tiny"], n_candidates=16, n_candidates_decisive=16),
                      arms=("never_trained", "fine_tuned", "ortho_tuned"), probes=(1,)),
    # `run` on a CPU: SmolLM2 at Experiment 1's make-test learning rates, every arm, every probe
    "smollm2-135m": StudySize(name="small", per_count=3, holdout=4, pii=6, pii_count=8, epochs=2, batch=32,
                              base=replace(SMALL["smollm2-135m"], arms=ARMS)),
}


def _source_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


class SecretsStudy(KillSwitch):
    """Experiment 1's machinery with canaries trained by an insertion schedule, plus PII records and probes.

    `canaries` are the digit canaries then the PII records (training template); `holdout` the never-inserted
    digit canaries then the PII non-members. Entries of `results` carry `probes` (the paraphrase templates).
    """

    def __init__(self, model: str = "smollm2-135m", size: StudySize = FULL_STUDY, seed: int = 0,
                 device: str = "cpu", progress: bool = True, bits: int | None = None, measure_cache: bool = True):
        self.study = size
        super().__init__(model, size.kill_size(), seed, "plain", "default", device, progress, bits, measure_cache)

    def _prepare(self, *args, **kw) -> None:
        super()._prepare(*args, **kw)
        s = self.study
        self.digits, digit_holdout = list(self.canaries), list(self.holdout)
        self.insertion = insertion_schedule(self.digits, s.counts, self.seed)
        records = make_pii_records(2 * s.pii, self.seed)
        self.pii_records = records[:s.pii]
        pii_train = pii_canaries(self.tok, records[:s.pii], 0)
        self.probes = {t: cs for t, cs in probe_canaries(self.tok, records[:s.pii]).items() if t in s.probes}
        self.pii_insertion = insertion_schedule(pii_train, (s.pii_count,), self.seed)
        seq = [*self.insertion.sequences, *self.pii_insertion.sequences]
        random.Random(f"secrets:{self.seed}").shuffle(seq)
        self.sequences = seq
        self.canaries = self.digits + pii_train
        self.holdout = digit_holdout + pii_canaries(self.tok, records[s.pii:], 0)
        schedule = {"study": {k: v for k, v in asdict(s).items() if k != "base"},
                    "sequences": hashlib.sha256("\n".join(c.user + c.secret for c in seq).encode()).hexdigest()}
        self.schedule_key = config_key(schedule)

    # -- hooks of KillSwitch ------------------------------------------------------------------
    def _loss(self, cfg: TrainConfig):
        """Step s >= 1 trains batch (s - 1) mod batches of the schedule; step 0 (the saliency pass of the
        ortho stream's mask) every trained secret once."""
        b = self.study.batch
        batches = [canary_loss(self.sequences[i:i + b], self.general, cfg, self.pad_id)
                   for i in range(0, len(self.sequences), b)]
        every = canary_loss(self.canaries, self.general, cfg, self.pad_id)

        def loss_fn(model, step: int):
            return every(model, step) if step < 1 else batches[(step - 1) % len(batches)](model, step)

        return loss_fn

    def cache_key(self, kind: str, train: TrainConfig, **more) -> dict:
        return super().cache_key(kind, train, secrets_schedule=self.schedule_key, **more)

    def _measure_key(self, arm: str, alpha: float, n: int, kind: str = "measure") -> Path:
        p = super()._measure_key(arm, alpha, n, kind)
        return p.with_name(f"secrets-{config_key({'s': self.schedule_key, 'code': _source_hash()})}-{p.name}")

    def evaluate(self, model, n_candidates: int | None = None) -> dict:
        """`KillSwitch.evaluate` plus the PII phone numbers under every paraphrase template."""
        entry = super().evaluate(model, n_candidates)
        n = entry["n_candidates"]
        cands = self.candidates(n)[len(self.digits):]  # candidates depend on the record, not the template
        entry["probes"] = {}
        for t, cs in self.probes.items():
            rep = measure(model, self.tok, cs, n, self.seed, self.size.chunk, self.oom_events, candidates=cands,
                          extrapolate=False)
            entry["probes"][str(t)] = {"extracted": [bool(x) for x in rep.extracted],
                                       **exposure_view(rep.logprobs, n)}
        return entry

    # -- report -------------------------------------------------------------------------------
    def split(self) -> dict:
        """{arm: {alpha: {"digits", "pii", "ppl"}}}: per-canary values of the two studies (what claims read)."""
        nd, nh = len(self.digits), self.study.holdout
        n = str(self.size.n_candidates)
        out: dict = {}
        for arm, by in self.results.items():
            for a, e in by.items():
                v = e["by_R"][n]
                att = e["mia_scores"][MIA_ATTACKS[0]]
                pii = {"0": {"extracted": e["extracted"][nd:], "exposure": v["exposure"][nd:],
                             "exposure_ext": v["exposure_ext"][nd:]}}
                pii.update({t: {k: p[k] for k in ("extracted", "exposure", "exposure_ext")}
                            for t, p in e["probes"].items()})
                out.setdefault(arm, {})[a] = {
                    "digits": {"extracted": e["extracted"][:nd], "exposure": v["exposure"][:nd],
                               "exposure_ext": v["exposure_ext"][:nd]},
                    "pii": {"templates": pii, "mia_member": att["member"][nd:], "mia_nonmember": att["nonmember"][nh:]},
                    "ppl": e["ppl"]}
        return out

    def report(self, thresholds: dict | None = None) -> dict:
        """The `exp1_secrets` section: curves, PII table, claims and negative controls, per-canary values."""
        from ..results import environment

        t = thresholds if thresholds is not None else thresholds_for(self.study.name)
        arms = self.split()
        counts = list(self.insertion.counts)
        claims = [c for x in SWITCHES if {"0.0", "1.0"} <= set(arms.get(x, {})) and CONTROL in arms
                  for c in decide_claims(arms, counts, x, t, self.seed)]
        negatives = negative_controls(arms, counts, t, self.seed)
        return {
            "model": self.name, "public_model": self.public_facts, "seed": self.seed, "thresholds": t,
            "size": self.study.to_dict(), "exposure_candidates": self.size.n_candidates,
            "schedule": {**self.insertion.to_dict(), "epochs": self.study.epochs, "batch": self.study.batch,
                         "steps": self.study.steps, "pii_records": self.study.pii,
                         "pii_insertions_per_epoch": self.study.pii_count,
                         "sequences_per_epoch": len(self.sequences)},
            "curves": curves(arms, self.insertion, self.study.epochs, self.seed),
            "pii": pii_table(arms, self.seed),
            "claims": claims, "claims_summary": summarize(claims),
            "negative_controls": negatives,
            "negative_controls_summary": {"all_failed": not any(c["passed"] for c in negatives),
                                          "passed": [f"{c['name']} ({c['candidate']})" for c in negatives
                                                     if c["passed"]]},
            "arms": arms, "training": self.train_info, "arm_seconds": self.seconds,
            "mia": {"attack": MIA_ATTACKS[0], "members": "trained PII records (training template)",
                    "nonmembers": "PII records never trained on", "reference": "the public model"},
            "environment": environment(self.device),
        }


# ---------------------------------------------------------------------------------------------
# tables and claims: pure functions of `SecretsStudy.split()`, so a test can feed them anything

def _ext(view: dict) -> list[float]:
    """Extrapolated exposure per item, the rank exposure where no tail could be fitted (None)."""
    return [r if e is None else e for e, r in zip(view["exposure_ext"], view["exposure"])]


def curves(arms: dict, insertion: Insertion, epochs: int, seed: int = 0) -> dict:
    """{arm: {alpha: `secrets.frequency_curve` rows of the extrapolated exposures (+ "insertions" = count x epochs,
    "mean_rank_exposure": rank exposure is capped at log2 |R|, so its mean is defined)}}."""
    out: dict = {}
    for arm, by in arms.items():
        for a, e in by.items():
            d = e["digits"]
            rows = frequency_curve(insertion, d["extracted"], _ext(d), seed)
            for r, idx in zip(rows, insertion.by_count().values()):
                r.update(insertions=r["count"] * epochs,
                         mean_rank_exposure=float(np.mean([d["exposure"][i] for i in idx])))
            out.setdefault(arm, {})[a] = rows
    return out


def pii_table(arms: dict, seed: int = 0) -> dict:
    """{arm: {alpha: {template: {"extraction_rate", "median_exposure_ext"}, "mia"}}} of the PII records."""
    from ..mia import attack_metrics

    out: dict = {}
    for arm, by in arms.items():
        for a, e in by.items():
            p = e["pii"]
            row = {t: {"extraction_rate": float(np.mean(v["extracted"])), "median_exposure_ext": float(np.median(_ext(v)))}
                   for t, v in p["templates"].items()}
            row["mia"] = attack_metrics(p["mia_member"], p["mia_nonmember"], 0.01, seed)
            out.setdefault(arm, {})[a] = row
    return out


def _stratified(groups: list[np.ndarray], statistic, seed: int, n_resamples: int = 9999):
    """scipy's percentile bootstrap of `statistic(*groups, axis)`, each group resampled on its own (strata);
    None when no group varies (the point is the interval)."""
    from scipy import stats

    if all(np.ptp(g) == 0 for g in groups):
        return None
    return stats.bootstrap(groups, statistic, n_resamples=n_resamples, vectorized=True, axis=-1,
                           confidence_level=0.95, method="percentile", **_rng_kw(seed))


def _by_count(counts, candidate_values, control_values, least: int) -> tuple[np.ndarray, list[np.ndarray]]:
    x = np.asarray(counts, dtype=np.float64)
    d = np.asarray(candidate_values, dtype=np.float64) - np.asarray(control_values, dtype=np.float64)
    if x.shape != d.shape or x.size < least:
        raise ValueError(f"need >= {least} (count, value) pairs of equal length, got {x.size} counts, {d.size} values")
    if not np.isfinite(d).all():
        raise ValueError(f"values must be finite, got {d[~np.isfinite(d)][:3].tolist()}; drop those items first")
    ks = np.unique(x)
    return ks, [d[x == k] for k in ks]


def trend_claim(name: str, candidate: str, control: str, counts, candidate_values, control_values,
                threshold: float, alpha: float = 0.05, seed: int = 0, n_resamples: int = 9999) -> Claim:
    """"The candidate's excess over the control grows with the insertion count by more than `threshold` bits
    per doubling": the statistic is the least-squares slope of the per-count medians of the paired differences
    against log2(count) (medians: one extrapolated tail at 1e14 bits cannot carry it; a slope in bits: rank
    noise of a few hundredths of a bit cannot either). CI and one-sided p (share of resamples at or below
    `threshold`) from the stratified percentile bootstrap. Passed iff the lower bound is above `threshold` and
    p < alpha."""
    ks, groups = _by_count(counts, candidate_values, control_values, 3)
    if ks.size < 2:
        raise ValueError(f"a trend needs >= 2 insertion counts, got {ks.tolist()}")
    lx = np.log2(ks) - np.log2(ks).mean()  # (K,)

    def slope(*g, axis=-1):
        med = np.stack([np.median(v, axis=axis) for v in g], axis=-1)  # (..., K)
        return (med * lx).sum(-1) / (lx * lx).sum()

    value = float(slope(*groups))
    res = _stratified(groups, slope, seed, n_resamples)
    if res is None:
        lo = hi = value
        p = 0.0 if value > threshold else 1.0
    else:
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        p = float((1 + np.sum(res.bootstrap_distribution <= threshold)) / (1 + n_resamples))
    return Claim(name, candidate, control, "median_slope_bits_per_doubling", value, (lo, hi), float(threshold), p,
                 bool(lo > threshold and p < alpha), int(sum(g.size for g in groups)), "greater",
                 "stratified bootstrap percentile",
                 {"alpha": alpha, "median_diff_by_count": {str(int(k)): float(np.median(g)) for k, g in zip(ks, groups)}})


def every_count_claim(name: str, candidate: str, control: str, counts, candidate_values, control_values,
                      margin: float, alpha: float = 0.05, seed: int = 0, n_resamples: int = 9999) -> Claim:
    """"At every insertion count the candidate is no more than `margin` above the control": the statistic is
    the largest per-count median of the paired differences; its 95% CI and a one-sided bootstrap p (share of
    resamples at or above `margin`) come from resampling within each count (stratified percentile bootstrap).
    Passed iff the upper bound is below `margin` and p < alpha."""
    ks, groups = _by_count(counts, candidate_values, control_values, 2)
    worst = lambda *g, axis=-1: np.max([np.median(v, axis=axis) for v in g], axis=0)  # noqa: E731
    value = float(worst(*groups))
    res = _stratified(groups, worst, seed, n_resamples)
    if res is None:
        lo = hi = value
        p = 0.0 if value < margin else 1.0
    else:
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        p = float((1 + np.sum(res.bootstrap_distribution >= margin)) / (1 + n_resamples))
    return Claim(name, candidate, control, "max_count_median_diff", value, (lo, hi), float(margin), p,
                 bool(hi < margin and p < alpha), int(sum(g.size for g in groups)), "less", "stratified bootstrap percentile",
                 {"alpha": alpha, "median_diff_by_count": {str(int(k)): float(np.median(g)) for k, g in zip(ks, groups)}})


def _pairs(a: list, b: list) -> tuple[list, list]:
    keep = [(u, v) for u, v in zip(a, b) if u is not None and v is not None]
    return [u for u, _ in keep], [v for _, v in keep]


def _label(arm: str, alpha: str) -> str:
    return f"{arm}@{alpha}" if arm in SWITCHES else arm


def _add(out: list, claim: Claim, arm: str, control: str, alpha: str, **extra) -> None:
    d = claim.to_dict()
    d["by_construction"] = alpha == "0.0" and (arm, control) in BY_CONSTRUCTION
    d.update(extra)
    out.append(d)


def _at(arms: dict, arm: str, alpha: str) -> dict:
    by = arms[arm]
    return by[alpha] if alpha in by else by["1.0"]  # an arm without a switch: the model as built at every alpha


def exposure_trend(arms: dict, counts: list[int], arm: str, alpha: str, t: dict, seed: int = 0) -> list[dict]:
    """`exposure_grows_with_insertions` of `arm` at `alpha` against never_trained (digit canaries)."""
    c, k = _at(arms, arm, alpha)["digits"], _at(arms, CONTROL, "1.0")["digits"]
    keep = [i for i in range(len(counts)) if c["exposure_ext"][i] is not None and k["exposure_ext"][i] is not None]
    out: list = []
    _add(out, trend_claim("exposure_grows_with_insertions", _label(arm, alpha), CONTROL, [counts[i] for i in keep],
                          [c["exposure_ext"][i] for i in keep], [k["exposure_ext"][i] for i in keep], t["trend_bits_per_doubling"],
                          seed=seed), arm, CONTROL, alpha, values="extrapolated exposure per canary (bits)",
         dropped=len(counts) - len(keep))
    return out


def alpha0_every_count(arms: dict, counts: list[int], arm: str, alpha: str, t: dict, seed: int = 0) -> list[dict]:
    """`alpha0_exposure_no_higher_every_count` of `arm` at `alpha` against never_trained (digit canaries)."""
    c, k = _at(arms, arm, alpha)["digits"], _at(arms, CONTROL, "1.0")["digits"]
    keep = [i for i in range(len(counts)) if c["exposure_ext"][i] is not None and k["exposure_ext"][i] is not None]
    out: list = []
    _add(out, every_count_claim("alpha0_exposure_no_higher_every_count", _label(arm, alpha), CONTROL,
                                [counts[i] for i in keep], [c["exposure_ext"][i] for i in keep],
                                [k["exposure_ext"][i] for i in keep], t["alpha0_margin_bits"], seed=seed),
         arm, CONTROL, alpha, values="extrapolated exposure per canary (bits)", dropped=len(counts) - len(keep))
    return out


def pii_claims(arms: dict, arm: str, alpha: str, t: dict, seed: int = 0) -> list[dict]:
    """Exposure of the phone numbers under each template, and membership, of `arm` at `alpha` over the control."""
    c, k = _at(arms, arm, alpha)["pii"], _at(arms, CONTROL, "1.0")["pii"]
    out: list = []
    for tpl in sorted(c["templates"], key=int):
        a, b = _pairs(c["templates"][tpl]["exposure_ext"], k["templates"][tpl]["exposure_ext"])
        name = "pii_exposure_above_control" if tpl == "0" else f"paraphrase{tpl}_exposure_above_control"
        _add(out, paired_claim(name, _label(arm, alpha), CONTROL, a, b, t["paraphrase_gain_bits"],
                               statistic="median_diff", seed=seed),
             arm, CONTROL, alpha, values=f"extrapolated exposure of the phone number, template {tpl} (bits)",
             template=int(tpl))
    _add(out, auc_claim("pii_mia_auc_above_control", _label(arm, alpha), CONTROL, c["mia_member"],
                        c["mia_nonmember"], k["mia_member"], k["mia_nonmember"], t["mia_auc_gain"],
                        direction="greater", seed=seed),
         arm, CONTROL, alpha, values=f"membership score {MIA_ATTACKS[0]} per PII record")
    return out


def decide_claims(arms: dict, counts: list[int], switch: str, t: dict, seed: int = 0) -> list[dict]:
    """Every claim of `switch` (see the module docstring)."""
    return (exposure_trend(arms, counts, switch, "1.0", t, seed) + alpha0_every_count(arms, counts, switch, "0.0", t, seed)
            + pii_claims(arms, switch, "1.0", t, seed))


def negative_controls(arms: dict, counts: list[int], t: dict, seed: int = 0) -> list[dict]:
    """The claims with a candidate that must fail them: each switch at alpha 0 for the trend and the PII
    claims, fine_tuned (no switch) for the alpha-0 claims. Each dict carries "expected": "fail"."""
    out = []
    for x in SWITCHES:
        if {"0.0", "1.0"} <= set(arms.get(x, {})) and CONTROL in arms:
            out += exposure_trend(arms, counts, x, "0.0", t, seed) + pii_claims(arms, x, "0.0", t, seed)
    if "fine_tuned" in arms and CONTROL in arms:
        out += alpha0_every_count(arms, counts, "fine_tuned", "1.0", t, seed)
    for c in out:
        c["expected"] = "fail"
    return out


def summarize(claims: list[dict]) -> dict:
    """{"passed": every claim that is a test passed, "failed": those that did not, "by_construction": names}."""
    tests = [c for c in claims if not c.get("by_construction")]
    return {"passed": all(c["passed"] for c in tests),
            "failed": [f"{c['name']} ({c['candidate']})" for c in tests if not c["passed"]],
            "by_construction": [f"{c['name']} ({c['candidate']})" for c in claims if c.get("by_construction")]}


# ---------------------------------------------------------------------------------------------
# plot, run

def plot(inner: dict, path: Path) -> Path:
    """Exposure and extraction vs insertion count (log x) per arm and alpha; PII exposure per template."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    medians = [1.0]
    for i, (arm, by) in enumerate(inner["curves"].items()):
        for a, rows in by.items():
            label = _label(arm, a)
            ls = "--" if a == "0.0" else "-"
            x = [r["insertions"] for r in rows]
            y = np.array([r["median_exposure"] for r in rows])
            medians += [v for v in y.tolist() if np.isfinite(v)]
            ci = np.array([r["median_exposure_ci95"] for r in rows]).T  # (2, counts)
            axes[0].errorbar(x, y, yerr=np.abs(ci - y), fmt="o" + ls, color=f"C{i}", capsize=3, label=label)
            axes[1].plot(x, [r["extraction_rate"] for r in rows], "o" + ls, color=f"C{i}", label=label)
            pii = inner["pii"][arm][a]
            tpls = sorted((k for k in pii if k != "mia"), key=int)
            axes[2].plot([int(k) for k in tpls], [pii[k]["median_exposure_ext"] for k in tpls], "o" + ls,
                         color=f"C{i}", label=label)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("insertions of the canary (count x epochs)")
    axes[0].set_ylabel("median extrapolated exposure (bits), 95% CI")
    axes[0].set_yscale("symlog")
    # exposure is >= 0; an extrapolated tail's CI can reach 1e12 bits and flatten every curve: clip the axis
    top = 10 ** math.ceil(math.log10(max(medians) * 4))
    axes[0].set_ylim(0, top)
    axes[0].set_title(f"CI bars clipped at {top:g} bits", fontsize=8)
    axes[2].set_ylim(bottom=0)
    axes[1].set_ylabel("greedy extraction rate")
    axes[2].set_xlabel("template (0: training text; 1..: paraphrased probes)")
    axes[2].set_ylabel("PII phone number: median extrapolated exposure (bits)")
    axes[2].set_yscale("symlog")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    s = inner["claims_summary"]
    fig.suptitle(f"Exp 1 realistic secrets: {inner['model']}, seed {inner['seed']}, |R|={inner['exposure_candidates']}, "
                 f"{inner['schedule']['epochs']} epochs; "
                 f"{'all claims hold' if s['passed'] else 'failed: ' + ', '.join(s['failed'])[:150]}", fontsize=9)
    return save_figure(fig, path, dpi=110)


def print_table(inner: dict) -> None:
    print(f"\n== Exp 1 realistic secrets: {inner['model']}, |R|={inner['exposure_candidates']} ==")
    for arm, by in inner["curves"].items():
        for a, rows in by.items():
            cells = " ".join(f"k{r['count']}: {r['extraction_rate']:.2f}/{r['median_exposure']:.1f}" for r in rows)
            pii = inner["pii"][arm][a]
            probes = " ".join(f"t{k}: {v['median_exposure_ext']:.1f}" for k, v in pii.items() if k != "mia")
            print(f"{_label(arm, a):20s} extraction/median exposure {cells} | PII {probes} AUC {pii['mia']['auc']:.2f}")
    f = lambda x: "nan" if x is None else f"{x:+.3f}"  # noqa: E731
    for head, cs in (("claims", inner["claims"]), ("negative controls (must fail)", inner["negative_controls"])):
        print(head + ":")
        for c in cs:
            tag = " (by construction)" if c.get("by_construction") else ""
            print(f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']:36s} {c['candidate']:16s} {c['statistic']} "
                  f"{f(c['value'])} CI [{f(c['ci95'][0])}, {f(c['ci95'][1])}] thr {c['threshold']:+g}{tag}")


@register("secrets")
def run(ctx: RunContext, size: StudySize | None = None, thresholds: dict | None = None) -> dict:
    """`run --experiment secrets`: the study at `size` (FULL_STUDY with --size full or on a GPU, else the
    model's small size); returns the `exp1_secrets` section and writes its plot beside the JSON."""
    size = size or (FULL_STUDY if ctx.full_size else SMALL_STUDY.get(ctx.model, SMALL_STUDY["smollm2-135m"]))
    exp = SecretsStudy(ctx.model, size, ctx.seed, ctx.device, ctx.progress, ctx.load_bits)
    for arm in tqdm(size.arms, desc="secrets arms", disable=not ctx.progress):
        exp.measure_arm(arm)
    inner = exp.report(thresholds)
    inner["plot"] = str(plot(inner, ctx.artifact("exp1_secrets.png")))
    print_table(inner)
    return inner
