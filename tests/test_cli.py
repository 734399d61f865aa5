"""The command line in-process (cli.main): plan, bad input in one line before any computation, what a run writes.

Experiments are replaced by cheap fakes where the test is about the CLI, not the experiment; the real launch
(signals, two processes at once) is in test_cli_process.py, a real conversion at the end of this file.
"""
import json
import os
import re
import time

import pytest
import torch

from libortho import cli
from libortho.cli import main


class Result:
    def __init__(self, returncode, stdout, stderr, seconds):
        self.returncode, self.stdout, self.stderr, self.seconds = returncode, stdout, stderr, seconds


def inproc(capsys, *args):
    """Same entry point as `python -m libortho`, without a new interpreter."""
    capsys.readouterr()
    t = time.perf_counter()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return Result(rc, out.out, out.err, time.perf_counter() - t)


def error_lines(r):
    return [line for line in r.stderr.splitlines() if line.startswith("libortho: error:")]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# -- plan ------------------------------------------------------------------------------------------------------

def test_plan_70b_refused_on_6gb(capsys):
    r = inproc(capsys, "plan", "--model", "meta-llama/Meta-Llama-3-70B", "--profile", "gtx4050")
    assert r.returncode == 2 and r.seconds < 10, (r.returncode, r.seconds)
    assert len(error_lines(r)) == 1 and "does not fit" in r.stderr and "Meta-Llama-3-8B" in r.stderr
    assert " yes" not in r.stdout  # the table says no everywhere: nothing contradicts the refusal


@pytest.mark.parametrize("model", ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                                   "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B"])
def test_plan_8b_needs_4bit(capsys, model):
    r = inproc(capsys, "plan", "--model", model, "--profile", "gtx4050")
    assert r.returncode == 0 and "4-bit required" in r.stdout and "loads this model in int4" in r.stdout


def test_plan_70b_on_h100_decides_instead_of_contradicting(capsys):
    """It printed "int8/int4/libortho fit" and then exited 2 ("fp16 needs 132.54 GiB")."""
    r = inproc(capsys, "plan", "--model", "meta-llama/Meta-Llama-3-70B-Instruct", "--profile", "h100")
    assert r.returncode == 0 and not error_lines(r), r.stderr
    assert "loads this model in int8" in r.stdout and "fits: int8, int4, libortho" in r.stdout


def test_plan_columns_survive_huge_seq_len(capsys):
    r = inproc(capsys, "plan", "--model", "meta-llama/Meta-Llama-3-8B", "--profile", "h100", "--seq-len", 100000000)
    rows = [line.split() for line in r.stdout.splitlines()[1:6]]
    assert rows[0] == ["precision", "weights", "embed", "head", "kv", "context", "total", "fits"]
    assert all(len(row) == 8 for row in rows), r.stdout  # "kv" and "context" used to run together
    assert r.returncode == 2 and "at seq_len 100000000" in r.stderr


def test_plan_llama31_70b_known_offline(capsys):
    r = inproc(capsys, "plan", "--model", "meta-llama/Llama-3.1-70B-Instruct", "--profile", "gtx4050")
    assert r.returncode == 2 and "does not fit" in r.stderr and "unknown" not in r.stderr and r.seconds < 10


def test_check_gpu_without_cuda(capsys):
    r = inproc(capsys, "check-gpu")
    assert r.returncode == 0 and "cuda" in r.stdout.lower()


# -- run: bad input, one line, exit 2, before any computation -----------------------------------------------

@pytest.fixture
def no_compute(monkeypatch):
    """Experiments that fail the test if called: validation must stop the run first."""
    from libortho.experiments import EXPERIMENTS, load_all

    load_all()

    def boom(ctx):
        raise AssertionError("an experiment ran although the input was bad")

    for name in list(EXPERIMENTS):
        monkeypatch.setitem(EXPERIMENTS, name, boom)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    return d


