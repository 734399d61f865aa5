"""Claims as statistics: paired one-sided tests with bootstrap confidence intervals, and the power they have.

A claim compares a candidate (an arm at some alpha) with its control on the same items (canaries, records)
and decides whether the effect lies beyond a threshold, an effect size taken from thresholds.toml.

* `paired_claim`, direction "greater" ("the candidate exceeds the control by more than `threshold`"):
  passed iff the lower bound of the 95% bootstrap CI of the statistic of the per-item differences
  d_i = candidate_i - control_i is above `threshold` AND the one-sided test of H0 "location of d <= threshold"
  gives p < alpha.
* `paired_claim`, direction "less" (equivalence-style, "the candidate is no more than `threshold` above
  the control"): passed iff the upper CI bound is below `threshold` AND the one-sided test of
  H0 "location of d >= threshold" gives p < alpha. `no_higher_claim` is this with its own name.
* `proportion_claim`: the same two directions for rates (extraction: hits out of n), exact intervals.

Both halves must hold, so a claim fails on a null effect, on an effect at or just under the threshold,
and on a design too small to tell (n < 5 pairs can never reach p < 0.05 with a rank or sign test:
the smallest one-sided p of n pairs is 2**-n).

The bootstrap is scipy's: BCa by default (bias-corrected and accelerated; percentile where BCa is
undefined because every jackknife value is equal, e.g. identical differences), seeded by `seed`.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

DIRECTIONS = ("greater", "less")
TESTS = ("wilcoxon", "sign")
METHODS = ("BCa", "percentile", "basic")
# statistics of the per-item differences; each takes (array, axis) like numpy reductions
STATISTICS: dict[str, Callable] = {"mean_diff": np.mean, "median_diff": np.median}
CONFIDENCE = 0.95  # the "ci95" of every claim


@dataclass(frozen=True)
class Claim:
    """One decided claim; `to_dict()` is its JSON form.

    Args:
        name: what is claimed, e.g. "ortho_alpha0_exposure_no_higher_than_public".
        candidate, control: the two arms (labels, e.g. "ortho_tuned@0.0", "int4_of_public").
        statistic: of the per-item differences ("mean_diff", "median_diff") or "rate_diff".
        value: the statistic on the data (candidate minus control).
        ci95: its 95% confidence interval (low, high).
        threshold: the effect size the claim is decided against.
        p: one-sided p-value of H0 "not beyond the threshold".
        passed: CI bound beyond the threshold and p < alpha (see the module docstring).
        n: items (pairs; for proportions, the candidate's count).
        direction: "greater" (beyond = above) or "less" (beyond = below).
        test: how p and the CI were computed.
        detail: means, counts, alpha: whatever a reader needs to recompute it.
    """

    name: str
    candidate: str
    control: str
    statistic: str
    value: float
    ci95: tuple[float, float]
    threshold: float
    p: float
    passed: bool
    n: int
    direction: str
    test: str
    detail: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"name": self.name, "candidate": self.candidate, "control": self.control, "statistic": self.statistic,
             "value": _num(self.value), "ci95": [_num(self.ci95[0]), _num(self.ci95[1])],
             "threshold": _num(self.threshold), "p": _num(self.p), "passed": bool(self.passed), "n": int(self.n),
             "direction": self.direction, "test": self.test}
        if self.detail:
            d["detail"] = {k: _num(v) if isinstance(v, float) else v for k, v in self.detail.items()}
        return d


def _num(x: float) -> float | None:
    """JSON-safe float: NaN and infinities become None (strict JSON has neither)."""
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(claims: Sequence[Claim]) -> dict:
    """{"passed": every claim passed, "failed": names of those that did not}."""
    failed = [c.name for c in claims if not c.passed]
    return {"passed": not failed, "failed": failed}


# ---------------------------------------------------------------------------------------------
# checks (before any computation)

def thresholds_for(table: dict, size_name: str = "full", required: Sequence[str] = ()) -> dict:
    """A claims table's thresholds for one size: its base entries with the nested `size_name` table laid over them
    (thresholds.toml's layout: `[exp1_kill_switch]` and `[exp1_kill_switch.small]`).

    Raises:
        KeyError: a `required` threshold is missing from the base entries.
    """
    base = {k: v for k, v in table.items() if not isinstance(v, dict)}
    missing = [k for k in required if k not in base]
    if missing:
        raise KeyError(f"claim thresholds lack {missing}")
    return {**base, **table.get(size_name, {})}


def _values(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of numbers, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} must be finite, got {a[~np.isfinite(a)][:3].tolist()} among them; "
                         "drop or fix those items first")
    return a


def _check_common(threshold: float, direction: str, alpha: float):
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _check_boot(method: str, n_resamples: int):
    if method not in METHODS:
        raise ValueError(f"bootstrap method must be one of {METHODS}, got {method!r}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")


# ---------------------------------------------------------------------------------------------
# bootstrap

def _rng_kw(seed: int) -> dict:
    # scipy >= 1.15 takes `rng`; 1.11-1.14 take `random_state`
    name = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def bootstrap_ci(samples: Sequence, statistic: Callable, *, paired: bool = False, method: str = "BCa",
                 n_resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap CI of `statistic(*samples, axis=-1)` (scipy.stats.bootstrap, seeded).

    Args:
        samples: one or more 1-D arrays; resampled together by index when `paired`, else each on its own
            (stratified: a two-group statistic keeps both group sizes).
        statistic: vectorized, takes `axis` (numpy-reduction style).
        method: "BCa" (default), "percentile" or "basic". BCa falls back to percentile where it is undefined
            (constant jackknife values, e.g. identical data), so degenerate data give the point interval.

    Returns:
        (low, high).
    """
    _check_boot(method, n_resamples)
    samples = tuple(np.asarray(s, dtype=np.float64) for s in samples)
    if all(np.ptp(s) == 0 for s in samples):  # no variability to resample: the interval is the point
        v = float(statistic(*samples, axis=-1))
        return v, v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa's degenerate-data warning: handled below
        res = stats.bootstrap(samples, statistic, n_resamples=n_resamples, paired=paired, vectorized=True,
                              axis=-1, confidence_level=CONFIDENCE, method=method, **_rng_kw(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if method == "BCa" and not (math.isfinite(lo) and math.isfinite(hi)):
            res = stats.bootstrap(samples, statistic, n_resamples=n_resamples, paired=paired, vectorized=True,
                                  axis=-1, confidence_level=CONFIDENCE, method="percentile", **_rng_kw(seed))
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# one-sided tests of the differences against a threshold

def wilcoxon_p(d: np.ndarray, threshold: float = 0.0, direction: str = "greater") -> float:
    """One-sided Wilcoxon signed-rank p of H0 "pseudo-median of d is not beyond `threshold`".

    Items with d == threshold carry no sign and are dropped (scipy's "wilcox" rule); if none is left, p = 1.
    """
    x = np.asarray(d, dtype=np.float64) - threshold
    if not np.any(x != 0):
        return 1.0
    return float(stats.wilcoxon(x, alternative=direction, zero_method="wilcox").pvalue)


def sign_p(d: np.ndarray, threshold: float = 0.0, direction: str = "greater") -> float:
    """Exact one-sided sign test p of H0 "median of d is not beyond `threshold`" (ties dropped; none left: 1)."""
    x = np.asarray(d, dtype=np.float64) - threshold
    beyond = int((x > 0).sum() if direction == "greater" else (x < 0).sum())
    m = int((x != 0).sum())
    if m == 0:
        return 1.0
    return float(stats.binomtest(beyond, m, 0.5, alternative="greater").pvalue)


# ---------------------------------------------------------------------------------------------
# claims

def paired_claim(name: str, candidate: str, control: str, candidate_values, control_values,
                 threshold: float = 0.0, *, direction: str = "greater", statistic: str = "mean_diff",
                 test: str = "wilcoxon", alpha: float = 0.05, method: str = "BCa", n_resamples: int = 9999,
                 seed: int = 0) -> Claim:
    """Decide a paired claim on per-item values (item i of both arrays is the same canary or record).

    "greater": the candidate exceeds the control by more than `threshold`: lower 95% CI bound of
    statistic(candidate - control) > threshold and one-sided p < alpha.
    "less": the candidate is no more than `threshold` above the control: upper 95% CI bound < threshold
    and one-sided p < alpha.

    Args:
        name, candidate, control: labels for the JSON.
        candidate_values, control_values: 1-D, same length n >= 2, finite.
        threshold: effect size in the values' unit (bits of exposure, nats of loss, ...).
        statistic: "mean_diff" or "median_diff" of the differences (the CI's statistic).
        test: "wilcoxon" (signed-rank on d - threshold) or "sign" (exact binomial on its signs).
        alpha: level of the one-sided test.
        method, n_resamples, seed: the bootstrap (same seed -> same CI).

    Returns:
        A `Claim`.

    Example:
        >>> paired_claim("alpha1_leaks", "ortho_tuned@1.0", "ortho_tuned@0.0", [9.9, 9.8, 9.9, 9.7, 9.9],
        ...              [1.2, 0.8, 1.1, 1.4, 0.9], threshold=2.0).passed
        True
    """
    _check_common(threshold, direction, alpha)
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {tuple(STATISTICS)}, got {statistic!r}")
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    _check_boot(method, n_resamples)
    cand, ctrl = _values(candidate_values, "candidate_values"), _values(control_values, "control_values")
    if cand.shape != ctrl.shape:
        raise ValueError(f"paired values need the same items: {cand.size} candidate vs {ctrl.size} control values")
    if cand.size < 2:
        raise ValueError(f"a paired claim needs at least 2 items, got {cand.size}")

    d = cand - ctrl  # (n,)
    fn = STATISTICS[statistic]
    value = float(fn(d))
    lo, hi = bootstrap_ci((d,), fn, method=method, n_resamples=n_resamples, seed=seed)
    p = (wilcoxon_p if test == "wilcoxon" else sign_p)(d, threshold, direction)
    bound_ok = lo > threshold if direction == "greater" else hi < threshold
    return Claim(name, candidate, control, statistic, value, (lo, hi), float(threshold), p,
                 bool(bound_ok and p < alpha), int(d.size), direction, f"{test}, bootstrap {method}",
                 {"alpha": alpha, "candidate_mean": float(cand.mean()), "control_mean": float(ctrl.mean()),
                  "n_beyond": int((d > threshold).sum() if direction == "greater" else (d < threshold).sum()),
                  "sd_diff": float(d.std(ddof=1))})


def no_higher_claim(name: str, candidate: str, control: str, candidate_values, control_values, margin: float,
                    **kw) -> Claim:
    """"The candidate is no more than `margin` above the control" (e.g. alpha-0 exposure vs the public model).

    `paired_claim(..., threshold=margin, direction="less")`: upper 95% CI bound of the mean difference
    below `margin` and one-sided p < alpha. Identical arms pass with any margin > 0 once n >= 5.
    """
    return paired_claim(name, candidate, control, candidate_values, control_values, margin, direction="less", **kw)


# ---------------------------------------------------------------------------------------------
# proportions (extraction: hits out of n)

def clopper_pearson(k: int, n: int, level: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided interval of a binomial rate k/n at confidence `level`."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    r = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return float(r.low), float(r.high)


def _one_sided_cp(k: int, n: int, gamma: float) -> tuple[float, float]:
    """Clopper-Pearson one-sided bounds at confidence gamma: P(rate < lo) <= 1-gamma, P(rate > hi) <= 1-gamma."""
    lo = 0.0 if k == 0 else float(stats.beta.ppf(1 - gamma, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(gamma, k + 1, n - k))
    return lo, hi


def _mover(k1: int, n1: int, k2: int, n2: int, gamma: float) -> tuple[float, float]:
    """MOVER bounds of p1 - p2 (Newcombe 1998 / Zou & Donner 2008) from one-sided Clopper-Pearson bounds."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = _one_sided_cp(k1, n1, gamma)
    l2, u2 = _one_sided_cp(k2, n2, gamma)
    d = p1 - p2
    return d - math.hypot(p1 - l1, u2 - p2), d + math.hypot(u1 - p1, p2 - l2)


def _hits(x, what: str) -> tuple[int, int]:
    a = np.asarray(x)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D sequence of per-item hits (bools), got shape {a.shape}")
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{what} must hold only True/False (or 0/1), got {np.unique(a)[:5].tolist()}")
    return int(a.sum()), int(a.size)


def proportion_claim(name: str, candidate: str, control: str, candidate_hits, control_hits,
                     threshold: float = 0.0, *, direction: str = "greater", alpha: float = 0.05) -> Claim:
    """Decide a claim on the difference of two rates (e.g. extraction), rate_diff = k1/n1 - k2/n2.

    The 95% CI is MOVER (Newcombe's hybrid method with exact Clopper-Pearson rate intervals). It does not
    use the pairing of items, so it is wider (conservative: harder to pass) when the arms agree item by item.
    p is that interval inverted: the one-sided level at which its bound reaches `threshold` (1.0 when the
    point estimate is not beyond it), so "95% bound beyond the threshold" is "p < 0.025".

    "greater": lower bound > threshold ("the candidate extracts more, by more than `threshold`").
    "less": upper bound < threshold ("the candidate extracts no more than `threshold` above the control").
    A non-inferiority claim ("at least 0.9 of fine_tuned's rate") is "greater" with threshold -0.1.

    Args:
        candidate_hits, control_hits: per-item True/False (the counts are what matter; n may differ).
    """
    _check_common(threshold, direction, alpha)
    k1, n1 = _hits(candidate_hits, "candidate_hits")
    k2, n2 = _hits(control_hits, "control_hits")
    gamma95 = (1 + CONFIDENCE) / 2
    lo, hi = _mover(k1, n1, k2, n2, gamma95)
    value = k1 / n1 - k2 / n2

    def beyond(gamma: float) -> float:  # > 0 when the one-sided bound at gamma is beyond the threshold
        b = _mover(k1, n1, k2, n2, gamma)
        return b[0] - threshold if direction == "greater" else threshold - b[1]

    g_lo, g_hi = 0.5, 1 - 1e-15
    if beyond(g_lo) <= 0:
        p = 1.0
    elif beyond(g_hi) > 0:
        p = 1 - g_hi
    else:
        p = 1 - optimize.brentq(beyond, g_lo, g_hi, xtol=1e-15, rtol=1e-12)
    bound_ok = lo > threshold if direction == "greater" else hi < threshold
    return Claim(name, candidate, control, "rate_diff", value, (lo, hi), float(threshold), float(p),
                 bool(bound_ok and p < alpha), n1, direction, "MOVER Clopper-Pearson (inverted)",
                 {"alpha": alpha, "candidate_hits": k1, "candidate_n": n1, "control_hits": k2, "control_n": n2})


# ---------------------------------------------------------------------------------------------
# power

def min_detectable_effect(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest paired mean effect (beyond the threshold) a one-sided paired t-test of n items detects.

    Solves P(noncentral t_{n-1}(delta sqrt(n) / sd) > t_{1-alpha, n-1}) = power for delta. The Wilcoxon test
    is about as powerful under normal differences (asymptotic efficiency 0.955), so this is its MDE to ~2%.
    A claim "candidate exceeds control by more than T" has power `power` when the true effect is >= T + MDE.

    Returns:
        delta, in the unit of `sd` (the standard deviation of the per-item differences).
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 pairs, got {n}")
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be finite and >= 0, got {sd!r}")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be in (0, 1), got alpha={alpha!r}, power={power!r}")
    if sd == 0:
        return 0.0
    df = n - 1
    crit = stats.t.ppf(1 - alpha, df)

    def gap(delta: float) -> float:
        return float(stats.nct.sf(crit, df, delta * math.sqrt(n) / sd)) - power

    hi = sd
    while gap(hi) < 0:
        hi *= 2
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-12 * sd))


def power_report(candidate_values, control_values, alpha: float = 0.05, power: float = 0.8) -> dict:
    """{"n", "sd_diff", "mde", "alpha", "power"} of a paired design, from its own per-item differences."""
    cand, ctrl = _values(candidate_values, "candidate_values"), _values(control_values, "control_values")
    if cand.shape != ctrl.shape or cand.size < 2:
        raise ValueError(f"need two equal-length arrays of >= 2 items, got {cand.size} and {ctrl.size}")
    sd = float((cand - ctrl).std(ddof=1))
    return {"n": int(cand.size), "sd_diff": sd, "mde": min_detectable_effect(cand.size, sd, alpha, power),
            "alpha": alpha, "power": power}
