import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libortho.stats import (Claim, bootstrap_ci, clopper_pearson, min_detectable_effect, no_higher_claim,
                            paired_claim, power_report, proportion_claim, sign_p, summarize, thresholds_for,
                            wilcoxon_p)

FIELDS = {"name", "candidate", "control", "statistic", "value", "ci95", "threshold", "p", "passed"}


def pairs(effect: float, n: int = 100, sd: float = 1.0, seed: int = 0):
    """(candidate, control) per-item values whose differences are `effect` + N(0, sd) noise."""
    rng = np.random.default_rng(seed)
    ctrl = rng.normal(2.0, 1.0, n)
    return ctrl + effect + rng.normal(0.0, sd, n), ctrl


@pytest.mark.parametrize("test", ["wilcoxon", "sign"])
def test_greater_claim_fails_on_null_and_just_under_passes_on_clear(test):
    thr = 0.5
    null = paired_claim("c", "cand", "ctrl", *pairs(0.0), thr, test=test)
    under = paired_claim("c", "cand", "ctrl", *pairs(0.45, n=400, sd=0.3), thr, test=test)  # 0.9 x threshold
    clear = paired_claim("c", "cand", "ctrl", *pairs(1.5), thr, test=test)
    assert not null.passed and null.p > 0.5
    assert not under.passed and under.ci95[0] < thr  # precise, but on the wrong side of the threshold
    assert clear.passed and clear.ci95[0] > thr and clear.p < 1e-6
    assert clear.ci95[0] < clear.value < clear.ci95[1]


def test_at_the_threshold_fails_both_ways():
    """An effect equal to the threshold passes neither 'more than' nor 'less than' it."""
    cand, ctrl = pairs(0.5, n=400, sd=0.2)
    assert not paired_claim("c", "a", "b", cand, ctrl, 0.5, direction="greater").passed
    assert not paired_claim("c", "a", "b", cand, ctrl, 0.5, direction="less").passed


def test_no_higher_claim_passes_identical_arms_fails_a_leak():
    """The alpha-0 claim: identical arms pass; a leak of the issue's size (+0.41 bit) fails a 0.25-bit margin."""
    ctrl = np.random.default_rng(1).normal(1.2, 0.8, 20)
    same = no_higher_claim("alpha0", "ortho_tuned@0.0", "public", ctrl, ctrl, margin=0.25)
    assert same.passed and same.ci95 == (0.0, 0.0) and same.value == 0.0
    leak = no_higher_claim("alpha0", "delta@0.0", "public", *pairs(0.41, n=20, sd=0.6, seed=3), margin=0.25)
    assert not leak.passed and leak.ci95[1] > 0.25
    null = no_higher_claim("alpha0", "a", "b", *pairs(0.0, n=20), margin=0.25)  # no leak, but no power
    assert not null.passed
    clean = no_higher_claim("alpha0", "a", "b", *pairs(0.0, n=300, sd=0.3), margin=0.25)
    assert clean.passed and clean.direction == "less"


def test_too_few_pairs_can_never_pass():
    """4 pairs: the smallest one-sided rank or sign p is 1/16 > 0.05, so even a huge effect fails."""
    cand, ctrl = [10.0, 11, 12, 13], [0.0, 0, 0, 0]
    for test in ("wilcoxon", "sign"):
        c = paired_claim("c", "a", "b", cand, ctrl, 1.0, test=test)
        assert c.ci95[0] > 1.0 and c.p == pytest.approx(1 / 16) and not c.passed
    assert paired_claim("c", "a", "b", cand + [14.0], ctrl + [0.0], 1.0).passed  # 5 pairs: p = 1/32


def test_bootstrap_is_seeded():
    cand, ctrl = pairs(0.3, n=30)
    a, b = (paired_claim("c", "a", "b", cand, ctrl, seed=s) for s in (7, 7))
    assert a == b
    assert paired_claim("c", "a", "b", cand, ctrl, seed=8).ci95 != a.ci95
    for method in ("BCa", "percentile", "basic"):
        ci = bootstrap_ci((cand - ctrl,), np.mean, method=method, seed=0)
        assert ci == bootstrap_ci((cand - ctrl,), np.mean, method=method, seed=0) and ci[0] < ci[1]


