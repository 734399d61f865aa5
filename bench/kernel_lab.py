"""Side-by-side timing of decode GEMV candidates on the Llama-3-8B shapes (a lab script, not a test).

    python bench/kernel_lab.py [--shapes 4096x4096,14336x4096] [--impls int4mm,dual_all_base,dual_all_alpha1,...]

Same method as bench/test_kernels.py: a CUDA graph of many calls rotating over enough weight copies to
defeat the L2, median of 20 replays. Prints microseconds per call and the autotuner's pick.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import triton

sys.path.insert(0, ".")
from libortho.kernels import triton_dual as td  # noqa: E402
from libortho.shape_only import random_ortho_linear  # noqa: E402

GROUP, DENSITY = 128, 0.01
_KEY = ["N", "K", "HAS_ORTHO", "RCHUNK"]
# the same kernel autotuned over a subset of its configs: with / without a register cap
VARIANTS = {"all": td._dual_gemv_kernel,
            "cap": triton.autotune([c for c in td.GEMV_CONFIGS if c.maxnreg], key=_KEY)(td._dual_gemv_kernel.fn),
            "nocap": triton.autotune([c for c in td.GEMV_CONFIGS if not c.maxnreg], key=_KEY)(td._dual_gemv_kernel.fn)}


def _dual(variant, has_ortho, a):
    def f(x):
        td._dual_gemv_kernel = VARIANTS[variant]
        return td.dual_gemv(x, *a, has_ortho)
    return f


def make(impl, N, K, gen):
    if impl in ("bf16", "nf4"):
        w = torch.randn(N, K, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        if impl == "bf16":
            return (lambda x: x @ w.t()), w.numel() * 2
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        q, st = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        return (lambda x: bnb.matmul_4bit(x, q.t(), quant_state=st)), q.numel()
    m = random_ortho_linear(N, K, DENSITY, GROUP, torch.bfloat16, "cuda", gen)
    nb = m.qweight.numel() + m.scales.numel() * 2
    if impl == "int4mm":
        swapped = ((m.qweight & 0xF) << 4) | (m.qweight >> 4)
        pk = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
        sz = torch.stack([m.scales, torch.zeros_like(m.scales)], -1).transpose(0, 1).contiguous()
        return (lambda x: torch.ops.aten._weight_int4pack_mm(x, pk, GROUP, sz)), nb
    a = (m.qweight, m.scales, None, GROUP, m.ortho_crow, m.ortho_col, m.ortho_values, m.alpha, None)
    if impl.startswith("dual"):  # dual_{all,cap,nocap}_{base,alpha1}
        _, variant, which = impl.split("_")
        return _dual(variant, which == "alpha1", a), nb
    raise ValueError(impl)


def time_impl(impl, N, K, rotate=256 * 2**20):
    gen = torch.Generator(device="cuda").manual_seed(N + K)
    first, nb = make(impl, N, K, gen)
    copies = [first] + [make(impl, N, K, gen)[0] for _ in range(max(0, min(math.ceil(rotate / nb), 32) - 1))]
    reps = max(32, len(copies))
    xs = [torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)]
    with torch.no_grad():
        for _ in range(3):
            for i in range(len(copies)):
                copies[i](xs[i % 4])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(reps):
                copies[i % len(copies)](xs[i % 4])
    ts = []
    for _ in range(23):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / reps)
    del copies, g
    torch.cuda.empty_cache()
    return statistics.median(ts[3:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,128256x4096")
    p.add_argument("--impls", default="nf4,int4mm,dual_nocap_base,dual_nocap_alpha1,dual_cap_base,dual_cap_alpha1,dual_all_base,dual_all_alpha1")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")]
    impls = a.impls.split(",")
    out = {}
    print("| shape | " + " | ".join(impls) + " |")
    for N, K in shapes:
        row = {}
        for impl in impls:
            try:
                row[impl] = time_impl(impl, N, K)
            except Exception as e:  # keep going: a lab table with holes beats none
                print(f"{impl} {N}x{K}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                row[impl] = float("nan")
        out[f"{N}x{K}"] = row
        print(f"| {N}x{K} | " + " | ".join(f"{row[i]:.1f}" for i in impls) + " |", flush=True)
    picks = {f"{name}{k[:4]}": str(v) for name, t in VARIANTS.items()
             for k, v in getattr(t, "cache", {}).items()}
    for k, v in picks.items():
        print("pick", k, v)
    if a.json:
        json.dump({"us": out, "picks": picks, "device": torch.cuda.get_device_name()}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
