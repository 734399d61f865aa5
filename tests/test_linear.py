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
