"""Side-by-side timing of the layer implementations of bench/test_kernels.py (a lab script, not a test).

    python bench/kernel_lab.py [--shapes 4096x4096,14336x4096] [--impls nf4,int4mm,base,alpha1] [--json F]
                               [--candidate some.module:function]

The same cases and method as the test (`rotated_calls`: a CUDA graph of many calls rotating over weight
copies to defeat the L2), timed with CUDA events, median of 20 replays after 3; no pytest, no assertions,
so a kernel candidate can be compared in one device call. Prints microseconds per call and the autotuner's
pick of the Triton kernel. `--candidate` runs a function with `dual_gemv`'s signature in the base/alpha0/alpha1
cases instead of the committed kernel (passed to the cases, the library is not patched), after checking its
output against the committed kernel.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys

import torch

sys.path.insert(0, ".")
from bench.kernel_cases import IMPLS, SHAPES, rotated_calls  # noqa: E402
from libortho.kernels import triton_dual as td  # noqa: E402


def time_impl(impl: str, N: int, K: int, gemv=None) -> float:
    run, reps, *_ = rotated_calls(impl, N, K, gemv)
    ts = []
    for _ in range(23):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / reps)
    del run
    torch.cuda.empty_cache()
    return statistics.median(ts[3:])


def check_candidate(fn, shapes) -> None:
    """The candidate against the committed kernel on fresh random layers: relative error, NaN, every output."""
    from libortho.shape_only import random_ortho_linear

    gen = torch.Generator(device="cuda").manual_seed(1)
    for N, K in shapes:
        m = random_ortho_linear(N, K, 0.01, 128, torch.bfloat16, "cuda", gen)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        for on in (False, True):
            args = (x, m.qweight, m.scales, None, 128, m.ortho_crow, m.ortho_col, m.ortho_values, m.alpha, None, on)
            ref, got = COMMITTED(*args).float(), fn(*args).float()
            err = ((got - ref).norm() / ref.norm()).item()
            ok = torch.isfinite(got).all().item() and err < 1e-2
            print(f"check {N}x{K} ortho={on}: rel err {err:.2e} {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                raise SystemExit(f"candidate wrong at {N}x{K}")


COMMITTED = td.dual_gemv


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--json", default=None)
    p.add_argument("--candidate", default=None, help="module:function with dual_gemv's signature")
    a = p.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    cand = None
    if a.candidate:
        mod, fn = a.candidate.split(":")
        cand = getattr(importlib.import_module(mod), fn)
        check_candidate(cand, shapes)
    impls = a.impls.split(",")
    out = {}
    print("| shape | " + " | ".join(impls) + " |")
    for N, K in shapes:
        row = {}
        for impl in impls:
            try:
                row[impl] = time_impl(impl, N, K, cand)
            except Exception as e:  # keep going: a lab table with holes beats none
                print(f"{impl} {N}x{K}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                row[impl] = float("nan")
        out[f"{N}x{K}"] = row
        print(f"| {N}x{K} | " + " | ".join(f"{row[i]:.1f}" for i in impls) + " |", flush=True)
    kernels = [td._dual_gemv_kernel] + (getattr(importlib.import_module(mod), "AUTOTUNED", []) if a.candidate else [])
    picks = {str(k[:4]): str(v) for kern in kernels for k, v in getattr(kern, "cache", {}).items()}
    for k, v in picks.items():
        print("pick", k, v)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"us": out, "picks": picks, "device": torch.cuda.get_device_name()}, f, indent=1)


if __name__ == "__main__":
    main()
