"""Results files: the environment block, the commit of the package's own checkout, exclusive names, atomic writes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from libortho.results import (environment, git_commit, reserve_results_path, results_dir, results_path, save_figure,
                              write_json)

PKG = Path(__file__).resolve().parent.parent / "libortho"


def test_git_commit_env_override(monkeypatch):
    """A copied tree (a lent GPU machine) reports the commit it was told, not its copy's .git."""
    monkeypatch.setenv("LIBORTHO_GIT_COMMIT", "0123abcd")
    assert git_commit() == "0123abcd"
    assert environment("cpu")["git_commit"] == "0123abcd"
    monkeypatch.delenv("LIBORTHO_GIT_COMMIT")
    head = git_commit()
    assert head is None or re.fullmatch(r"[0-9a-f]{40}", head)


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


def test_git_commit_only_for_the_package_own_checkout(monkeypatch, tmp_path):
    """An installed copy inside another project's repository must not record that project's HEAD (the control:
    the same layout with the package at the top of the work tree does record it)."""
    monkeypatch.delenv("LIBORTHO_GIT_COMMIT", raising=False)
    other = tmp_path / "project"
    installed = other / ".venv" / "site-packages" / "libortho"
    shutil.copytree(PKG, installed, ignore=shutil.ignore_patterns("__pycache__"))
    _git(other, "init", "-q")
    _git(other, "add", "-A")
    _git(other, "commit", "-qm", "x")
    assert git_commit(installed) is None  # today's code reported the project's HEAD here
    checkout = tmp_path / "checkout"
    shutil.copytree(installed, checkout / "libortho")
    _git(checkout, "init", "-q")
    _git(checkout, "add", "-A")
    _git(checkout, "commit", "-qm", "y")
    assert git_commit(checkout / "libortho") == _git(checkout, "rev-parse", "HEAD")
    assert git_commit(tmp_path / "nowhere") is None  # not a repository at all


def test_environment_has_date_and_machine():
    env = environment("cpu")
    assert env["date"] and env["machine"] and env["device"] == "cpu"


def test_write_json_is_whole_and_readable(tmp_path):
    p = write_json(tmp_path / "sub" / "r.json", {"a": 1, "b": [1.5]})
    assert json.loads(p.read_text()) == {"a": 1, "b": [1.5]}
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and f.name != "r.json"]  # no temporary left
    assert p.stat().st_mode & 0o044  # readable by others, not mkstemp's 0600


class _Unprintable:
    def __str__(self):
        raise RuntimeError("cannot serialise")


def test_write_json_failure_leaves_the_old_file(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(RuntimeError):
        write_json(p, {"a": 2, "b": _Unprintable()})
    assert json.loads(p.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1


def test_results_names_are_exclusive(tmp_path):
    """Names carry microseconds and the pid, and are created O_EXCL: 50 reservations in one process (same pid,
    maybe the same microsecond) give 50 distinct files."""
    paths = [reserve_results_path(tmp_path, "gtx4050") for _ in range(50)]
    assert len(set(paths)) == 50 and all(p.is_file() for p in paths)
    assert re.fullmatch(rf"gtx4050_results_\d{{8}}_\d{{6}}_\d{{6}}_{os.getpid()}(_\d+)?\.json", paths[0].name)
    assert results_path(tmp_path, None).name.startswith("cpu_results_")


def test_reserve_refuses_a_file_and_proc(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        reserve_results_path(f, None)
    with pytest.raises(OSError, match="--output-dir /proc/libortho_out"):
        reserve_results_path("/proc/libortho_out", None)


def test_save_figure_atomic(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    p = save_figure(fig, tmp_path / "run_x_plot.png")
    assert p.read_bytes()[:4] == b"\x89PNG" and [q.name for q in tmp_path.iterdir()] == ["run_x_plot.png"]


def test_results_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv("LIBORTHO_RESULTS_DIR", raising=False)
    assert results_dir(tmp_path / "results") == tmp_path / "results"
    monkeypatch.setenv("LIBORTHO_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert results_dir(tmp_path / "results") == tmp_path / "elsewhere"
