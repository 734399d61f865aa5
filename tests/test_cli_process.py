"""The command line as separate processes: two runs into one folder at once, Ctrl-C in the middle of a run.

Each process runs the real `libortho.cli.main` with the conversion demo replaced by a cheap stand-in (it sleeps,
then writes its plot through `ctx.artifact`), so the test costs the interpreter start-up, not a conversion.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
SCRIPT = r"""
import signal, sys, time
# as in a user's terminal: a suite started in the background (`nohup make test &`) hands its children SIGINT
# ignored, and the Ctrl-C test below then measured how the suite was started, not the CLI
signal.signal(signal.SIGINT, signal.default_int_handler)
from libortho.experiments import EXPERIMENTS, load_all
from libortho.cli import main

load_all()

def convert(ctx):
    time.sleep(float(sys.argv[1]))
    plot = ctx.artifact("convert.png")
    plot.write_text(ctx.run_id)
    return {"plot": str(plot)}

EXPERIMENTS["convert"] = convert
sys.exit(main(sys.argv[2:]))
"""


def start(sleep_s: float, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(sleep_s), "run", "--model", "tiny", "--no-progress",
                             *map(str, args)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow  # two interpreters start at once: about 15 s on 2 idle cores, 30 s under load
def test_two_concurrent_runs_keep_two_jsons_and_their_plots(tmp_path):
    procs = [start(2.0, "--experiment", "convert", "--output-dir", tmp_path) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    paths = sorted(tmp_path.glob("cpu_results_*.json"))
    assert len(paths) == 2  # it was one file: both runs printed the same name and one overwrote the other
    for path in paths:
        data = json.loads(path.read_text())
        plot = Path(data["convert"]["plot"])
        assert data["status"] == "complete" and plot.name == f"{path.stem}_convert.png"
        assert plot.read_text() == path.stem  # its own plot, not the other run's
    assert sorted(str(p) for p in paths) == sorted(o[0].split("results: ")[1].split()[0] for o in outs)


def test_ctrl_c_saves_what_finished(tmp_path):
    """Ctrl-C while Experiment 1 (real, tiny model) computes: one line, exit 130, the conversion kept."""
    p = start(0.0, "--experiment", "all", "--output-dir", tmp_path)
    deadline = time.monotonic() + 120
    data = {}
    while "convert" not in data and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
        paths = list(tmp_path.glob("cpu_results_*.json"))
        data = json.loads(paths[0].read_text()) if paths and paths[0].stat().st_size else {}
    assert "convert" in data, p.communicate(timeout=10)
    time.sleep(1.5)  # now inside Experiment 1
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "libortho: interrupted during kill_switch"), err[-2000:]
    [path] = list(tmp_path.glob("cpu_results_*.json"))
    data = json.loads(path.read_text())
    assert data["status"] == "interrupted" and "convert" in data and "exp1_kill_switch" not in data
    assert [s["status"] for s in data["run_facts"]["steps"]] == ["complete", "interrupted"]


def test_bad_input_answers_before_the_heavy_imports(tmp_path):
    """The issue's bound: bad input is one line and exit 2 in under 10 s, as a user runs it (a fresh process);
    the checks run before torch and transformers load (they took 10-17 s of imports before)."""
    for args in (["--model", str(tmp_path / "missing")], ["--model", "tiny", "--text", str(tmp_path / "no.txt")],
                 ["--model", "tiny", "--output-dir", "/proc/libortho"]):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "libortho", "run", *args], capture_output=True, text=True,
                           env=ENV, timeout=60)
        took = time.perf_counter() - t
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
        assert took < 10, f"{args}: {took:.1f} s"
