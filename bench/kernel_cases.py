"""The layer cases of the kernel benchmarks: one weight copy per case, timed as a CUDA graph of many calls.

Shared by bench/test_kernels.py (the pytest-benchmark tables and ratio claims) and bench/kernel_lab.py (a
side-by-side lab script). `rotated_calls(impl, N, K, gemv=...)` takes a candidate GEMV with `dual_gemv`'s
signature for the base / alpha0 / alpha1 cases, so a lab run compares a kernel without patching the library.
"""
from __future__ import annotations

import math

import torch

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]  # (out, in)
IMPLS = ["bf16", "nf4", "int4mm", "cusparse_csr", "int4mm+csr", "base", "alpha0", "alpha1"]
DENSITY, GROUP = 0.01, 128
ROTATE_BYTES, POOL_MAX = 256 * 2**20, 1536 * 2**20


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def make_case(impl, N, K, gen, gemv=None):
    """(callable(x) -> y, weight bytes read per call) for one copy of the layer. `gemv`: a kernel with
    `dual_gemv`'s signature to run the base / alpha0 / alpha1 cases with (default: the module's own path)."""
    from libortho.kernels import triton_dual as td
    from libortho.shape_only import random_ortho_linear

    if impl in ("bf16", "nf4"):
        w = (torch.randn(N, K, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02)
        if impl == "bf16":
            return (lambda x: x @ w.t()), _nbytes(w)
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        q, st = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        del w
        nb = _nbytes(q, st.absmax, st.code) + (_nbytes(st.state2.absmax, st.state2.code) if st.nested else 0)
        return (lambda x: bnb.matmul_4bit(x, q.t(), quant_state=st)), nb
    m = random_ortho_linear(N, K, DENSITY, GROUP, torch.bfloat16, "cuda", gen)
    base_nb = _nbytes(m.qweight, m.scales)
    ortho_nb = _nbytes(m.ortho_crow, m.ortho_col, m.ortho_values)
    if impl in ("int4mm", "int4mm+csr"):
        swapped = ((m.qweight & 0xF) << 4) | (m.qweight >> 4)  # torch's packing: high nibble first
        pk = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
        sz = torch.stack([m.scales, torch.zeros_like(m.scales)], -1).transpose(0, 1).contiguous()  # (G, N, 2)
        if impl == "int4mm":
            return (lambda x: torch.ops.aten._weight_int4pack_mm(x, pk, GROUP, sz)), _nbytes(pk, sz)

        def f(x):
            y = torch.ops.aten._weight_int4pack_mm(x, pk, GROUP, sz)
            return td.csr_gemv_add_(y, x, m.ortho_crow, m.ortho_col, m.ortho_values, m.alpha)

        return f, _nbytes(pk, sz) + ortho_nb
    if impl == "cusparse_csr":
        S = torch.sparse_csr_tensor(m.ortho_crow, m.ortho_col.int(), m.ortho_values, size=(N, K))
        return (lambda x: (S @ x.t()).t()), _nbytes(m.ortho_crow, m.ortho_values) + m.nnz * 4
    if impl == "base":  # the kernel alone, base stream only
        g = gemv or td.dual_gemv
        return (lambda x: g(x, m.qweight, m.scales, None, GROUP, None, None, None, None, None, False)), base_nb
    m.set_alpha(1.0 if impl == "alpha1" else 0.0)
    m.pinned_ortho = impl == "alpha1"  # what the decoder sets before capturing: no per-call sync
    nb = base_nb + (ortho_nb if impl == "alpha1" else 0)
    if gemv is not None:
        on = impl == "alpha1"
        return (lambda x: gemv(x, m.qweight, m.scales, None, GROUP, m.ortho_crow, m.ortho_col, m.ortho_values,
                               m.alpha, None, on)), nb
    return m, nb


def graph_or_eager(fn, warm: int = 3):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        return g.replay, "cuda-graph"
    except Exception:
        torch.cuda.synchronize()
        return fn, "eager"


def rotated_calls(impl, N, K, gemv=None):
    """(run, reps, copies, weight bytes, timing): `run()` makes `reps` batch-1 calls of `impl` rotating over
    enough weight copies to defeat the L2, as one CUDA graph where capture works (bench/kernel_lab.py too)."""
    gen = torch.Generator(device="cuda").manual_seed(N + K)
    first, nb = make_case(impl, N, K, gen, gemv)
    copies = [first] + [make_case(impl, N, K, gen, gemv)[0]
                        for _ in range(max(0, min(math.ceil(ROTATE_BYTES / nb), POOL_MAX // nb, 32) - 1))]
    reps = max(32, len(copies))
    xs = [torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)]
    with torch.no_grad():
        y = copies[0](xs[0])
        assert torch.isfinite(y.float()).all() and tuple(y.shape) == (1, N), f"{impl} output {tuple(y.shape)}"

        def many():
            for i in range(reps):
                copies[i % len(copies)](xs[i % len(xs)])

        run, timing = graph_or_eager(many)
    return run, reps, len(copies), nb, timing
