"""The Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1): per-row alpha parity.

The interpreter is chosen when the kernels are defined, so the cases run in a fresh process (`_run_cases`) and
report numbers that the tests below check. Skipped with a reason where Triton is not installed; the same cases
on a GPU, compiled, are in tests/test_kernels.py.
"""
import importlib.util

import pytest
import torch

from tests.interpreted import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed (pip install triton runs its interpreter on CPU)")
ALPHAS = [0.0, 1.0, 0.37, 0.0]  # one per row of x: rows 0 and 3 at the kill switch
TOL = 1e-2  # bf16 outputs


def _layer(symmetric: bool, bias: bool, seed: int):
    from libortho.linear import OrthoLinear
    from libortho.quant import quantize
    from libortho.sparse import csr_from_mask

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 256, generator=g) * 0.02  # 40 outputs: not a multiple of any BLOCK_N
    base = quantize(w, 64, symmetric, dtype=torch.bfloat16)
    mask = torch.rand(40, 256, generator=g) < 0.1
    b = torch.randn(40, generator=g).to(torch.bfloat16) if bias else None
    # a stream as large as the weights it sits on (not a quantization residual): alpha moves y by ~30%, far
    # above the bf16 tolerance, so a row given the wrong alpha cannot pass
    return OrthoLinear.from_parts(base, csr_from_mask((torch.randn(40, 256, generator=g) * 0.02).to(torch.bfloat16),
                                                      mask), b)


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _cases() -> dict:
    """Runs under the interpreter: per kind of tile, each row against the reference at its own alpha, the rows
    at alpha 0 against the base-only kernel, a poisoned stream, and the control (alpha[0] for every row)."""
    from libortho.kernels import _prefill_rows, reference
    from libortho.kernels import triton_dual as td

    kinds = {}
    for c in td.GEMV_CONFIGS:
        kinds.setdefault((c.kwargs["SPLIT"], c.kwargs["CSR_EARLY"], c.kwargs["PREFETCH"]), c)
    a = torch.tensor(ALPHAS)
    out = {}
    for i, ((split, early, pre), cfg) in enumerate(kinds.items()):
        for sym, bias in ((i % 2 == 0, i % 2 == 1),):  # symmetric and asymmetric + bias, alternately
            m = _layer(sym, bias, seed=split + 2 * early + 4 * pre)
            x = torch.randn(len(ALPHAS), 256, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
            b = m.bias
            args = (x, m.qweight, m.scales, m.zeros, 64, m.ortho_crow, m.ortho_col, m.ortho_values)
            y = td.dual_gemv(*args, a, b, True, config=cfg)
            y0 = td.dual_gemv(*args, m.alpha, b, False, config=cfg)  # base only (HAS_ORTHO off)
            wrong = td.dual_gemv(*args, torch.tensor(ALPHAS[0]), b, True, config=cfg)  # control
            refs = [reference.dual_linear(x[r:r + 1].float(), m.qweight, m.scales, m.zeros, 64, m.ortho_crow,
                                          m.ortho_col, m.ortho_values, ALPHAS[r], b) for r in range(len(ALPHAS))]
            poisoned = m.ortho_values.clone().fill_(float("nan"))
            yp = td.dual_gemv(x, m.qweight, m.scales, m.zeros, 64, m.ortho_crow, m.ortho_col, poisoned, a, b, True,
                              config=cfg)
            zero = [r for r, v in enumerate(ALPHAS) if v == 0]
            key = f"split{split}-early{early}-prefetch{pre}-{'sym' if sym else 'asym'}{'-bias' if bias else ''}"
            out[key] = dict(
                row_err=[_rel(y[r], refs[r][0]) for r in range(len(ALPHAS))],
                wrong_err=[_rel(wrong[r], refs[r][0]) for r in range(len(ALPHAS))],
                zero_rows_equal_base=bool(torch.equal(y[zero], y0[zero])),
                poisoned_zero_rows_equal_base=bool(torch.equal(yp[zero], y0[zero])),
                poisoned_other_rows_nan=[bool(torch.isnan(yp[r].float()).any()) for r in range(len(ALPHAS))
                                         if r not in zero],
                counters_zero=int(td.split_buffers(x.device, len(ALPHAS), 40)[1].abs().sum()) == 0)
    # prefill (more rows than the GEMV takes): 2 requests x 6 positions, the base for all, the stream for one
    m = _layer(True, True, seed=11)
    x = torch.randn(2, 6, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    m.set_row_alpha(torch.tensor([0.0, 1.0]))
    from libortho.kernels import row_alphas

    x2 = x.reshape(-1, 256)
    y = _prefill_rows(m, x2, row_alphas(m, x2), True, td).reshape(2, 6, 40)
    refs = [reference.dual_linear(x[r].float(), m.qweight, m.scales, m.zeros, 64, m.ortho_crow, m.ortho_col,
                                  m.ortho_values, al, m.bias) for r, al in enumerate((0.0, 1.0))]
    out["prefill"] = dict(row_err=[_rel(y[r], refs[r]) for r in range(2)])
    out["tensor_core"] = _tensor_core_cases()
    return out


def _tensor_core_cases() -> dict:
    """Prefill on tensor cores: `w4_gemm` (every tile of GEMM_CONFIGS) against the reference base, then the stream
    added by `csr_spmm_add_` at one alpha and at one alpha per row (rows at 0 untouched even by a NaN stream)."""
    from libortho.kernels import reference
    from libortho.kernels import triton_dual as td

    out = {}
    M = 37  # rows of x: not a multiple of any BLOCK_M
    for i, cfg in enumerate(td.GEMM_CONFIGS):
        sym, bias = i % 2 == 0, i % 2 == 1
        m = _layer(sym, bias, seed=20 + i)
        x = torch.randn(M, 256, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
        args = (m.qweight, m.scales, m.zeros, 64, m.ortho_crow, m.ortho_col, m.ortho_values)
        ref = {a: reference.dual_linear(x.float(), *args, a, m.bias) for a in (0.0, 1.0)}
        base = td.w4_gemm(x, m.qweight, m.scales, m.zeros, 64, m.bias, config=cfg)
        one = td.csr_spmm_add_(base.clone(), x, m.ortho_crow, m.ortho_col, m.ortho_values, torch.tensor(1.0))
        a = torch.tensor([0.0, 1.0, 0.37] * (M // 3) + [0.0] * (M % 3))
        rows = td.csr_spmm_add_(base.clone(), x, m.ortho_crow, m.ortho_col, m.ortho_values, a)
        refs = torch.stack([reference.dual_linear(x[r:r + 1].float(), *args, float(a[r]), m.bias)[0] for r in range(M)])
        nan = m.ortho_values.clone().fill_(float("nan"))
        poisoned = td.csr_spmm_add_(base.clone(), x, m.ortho_crow, m.ortho_col, nan, a)
        z = a == 0
        key = "x".join(str(cfg.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + ("-sym" if sym else "-asym")
        out[key] = dict(base_err=_rel(base, ref[0.0]), one_err=_rel(one, ref[1.0]), rows_err=_rel(rows, refs),
                        stream_effect=_rel(ref[0.0], ref[1.0]), zero_rows_equal_base=bool(torch.equal(rows[z], base[z])),
                        poisoned_zero_rows_equal_base=bool(torch.equal(poisoned[z], base[z])),
                        poisoned_other_rows_nan=bool(torch.isnan(poisoned[~z].float()).any(1).all()))
    return out


@pytest.fixture(scope="module")
def cases() -> dict:
    """The numbers `_cases` reports, from one interpreter process (about 15 s)."""
    return run_interpreted("tests.test_triton_dual:t._cases()", "the CSR row range of each output row")


def test_every_tile_kind_applies_each_rows_own_alpha(cases):
    kinds = [k for k in cases if k not in ("prefill", "tensor_core")]
    assert len(kinds) >= 5  # split 1/2/4, CSR early or late, prefetch: every kind the tuner may pick
    for k in kinds:
        assert max(cases[k]["row_err"]) < TOL, (k, cases[k]["row_err"])
        assert cases[k]["counters_zero"], k


def test_rows_at_alpha_zero_are_the_base_kernel_bit_for_bit_and_skip_the_stream(cases):
    for k, c in cases.items():
        if k in ("prefill", "tensor_core"):
            continue
        assert c["zero_rows_equal_base"], k
        assert c["poisoned_zero_rows_equal_base"], k  # NaN values in the stream never reached them
        assert all(c["poisoned_other_rows_nan"]), k  # control: the rows at nonzero alpha did read it


def test_control_first_alpha_for_every_row_is_caught(cases):
    for k, c in cases.items():
        if k in ("prefill", "tensor_core"):
            continue
        wrong = c["wrong_err"]
        assert wrong[0] < TOL and wrong[3] < TOL, k  # alpha[0] = 0 is right for rows 0 and 3 ...
        assert min(wrong[1], wrong[2]) > 3 * TOL, (k, wrong)  # ... and caught on the others


def test_prefill_rows_apply_each_requests_alpha(cases):
    assert max(cases["prefill"]["row_err"]) < TOL, cases["prefill"]


def test_tensor_core_prefill_matches_the_reference(cases):
    """w4_gemm + csr_spmm_add_ (every GEMM tile) against the plain-torch layer: the base, the stream at alpha 1 and
    one alpha per row. The stream moves y by far more than the tolerance, so a dropped or doubled stream fails."""
    from libortho.kernels.triton_dual import GEMM_CONFIGS

    tc = cases["tensor_core"]
    assert len(tc) == len(GEMM_CONFIGS)
    for k, c in tc.items():
        assert max(c["base_err"], c["one_err"], c["rows_err"]) < TOL, (k, c)
        assert c["stream_effect"] > 3 * TOL, (k, c)  # control: base alone would fail one_err


def test_tensor_core_prefill_rows_at_alpha_zero_never_meet_the_stream(cases):
    for k, c in cases["tensor_core"].items():
        assert c["zero_rows_equal_base"] and c["poisoned_zero_rows_equal_base"], k
        assert c["poisoned_other_rows_nan"], k  # control: the rows at nonzero alpha did read the (NaN) stream


PREFILL_SIGNATURES = {
    "_w4_gemm_kernel": (["*bf16", "*u8", "*bf16", "*bf16", "*bf16", "*bf16"] + ["i32"] * 8,
                        {"GROUP": 64, "HAS_ZERO": True, "HAS_BIAS": True, "BLOCK_M": 128, "BLOCK_N": 128,
                         "BLOCK_K": 64, "GROUP_M": 8}),
    "_csr_spmm_add_kernel": (["*bf16", "*i32", "*i16", "*bf16", "*fp32", "*bf16"] + ["i32"] * 4,
                             {"PER_ROW": True, "BLOCK_M": 64, "BLOCK_N": 32}),
}


@pytest.mark.parametrize("arch", [89, 90])
@pytest.mark.parametrize("name", sorted(PREFILL_SIGNATURES))
def test_prefill_kernels_compile_for_the_gpu(name, arch):
    """Compiled for sm_89 (the gtx4050 profile's GPU) and sm_90 with no GPU: the interpreter accepts code the
    compiler rejects (tests/test_triton_decode.py shows the check failing on such a kernel)."""
    from libortho.kernels import triton_dual as td
    from tests.test_triton_decode import _compile

    assert "cubin" in _compile(name, arch, td, PREFILL_SIGNATURES).asm
