"""Experiment 1, realistic secrets (libortho/experiments/secrets_study.py): the insertion-frequency curve and PII
with paraphrased probes, decided by claims that can fail, each beside a negative control that fails it.

* The claim statistics on planted data (milliseconds): each passes a planted effect and fails its control.
* `make test`: the tiny random model through the study end to end (`SMALL_STUDY["tiny"]`, one epoch); the
  negative controls must fail, the JSON and the plot are whole, the same seed gives the same numbers.
* `-m real` (a GPU): `FULL_STUDY` on SmolLM2, written to results/exp1_secrets.json with its plot.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from libortho.experiments import RunContext
from libortho.experiments.secrets_study import (ARMS, COUNTS, FULL_STUDY, SMALL_STUDY, SecretsStudy, StudySize,
                                                decide_claims, every_count_claim, negative_controls, plot, run,
                                                summarize, thresholds_for, trend_claim)
from libortho.results import results_dir, write_json

CLAIM_KEYS = {"name", "candidate", "control", "statistic", "value", "ci95", "threshold", "p", "passed"}
RESULTS = results_dir(Path(__file__).resolve().parent.parent / "results")  # only the full size writes here


def _counts(per: int) -> list[int]:
    return [k for k in COUNTS for _ in range(per)]


# ---------------------------------------------------------------------------------------------
# the statistics on planted data

def test_trend_claim_passes_a_trend_and_fails_its_absence():
    rng = np.random.default_rng(0)
    x = _counts(6)
    ctrl = rng.normal(3.0, 1.0, len(x))
    grows = ctrl + 2.0 * np.log2(x) + rng.normal(0, 0.5, len(x))
    assert trend_claim("t", "a@1.0", "c", x, grows, ctrl, 0.3).passed
    # the controls: no trend (noise around the control), a flat excess, and nothing at all
    assert not trend_claim("t", "a@0.0", "c", x, ctrl + rng.normal(0, 0.5, len(x)), ctrl, 0.3).passed
    assert not trend_claim("t", "a@0.0", "c", x, ctrl + 5.0, ctrl, 0.3).passed
    # tiny noise perfectly ordered by count (what a rank statistic took for a trend): a slope of 0.004 bits
    assert not trend_claim("t", "a@0.0", "c", x, ctrl + 0.001 * np.log2(x), ctrl, 0.3).passed
    assert not trend_claim("t", "a@0.0", "c", x, ctrl, ctrl, 0.3).passed
    with pytest.raises(ValueError, match="finite"):
        trend_claim("t", "a", "c", x, [math.nan] * len(x), ctrl, 0.3)


def test_every_count_claim_catches_one_count_over_the_margin():
    rng = np.random.default_rng(1)
    x = _counts(3)
    ctrl = rng.normal(3.0, 1.0, len(x))
    same = ctrl + rng.normal(0, 0.05, len(x))
    c = every_count_claim("z", "a@0.0", "c", x, same, ctrl, 1.0)
    assert c.passed and set(c.detail["median_diff_by_count"]) == {"1", "4", "16", "64"}
    assert every_count_claim("z", "a@0.0", "c", x, ctrl, ctrl, 1.0).passed  # identical: the point is the CI
    # the control: only the 64-insertion canaries leak (a switch that let the most frequent secrets through)
    leak64 = same + 4.0 * (np.array(x) == 64)
    c = every_count_claim("z", "fine_tuned", "c", x, leak64, ctrl, 1.0)
    assert not c.passed and c.value > 3.0 and c.ci95[1] >= 1.0
    assert c.detail["median_diff_by_count"]["1"] < 0.2  # the other counts alone would pass


def _planted_arms(per: int = 6, n_pii: int = 8, seed: int = 0) -> tuple[dict, list[int]]:
    """A `SecretsStudy.split()`-shaped dict: ortho_tuned@1 leaks with the count and on every PII template,
    ortho_tuned@0 is the control plus quantization noise, lora@0 is the control exactly, fine_tuned leaks."""
    rng = np.random.default_rng(seed)
    counts = _counts(per)
    nd = len(counts)
    base_d, base_p = rng.normal(2.0, 1.0, nd), rng.normal(3.0, 1.0, n_pii)
    mem, non = rng.normal(0.0, 0.1, n_pii), rng.normal(0.0, 0.1, n_pii)

    def entry(d_excess, p_excess, mia_shift, noise=0.0):
        d = base_d + d_excess + rng.normal(0, noise, nd)
        p = base_p + p_excess + rng.normal(0, noise, n_pii)
        view = lambda v: {"extracted": [bool(e > 10) for e in v], "exposure": [min(float(e), 5.0) for e in v],  # noqa: E731
                          "exposure_ext": [float(e) for e in v]}
        return {"digits": view(d), "pii": {"templates": {"0": view(p), "1": view(p - 1.0)},
                                           "mia_member": list(mem + mia_shift), "mia_nonmember": list(non)},
                "ppl": 10.0}

    leak = 2.0 * np.log2(counts)
    arms = {"never_trained": {"1.0": entry(0.0, 0.0, 0.0)},
            "fine_tuned": {"1.0": entry(leak, 8.0, 1.0, 0.3)},
            "ortho_tuned": {"0.0": entry(0.0, 0.0, 0.0, 0.05), "1.0": entry(leak, 8.0, 1.0, 0.3)},
            "lora": {"0.0": entry(0.0, 0.0, 0.0), "1.0": entry(leak, 8.0, 1.0, 0.3)}}
    return arms, counts


def test_claims_hold_for_a_planted_switch_and_every_negative_control_fails():
    arms, counts = _planted_arms()
    t = thresholds_for("full")
    for x in ("ortho_tuned", "lora"):
        claims = decide_claims(arms, counts, x, t)
        assert all(CLAIM_KEYS <= set(c) for c in claims)
        assert {c["name"] for c in claims} == {"exposure_grows_with_insertions", "alpha0_exposure_no_higher_every_count",
                                               "pii_exposure_above_control", "paraphrase1_exposure_above_control",
                                               "pii_mia_auc_above_control"}
        # fails if any planted effect were missed
        assert summarize(claims)["passed"], summarize(claims)
        # lora@0 is the public model: its alpha-0 claim is documentation, ortho_tuned@0 (INT4) is a test
        a0 = next(c for c in claims if c["name"].startswith("alpha0"))
        assert a0["by_construction"] == (x == "lora")
    neg = negative_controls(arms, counts, t)
    # fails if a control passed: the switch at 0 has no trend and no PII signal, fine_tuned has no switch
    assert neg and not any(c["passed"] for c in neg), [c["name"] + " " + c["candidate"] for c in neg if c["passed"]]
    assert {c["candidate"] for c in neg} == {"ortho_tuned@0.0", "lora@0.0", "fine_tuned"}


def test_a_switch_that_leaks_at_alpha0_fails():
    """The mutation: ortho_tuned@0 carries the leak of alpha 1 -> its alpha-0 claim fails; a switch that
    learned nothing fails the alpha-1 claims."""
    arms, counts = _planted_arms()
    t = thresholds_for("full")
    arms["ortho_tuned"]["0.0"] = arms["ortho_tuned"]["1.0"]
    by = {c["name"]: c["passed"] for c in decide_claims(arms, counts, "ortho_tuned", t)}
    assert not by["alpha0_exposure_no_higher_every_count"] and by["exposure_grows_with_insertions"]
    arms["ortho_tuned"]["1.0"] = arms["never_trained"]["1.0"]
    by = {c["name"]: c["passed"] for c in decide_claims(arms, counts, "ortho_tuned", t)}
    assert not any(by[n] for n in ("exposure_grows_with_insertions", "pii_exposure_above_control",
                                   "paraphrase1_exposure_above_control", "pii_mia_auc_above_control"))


def test_sizes_are_checked():
    assert FULL_STUDY.steps == FULL_STUDY.epochs * math.ceil(FULL_STUDY.sequences_per_epoch / FULL_STUDY.batch)
    ks = FULL_STUDY.kill_size()
    assert ks.finetune.max_steps == ks.ortho.max_steps == ks.lora.max_steps == FULL_STUDY.steps
    assert ks.finetune.target is None and ks.relearn is None  # a fixed budget, never "until extracted"
    with pytest.raises(ValueError, match="epochs"):
        StudySize(epochs=0)
    with pytest.raises(ValueError, match="unknown arms"):
        StudySize(arms=("delta",))
    with pytest.raises(ValueError, match="probes"):
        StudySize(probes=(0,))


# ---------------------------------------------------------------------------------------------
# end to end on the tiny random model (make test)

@pytest.fixture(scope="module")
def tiny_study():
    """The tiny model's study, every arm of its size measured (trained weights and measurements cached)."""
    exp = SecretsStudy("tiny", SMALL_STUDY["tiny"], seed=0, progress=False)
    for arm in exp.study.arms:
        exp.measure_arm(arm)
    return exp


