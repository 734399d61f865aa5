"""Results files: one JSON per run with the environment beside the numbers, plots next to it."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch


def git_commit(package_dir: str | Path | None = None) -> str | None:
    """HEAD of the checkout this package runs from, or None.

    LIBORTHO_GIT_COMMIT wins (a copied tree whose .git is not the code that runs). A commit is recorded only
    when the package's own parent directory is the top of the git work tree (the repo checkout itself), never
    when an installed copy merely sits inside some other project's repository.

    Args:
        package_dir: the package directory (default: this package's).
    """
    if os.environ.get("LIBORTHO_GIT_COMMIT"):
        return os.environ["LIBORTHO_GIT_COMMIT"]
    pkg = Path(package_dir or Path(__file__).parent).resolve()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=pkg).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != pkg.parent:
            return None
        return git("rev-parse", "HEAD") or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str = "cpu") -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
           "device": device, "git_commit": git_commit(), "package_dir": str(Path(__file__).resolve().parent),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def results_dir(default: str | Path) -> Path:
    """Where a run writes its committed results: LIBORTHO_RESULTS_DIR when set (a lent GPU machine, a CI
    artifact folder), else `default`."""
    return Path(os.environ.get("LIBORTHO_RESULTS_DIR") or default)


def run_stamp() -> str:
    """Local time to the microsecond: `YYYYMMDD_HHMMSS_ffffff`."""
    return dt.datetime.now().strftime("%Y%m%d_%H%M%S_%f")


def reserve_results_path(output_dir: str | Path, profile: str | None) -> Path:
    """Create (O_EXCL) an empty results file no other run can take and return its path.

    Name: `<profile or cpu>_results_<YYYYMMDD_HHMMSS_ffffff>_<pid>[_<n>].json`; the stem is the run id that
    names the run's plots. Raises NotADirectoryError / PermissionError / OSError with the directory named, before
    any computation (the CLI turns them into one line).
    """
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"--output-dir {d}: is a file, not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"--output-dir {d}: cannot create it ({e.strerror or e})") from None
    base = f"{profile or 'cpu'}_results_{run_stamp()}_{os.getpid()}"
    for n in range(1000):
        path = d / (base + (f"_{n}" if n else "") + ".json")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise type(e)(f"--output-dir {d}: not writable ({e.strerror or e})") from None
    raise FileExistsError(f"--output-dir {d}: 1000 results files named {base}_*.json already exist")


def results_path(output_dir: str | Path, profile: str | None) -> Path:
    """A fresh results file in `output_dir`, already created so that no concurrent run can take its name."""
    return reserve_results_path(output_dir, profile)


def _atomic(path: Path, write) -> Path:
    """Call `write(tmp)` on a temporary file unique to this process beside `path`, then rename it over `path`:
    readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a results file is for everyone to read
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` as JSON atomically (never half a results file)."""
    text = json.dumps(payload, indent=2, default=str)
    return _atomic(Path(path), lambda tmp: tmp.write_text(text))


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically (creating its folder) and release it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path
