"""`run --candidate ARM` and the exit code of claims: a claim that does not hold exits 1 (the run is complete and
saved); a bad candidate is bad input (exit 2, before any computation). Experiment 1 is replaced by a fake that
returns claims as the real one writes them."""
import json

import pytest

from libortho.cli import claims_failed, main


def _claim(name: str, passed: bool) -> dict:
    return {"name": name, "candidate": "x@0", "control": "int4_of_public", "statistic": "median_diff", "value": 0.0,
            "ci95": [0.0, 0.0], "threshold": 0.25, "p": 0.01, "passed": passed}


@pytest.fixture
def fake_exp1(monkeypatch):
    """Installs a fake experiment 1 whose claims pass unless the candidate is a negative control; returns the
    candidates it was called with."""
    from libortho.experiments import EXPERIMENTS, load_all

    load_all()
    seen = []

    def fake(ctx):
        cand = ctx.extra.get("candidate") or "ortho_tuned"
        seen.append(cand)
        ok = cand in ("ortho_tuned", "lora")
        return {"model": ctx.model, "candidate": cand,
                "claims": [_claim("alpha0_exposure_no_higher", ok), _claim("alpha1_exposure_gain", True)]}

    monkeypatch.setitem(EXPERIMENTS, "kill_switch", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return seen


def _run(capsys, tmp_path, *extra):
    rc = main(["run", "--experiment", "1", "--model", "tiny", "--output-dir", str(tmp_path), "--no-progress", *extra])
    out = capsys.readouterr()
    files = list(tmp_path.glob("*_results_*.json"))
    return rc, out, json.loads(files[0].read_text()) if files else None


def test_passing_claims_exit_0(capsys, tmp_path, fake_exp1):
    rc, out, data = _run(capsys, tmp_path)
    assert rc == 0 and fake_exp1 == ["ortho_tuned"] and data["status"] == "complete"
    assert "exp1_kill_switch claims: 2 of 2 met" in out.out and "claims_failed" not in data


def test_a_failing_claim_exits_1_and_names_it(capsys, tmp_path, fake_exp1):
    """The negative control as candidate: the run completes and is saved, and exits 1 naming the claim."""
    rc, out, data = _run(capsys, tmp_path, "--candidate", "delta")
    assert rc == 1 and fake_exp1 == ["delta"] and data["run_facts"]["candidate"] == "delta"
    assert data["status"] == "complete" and data["claims_failed"] == ["exp1_kill_switch.alpha0_exposure_no_higher"]
    assert "claims not met: exp1_kill_switch.alpha0_exposure_no_higher" in out.err
    assert "not met: alpha0_exposure_no_higher" in out.out


@pytest.mark.parametrize("args,needle", [(("--candidate", "bogus"), "not a candidate arm"),
                                         (("--candidate", "never_trained"), "not a candidate arm")])
def test_bad_candidate_is_bad_input(capsys, tmp_path, fake_exp1, args, needle):
    rc, out, data = _run(capsys, tmp_path, *args)
    assert rc == 2 and needle in out.err and fake_exp1 == [] and data is None  # nothing ran, no file


def test_candidate_needs_experiment_1(capsys, tmp_path, fake_exp1):
    rc = main(["run", "--experiment", "2", "--model", "tiny", "--output-dir", str(tmp_path), "--candidate", "lora"])
    assert rc == 2 and "applies to experiment 1" in capsys.readouterr().err


def test_claims_failed_reads_lists_and_dicts():
    payload = {"status": "complete", "exp1_kill_switch": {"claims": [_claim("a", True), _claim("b", False)]},
               "other": {"claims": {"x": True, "y": {"z": False}}}, "exp2_null_test": {"acceptance": {"q": False}}}
    # acceptance blocks are reported, not exit codes; claims are both
    assert claims_failed(payload) == ["exp1_kill_switch.b", "other.y.z"]
