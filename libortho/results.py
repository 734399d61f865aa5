"""Results files: one JSON per run with the environment beside the numbers, plots next to it."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str | None:
    """HEAD of the checkout; LIBORTHO_GIT_COMMIT wins (a copied tree whose .git is not the code that runs)."""
    if os.environ.get("LIBORTHO_GIT_COMMIT"):
        return os.environ["LIBORTHO_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str = "cpu") -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
           "device": device, "git_commit": git_commit(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def results_dir(default: str | Path) -> Path:
    """Where a run writes its committed results: LIBORTHO_RESULTS_DIR when set (a lent GPU machine, a CI
    artifact folder), else `default`."""
    return Path(os.environ.get("LIBORTHO_RESULTS_DIR") or default)


def results_path(output_dir: str | Path, profile: str | None) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d_%H%M%S")
    return Path(output_dir) / f"{profile or 'cpu'}_results_{stamp}.json"


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)  # never leave half a results file
    return path


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure (creating its folder) and release it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
