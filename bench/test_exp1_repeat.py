"""bench/exp1_repeat.py: a committed seed's arms measured again compare equal, and a changed number is caught."""
from __future__ import annotations

import json

import pytest

from bench import exp1_repeat
from libortho.experiments.kill_switch import SMALL, KillSwitch


pytestmark = pytest.mark.slow  # about 25 s: two measurements of the tiny model


@pytest.fixture(scope="module")
def seed_json(tmp_path_factory):
    """A seed JSON of the tiny model with one arm (about 10 s a measurement on 2 cores)."""
    size = SMALL["tiny"]
    exp = KillSwitch("tiny", size, seed=0, progress=False, measure_cache=False)
    exp.measure_arm("never_trained")
    inner = {"arms": exp.results, "size": size.to_dict(), "seed": 0, "canary_format": "plain", "model": exp.name}
    path = tmp_path_factory.mktemp("repeat") / "exp1_kill_switch_seed0.json"
    path.write_text(json.dumps({"exp1_kill_switch": inner}, default=str))
    return path


def test_repeat_is_identical_but_for_a_changed_number(seed_json, tmp_path):
    """One repeat of a JSON with one log-probability moved by 1e-12: exactly that number differs (the control, which
    must be caught) and every other number of the entry is identical (the repeat itself)."""
    d = json.loads(seed_json.read_text())
    d["exp1_kill_switch"]["arms"]["never_trained"]["1.0"]["logp_true"][3] += 1e-12
    path = tmp_path / seed_json.name
    path.write_text(json.dumps(d))
    args = ["--model", "tiny", "--device", "cpu", "--arms", "never_trained", "--out", str(tmp_path / "diff.json")]
    assert exp1_repeat.main([str(path), *args]) == 1
    rep = json.loads((tmp_path / "diff.json").read_text())["arms"]["never_trained"]["1.0"]
    assert rep["differing_leaves"] == 1 and rep["first_differences"][0][0] == ".logp_true[3]", rep
    assert exp1_repeat.differences({"a": [1.0, float("nan")]}, {"a": [1.0, float("nan")]}) == []  # NaN == NaN


def test_repeat_refuses_bad_input(seed_json, tmp_path):
    path = seed_json
    assert exp1_repeat.main([str(path), "--model", "tiny", "--device", "cpu", "--arms", "lora"]) == 2  # not in it
    d = json.loads(path.read_text())
    d["exp1_kill_switch"]["model"] = "another model"
    (tmp_path / "other.json").write_text(json.dumps(d))
    assert exp1_repeat.main([str(tmp_path / "other.json"), "--model", "tiny", "--device", "cpu",
                             "--arms", "never_trained"]) == 2  # refused after loading: the names differ
    (tmp_path / "x.json").write_text("{}")
    assert exp1_repeat.main([str(tmp_path / "x.json"), "--device", "cpu"]) == 2


def test_retrain_trains_again_and_gives_the_same_numbers(tmp_path):
    """--retrain: fine_tuned trained afresh (an empty training cache, not the entry the JSON's run left) measures
    number for number as the JSON says; the control: without --retrain the cached weights are read (cached true)."""
    import os

    size = SMALL["tiny"]
    exp = KillSwitch("tiny", size, seed=0, progress=False, measure_cache=False)
    exp.measure_arm("fine_tuned")
    inner = {"arms": exp.results, "size": size.to_dict(), "seed": 0, "canary_format": "plain", "model": exp.name}
    path = tmp_path / "exp1_kill_switch_seed0.json"
    path.write_text(json.dumps({"exp1_kill_switch": inner}, default=str))
    before = os.environ.get("LIBORTHO_CACHE")
    args = [str(path), "--model", "tiny", "--device", "cpu", "--arms", "fine_tuned"]
    for retrain, out in ((True, "again.json"), (False, "cached.json")):
        assert exp1_repeat.main([*args, *(["--retrain"] if retrain else []), "--out", str(tmp_path / out)]) == 0
        rec = json.loads((tmp_path / out).read_text())
        assert rec["identical"] and rec["retrained"] is retrain
        assert rec["training"]["fine_tuned"]["cached"] is not retrain, rec["training"]
    assert os.environ.get("LIBORTHO_CACHE") == before  # the fresh cache was the run's only