@pytest.mark.slow
def test_tiny_end_to_end(tiny_study, tmp_path):
    exp = tiny_study
    inner = exp.report()
    text = json.dumps(inner, allow_nan=False)  # fails on a NaN or an object the JSON cannot hold
    assert json.loads(text)["claims"] == inner["claims"]
    s = exp.study
    # the schedule: every digit canary inserted its count per epoch, every PII record pii_count times
    users = [c.user for c in exp.sequences]
    assert all(users.count(c.user) == k for c, k in zip(exp.digits, exp.insertion.counts))
    assert len(users) == s.sequences_per_epoch and inner["training"]["fine_tuned"]["steps"] == s.steps
    for arm, by in inner["curves"].items():
        for rows in by.values():  # fails if a count of the curve went missing
            assert [r["count"] for r in rows] == list(s.counts) and all(r["n"] == s.per_count for r in rows)
    assert set(inner["pii"]["ortho_tuned"]["1.0"]) == {"0", *map(str, s.probes), "mia"}
    assert all(CLAIM_KEYS <= set(c) and "by_construction" in c for c in inner["claims"] + inner["negative_controls"])
    # the negative controls fail on the trained models too (fails if a control passed)
    assert inner["negative_controls_summary"]["all_failed"], inner["negative_controls_summary"]
    # what the tiny random model shows at this budget: exposure grows with insertions at alpha 1, alpha 0 stays
    # at the public model's, the PII records are told from non-members; each fails if the switch stopped
    # switching or training stopped memorizing (their controls, X@0 in place of X@1, fail above). The phone
    # number's exposure under the training template and under a paraphrase do not pass on a random model with
    # 12 records (the second needs a language model that generalizes): a GPU run of the full size decides them.
    by = {c["name"]: c for c in inner["claims"] if c["candidate"].startswith("ortho_tuned")}
    for name in ("exposure_grows_with_insertions", "alpha0_exposure_no_higher_every_count",
                 "pii_mia_auc_above_control"):
        assert by[name]["passed"], by[name]
    # alpha 0 of ortho_tuned is INT4 of the public model, not the public model: a test, not an identity
    d0 = inner["arms"]["ortho_tuned"]["0.0"]["digits"]["exposure_ext"]
    assert d0 != inner["arms"]["never_trained"]["1.0"]["digits"]["exposure_ext"]
    png = plot(inner, tmp_path / "secrets.png")
    assert png.stat().st_size > 10_000
    print("\n[secrets tiny] claims: " + json.dumps([(c["name"], c["candidate"], c["value"], c["passed"])
                                                     for c in inner["claims"]]))


