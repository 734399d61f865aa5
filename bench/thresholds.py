"""Read thresholds.toml, the one place where the suite's pass/fail numbers live."""
from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PATH = Path(__file__).resolve().parent.parent / "thresholds.toml"  # the repo root: the suite, not the package


def load(section: str) -> dict:
    if not PATH.is_file():
        raise FileNotFoundError(f"{PATH} is missing: the suite's thresholds live there")
    data = tomllib.loads(PATH.read_text())
    if section not in data:
        raise KeyError(f"thresholds.toml has no [{section}] section")
    return data[section]
