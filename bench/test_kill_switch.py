"""Experiment 1, the privacy kill switch, as a suite that can fail: claims decided by statistics, on the public
model off the 4-bit grid, with negative controls that must fail them.

Sizes:

* `make test` (`SMALL`): the tiny random Llama through every arm and every alpha (the pipeline end to end,
  bit-exact switch endpoints, the JSON); SmolLM2 (the derived off-grid public model) through never_trained,
  int4_of_public, fine_tuned, int4_of_fine_tuned and ortho_tuned: 8 trained + 8 held-out canaries of 8 digits,
  |R| = 32 candidates, fixed budgets of 20 steps. The `--candidate` arm's claims
  (default ortho_tuned) must all hold; int4_of_fine_tuned, the negative control, must fail.
* `pytest bench/test_kill_switch.py -m real` (the acceptance size, a GPU): `FULL` at 100 canaries x 3 seeds,
  |R| = 10,000 where the candidate's alpha-0 claims are decided, 1,000 elsewhere, every arm, alphas
  {0, .05, .1, .25, .5, 1}; one JSON per seed, merged into results/exp1_kill_switch.json. With pytest-xdist
  (`-n 2`) the seeds run on two GPUs (bench/conftest.py); the merged claims do not depend on where a seed ran.

Trained weights and measurements are cached under `libortho.models.cache_dir()`, keyed by everything that
determines them (measurements also by the source of the code that computes them). Every assertion names, in a
comment, what would make it fail.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from bench import thresholds
from libortho.experiments import RunContext
from libortho.experiments.kill_switch import (ARMS, CANDIDATES, CLAIMS, CONTROL_OF, FULL, MUST_FAIL, MUST_PASS,
                                              RELEARN_CLAIM, SMALL, SWITCHED, THRESHOLDS, KillSwitch, decide_claims,
                                              merge_relearn, merge_seeds, plot, run, summarize_claims,
                                              thresholds_for)
from libortho.results import results_dir, write_json

TABLE = thresholds.load("exp1_kill_switch")
RESULTS = results_dir(Path(__file__).resolve().parent.parent / "results")  # full-size runs write here
CLAIM_KEYS = {"name", "candidate", "control", "statistic", "value", "ci95", "threshold", "p", "passed"}
SMOL = "smollm2-135m"


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
        for arm, by in exp.results.items():
            print(f"\n[exp1 {model}] {arm}: " + json.dumps({a: {k: e[k] for k in ("extraction_rate", "mean_exposure",
                                                                                   "mean_exposure_ext", "ppl")}
                                                             for a, e in by.items()}))


def test_thresholds_file_is_what_the_package_runs_with():
    """thresholds.toml [exp1_kill_switch] is the suite's; `run` (an installed package has no thresholds file)
    uses kill_switch.THRESHOLDS. Fails when one is edited without the other."""
    assert TABLE == THRESHOLDS
    assert {**TABLE, "alpha0_exposure_margin_bits": 9.0} != THRESHOLDS  # the control: a drifted copy is caught


# ---------------------------------------------------------------------------------------------
# the pipeline, end to end on the tiny model

def _check_entry(e: dict, n_canaries: int) -> None:
    # fails on a measurement outside its range (a broken scorer, a NaN perplexity, a lost canary)
    assert len(e["extracted"]) == n_canaries and 0.0 <= e["extraction_rate"] <= 1.0
    for r, v in e["by_R"].items():
        assert 0.0 <= v["mean_exposure"] <= math.log2(int(r)) + 1e-9 and len(v["exposure_ext"]) == n_canaries
    assert math.isfinite(e["ppl"]) and e["ppl"] > 1.0
    for m in e["mia"].values():
        assert 0.0 <= m["auc"] <= 1.0 and m["n_members"] == m["n_nonmembers"] == n_canaries


@pytest.mark.parametrize("arm", ARMS)
def test_arm_is_measured_tiny(experiment, arm):
    exp = experiment("tiny")
    res = exp.measure_arm(arm)
    # fails if an alpha of the sweep went missing
    assert set(res) == {str(a) for a in exp.size.alphas_for(arm)}
    for e in res.values():
        _check_entry(e, exp.size.num_canaries)


@pytest.mark.parametrize("model", [pytest.param("tiny"), pytest.param(SMOL, marks=pytest.mark.slow)])
def test_alpha0_is_int4_of_public_and_not_public(experiment, model):
    """The kill switch: alpha=0 of the ortho-tuned model is INT4 of the public weights, bit for bit. On the
    off-grid public model that is no longer the public model itself (it was, on the Q4_1 model)."""
    from libortho.modules import set_alpha

    exp = experiment(model)
    m, _ = exp.build("ortho_tuned")
    ref, _ = exp.build("int4_of_public")
    public, _ = exp.build("never_trained")
    ids = torch.tensor([exp.canaries[0].ids])
    with torch.no_grad():
        set_alpha(m, 0.0)
        # fails if the base were built from anything but the public weights on this grid (or training touched it)
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)
        # fails on a public model on the INT4 grid (the embedded Q4_1 SmolLM2: INT4 of it is it)
        assert not torch.equal(ref(input_ids=ids).logits, public(input_ids=ids).logits)
        set_alpha(m, 1.0)
        # fails if the trained stream were empty or ignored
        assert not torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_switch_endpoints_tiny(experiment):
    """alpha=0 of the posthoc arms is INT4 of fine_tuned; alpha=0 of LoRA is the public model."""
    exp = experiment("tiny")
    int4 = exp.measure_arm("int4_of_fine_tuned")["1.0"]
    never = exp.measure_arm("never_trained")["1.0"]
    for arm in ("posthoc_hessian", "posthoc_magnitude", "posthoc_random"):
        # fails if a posthoc base were not INT4 RTN of the fine-tuned weights on the same grid
        assert exp.measure_arm(arm)["0.0"]["ppl"] == pytest.approx(int4["ppl"], rel=1e-6)
    # fails if LoRA's alpha did not scale the adapter to nothing
    assert exp.measure_arm("lora")["0.0"]["ppl"] == pytest.approx(never["ppl"], rel=1e-6)


def test_report_json_and_plot_tiny(experiment, tmp_path):
    """Every arm and alpha lands in the JSON with its claims (the issue's fields), and in the plot; claims
    decided again from the JSON alone are the same."""
    exp = experiment("tiny")
    for arm in ARMS:
        exp.measure_arm(arm)
    for c in CANDIDATES:
        exp.measure_candidate(c)
    inner = exp.report("ortho_tuned", thresholds_for("small", TABLE))
    path = write_json(tmp_path / "exp1.json", {"exp1_kill_switch": inner})
    back = json.loads(path.read_text())["exp1_kill_switch"]
    # fails if an arm, an alpha or a claim field is dropped on the way to the JSON
    assert set(back["arms"]) == set(ARMS) and set(back["claims_by_arm"]) == set(CANDIDATES)
    for arm in SWITCHED:
        assert set(back["arms"][arm]) == {str(a) for a in exp.size.alphas_for(arm)}
    assert [c["name"] for c in back["claims"]] == [*CLAIMS, RELEARN_CLAIM]  # the tiny size runs the relearning
    assert back["relearn"]["ortho_tuned"]["0.0"]["measured_on"] == list(range(1, exp.size.num_canaries, 2))
    assert set(back["arms"]["ortho_tuned"]["1.0"]["sampled_extraction"]) == {"1", "10", "100"}
    assert all(CLAIM_KEYS <= set(c) for c in back["claims"])
    assert back["arms"]["ortho_tuned"]["0.0"]["n_candidates"] == exp.size.n_candidates_decisive
    # fails if the claims depended on anything but the stored per-canary values (or were not seeded)
    again = decide_claims(back["arms"], "ortho_tuned", back["thresholds"], back["seed"], back["relearn"])
    assert json.loads(json.dumps(again, default=str)) == back["claims"]
    assert back["environment"]["date"] and back["public_model"]["key"] == "tiny"
    png = plot(inner, tmp_path / "exp1.png")
    assert png.stat().st_size > 10_000


def test_same_seed_same_numbers_tiny(experiment):
    """A second experiment with the same seed (trained weights from the cache, measured afresh) gives the same
    numbers; fails on an unseeded draw anywhere in candidates, records, MIA bootstrap or training."""
    sub = (0.0, 1.0)
    first = KillSwitch("tiny", SMALL["tiny"], seed=0, progress=False, measure_cache=False).measure_arm("ortho_tuned", sub)
    again = KillSwitch("tiny", SMALL["tiny"], seed=0, progress=False, measure_cache=False).measure_arm("ortho_tuned", sub)
    assert again == first


def test_lr_grid_keeps_the_lowest_training_loss_tiny():
    """FULL's rule on the tiny model: a trained arm at each lr of its grid, the run of lowest tail training loss
    kept and its weights used. The grid in both orders keeps the same lr: fails if the rule kept the first or
    the last run, or used weights other than the kept run's."""
    from dataclasses import replace

    from libortho.experiments.kill_switch import Size, tail_loss
    from libortho.train import LoraSpec, cached

    kept = []
    for grid in ((1e-3, 3e-2), (3e-2, 1e-3)):
        size = replace(SMALL["tiny"], lr_grid={"lora": grid})
        exp = KillSwitch("tiny", size, seed=0, progress=False, measure_cache=False)
        lora = exp.lora()
        info = exp.train_info["lora"]
        losses = info["lr_selection"]["tail_loss"]
        assert len(losses) == 2 and info["lr"] == float(min(losses, key=losses.get))
        want = cached("lora", exp.cache_key("lora", replace(size.lora, lr=info["lr"]), lora=LoraSpec().to_dict()),
                      lambda: pytest.fail("the kept run must be cached"))[0]
        got = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
        assert set(got) == set(want) and all(torch.equal(got[k].cpu(), want[k]) for k in want)
        kept.append(info["lr"])
    assert kept[0] == kept[1]
    assert tail_loss([5.0] * 18 + [1.0, 3.0]) == 2.0 and tail_loss([2.0]) == 2.0  # last tenth, at least one step
    for bad in ({"adam": (1e-3,)}, {"ortho": ()}, {"lora": (0.0,)}):
        with pytest.raises(ValueError, match="lr_grid"):
            Size(lr_grid=bad)


def test_lr_grid_skips_a_diverged_lr_and_fails_when_every_lr_diverges():
    """A run whose loss stops being finite (`fit` raises) is recorded as diverged and the others compete; when
    every lr diverges the arm fails loudly instead of keeping a broken run."""
    from dataclasses import replace
    from types import SimpleNamespace

    from libortho.experiments.kill_switch import KillSwitch as KS

    size = replace(SMALL["tiny"], lr_grid={"lora": (1e-3, 1e-2, 1e-1)})
    losses = {1e-3: [3.0, 2.0], 1e-2: [3.0, 1.0]}

    def one(cfg):
        if cfg.lr not in losses:
            raise FloatingPointError("loss is nan")
        return f"weights@{cfg.lr}", {"loss": losses[cfg.lr], "steps": 2}, False

    stub = SimpleNamespace(size=size, train_info={}, seed=0)
    payload, cfg, _ = KS._select(stub, "lora", "lora", one)
    assert payload == "weights@0.01" and cfg.lr == 1e-2
    assert stub.train_info["lora"]["lr_selection"]["tail_loss"] == {"0.001": 2.0, "0.01": 1.0, "0.1": "diverged"}
    losses.clear()
    with pytest.raises(FloatingPointError, match="every lr"):
        KS._select(stub, "lora", "lora", one)


def test_a_finite_blow_up_is_flagged(capsys):
    """A run that stays finite but ends above where it started (LoRA at lr 1e-2 on SmolLM2, 20 steps: loss 14.9)
    is kept when it is the only lr, but flagged in the JSON's training info and on stderr; a run whose loss fell
    is not (the control)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from libortho.experiments.kill_switch import KillSwitch as KS

    for losses, flagged in (([7.0, 9.0, 14.9], True), ([7.0, 6.0, 5.0], False)):
        stub = SimpleNamespace(size=replace(SMALL["tiny"]), train_info={}, seed=0)
        KS._select(stub, "lora", "lora", lambda cfg: ("w", {"loss": losses, "steps": 3}, False))
        assert ("loss_rose" in stub.train_info["lora"]) == flagged
        assert ("loss rose" in capsys.readouterr().err) == flagged


# ---------------------------------------------------------------------------------------------
# claims: the decision rule on fabricated arms (fast), then on SmolLM2 at the make-test size

def _fake_entry(exposure: list[float], extracted: list[bool], member: list[float], nonmember: list[float]) -> dict:
    view = {"exposure": exposure, "exposure_ext": exposure, "mean_exposure": sum(exposure) / len(exposure),
            "mean_exposure_ext": sum(exposure) / len(exposure)}
    return {"extracted": extracted, "by_R": {"32": view}, "mia_scores": {"ref_ratio": {"member": member,
                                                                                      "nonmember": nonmember}}}


def test_claim_rule_passes_a_clean_switch_and_fails_a_leak():
    """decide_claims on fabricated per-canary values: a switch whose alpha 0 equals its control and whose
    alpha 1 exposes everything passes all five; the same with +1 bit at alpha 0 fails the alpha-0 exposure
    claim; the same model at both alphas (no switch) fails the alpha-1 claims."""
    n = 12
    base = [0.5 + 0.1 * i for i in range(n)]
    mem, non = [0.1 * i for i in range(n)], [0.1 * i + 0.05 for i in range(n)]
    ctrl = _fake_entry(base, [False] * n, mem, non)
    on = _fake_entry([v + 10 for v in base], [True] * n, [v + 5 for v in mem], non)
    t = thresholds_for("small", TABLE)
    clean = decide_claims({"ortho_tuned": {"0.0": ctrl, "1.0": on}, "int4_of_public": {"1.0": ctrl}}, "ortho_tuned", t)
    summary = summarize_claims(clean)
    assert summary["passed"] and summary["failed"] == []
    # ortho_tuned's alpha-0 claims are documentation (its alpha 0 is the control), and the data agree
    assert summary["by_construction"] == list(CLAIMS[:3]) and summary["decided_by_data"] == list(CLAIMS[3:])
    assert all(c["identical_to_control"] for c in clean if c["by_construction"])
    leak = decide_claims({"ortho_tuned": {"0.0": _fake_entry([v + 1 for v in base], [False] * n, mem, non),
                                          "1.0": on}, "int4_of_public": {"1.0": ctrl}}, "ortho_tuned", t)
    assert summarize_claims(leak)["failed"] == ["alpha0_exposure_no_higher"]
    # a leaky switch is not identical to its control: fails if the identity check read the wrong values
    assert [c["identical_to_control"] for c in leak[:3]] == [False, True, True]
    delta = decide_claims({"delta": {"0.0": ctrl, "1.0": on}, "int4_of_public": {"1.0": ctrl}}, "delta", t)
    assert summarize_claims(delta)["by_construction"] == []  # delta's alpha 0 is decided by its data
    none = decide_claims({"int4_of_fine_tuned": {"1.0": ctrl}, "int4_of_public": {"1.0": ctrl}},
                         "int4_of_fine_tuned", t)
    assert summarize_claims(none)["failed"] == ["alpha1_exposure_gain", "alpha1_extraction_above_control"]


def _smol_claims(exp: KillSwitch, arm: str) -> list[dict]:
    exp.measure_candidate(arm)
    return exp.claims(arm, thresholds_for(exp.size.name, TABLE))


def _show(arm: str, claims: list[dict]) -> str:
    return f"{arm}: " + "; ".join(f"{c['name']} {'PASS' if c['passed'] else 'FAIL'} value {c['value']} "
                                  f"ci95 {c['ci95']} threshold {c['threshold']} p {c['p']}" for c in claims)


@pytest.mark.slow
def test_candidate_claims_hold_make_test_size(experiment, candidate):
    """`pytest bench/ --candidate ARM`: every claim of ARM as the switch holds on SmolLM2 at the make-test size.
    Default ortho_tuned; with a negative control (e.g. --candidate int4_of_fine_tuned) this test fails and
    names the claims that did not hold."""
    exp = experiment(SMOL)
    claims = _smol_claims(exp, candidate)
    print("\n" + _show(candidate, claims))
    # fails on a switch that leaks at alpha 0 (exposure, extraction or membership above its control's) or
    # that does not give the secrets back at alpha 1 at the fixed budget
    failed = summarize_claims(claims)["failed"]
    assert not failed, f"{candidate} fails {failed}: {_show(candidate, claims)}"
    if candidate == "ortho_tuned":  # configured and trained share of each weight
        assert exp.ocfg.density <= TABLE["ortho_max_density"] and exp.train_info["ortho_tuned"]["density"] <= \
            exp.ocfg.density + 1e-4


@pytest.mark.slow
def test_negative_control_fails_make_test_size(experiment):
    """INT4 of the fine-tuned model is no kill switch: on the off-grid public model it keeps exposure above
    INT4 of the public model (the alpha-0 exposure claim fails), and without a switch nothing turns on. This
    test fails if the suite could not tell it from a switch (e.g. on the Q4_1 model, where INT4 snapped the
    fine-tuning back onto the public grid)."""
    exp = experiment(SMOL)
    claims = _smol_claims(exp, "int4_of_fine_tuned")
    print("\n" + _show("int4_of_fine_tuned", claims))
    failed = summarize_claims(claims)["failed"]
    assert "alpha0_exposure_no_higher" in failed, _show("int4_of_fine_tuned", claims)
    assert "alpha1_exposure_gain" in failed, _show("int4_of_fine_tuned", claims)


# ---------------------------------------------------------------------------------------------
# acceptance size (GPU): 100 canaries x 3 seeds

SEEDS = (0, 1, 2)


def _locked(path: Path):
    """An exclusive lock for `path`: one process (xdist worker) computes a seed, the others wait for it and read its
    JSON. The lock file lives in the cache, not beside the results (nothing to clean up or commit by mistake)."""
    from libortho.models import cache_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    return cache_lock(path.name)


def _procs() -> int:
    """Processes per seed (`run(procs=...)`): LIBORTHO_EXP1_PROCS, default 1 (bench/gpu_sweep.sh sets 3)."""
    v = os.environ.get("LIBORTHO_EXP1_PROCS", "1")
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"LIBORTHO_EXP1_PROCS must be a positive integer, got {v!r}")
    return int(v)


def _seed_section(seed: int) -> dict:
    """Experiment 1 at FULL size for one seed, every arm and every candidate's decisive |R|; written to
    results/exp1_kill_switch_seed<seed>.json once (a later call, or another worker, reads it)."""
    path = RESULTS / f"exp1_kill_switch_seed{seed}.json"
    with _locked(path):
        if path.is_file():
            inner = json.loads(path.read_text())["exp1_kill_switch"]
            if inner.get("size") == json.loads(json.dumps(FULL.to_dict(), default=str)):
                return inner
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ctx = RunContext(model=SMOL, output_dir=RESULTS, seed=seed, device=device, progress=True, size="full",
                         run_id=f"exp1_seed{seed}")
        inner = run(ctx, size=FULL, candidate="ortho_tuned", thresholds=TABLE, procs=_procs())
        write_json(path, {"exp1_kill_switch": inner})
        return inner


@pytest.mark.real
@pytest.mark.parametrize("seed", SEEDS)
def test_full_size_seed(seed):
    inner = _seed_section(seed)
    # fails on a run smaller than the acceptance size or with |R| below 10,000 where alpha 0 is decided
    assert set(inner["arms"]) == set(ARMS) and inner["num_canaries"] >= 100
    assert inner["arms"]["ortho_tuned"]["0.0"]["n_candidates"] >= 10_000
    assert inner["arms"]["int4_of_public"]["1.0"]["n_candidates"] >= 10_000


@pytest.mark.real
def test_full_size_claims(candidate):
    """The acceptance: seeds pooled, every claim of the candidate holds, every negative control fails one;
    writes results/exp1_kill_switch.json (and the per-seed JSONs) and the plot of seed 0."""
    inners = [_seed_section(s) for s in SEEDS]  # waits for (or runs) each seed
    arms, relearn = merge_seeds(inners), merge_relearn(inners)
    t = thresholds_for("full", TABLE)
    by_arm = {}
    for arm in CANDIDATES:
        if arm in inners[0]["arms"] and CONTROL_OF[arm] in inners[0]["arms"]:
            by_arm[arm] = decide_claims(arms, arm, t, seed=0, relearn=relearn)
    merged = {"seeds": list(SEEDS), "candidate": candidate, "claims": by_arm[candidate],
              "claims_summary": summarize_claims(by_arm[candidate]), "claims_by_arm": by_arm,
              "negative_controls": {a: summarize_claims(c) for a, c in by_arm.items() if a in MUST_FAIL},
              "thresholds": t, "arms": arms, "relearn": relearn, "public_model": inners[0]["public_model"],
              "per_seed": {str(s): {k: i[k] for k in ("training", "arm_seconds", "environment", "claims_summary",
                                                        "oom_retries")} for s, i in zip(SEEDS, inners)},
              **{k: inners[0][k] for k in ("model", "num_canaries", "num_holdout", "exposure_candidates",
                                           "exposure_candidates_decisive", "canary_format", "secret_digits",
                                           "size", "perplexity", "mia", "base", "ortho_tune")}}
    write_json(RESULTS / "exp1_kill_switch.json", {"exp1_kill_switch": merged})
    for arm, claims in by_arm.items():
        print("\n" + _show(arm, claims))
    # fails on a leaking or non-switching candidate (see test_candidate_claims_hold_make_test_size)
    assert merged["claims_summary"]["passed"], _show(candidate, by_arm[candidate])
    for arm in MUST_PASS:  # the switches (only when the candidate is one of them: else this is a control run)
        if candidate in MUST_PASS:
            assert summarize_claims(by_arm[arm])["passed"], _show(arm, by_arm[arm])
    for arm in MUST_FAIL:  # fails if the suite could not tell a negative control from a switch
        assert not summarize_claims(by_arm[arm])["passed"], _show(arm, by_arm[arm])


def test_helper_processes_give_the_numbers_of_one_process(tmp_path, monkeypatch, capfd):
    """run(procs=2): the arms a helper process measured (through the measurement cache) are the numbers this process
    measures itself, number for number. The helper's own line shows it did the work: without it a failed helper
    would leave its arms to the parent and the comparison would hold trivially."""
    from dataclasses import replace

    from libortho.experiments import RunContext
    from libortho.models import embedded_dir

    tokenizer = embedded_dir()  # the tiny model's tokenizer, converted once into the suite's cache and shared
    cache = tmp_path / "cache"  # no trained weights and no measurement from other tests
    cache.mkdir()
    (cache / tokenizer.name).symlink_to(tokenizer)
    monkeypatch.setenv("LIBORTHO_CACHE", str(cache))
    tiny = SMALL["tiny"]  # 5 training steps: the comparison needs trained weights, not memorized canaries
    # fine_tuned the candidate (its control never_trained): the parent trains it, the helper measures the public arms
    size = replace(tiny, relearn=None, finetune=replace(tiny.finetune, max_steps=5),
                   arms=("never_trained", "int4_of_public", "nf4_of_public", "fine_tuned"))
    ctx = RunContext(model="tiny", output_dir=tmp_path / "out", seed=0, device="cpu", progress=False)
    inner = run(ctx, size=size, candidate="fine_tuned", procs=2)
    err = capfd.readouterr().err
    assert "measured int4_of_public, nf4_of_public" in err and "exited with" not in err, err[-2000:]
    here = KillSwitch("tiny", size, seed=0, progress=False, measure_cache=False)
    for arm in ("int4_of_public", "nf4_of_public"):
        assert json.loads(json.dumps(here.measure_arm(arm))) == inner["arms"][arm], arm
    # the control: a helper that measured another seed's canaries would be caught by the comparison above
    other = KillSwitch("tiny", size, seed=1, progress=False, measure_cache=False)
    assert json.loads(json.dumps(other.measure_arm("int4_of_public"))) != inner["arms"]["int4_of_public"]
    with pytest.raises(ValueError, match="procs must be a positive int"):
        run(RunContext(model="tiny", device="cpu"), size=size, procs=0)
