import pytest
import torch

from libortho.llama import LLAMA_LINEARS
from libortho.select import collect_hessian_diag, scores, select, target_linears, top_mask


def test_top_mask_count_and_order():
    s = torch.arange(100.0).view(10, 10)
    m = top_mask(s, 0.05)
    assert m.sum() == 5 and m.flatten()[-5:].all()


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    with pytest.raises(ValueError, match="density must be a number in"):
        top_mask(torch.rand(4, 4), density)


def test_hessian_score_weights_columns():
    r = torch.ones(2, 3)
    h = torch.tensor([0.0, 1.0, 4.0])
    assert torch.equal(scores(r, "hessian", h), torch.tensor([[0.0, 1, 4], [0, 1, 4]]))
    m = top_mask(scores(r, "hessian", h), 2 / 6)
    assert m[:, 2].all() and not m[:, :2].any()


def test_hessian_needs_statistics():
    with pytest.raises(ValueError, match="calibration"):
        scores(torch.ones(2, 2), "hessian")


def test_random_is_seeded():
    r = torch.randn(16, 16)
    a = select(r, 0.1, "random", generator=torch.Generator().manual_seed(3))
    b = select(r, 0.1, "random", generator=torch.Generator().manual_seed(3))
    c = select(r, 0.1, "random", generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.col, b.col) and not torch.equal(a.col, c.col)


def test_magnitude_picks_largest():
    r = torch.zeros(4, 4)
    r[1, 2], r[3, 0] = -5.0, 4.0
    csr = select(r, 2 / 16, "magnitude")
    assert torch.equal(csr.to_dense(), r)


def test_collect_hessian_diag_matches_manual(tiny_model):
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    captured = []
    lin = tiny_model.model.layers[0].mlp.down_proj
    h = lin.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    tiny_model(input_ids=ids)
    h.remove()
    stats = collect_hessian_diag(tiny_model, [ids], LLAMA_LINEARS, progress=False)
    assert set(stats) == set(target_linears(tiny_model, LLAMA_LINEARS))
    torch.testing.assert_close(stats["model.layers.0.mlp.down_proj"], captured[0].pow(2).mean(0))


def test_empty_calibration_rejected(tiny_model):
    with pytest.raises(ValueError, match="calibration data is empty"):
        collect_hessian_diag(tiny_model, [], LLAMA_LINEARS, progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        collect_hessian_diag(tiny_model, [torch.zeros(1, 0, dtype=torch.long)], LLAMA_LINEARS, progress=False)


def test_no_convertible_linears():
    with pytest.raises(ValueError, match="no linear named"):
        target_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)), LLAMA_LINEARS)
