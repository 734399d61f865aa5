"""Results files: the environment block, atomic JSON writes, the file name."""
from __future__ import annotations

import json
import re

from libortho.results import environment, git_commit, results_dir, results_path, write_json


def test_git_commit_env_override(monkeypatch):
    """A copied tree (a lent GPU machine) reports the commit it was told, not its copy's .git."""
    monkeypatch.setenv("LIBORTHO_GIT_COMMIT", "0123abcd")
    assert git_commit() == "0123abcd"
    assert environment("cpu")["git_commit"] == "0123abcd"
    monkeypatch.delenv("LIBORTHO_GIT_COMMIT")
    head = git_commit()
    assert head is None or re.fullmatch(r"[0-9a-f]{40}", head)


def test_environment_has_date_and_machine():
    env = environment("cpu")
    assert env["date"] and env["machine"] and env["device"] == "cpu"


def test_write_json_is_whole_and_named(tmp_path):
    p = write_json(tmp_path / "sub" / "r.json", {"a": 1, "b": [1.5]})
    assert json.loads(p.read_text()) == {"a": 1, "b": [1.5]}
    assert not list(tmp_path.rglob("*.tmp"))
    assert re.fullmatch(r"gtx4050_results_\d{8}_\d{6}\.json", results_path(tmp_path, "gtx4050").name)
    assert results_path(tmp_path, None).name.startswith("cpu_results_")


def test_results_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.delenv("LIBORTHO_RESULTS_DIR", raising=False)
    assert results_dir(tmp_path / "results") == tmp_path / "results"
    monkeypatch.setenv("LIBORTHO_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert results_dir(tmp_path / "results") == tmp_path / "elsewhere"