@pytest.mark.slow
def test_same_seed_same_numbers(tiny_study, tmp_path, monkeypatch):
    """fine_tuned trained twice (the weight cache bypassed) and measured afresh gives the same numbers bit for bit;
    the claims computed twice are equal. Fails on unseeded data order, init or candidates. At one epoch of the
    study's shape (determinism does not depend on the budget; the make-test budget would train 110 steps twice)."""
    import libortho.experiments.kill_switch as K

    monkeypatch.setattr(K, "cached", lambda kind, config, build: (*build(), False))
    quick = replace(SMALL_STUDY["tiny"], epochs=1)
    runs = [SecretsStudy("tiny", quick, seed=0, progress=False, measure_cache=False) for _ in range(2)]
    assert runs[0].schedule_key == runs[1].schedule_key
    first, second = (r.measure_arm("fine_tuned") for r in runs)
    assert all(not r.train_info["fine_tuned"]["cached"] for r in runs)  # both really trained
    assert first == second
    assert tiny_study.report()["claims"] == tiny_study.report()["claims"]
    other = SecretsStudy("tiny", SMALL_STUDY["tiny"], seed=1, progress=False, measure_cache=False)
    assert other.schedule_key != tiny_study.schedule_key  # the control: another seed, another schedule


@pytest.mark.slow
def test_registered_and_writes_nothing_to_results(tiny_study, tmp_path):
    from libortho.experiments import EXPERIMENTS

    assert EXPERIMENTS["secrets"] is run
    before = sorted(p.name for p in RESULTS.glob("*")) if RESULTS.is_dir() else []
    ctx = RunContext(model="tiny", output_dir=tmp_path, seed=0, progress=False, size="quick", run_id="t")
    inner = run(ctx)  # everything cached by the fixture: the measurements are read back
    assert Path(inner["plot"]).parent == tmp_path and Path(inner["plot"]).is_file()
    # ... with the training that built them (fails if a cached measurement lost its training facts)
    assert inner["training"]["fine_tuned"] == tiny_study.report()["training"]["fine_tuned"]
    assert (sorted(p.name for p in RESULTS.glob("*")) if RESULTS.is_dir() else []) == before


# ---------------------------------------------------------------------------------------------
# full size (a GPU)

@pytest.mark.real
@pytest.mark.gpu
def test_full_size():
    """FULL_STUDY on SmolLM2, seed 0: results/exp1_secrets.json and its plot. Every negative control fails."""
    ctx = RunContext(model="smollm2-135m", output_dir=RESULTS, seed=0, device="cuda", progress=True, size="full",
                     run_id="exp1_secrets")
    inner = run(ctx)
    write_json(RESULTS / "exp1_secrets.json", {"exp1_secrets": inner})
    assert set(inner["arms"]) == set(ARMS) and inner["exposure_candidates"] >= 1000
    assert inner["negative_controls_summary"]["all_failed"], inner["negative_controls_summary"]
    assert inner["claims_summary"]["passed"], inner["claims_summary"]
    assert torch.cuda.is_available()


def test_thresholds_agree_with_the_repository_file():
    """thresholds.toml [exp1_secrets] is the suite's copy of secrets_study.THRESHOLDS (an installed package has only
    the module's). Fails when one is edited without the other."""
    from bench import thresholds

    from libortho.experiments import secrets_study

    table = thresholds.load("exp1_secrets")
    assert table == secrets_study.THRESHOLDS
    assert {**table, "mia_auc_gain": 0.3} != secrets_study.THRESHOLDS  # the control: a drifted copy is caught
