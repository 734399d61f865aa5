"""One Triton-interpreter process for a test module's kernel cases (TRITON_INTERPRET=1 is read when the kernels are
defined, so they run in a child process), shared by tests/test_triton_dual.py and tests/test_triton_decode.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(call: str, loop: str) -> dict:
    """The JSON that `call` (an expression over `t`, the test module, e.g. "t._cases()") returns in a
    TRITON_INTERPRET=1 process. Skips where the installed Triton's interpreter cannot bound a loop by a loaded
    value (`loop` says which loop: Triton 3.6 fails so; 3.9 runs it): an interpreter limit, not a kernel bug, and
    the compiled kernels are checked in the gpu tests."""
    module, _, expr = call.partition(":")
    code = (f"import json, torch, {module} as t; torch.set_num_threads(1); "
            f"print('CASES' + json.dumps({expr}))")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="1"), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    if run.returncode and "only 0-dimensional arrays can be converted" in run.stderr:
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot bound a loop by a loaded value ({loop}; runs "
                    "in later Triton); the compiled kernels run in the gpu tests")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(next(s for s in run.stdout.splitlines() if s.startswith("CASES"))[5:])
