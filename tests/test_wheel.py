"""The package as users install it: a wheel built from this tree, installed outside the repo, run from elsewhere.

Everything the installed package reads must ship inside it (markers.ini is package data); a file read from the
directory above the package works in the checkout and fails here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the tests using `installed` are slow: building the wheel, three interpreters and Experiment 2 on the tiny
# model take about 60 s on 2 idle cores
# a path built above the package (`Path(__file__).parent.parent`, `parents[1]`, "../x") or a repo-root file by name
OUTSIDE = re.compile(r"__file__\)?(\.resolve\(\))?\.(parent\.parent|parents\[\d\])|[\"']\.\./|[\"']thresholds\.toml")


def test_no_module_reads_above_the_package():
    """The cheap guard beside the wheel test: no module builds a path above its own package directory."""
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in sorted((ROOT / "libortho").rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, hits
    assert OUTSIDE.search('PATH = Path(__file__).resolve().parent.parent / "thresholds.toml"')  # the control


def _env(target: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LIBORTHO_GIT_COMMIT", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _run(target: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(target), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(target, cwd): the wheel of this tree installed with `pip install --no-deps --target`, and an empty cwd."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build writes no build/ or egg-info into the checkout
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / "libortho", src / "libortho", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("libortho-*.whl"))
    target = tmp / "target"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return target, cwd


@pytest.mark.slow
def test_check_gpu_and_plan(installed):
    target, cwd = installed
    assert (target / "libortho" / "markers.ini").is_file()
    r = _run(target, cwd, "-m", "libortho", "check-gpu")
    assert r.returncode == 0 and "gtx4050" in r.stdout, r.stderr[-2000:]
    r = _run(target, cwd, "-m", "libortho", "plan", "--model", "meta-llama/Meta-Llama-3-8B-Instruct",
             "--profile", "gtx4050")
    assert r.returncode == 0 and "int4" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_missing_package_file_is_caught(installed, tmp_path):
    """The control: the same install without markers.ini fails, in one line naming the file."""
    target, cwd = installed
    broken = tmp_path / "target"
    shutil.copytree(target, broken)
    (broken / "libortho" / "markers.ini").unlink()
    r = _run(broken, cwd, "-m", "libortho", "plan", "--model", "meta-llama/Meta-Llama-3-8B-Instruct",
             "--profile", "gtx4050")
    assert r.returncode == 2 and "markers.ini" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_experiment_2_on_tiny(installed):
    target, cwd = installed
    out = cwd / "out"
    r = _run(target, cwd, "-m", "libortho", "run", "--experiment", "2", "--model", "tiny", "--size", "quick",
             "--output-dir", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    [path] = list(out.glob("cpu_results_*.json"))
    data = json.loads(path.read_text())
    assert data["status"] == "complete" and data["exp2_null_test"]["arms"]["fp"]["ppl"] > 1
    assert Path(data["environment"]["package_dir"]).is_relative_to(target)  # the installed copy ran, not the repo
    assert data["environment"]["git_commit"] is None  # an installed copy is no checkout
    assert Path(data["exp2_null_test"]["plot"]).name == f"{path.stem}_exp2_null_test.png"
    assert (out / f"{path.stem}_exp2_null_test.png").is_file()
