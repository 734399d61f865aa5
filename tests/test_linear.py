import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libortho.linear import OrthoLinear
from libortho.quant import quantize
from libortho.select import select


def make(out_f=48, in_f=64, density=0.05, group_size=32, symmetric=True, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    base = quantize(w, group_size, symmetric)
    residual = w - base.dequantize()
    b = torch.randn(out_f, generator=g) if bias else None
    return w, b, OrthoLinear.from_parts(base, select(residual, density, "magnitude"), b)


@given(st.integers(0, 10_000), st.sampled_from([0.01, 0.1, 0.5]), st.booleans())
@settings(max_examples=25, deadline=None)
def test_alpha_zero_is_exactly_base_only(seed, density, symmetric):
    _, _, lin = make(density=density, symmetric=symmetric, seed=seed)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(seed))
    lin.set_alpha(0.0)
    base_only = torch.nn.functional.linear(x, lin.base().dequantize())
    assert torch.equal(lin(x), base_only)


def test_alpha_zero_never_reads_ortho():
    _, _, lin = make()
    lin.ortho_values.data.fill_(float("nan"))  # any read would poison the output
    lin.set_alpha(0.0)
    assert torch.isfinite(lin(torch.randn(2, 64))).all()


@given(st.integers(0, 10_000), st.booleans(), st.sampled_from([32, 64, -1]))
@settings(max_examples=25, deadline=None)
def test_density_one_alpha_one_reproduces_dense(seed, symmetric, group_size):
    w, b, lin = make(density=1.0, group_size=group_size, symmetric=symmetric, seed=seed, bias=True)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(seed + 1))
    ref = torch.nn.functional.linear(x, w, b)
    rel = ((lin(x) - ref).norm() / ref.norm()).item()
    assert rel < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 2, 2)])
def test_any_leading_dims_and_dtypes(dtype, lead):
    w, _, lin = make(density=1.0)
    x = torch.randn(*lead, 64)
    y = lin(x.to(dtype))
    assert y.shape == (*lead, 48) and y.dtype == dtype
    ref = x @ w.T
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((y.float() - ref).norm() / ref.norm()).item() < tol


