"""Experiment 1, the privacy kill switch, as a test suite: every arm measured, the claims asserted.

Two sizes:

* `make test` (this file's SMALL sizes, about 6 minutes on 2 CPU cores with an empty cache): the tiny
  random Llama through every arm and every alpha, and SmolLM2-135M through the main arms
  (never_trained, fine_tuned, ortho_tuned at alpha 0 and 1) with 3 canaries of 8 digits, |R| = 16
  candidates, ortho density 2%, perplexity on 256 tokens. The claims of the acceptance list are asserted at that size.
* `pytest bench/ -m real`: the acceptance size (SmolLM2-135M, 20 canaries of 12 digits, |R| = 1000,
  every arm, alphas 0 .. 1), written to results/exp1_kill_switch.json and .png. On a GPU when one is
  visible (a few minutes on one H100), else on CPU (hours).

Fine-tuned weights are cached under `libortho.models.cache_dir()` keyed by their configuration, so a
second run trains nothing. The suite asserts only the claims; what the controls show (plain INT4 of a
fine-tuned model keeps exposure high, post-hoc sieving does not switch) is measured and written out,
and printed, never hidden.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import thresholds
from libortho.experiments import RunContext
from libortho.experiments.kill_switch import ARMS, MAIN_ARMS, SMALL, SWITCHED, KillSwitch, Size, plot, run
from libortho.results import results_dir, write_json

T = thresholds.load("exp1_kill_switch")
RESULTS = results_dir(Path(__file__).resolve().parent.parent / "results")  # full-size runs write here


SMALL_ARMS = {"tiny": ARMS, "smollm2-135m": MAIN_ARMS}
CASES = [pytest.param(m, a, marks=[pytest.mark.slow] if m != "tiny" else [], id=f"{m}-{a}")
         for m in SMALL for a in SMALL_ARMS[m]]


@pytest.fixture(scope="module")
def experiment():
    """`experiment(model)`: the make-test-size KillSwitch of `model`, loaded once per module."""
    made: dict[str, KillSwitch] = {}

    def get(model: str) -> KillSwitch:
        if model not in made:
            made[model] = KillSwitch(model, SMALL[model], seed=0, progress=False)
        return made[model]

    yield get
    for model, exp in made.items():  # show every measured number, controls included
        if exp.results:
            print(f"\n[exp1 {model}] " + json.dumps(exp.report()["arms"]))


def _check_entry(r: dict, n_candidates: int) -> None:
    assert 0.0 <= r["extraction_rate"] <= 1.0
    assert 0.0 <= r["mean_exposure"] <= math.log2(n_candidates) + 1e-9
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1.0


@pytest.mark.parametrize("model,arm", CASES)
def test_arm_is_measured(experiment, model, arm):
    exp = experiment(model)
    res = exp.measure_arm(arm)
    assert set(res) == {str(a) for a in exp.size.alphas_for(arm)}
    for r in res.values():
        _check_entry(r, exp.size.n_candidates)


@pytest.mark.parametrize("model", [pytest.param("tiny"), pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_alpha0_is_int4_of_public(experiment, model):
    """The kill switch: alpha=0 of the ortho-tuned model is INT4 of the public weights, bit for bit."""
    from libortho.baselines import int4_rtn_
    from libortho.modules import set_alpha

    exp = experiment(model)
    m, _ = exp.build("ortho_tuned")
    ref = exp._copy_public()
    ids = torch.tensor([exp.canaries[0].ids])
    public = ref(input_ids=ids).logits
    int4_rtn_(ref, exp.size.group_size, exp.size.symmetric)
    set_alpha(m, 0.0)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)
        if model == "smollm2-135m":  # a Q4_1 model: INT4(public) on its grid is the public model
            assert torch.equal(ref(input_ids=ids).logits, public)
        set_alpha(m, 1.0)
        assert not torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_switch_endpoints_tiny(experiment):
    """alpha=0 of posthoc arms is INT4 of fine_tuned; alpha=0 of LoRA is the public model."""
    exp = experiment("tiny")
    int4 = exp.measure_arm("int4_of_fine_tuned")["1.0"]
    never = exp.measure_arm("never_trained")["1.0"]
    for arm in ("posthoc_hessian", "posthoc_magnitude", "posthoc_random"):
        assert exp.measure_arm(arm)["0.0"]["ppl"] == pytest.approx(int4["ppl"], rel=1e-6)
    assert exp.measure_arm("lora")["0.0"]["ppl"] == pytest.approx(never["ppl"], rel=1e-6)


def test_report_json_and_plot_tiny(experiment, tmp_path):
    """Every arm and alpha lands in the JSON (controls included) and in the plot."""
    exp = experiment("tiny")
    for arm in ARMS:
        exp.measure_arm(arm)
    inner = exp.report()
    path = write_json(tmp_path / "exp1.json", {"exp1_kill_switch": inner})
    back = json.loads(path.read_text())["exp1_kill_switch"]
    for key in ("model", "num_canaries", "exposure_candidates", "seed", "arms", "privacy_ratio"):
        assert key in back
    assert set(back["arms"]) == set(ARMS)
    for arm in SWITCHED:
        assert set(back["arms"][arm]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
        assert arm in back["privacy_ratio"] and back["privacy_ratio"][arm] <= back["num_canaries"]
    assert back["environment"]["date"] and back["environment"]["machine"]
    png = plot(inner, tmp_path / "exp1.png")
    assert png.stat().st_size > 10_000


def _assert_claims(inner: dict, min_ratio: float) -> None:
    """The acceptance list, items 1 and 2 (item 3 is the JSON holding every arm)."""
    arms, n = inner["arms"], inner["num_canaries"]
    ft = arms["fine_tuned"]["1.0"]["extraction_rate"]
    never = arms["never_trained"]["1.0"]["mean_exposure"]
    o0, o1 = arms["ortho_tuned"]["0.0"], arms["ortho_tuned"]["1.0"]
    assert ft >= T["fine_tuned_min_extraction"], f"fine_tuned extracts {ft * n:.0f}/{n}"
    # the configured share, and the trained one (each matrix keeps ceil(density x size) entries)
    assert inner["ortho_tune"]["density"] <= T["ortho_max_density"]
    assert inner["training"]["ortho_tuned"]["density"] <= inner["ortho_tune"]["density"] + 1e-4
    assert o1["extraction_rate"] >= T["ortho_alpha1_min_vs_fine_tuned"] * ft, (o1, ft)
    assert o0["extraction_rate"] <= T["ortho_alpha0_max_extraction"], o0
    assert o0["mean_exposure"] <= never + T["ortho_alpha0_max_exposure_over_never"], (o0, never)
    ratio = o1["extraction_rate"] / max(o0["extraction_rate"], 1 / n)
    assert ratio >= min_ratio, f"privacy ratio {ratio:.1f} < {min_ratio}"


@pytest.mark.slow
def test_claims_make_test_size(experiment):
    exp = experiment("smollm2-135m")
    for arm in MAIN_ARMS:
        exp.measure_arm(arm)
    _assert_claims(exp.report(), T["small_min_privacy_ratio"])


def test_same_seed_same_numbers_tiny(experiment):
    """A second experiment with the same seed (fine-tunes from the cache) gives the same numbers."""
    first = experiment("tiny").measure_arm("ortho_tuned")
    again = KillSwitch("tiny", SMALL["tiny"], seed=0, progress=False).measure_arm("ortho_tuned")
    assert again == first


@pytest.mark.real
def test_full_size_kill_switch():
    """The acceptance run: every arm at full size; writes results/exp1_kill_switch.{json,png}."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = RunContext(model="smollm2-135m", output_dir=RESULTS, seed=0, device=device, num_canaries=20,
                     progress=True)
    inner = run(ctx)
    write_json(RESULTS / "exp1_kill_switch.json", {"exp1_kill_switch": inner})
    assert set(inner["arms"]) == set(ARMS)
    assert inner["num_canaries"] == 20 and inner["exposure_candidates"] >= 1000
    # item 3, shown not hidden: plain INT4 of the fine-tuned model, what it keeps
    int4 = inner["arms"]["int4_of_fine_tuned"]["1.0"]
    print(f"\nint4_of_fine_tuned: extraction {int4['extraction_rate']:.2f}, exposure {int4['mean_exposure']:.2f} bits "
          f"(never_trained {inner['arms']['never_trained']['1.0']['mean_exposure']:.2f})")
    _assert_claims(inner, T["ortho_min_privacy_ratio"])