def _bad_inputs(tmp_path, model_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    no_cfg, no_w, broken = (tmp_path / n for n in ("no_cfg", "no_weights", "broken"))
    for d in (no_cfg, no_w, broken):
        d.mkdir()
        for f in model_dir.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    (no_cfg / "config.json").unlink()
    (no_w / "model.safetensors").unlink()
    (broken / "config.json").write_text("{\"model_type\": ")
    return [
        (("--output-dir", afile), "is a file, not a directory"),
        (("--output-dir", "/proc/libortho_out"), "--output-dir /proc/libortho_out"),
        (("--output-dir", "/sys/libortho_out"), "--output-dir /sys/libortho_out"),
        (("--model", "/no/such/dir"), "--model /no/such/dir"),
        (("--model", "bogus"), "--model bogus"),
        (("--model", "someorg/does-not-exist"), "not in the local Hugging Face cache"),
        (("--model", no_cfg), "no config.json"),
        (("--model", no_w), "no weights"),
        (("--model", broken), "not valid JSON"),
        (("--text", "/no/such.txt"), "no such file"),
        (("--text", tmp_path), "is a directory"),
        (("--seed", "abc"), "invalid int value"),
        (("--seed", 2**63), "from 0 to 2**32-1"),
        (("--seed", -1), "from 0 to 2**32-1"),
        (("--canary-format", "xml"), "invalid choice"),
        (("--num-canaries", "0"), "--num-canaries must be in [2, 4500]"),
        (("--num-canaries", "1000000000"), "--num-canaries must be in [2, 4500]"),  # failed late, doubled, exit 1
        (("--profile", "gtx9999"), "--profile gtx9999: unknown"),
        (("--profile", ""), "--profile : unknown"),  # was taken as no profile
        (("--quantization-bits", "8"), "8-bit loading applies to a model directory"),
        (("--quantization-bits", "4", "--no-quantization"), "not allowed with"),
        (("--model", "meta-llama/Meta-Llama-3-70B", "--profile", "gtx4050"), "does not fit"),
        (("--model", "meta-llama/Meta-Llama-3-8B", "--profile", "gtx4050", "--no-quantization"),
         "fp16 needs 15.71 GiB > 6 GiB; fits: int4, libortho"),
    ]


BAD_IDS = ["out-file", "out-proc", "out-sys", "model-missing", "model-bogus", "hub-offline", "no-config",
           "no-weights", "broken-config", "text-missing", "text-dir", "seed-abc", "seed-2**63", "seed-neg",
           "canary-format", "num-canaries", "num-canaries-huge", "profile", "profile-empty", "bits8-tiny", "bits-and-noquant", "70b-6gb", "8b-fp16-6gb"]


@pytest.mark.parametrize("case", range(len(BAD_IDS)), ids=BAD_IDS)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, model_dir, no_compute, case):
    cases = _bad_inputs(tmp_path, model_dir)
    assert len(cases) == len(BAD_IDS)
    extra, needle = cases[case]
    out = tmp_path / "out"
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--output-dir", out, *extra)  # last wins
    assert r.returncode == 2, r.stderr
    assert len(error_lines(r)) == 1 and needle in error_lines(r)[0], r.stderr
    assert "Traceback" not in r.stderr and r.seconds < 10
    assert not out.exists() or not list(out.iterdir())  # no results file reserved


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(capsys, tmp_path, no_compute):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--output-dir", ro)
    assert r.returncode == 2 and "not writable" in r.stderr


def test_unreadable_text_file(capsys, tmp_path, no_compute):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00\x81" * 10)
    r = inproc(capsys, "run", "--model", "tiny", "--text", f, "--output-dir", tmp_path / "o")
    assert r.returncode == 2 and "cannot read as UTF-8" in r.stderr and "Traceback" not in r.stderr


# -- run: what a run writes ------------------------------------------------------------------------------------

CALLS: list = []


def _section(name, **extra):
    def fn(ctx):
        CALLS.append((name, ctx))
        plot = ctx.artifact(f"{name}.png")
        plot.write_bytes(b"\x89PNG")
        return {"model": ctx.model, "plot": str(plot), **extra}
    return fn


def _raises(err):
    def fn(ctx):
        raise err
    return fn


@pytest.fixture
def fakes(monkeypatch):
    """install(convert=fn, kill_switch=fn, null_test=fn): cheap experiments in the registry."""
    from libortho.experiments import EXPERIMENTS, load_all

    load_all()
    CALLS.clear()

    def install(**fns):
        for name in ("convert", "kill_switch", "null_test"):
            monkeypatch.setitem(EXPERIMENTS, name, fns.get(name, _section(name)))
    return install


def _results(out):
    [path] = list(out.glob("*_results_*.json"))
    return path, json.loads(path.read_text())