def test_alpha_interpolates_linearly():
    _, _, lin = make(density=0.2)
    x = torch.randn(4, 64)
    outs = {}
    for a in (0.0, 0.5, 1.0):
        lin.set_alpha(a)
        outs[a] = lin(x)
    torch.testing.assert_close(outs[0.5], (outs[0.0] + outs[1.0]) / 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_bad_alpha_rejected(bad):
    _, _, lin = make()
    with pytest.raises(ValueError, match="alpha must be"):
        lin.set_alpha(bad)


def test_alpha_is_a_zero_dim_buffer():
    _, _, lin = make()
    assert lin.alpha.dim() == 0 and "alpha" in dict(lin.named_buffers())
    before = [n for n, _ in lin.named_modules()]
    lin.set_alpha(0.3)
    assert [n for n, _ in lin.named_modules()] == before


def test_ortho_values_are_trainable():
    _, _, lin = make(density=0.1)
    lin.ortho_values.requires_grad_(True)
    lin(torch.randn(3, 64)).sum().backward()
    assert lin.ortho_values.grad is not None and lin.ortho_values.grad.abs().sum() > 0
    assert lin.qweight.grad is None  # the base is a buffer: frozen by construction


def test_cached_base_matches_packed():
    _, _, lin = make()
    x = torch.randn(3, 64)
    y = lin(x)
    lin.cache_base_(True)
    assert torch.equal(lin(x), y)


def test_no_ortho_layer_refuses_nonzero_alpha():
    _, _, lin = make()
    lin.has_ortho = False
    with pytest.raises(ValueError, match="without its ortho stream"):
        lin.set_alpha(1.0)
    lin.set_alpha(0.0)


def test_merged_cache_follows_alpha_and_values():
    _, _, lin = make(density=0.2)
    x = torch.randn(3, 64)
    ref = {a: (lin.set_alpha(a), lin(x))[1] for a in (0.5, 1.0)}
    lin.cache_base_(True)
    with torch.no_grad():
        for a in (0.5, 1.0, 0.5):
            lin.set_alpha(a)
            torch.testing.assert_close(lin(x), ref[a])
        lin.ortho_values.mul_(2)  # an in-place edit invalidates the merged weight
        lin.set_alpha(1.0)
        expected = torch.nn.functional.linear(x, lin.base().dequantize() + lin.ortho_dense())
        torch.testing.assert_close(lin(x), expected)
        assert not torch.allclose(expected, ref[1.0])


def test_backward_in_row_blocks_equals_whole(monkeypatch):
    """A weight larger than BLOCK_BYTES (an 8B head) back-propagates through row blocks: the same gradient."""
    import libortho.linear as L
    from libortho.quant import quantize
    from libortho.sparse import csr_from_mask

    g = torch.Generator().manual_seed(0)
    m = L.OrthoLinear.from_parts(quantize(torch.randn(40, 64, generator=g), 32),
                                 csr_from_mask(torch.randn(40, 64, generator=g), torch.rand(40, 64, generator=g) < 0.2))
    m.set_alpha(0.7)
    x = torch.randn(3, 64, generator=g, requires_grad=True)
    (m(x) * torch.arange(40.0)).sum().backward()
    whole, x.grad = x.grad.clone(), None
    monkeypatch.setattr(L, "BLOCK_BYTES", 64 * 4 * 7)  # 7 rows a block: 6 blocks, the last one short
    assert len(m.row_blocks(x)) == 6
    (m(x) * torch.arange(40.0)).sum().backward()
    torch.testing.assert_close(x.grad, whole, rtol=1e-5, atol=2e-4)


# -- per-row alpha: one alpha per batch entry -------------------------------------------------------------

ROW_ALPHAS = torch.tensor([0.0, 1.0, 0.37, 0.0, 1.0])


def rows_vs_alone(lin, x, alphas) -> list[float]:
    """Relative error of each row of the per-row forward against the same request run alone at its alpha."""
    lin.set_row_alpha(alphas)
    y = lin(x)
    lin.set_row_alpha(None)
    errs = []
    for b, a in enumerate(alphas.tolist()):
        lin.set_alpha(a)
        ref = lin(x[b:b + 1])[0]
        errs.append(((y[b] - ref).norm() / ref.norm()).item())
    return errs


@pytest.mark.parametrize("lead", [(4,), (4, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_row_alpha_equals_each_request_alone(lead, bias):
    _, _, lin = make(density=0.2, bias=bias)
    x = torch.randn(len(ROW_ALPHAS), *lead[1:], 64, generator=torch.Generator().manual_seed(1))
    assert max(rows_vs_alone(lin, x, ROW_ALPHAS)) < 1e-6


def test_row_alpha_zero_rows_are_the_base_bit_for_bit_and_never_read_ortho():
    _, _, lin = make(density=0.2)
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(2))
    base = torch.nn.functional.linear(x, lin.base().dequantize())
    lin.ortho_values.data.fill_(float("nan"))  # any read would poison the row that reads it
    lin.set_row_alpha(ROW_ALPHAS)
    y = lin(x)
    zero = ROW_ALPHAS == 0
    assert torch.equal(y[zero], base[zero])
    assert torch.isnan(y[~zero].flatten(1)).any(1).all()  # control: each row at nonzero alpha read the poison


def test_row_alpha_check_catches_a_twin_that_applies_the_first_alpha_to_every_row(monkeypatch):
    import libortho.linear as L

    _, _, lin = make(density=0.2)
    x = torch.randn(len(ROW_ALPHAS), 64, generator=torch.Generator().manual_seed(3))
    assert max(rows_vs_alone(lin, x, ROW_ALPHAS)) < 1e-6
    right = L._forward_torch_rows

    def first_alpha_everywhere(m, x, w):
        saved = m.row_alpha
        m.row_alpha = saved[:1].expand_as(saved).contiguous()
        try:
            return right(m, x, w)
        finally:
            m.row_alpha = saved

    monkeypatch.setattr(L, "_forward_torch_rows", first_alpha_everywhere)
    errs = rows_vs_alone(lin, x, ROW_ALPHAS)
    assert errs[0] < 1e-6 and errs[3] < 1e-6  # the rows at alpha[0] = 0 agree ...
    assert min(errs[1], errs[2], errs[4]) > 1e-3  # ... the others are caught


def test_scalar_alpha_unchanged_after_row_alpha_cleared():
    _, _, lin = make(density=0.2)
    x = torch.randn(5, 64)
    lin.set_alpha(0.37)
    ref = lin(x)
    lin.set_row_alpha(ROW_ALPHAS)
    lin(x)
    lin.set_row_alpha(None)
    assert torch.equal(lin(x), ref) and lin.alpha.item() == pytest.approx(0.37)


@pytest.mark.parametrize("bad,msg", [(torch.tensor([0.0, float("nan")]), r"alpha\[1\] must be finite"),
                                     (torch.tensor([-1.0]), r"alpha\[0\] must be finite and in \[0"),
                                     (torch.zeros(2, 2), "1-D"), (torch.tensor([True]), "numbers"),
                                     (torch.tensor([]), "non-empty")])
def test_bad_row_alpha_rejected(bad, msg):
    _, _, lin = make()
    with pytest.raises(ValueError, match=msg):
        lin.set_row_alpha(bad)
    assert lin.row_alpha is None


def test_row_alpha_refuses_mismatched_batch_training_and_merging():
    _, _, lin = make(density=0.2)
    lin.set_row_alpha(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="2 values, one per batch entry, but x has shape \\(3, 64\\)"):
        lin(torch.randn(3, 64))
    with pytest.raises(ValueError, match="one per batch entry"):
        lin(torch.randn(64))
    with pytest.raises(ValueError, match="per-row alphas"):
        lin(torch.randn(2, 64, requires_grad=True))
    with pytest.raises(ValueError, match="per-row alphas"):
        lin.merged_weight()
    lin.has_ortho = False
    with pytest.raises(ValueError, match="without its ortho stream"):
        lin.set_row_alpha(torch.tensor([0.0, 1.0]))
    lin.set_row_alpha(torch.tensor([0.0, 0.0]))


# -- concatenation along the output dimension (the decoder's fused q|k|v and gate|up) ------------------------

def parts(symmetric=True, bias=False, group_size=32):
    """Three layers of one input width, like q (48 out), k and v (16 out each), streams of different density."""
    return [make(out_f=o, density=d, group_size=group_size, symmetric=symmetric, seed=s, bias=bias)[2]
            for o, d, s in ((48, 0.2, 1), (16, 0.05, 2), (16, 0.3, 3))]


def cat_of_parts(mods, x):
    return torch.cat([m(x) for m in mods], -1)


@pytest.mark.parametrize("symmetric,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.37])
def test_concat_is_the_concatenation_of_the_parts(symmetric, bias, alpha):
    from libortho.linear import concat_ortho_linears

    mods = parts(symmetric, bias)
    for m in mods:
        m.set_alpha(alpha)
    fused = concat_ortho_linears(mods)
    assert (fused.out_features, fused.nnz) == (80, sum(m.nnz for m in mods)) and torch.equal(fused.alpha, mods[0].alpha)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(fused(x), cat_of_parts(mods, x))


def test_concat_with_per_row_alpha_is_the_concatenation_of_the_parts():
    from libortho.linear import concat_ortho_linears

    mods = parts(bias=True)
    a = torch.tensor([0.0, 1.0, 0.5, 0.0])
    for m in mods:
        m.set_row_alpha(a)
    fused = concat_ortho_linears(mods)
    assert fused.row_alpha is a  # the parts' tensor itself: an in-place update reaches the fused layer too
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(fused(x), cat_of_parts(mods, x))
    a.copy_(torch.tensor([1.0, 0.0, 0.0, 0.25]))
    assert torch.equal(fused(x), cat_of_parts(mods, x))


def test_concat_check_catches_row_pointers_not_shifted():
    """Control: the same concatenation with each part's crow kept as it was (counting from 0) is caught."""
    from libortho.linear import concat_ortho_linears
    from libortho.sparse import CSR

    mods = parts()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    good = concat_ortho_linears(mods)
    crow = torch.cat([m.ortho_crow[:-1] for m in mods] + [mods[-1].ortho_crow[-1:]])  # not shifted
    bad = OrthoLinear.from_parts(good.base(), CSR(crow, good.ortho_col, good.ortho_values.detach(), (80, 64)))
    ref = cat_of_parts(mods, x)

    def agrees(m) -> bool:
        try:
            return torch.equal(m(x), ref)
        except RuntimeError:  # the plain-torch path expands crow into row indices: a falling crow raises
            return False

    assert agrees(good) and not agrees(bad)


def test_concat_refuses_parts_that_differ():
    from libortho.linear import concat_ortho_linears

    a, b = parts()[:2]
    with pytest.raises(ValueError, match=r"differ in group_size: \[32, 64\]"):
        concat_ortho_linears([a, make(out_f=16, group_size=64)[2]])
    with pytest.raises(ValueError, match="differ in symmetric"):
        concat_ortho_linears([a, make(out_f=16, symmetric=False)[2]])
    with pytest.raises(ValueError, match="differ in in_features"):
        concat_ortho_linears([a, make(out_f=16, in_f=128)[2]])
    with pytest.raises(ValueError, match="differ in bias"):
        concat_ortho_linears([a, make(out_f=16, bias=True)[2]])
    b.set_alpha(0.5)
    with pytest.raises(ValueError, match=r"different alphas \[1.0, 0.5\]"):
        concat_ortho_linears([a, b])
    b.set_alpha(1.0)
    b.set_row_alpha(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="do not share one per-row alpha"):
        concat_ortho_linears([a, b])
    a.set_row_alpha(torch.tensor([1.0, 0.0]))  # equal values, two tensors: the fused copy could follow only one
    with pytest.raises(ValueError, match="do not share one per-row alpha"):
        concat_ortho_linears([a, b])
    a.set_row_alpha(None)
    with pytest.raises(ValueError, match="one or more OrthoLinear"):
        concat_ortho_linears([a, torch.nn.Linear(64, 16)])
    with pytest.raises(ValueError, match="one or more OrthoLinear"):
        concat_ortho_linears([])


# -- the fused layers through the Triton GEMV, on the CPU under Triton's interpreter ---------------------------

def _fused_kernel_cases() -> dict:
    """Runs under TRITON_INTERPRET=1: q|k|v (32 + 16 + 16 outputs, GQA's structure at a small width) and gate|up
    (2 x 32) of bf16 layers, the fused module through `dual_gemv` against the parts through it and against the
    float reference, at alpha 0, 1 and per row; the control: the fused layer with its parts' crow not shifted."""
    from libortho.kernels import reference
    from libortho.kernels import triton_dual as td
    from libortho.linear import concat_ortho_linears
    from libortho.shape_only import random_ortho_linear

    g = torch.Generator().manual_seed(0)
    kinds = {}
    for c in td.GEMV_CONFIGS:  # a tile of SPLIT 1 and of SPLIT 2 (the interpreter runs ~20 ms per program)
        if c.kwargs["SPLIT"] <= 2 and c.kwargs["BLOCK_N"] == 16:
            kinds.setdefault(c.kwargs["SPLIT"], c)
    out = {}
    for name, outs in (("qkv", (32, 16, 16)), ("gate_up", (32, 32))):
        mods = [random_ortho_linear(o, 256, 0.05, 64, torch.bfloat16, "cpu", g, std=0.4) for o in outs]
        for m in mods:  # a stream nearly as large as the base: an entry read in the wrong row shows
            m.ortho_values.data.mul_(4)
        fused = concat_ortho_linears(mods)
        crow = torch.cat([m.ortho_crow[:-1] for m in mods] + [mods[-1].ortho_crow[-1:]])  # the control: not shifted
        x4 = torch.randn(4, 256, generator=g).to(torch.bfloat16)
        for alpha in (0.0, 1.0, (0.0, 1.0, 0.37, 0.0)):
            a = torch.tensor(alpha)
            on = bool(a.ne(0).any())
            x = x4 if a.dim() else x4[:2]  # a program per row: the scalar cases take 2 rows
            for split, cfg in kinds.items():
                if split > 1 and alpha != 1.0:  # SPLIT's cross-program sum once; alpha 0 never reads the stream
                    continue

                def gemv(m, crow=None, x=x):
                    return td.dual_gemv(x, m.qweight, m.scales, m.zeros, 64, m.ortho_crow if crow is None else crow,
                                        m.ortho_col, m.ortho_values, a, None, on, config=cfg).float()

                y = gemv(fused)
                parts_y = torch.cat([gemv(m) for m in mods], -1)
                al = a if a.dim() == 0 else a[:, None]
                ref = reference.dual_linear(x.float(), fused.qweight, fused.scales, None, 64, fused.ortho_crow,
                                            fused.ortho_col, fused.ortho_values, 1.0).float()
                base = reference.dual_linear(x.float(), fused.qweight, fused.scales, None, 64, fused.ortho_crow,
                                             fused.ortho_col, fused.ortho_values, 0.0).float()
                ref = base + al * (ref - base)
                out[f"{name}-alpha{alpha}-split{split}"] = dict(
                    vs_parts=((y - parts_y).norm() / parts_y.norm()).item(),
                    vs_reference=((y - ref).norm() / ref.norm()).item(),
                    unshifted=((gemv(fused, crow) - ref).norm() / ref.norm()).item() if on else None)
    return out


@pytest.fixture(scope="module")
def fused_kernel_cases() -> dict:
    """The numbers `_fused_kernel_cases` reports, from one interpreter process (about 10 s)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install triton runs its interpreter on CPU)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import json, tests.test_linear as t; print('CASES' + json.dumps(t._fused_kernel_cases()))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(next(s for s in run.stdout.splitlines() if s.startswith("CASES"))[5:])


def test_fused_layers_through_the_triton_gemv_are_their_parts(fused_kernel_cases):
    assert len(fused_kernel_cases) == 2 * 4  # qkv and gate_up: alpha 0, alpha 1 (SPLIT 1 and 2), per row
    for k, c in fused_kernel_cases.items():
        assert c["vs_parts"] < 1e-6, (k, c)  # every row is computed by its own program, as in its part
        assert c["vs_reference"] < 1e-2, (k, c)  # bf16 outputs
        if c["unshifted"] is not None:
            assert c["unshifted"] > 0.1, (k, c)  # control: the kernel reads the wrong entries without a word