def test_bootstrap_ci_covers_the_mean_and_narrows_with_n():
    d_small, d_big = pairs(1.0, n=20)[0], pairs(1.0, n=1000)[0]
    lo, hi = bootstrap_ci((d_small,), np.mean)
    lo2, hi2 = bootstrap_ci((d_big,), np.mean)
    assert lo < d_small.mean() < hi and hi2 - lo2 < (hi - lo) / 5
    # two unpaired groups keep their sizes: difference of means
    ci = bootstrap_ci((d_big, d_small), lambda x, y, axis: x.mean(axis) - y.mean(axis))
    assert ci[0] < d_big.mean() - d_small.mean() < ci[1]


def test_tests_agree_with_known_values():
    assert wilcoxon_p(np.arange(1.0, 6.0)) == pytest.approx(1 / 32)
    assert wilcoxon_p(np.arange(1.0, 6.0), threshold=10.0, direction="less") == pytest.approx(1 / 32)
    assert sign_p(np.array([1.0, 2, 3, -1]), 0.0) == pytest.approx(5 / 16)
    assert wilcoxon_p(np.zeros(10)) == 1.0 and sign_p(np.zeros(10)) == 1.0  # no sign at all: no evidence


def test_claim_json_has_the_issue_fields():
    c = paired_claim("c", "a", "b", *pairs(2.0, n=10), 0.5)
    d = json.loads(json.dumps(c.to_dict(), allow_nan=False))
    assert FIELDS <= set(d) and len(d["ci95"]) == 2 and isinstance(d["passed"], bool)
    assert {"n", "direction", "test"} <= set(d)
    assert summarize([c, proportion_claim("x", "a", "b", [0, 0], [0, 0])]) == {"passed": False, "failed": ["x"]}
    assert Claim("n", "a", "b", "s", float("nan"), (0.0, float("inf")), 0.0, 1.0, False, 1, "less", "t"
                 ).to_dict()["ci95"] == [0.0, None]


