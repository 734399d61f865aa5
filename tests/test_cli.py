import json
import os
import subprocess
import sys
import time

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args, timeout=600):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "libortho", *args], capture_output=True, text=True, env=ENV,
                       timeout=timeout)
    return r, time.perf_counter() - t


def error_lines(r):
    return [l for l in r.stderr.splitlines() if l.startswith("libortho: error:")]


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def inproc(capsys, *args):
    """Same entry point without a new interpreter (the subprocess tests cover the real launch)."""
    from libortho.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return Result(rc, out.out, out.err)


def test_plan_70b_refused_fast():
    r, secs = cli("plan", "--model", "meta-llama/Meta-Llama-3-70B", "--profile", "gtx4050")
    assert r.returncode == 2 and secs < 10, (r.returncode, secs)
    assert "does not fit" in r.stderr and "Meta-Llama-3-8B" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("model", ["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                                   "meta-llama/Llama-3.1-8B-Instruct"])
def test_plan_8b_needs_4bit(capsys, model):
    r = inproc(capsys, "plan", "--model", model, "--profile", "gtx4050")
    assert r.returncode == 0 and "4-bit required" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("run", "--model", "/no/such/dir"), "--model /no/such/dir"),
    (("run", "--model", "bogus"), "--model bogus"),
    (("run", "--text", "/no/such.txt"), "no such file"),
    (("run", "--seed", "abc"), "invalid int value"),
    (("run", "--canary-format", "xml"), "invalid choice"),
    (("run", "--num-canaries", "0"), "must be positive"),
    (("plan", "--model", "meta-llama/Meta-Llama-3-8B", "--profile", "gtx9999"), "unknown"),
    (("run", "--model", "meta-llama/Meta-Llama-3-70B", "--profile", "gtx4050"), "does not fit"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    r = inproc(capsys, *args)
    assert r.returncode == 2
    assert len(error_lines(r)) == 1 and needle in error_lines(r)[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unreadable_text_file(capsys, tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00\x81" * 10)
    r = inproc(capsys, "run", "--text", str(f))
    assert r.returncode == 2 and "cannot read as UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_check_gpu_without_cuda(capsys):
    r = inproc(capsys, "check-gpu")
    assert r.returncode == 0 and "cuda" in r.stdout.lower()


def test_run_convert_on_tiny_writes_json(tmp_path):
    r, _ = cli("run", "--experiment", "convert", "--model", "tiny", "--output-dir", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    files = list(tmp_path.glob("cpu_results_*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["environment"]["torch"] and data["convert"]["model"] == "tiny-llama"
    ppl = {a: v["ppl"] for a, v in data["convert"]["alphas"].items()}
    assert set(ppl) == {"0.0", "1.0"} and all(p > 1 for p in ppl.values())
