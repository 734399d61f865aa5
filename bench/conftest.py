"""Options and worker placement of the bench suite.

* `--candidate ARM` (registered in the root conftest.py): the arm Experiment 1 tests as the switch (default
  ortho_tuned). Its claims must all hold; a negative control (delta, int4_of_fine_tuned, nf4_of_fine_tuned, a
  posthoc arm) makes the claims tests fail, listing the claims that did not hold.
* pytest-xdist on a machine with several GPUs (`pytest -n 2 bench/test_kill_switch.py -m real`): worker gwN
  sees one GPU, the Nth of those visible to the controller (CUDA_VISIBLE_DEVICES set before CUDA starts).
"""
from __future__ import annotations

import os
import subprocess

import pytest

DEFAULT_CANDIDATE = "ortho_tuned"


def _visible_gpus() -> list[str]:
    """GPU indices visible to this process, without starting CUDA (nvidia-smi, or CUDA_VISIBLE_DEVICES)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    worker = getattr(config, "workerinput", None)
    if worker is None:  # the controller (or no xdist): list the GPUs once for the workers it starts
        os.environ.setdefault("LIBORTHO_XDIST_GPUS", ",".join(_visible_gpus()))
        return
    gpus = [g for g in os.environ.get("LIBORTHO_XDIST_GPUS", "").split(",") if g]
    if gpus:  # one GPU per worker, round robin
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[int(worker["workerid"].removeprefix("gw")) % len(gpus)]
    # each worker's share of the cores: torch would start one thread per core in every worker, and the workers'
    # CPU work (fits, statistics, tokenizing) would then fight over them. A suspect, not a measured cause: on
    # 2026-11-30 (3 workers, a 32-core host, 2 GPUs) the same |R| 10,000 scoring took 63 s in seed 0's process
    # and 112-125 s in the two others'; the next sweep's progress lines show whether this changes it
    import torch

    share = max(1, (os.cpu_count() or 1) // max(1, int(worker.get("workercount", 1))))
    torch.set_num_threads(min(torch.get_num_threads(), share))


@pytest.fixture(scope="session")
def candidate(request) -> str:
    """The `--candidate` arm (checked against Experiment 1's candidate arms)."""
    from libortho.experiments.kill_switch import CANDIDATES

    arm = request.config.getoption("--candidate", default=DEFAULT_CANDIDATE)
    if arm not in CANDIDATES:
        raise pytest.UsageError(f"--candidate {arm}: not a candidate arm; choose from {', '.join(CANDIDATES)}")
    return arm