def test_bad_inputs_are_refused_before_computing():
    with pytest.raises(ValueError, match="finite"):
        paired_claim("c", "a", "b", [1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="same items"):
        paired_claim("c", "a", "b", [1.0, 2.0, 3.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="direction"):
        paired_claim("c", "a", "b", [1.0, 2.0], [0.0, 0.0], direction="more")
    with pytest.raises(ValueError, match="at least 2"):
        paired_claim("c", "a", "b", [1.0], [0.0])
    with pytest.raises(ValueError, match="statistic"):
        paired_claim("c", "a", "b", [1.0, 2.0], [0.0, 0.0], statistic="max")
    with pytest.raises(ValueError, match="True/False"):
        proportion_claim("c", "a", "b", [0, 2], [0, 1])
    with pytest.raises(ValueError, match="threshold"):
        proportion_claim("c", "a", "b", [0, 1], [0, 1], float("inf"))


# ---------------------------------------------------------------------------------------------
# proportions

def hits(k: int, n: int) -> list[bool]:
    return [True] * k + [False] * (n - k)


def test_proportion_claim_null_under_and_clear():
    assert not proportion_claim("x", "a", "b", hits(10, 100), hits(10, 100)).passed  # null
    under = proportion_claim("x", "a", "b", hits(55, 100), hits(0, 100), 0.6)  # 0.55 < 0.6
    assert not under.passed and under.p == 1.0
    clear = proportion_claim("x", "a", "b", hits(95, 100), hits(0, 100), 0.5)
    assert clear.passed and clear.ci95[0] > 0.5 and clear.p < 1e-6
    # extraction at alpha 1 vs alpha 0 at the issue's size (20/20 vs 0/20) clears a 0.5 margin
    assert proportion_claim("x", "a", "b", hits(20, 20), hits(0, 20), 0.5).passed


def test_proportion_no_higher_needs_enough_canaries():
    """0 of n vs 0 of n: 300 canaries bound the excess below 0.05, 3 canaries cannot."""
    assert proportion_claim("x", "a", "b", hits(0, 300), hits(0, 300), 0.05, direction="less").passed
    assert not proportion_claim("x", "a", "b", hits(0, 3), hits(0, 3), 0.05, direction="less").passed
    assert not proportion_claim("x", "a", "b", hits(10, 300), hits(0, 300), 0.05, direction="less").passed


def test_proportion_p_is_the_inverted_interval():
    """The 95% bound sits exactly at the threshold when p = 0.025."""
    c = proportion_claim("x", "a", "b", hits(40, 50), hits(5, 50), 0.0)
    at = proportion_claim("x", "a", "b", hits(40, 50), hits(5, 50), c.ci95[0])
    assert at.p == pytest.approx(0.025, rel=1e-6) and not at.passed
    assert clopper_pearson(0, 300)[1] == pytest.approx(1 - 0.025 ** (1 / 300))


# ---------------------------------------------------------------------------------------------
# power

def test_mde_gives_the_stated_power():
    """At effect = MDE, a one-sided paired t-test rejects 80% of the time (simulated, 4000 designs)."""
    from scipy import stats

    n, sd = 20, 1.5
    mde = min_detectable_effect(n, sd)
    # large-n normal approximation: (z_.95 + z_.8) sd / sqrt(n); small n is a little larger
    assert mde == pytest.approx(2.486 * sd / math.sqrt(n), rel=0.06) and mde > 2.486 * sd / math.sqrt(n)
    d = np.random.default_rng(0).normal(mde, sd, (4000, n))
    p = stats.ttest_1samp(d, 0.0, axis=1, alternative="greater").pvalue
    assert (p < 0.05).mean() == pytest.approx(0.8, abs=0.025)
    half = np.random.default_rng(1).normal(mde / 2, sd, (4000, n))  # control: half the MDE is underpowered
    assert (stats.ttest_1samp(half, 0.0, axis=1, alternative="greater").pvalue < 0.05).mean() < 0.5
    rep = power_report(*pairs(0.0, n=20, sd=1.5))
    assert rep["n"] == 20 and rep["mde"] == pytest.approx(min_detectable_effect(20, rep["sd_diff"]))


# ---------------------------------------------------------------------------------------------
# properties

small = st.lists(st.floats(-5, 5, allow_nan=False), min_size=5, max_size=15)


@given(small, st.floats(-2, 2), st.integers(0, 3))
@settings(max_examples=20, deadline=None)
def test_passed_means_bound_and_p_and_mirror_symmetry(d, thr, seed):
    d = np.array(d)
    z = np.zeros_like(d)
    g = paired_claim("c", "a", "b", d, z, thr, n_resamples=999, seed=seed, method="percentile")
    m = paired_claim("c", "a", "b", -d, z, -thr, direction="less", n_resamples=999, seed=seed, method="percentile")
    assert g.passed == (g.ci95[0] > thr and g.p < 0.05)
    assert g.passed == m.passed and g.p == pytest.approx(m.p)
    assert g.ci95[0] == pytest.approx(-m.ci95[1]) and g.ci95[1] == pytest.approx(-m.ci95[0])


@given(st.integers(0, 40), st.integers(0, 40), st.floats(-0.5, 0.5))
@settings(max_examples=40, deadline=None)
def test_proportion_claim_monotone_in_threshold(k1, k2, thr):
    """Raising the bar never turns a failing 'greater' claim into a passing one."""
    a, b = hits(k1, 40), hits(k2, 40)
    lo = proportion_claim("x", "a", "b", a, b, thr)
    hi = proportion_claim("x", "a", "b", a, b, thr + 0.1)
    assert lo.p <= hi.p + 1e-12 and (lo.passed or not hi.passed)
    assert lo.ci95[0] <= lo.value <= lo.ci95[1]


def test_thresholds_for_lays_the_size_over_the_base_and_names_what_is_missing():
    table = {"a": 1.0, "b": 2.0, "small": {"b": 5.0}}
    assert thresholds_for(table, "small", ("a", "b")) == {"a": 1.0, "b": 5.0}
    assert thresholds_for(table, "full") == {"a": 1.0, "b": 2.0}  # a size without its table: the base
    with pytest.raises(KeyError, match=r"\['c'\]"):  # the control: a required threshold absent
        thresholds_for(table, "small", ("a", "c"))
