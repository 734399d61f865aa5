"""Layer-level speed of the dual-stream linear on Llama-3-8B shapes, batch 1 (decode), in one run.

Against: bf16 `matmul` (cuBLAS), bitsandbytes NF4 (`matmul_4bit`), torch's int4 kernel
(`_weight_int4pack_mm`), a 1%-dense cuSPARSE CSR product, and the pairing int4mm + our CSR kernel.
Each case times a CUDA graph of many calls that rotate over enough weight copies to defeat the 50 MB L2
(eager timing where capture fails; `timing` in extra_info says which), with torch.cuda.synchronize()
inside the timed function and warm-up rounds. Achieved bandwidth = weight bytes read / time per call.

    pytest -m gtx4050 bench/test_kernels.py --benchmark-autosave   # the tables
    pytest -m h100 bench/test_kernels.py                            # the tables and issue 7's ratio claims

The layer cases carry every profile they fit (gtx4050 and h100). The ratio targets of issue 7 were set for,
and are asserted on, the H100 only (`test_layer_ratios` is marked h100): against bitsandbytes on a laptop
Ada card the ratios mean something else, and no target was set there.
"""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from bench.kernel_cases import DENSITY, GROUP, IMPLS, SHAPES, rotated_calls
from bench.thresholds import load as load_thresholds
from bench.measure import now_utc


RESULTS: dict[tuple, dict] = {}


@pytest.fixture(scope="module")
def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


@pytest.mark.gtx4050
@pytest.mark.h100
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer(benchmark, gpu_profile, device_name, shape, impl):
    N, K = shape
    run, reps, n_copies, nb, timing = rotated_calls(impl, N, K)

    def timed():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    per_call = benchmark.stats.stats.median / reps
    info = dict(shape=f"{N}x{K}", impl=impl, us_per_call=per_call * 1e6, weight_bytes=nb,
                gb_s=nb / per_call / 1e9, timing=timing, copies=n_copies, density=DENSITY, batch=1,
                profile=gpu_profile[0].name, device=device_name, date=now_utc())
    benchmark.extra_info.update(info)
    RESULTS[(shape, impl)] = info
    del run  # the graph holds the copies: free them before the next case
    gc.collect()
    torch.cuda.empty_cache()


def _table() -> str:
    lines = ["| shape (out x in) | " + " | ".join(IMPLS) + " |", "|" + "---|" * (len(IMPLS) + 1)]
    for s in SHAPES:
        cells = []
        for i in IMPLS:
            r = RESULTS.get((s, i))
            cells.append(f"{r['us_per_call']:.1f} us / {r['gb_s']:.0f} GB/s" if r else "-")
        lines.append(f"| {s[0]}x{s[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@pytest.mark.h100
def test_layer_ratios(gpu_profile, device_name):
    """Issue 7, layer level, 1% ortho: alpha 1 <= 1.15x base-only and <= 0.7x NF4; alpha 0 <= 1.02x base."""
    need = [(s, i) for s in SHAPES for i in ("base", "alpha0", "alpha1", "nf4", "int4mm")]
    missing = [k for k in need if k not in RESULTS]
    if missing:
        pytest.skip(f"run with the test_layer cases in the same session (missing {missing[:2]}...)")
    th = load_thresholds("speed")
    rows, failures = [], []
    for s in SHAPES:
        t = {i: RESULTS[(s, i)]["us_per_call"] for i in IMPLS if (s, i) in RESULTS}
        r = dict(shape=f"{s[0]}x{s[1]}", alpha1_over_base=t["alpha1"] / t["base"],
                 alpha1_over_nf4=t["alpha1"] / t["nf4"], alpha0_over_base=t["alpha0"] / t["base"],
                 alpha1_over_int4mm=t["alpha1"] / t["int4mm"], base_over_int4mm=t["base"] / t["int4mm"])
        rows.append(r)
        if r["alpha1_over_base"] > th["layer_alpha1_over_base_max"]:
            failures.append(f"{r['shape']}: alpha1/base {r['alpha1_over_base']:.3f}")
        if r["alpha1_over_nf4"] > th["layer_alpha1_over_nf4_max"]:
            failures.append(f"{r['shape']}: alpha1/nf4 {r['alpha1_over_nf4']:.3f}")
        if r["alpha0_over_base"] > th["layer_alpha0_over_base_max"]:
            failures.append(f"{r['shape']}: alpha0/base {r['alpha0_over_base']:.3f}")
    table = _table()
    ratio_lines = "\n".join("| {shape} | {alpha1_over_base:.3f} | {alpha0_over_base:.3f} | {alpha1_over_nf4:.3f} | "
                            "{alpha1_over_int4mm:.3f} | {base_over_int4mm:.3f} |".format(**r) for r in rows)
    report = (f"Kernels, batch 1, bf16 activations, {DENSITY:.0%} ortho, group {GROUP}; {device_name}, {now_utc()}\n\n"
              f"{table}\n\n| shape | alpha1/base | alpha0/base | alpha1/NF4 | alpha1/int4mm | base/int4mm |\n"
              f"|---|---|---|---|---|---|\n{ratio_lines}\n")
    print("\n" + report)
    out = os.environ.get("LIBORTHO_RESULTS_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "kernels.md"), "w") as f:
            f.write(report)
        with open(os.path.join(out, "kernels.json"), "w") as f:
            json.dump({"device": device_name, "date": now_utc(), "results": list(RESULTS.values()), "ratios": rows}, f,
                      indent=1)
    assert not failures, "speed targets missed (measured): " + "; ".join(failures)