def test_complete_run_json(capsys, tmp_path, fakes):
    fakes(null_test=_section("null_test", acceptance={"alpha0_equals_base": True, "thresholds": {"a": 1},
                                                      "posthoc": {"libortho_posthoc_control": False}}),
          kill_switch=_section("kill_switch", claims={"switch": True}))
    r = inproc(capsys, "run", "--model", "tiny", "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    path, data = _results(tmp_path)
    assert re.fullmatch(r"cpu_results_\d{8}_\d{6}_\d{6}_\d+\.json", path.name)
    assert data["status"] == "complete" and data["run_id"] == path.stem
    assert [s["experiment"] for s in data["run_facts"]["steps"]] == ["convert", "kill_switch", "null_test"]
    assert all(s["status"] == "complete" and s["seconds"] >= 0 for s in data["run_facts"]["steps"])
    for key, name in (("convert", "convert"), ("exp1_kill_switch", "kill_switch"), ("exp2_null_test", "null_test")):
        assert data[key]["plot"] == str(tmp_path / f"{path.stem}_{name}.png")  # plots named after their JSON
    assert data["args"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # random weights: said in the JSON and on screen
    assert data["run_facts"]["model"] == {"source": "tiny", "hidden_size": 64, "num_hidden_layers": 2,
                                          "vocab_size": 49152, "weights": "random"}
    assert any("random" in n for n in data["notes"]) and "weights of tiny are random" in r.stdout
    # acceptance and claims printed, one line each, not only in the JSON
    assert "exp2_null_test acceptance: 1 of 2 met; not met: posthoc.libortho_posthoc_control" in r.stdout
    assert "exp1_kill_switch claims: 1 of 1 met" in r.stdout
    mem = data["run_facts"]["memory"]
    assert mem["profile"] is None and mem["cap_applied"] is False and mem["cap_reason"]
    assert data["run_facts"]["memory_policy"]["precision"] == "full"


def test_summary_line_control():
    assert cli.summary_line("x", {"arms": {}}) is None  # nothing to summarise: no line
    assert cli.summary_line("x", {"acceptance": {"ok": False}}) == "x acceptance: 0 of 1 met; not met: ok"


def test_failed_experiment_keeps_what_finished(capsys, tmp_path, fakes):
    fakes(null_test=_raises(RuntimeError("boom\nsecond line")))
    r = inproc(capsys, "run", "--model", "tiny", "--output-dir", tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    _, data = _results(tmp_path)
    assert data["status"] == "failed: null_test: RuntimeError: boom second line"
    assert data["convert"]["model"] == "tiny" and data["exp1_kill_switch"]["model"] == "tiny"
    assert "boom" in data["error"]["traceback"] and data["run_facts"]["steps"][-1]["status"] == "failed"


def test_out_of_memory_exit_3_names_step_and_peak(capsys, tmp_path, fakes, monkeypatch):
    from libortho.gpu import BudgetMeter

    monkeypatch.setattr(BudgetMeter, "peak_gib", lambda self: 5.5)
    fakes(kill_switch=_raises(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    r = inproc(capsys, "run", "--model", "tiny", "--output-dir", tmp_path)
    assert r.returncode == 3 and len(r.stderr.strip().splitlines()) == 1
    assert "out of memory in kill_switch (peak 5.50 GiB)" in r.stderr
    _, data = _results(tmp_path)
    assert data["status"] == "failed: out of memory in kill_switch (peak 5.50 GiB)"
    assert "convert" in data and "exp2_null_test" not in data


def test_interrupt_keeps_what_finished(capsys, tmp_path, fakes):
    fakes(kill_switch=_raises(KeyboardInterrupt()))
    r = inproc(capsys, "run", "--model", "tiny", "--output-dir", tmp_path)
    assert r.returncode == 130 and r.stderr.strip().splitlines() == [
        f"libortho: interrupted during kill_switch; the experiments finished before it are saved in "
        f"{_results(tmp_path)[0]}"]
    _, data = _results(tmp_path)
    assert data["status"] == "interrupted" and "convert" in data and "exp1_kill_switch" not in data


def test_sigterm_is_an_interrupt_too(capsys, tmp_path, fakes):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    fakes(null_test=lambda ctx: os.kill(os.getpid(), signal.SIGTERM))
    r = inproc(capsys, "run", "--model", "tiny", "--output-dir", tmp_path)
    assert r.returncode == 130 and "interrupted during null_test" in r.stderr
    assert _results(tmp_path)[1]["status"] == "interrupted" and signal.getsignal(signal.SIGTERM) == before


def test_wikitext_offline_falls_back_with_a_note(capsys, tmp_path, fakes):
    fakes()
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--text", "wikitext",
               "--output-dir", tmp_path)
    assert r.returncode == 0 and "using the default text" in r.stderr
    assert CALLS[0][1].text == "default"
    _, data = _results(tmp_path)
    assert data["run_facts"]["text"]["used"] == "default" and "HF_HUB_OFFLINE" in data["run_facts"]["text"]["fallback"]


def test_tiny_with_a_profile(capsys, tmp_path, fakes):
    """It was "unknown model 'tiny'" after 26 s of hub retries."""
    fakes()
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--profile", "gtx4050",
               "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    path, data = _results(tmp_path)
    assert path.name.startswith("gtx4050_results_")
    pol, mem = data["run_facts"]["memory_policy"], data["run_facts"]["memory"]
    assert pol["profile"] == "gtx4050" and pol["precision"] == "full" and not pol["automatic"]
    assert mem["profile"] == "gtx4050" and mem["budget_gib"] == 6.0
    if not torch.cuda.is_available():
        assert mem["cap_applied"] is False and "no GPU allocator" in mem["cap_reason"]


def _loads_with(bits_of):
    def fn(ctx):
        from libortho.models import load_model

        load_model(ctx.model, bits=bits_of(ctx))
        return {"model": ctx.model}
    return fn


def test_quantization_bits_applied_and_recorded(capsys, tmp_path, fakes):
    """--quantization-bits 4 without --profile loads in 4-bit, and the JSON shows the load that happened."""
    fakes(convert=_loads_with(lambda ctx: ctx.load_bits))
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--quantization-bits", 4,
               "--output-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    _, data = _results(tmp_path)
    pol, step = data["run_facts"]["memory_policy"], data["run_facts"]["steps"][0]
    assert pol["precision"] == "int4" and pol["applied"] is True
    assert step["loads"][0]["bits"] == 4 and step["loads"][0]["quantized_linears"] == 14


def test_policy_not_applied_is_said(capsys, tmp_path, fakes):
    """The control: an experiment that ignores ctx.load_bits is caught, in the JSON and on stderr."""
    fakes(convert=_loads_with(lambda ctx: None))
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--quantization-bits", 4,
               "--output-dir", tmp_path)
    assert "not 4 as the memory policy decided" in r.stderr
    _, data = _results(tmp_path)
    assert data["run_facts"]["memory_policy"]["applied"] is False


def test_load_bits_follows_the_policy():
    from libortho.experiments import RunContext

    assert RunContext().load_bits is None
    assert RunContext(extra={"memory_policy": {"precision": "full"}}).load_bits is None
    assert RunContext(extra={"memory_policy": {"precision": "int4"}}).load_bits == 4
    assert RunContext(extra={"memory_policy": {"precision": "int8"}}).load_bits == 8


@pytest.mark.slow  # about 20 s on 2 idle cores (the conversion and three perplexities of the tiny model)
def test_run_convert_on_tiny_writes_json(capsys, tmp_path):
    """The real conversion demo, end to end."""
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--output-dir", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    _, data = _results(tmp_path)
    assert data["status"] == "complete" and data["environment"]["torch"] and data["convert"]["model"] == "tiny-llama"
    ppl = {a: v["ppl"] for a, v in data["convert"]["alphas"].items()}
    assert set(ppl) == {"0.0", "1.0"} and all(p > 1 for p in ppl.values())
    assert data["run_facts"]["steps"][0]["memory_policy_applied"] is True


# -- on a GPU: the budget enforced and measured (skipped on a CPU) --------------------------------------------

@pytest.mark.gpu
def test_gpu_run_under_gtx4050_is_capped_and_measured(capsys, tmp_path):
    r = inproc(capsys, "run", "--experiment", "convert", "--model", "tiny", "--profile", "gtx4050",
               "--device", "cuda", "--output-dir", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    _, data = _results(tmp_path)
    mem = data["run_facts"]["memory"]
    assert mem["cap_applied"] is True and mem["cap"]["allocator_cap_gib"] < 6
    assert 0 < mem["torch_max_reserved_gib"] < 6 and (mem["nvml_peak_gib"] is None or mem["nvml_peak_gib"] <= 6)
    assert data["run_facts"]["steps"][0]["torch_max_reserved_gib"] > 0


@pytest.mark.gpu
def test_gpu_out_of_memory_under_the_cap_exits_3(capsys, tmp_path, fakes):
    """A step that needs more than the profile's 6 GiB: one line naming it and the measured peak, exit 3."""
    def greedy(ctx):
        keep = [torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")]
        keep.append(torch.empty(8 * 2**30, dtype=torch.uint8, device="cuda"))

    fakes(kill_switch=greedy)
    r = inproc(capsys, "run", "--model", "tiny", "--profile", "gtx4050", "--device", "cuda", "--output-dir", tmp_path)
    assert r.returncode == 3 and re.search(r"out of memory in kill_switch \(peak [2-6]\.\d\d GiB\)", r.stderr), r.stderr
    _, data = _results(tmp_path)
    assert data["status"].startswith("failed: out of memory in kill_switch") and "convert" in data


def test_every_experiment_choice_is_registered():
    """Each `run --experiment` name reaches a registered experiment with its JSON section key; `all` is the ORDER
    (fails if a choice were added without its experiment, or a study slipped into `make run`'s `all`)."""
    from libortho.experiments import ORDER, load_all

    action = next(a for a in cli._parser()._subparsers._group_actions[0].choices["run"]._actions
                  if a.dest == "experiment")
    registered = load_all()
    for choice in action.choices:
        if choice != "all":
            assert cli.EXPERIMENT_NAMES.get(choice, choice) in registered, choice
    assert set(registered) - set(ORDER) == {"secrets", "utility"}
    assert cli.SECTION_KEYS["secrets"] == "exp1_secrets" and cli.SECTION_KEYS["utility"] == "exp1_utility"
