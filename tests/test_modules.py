"""Model-level switches: set_alpha, the alpha context manager, the backend, merge."""
import pytest
import torch

from libortho import Backend, OrthoConfig, alpha, merge, orthogonalize_, set_alpha, set_backend
from libortho.models import tiny_llama
from libortho.modules import ortho_modules

IDS = torch.randint(0, 255, (1, 12), generator=torch.Generator().manual_seed(0))


def converted(density=0.1):
    return orthogonalize_(tiny_llama(vocab_size=256), OrthoConfig(score="magnitude", group_size=32, density=density),
                          progress=False)


def out(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def test_set_alpha_whole_model_and_errors():
    m = converted()
    set_alpha(m, 0.25)
    assert all(x.alpha.item() == 0.25 for x in ortho_modules(m).values())
    for bad, msg in ((float("inf"), "finite"), (1e30, r"\[0, 1000\]"), (-0.5, r"\[0, 1000\]"), ("1", "number"),
                     (True, "number")):
        with pytest.raises(ValueError, match=msg):
            set_alpha(m, bad)
    assert all(x.alpha.item() == 0.25 for x in ortho_modules(m).values())  # a refused value changes nothing
    with pytest.raises(ValueError, match="no OrthoLinear"):
        set_alpha(tiny_llama(vocab_size=256), 0.0)


def test_largest_alpha_keeps_logits_finite():
    m = converted()
    set_alpha(m, 1000.0)
    assert torch.isfinite(out(m)).all()


def test_alpha_context_restores_after_exception():
    m = converted()
    set_alpha(m, 1.0)
    ref1 = out(m)
    set_alpha(m, 0.0)
    ref0 = out(m)
    set_alpha(m, 1.0)
    with pytest.raises(RuntimeError, match="boom"):
        with alpha(m, 0.0):
            assert torch.equal(out(m), ref0)
            raise RuntimeError("boom")
    assert all(x.alpha.item() == 1.0 for x in ortho_modules(m).values())
    assert torch.equal(out(m), ref1)
    # per-layer values come back as they were, not as one global value
    ortho_modules(m)["model.layers.0.mlp.up_proj"].set_alpha(0.5)
    with alpha(m, 0.0):
        pass
    assert ortho_modules(m)["model.layers.0.mlp.up_proj"].alpha.item() == 0.5


def test_alpha_context_refuses_a_bad_value_without_changing_anything():
    m = converted()
    with pytest.raises(ValueError):
        with alpha(m, float("nan")):
            pass
    assert all(x.alpha.item() == 1.0 for x in ortho_modules(m).values())


def test_merge_matches_alpha_one_and_is_plain():
    m = converted(density=0.2)
    ref = out(m)
    merge(m)
    assert not ortho_modules(m) and not hasattr(m, "hf_quantizer")
    assert not hasattr(m.config, "quantization_config")
    torch.testing.assert_close(out(m), ref, rtol=1e-5, atol=1e-5)
    assert any(isinstance(x, torch.nn.Linear) and x.in_features == 64 for x in m.modules())


def test_merge_at_alpha_zero_is_the_base():
    m = converted(density=0.2)
    set_alpha(m, 0.0)
    ref0 = out(m)
    set_alpha(m, 1.0)
    ref1 = out(m)
    set_alpha(m, 0.0)
    merge(m)
    torch.testing.assert_close(out(m), ref0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out(m), ref1, atol=1e-5)  # control: alpha 1 differs, so the check above can fail


def test_merged_model_saves_as_a_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM

    m = merge(converted())
    m.save_pretrained(tmp_path)
    assert not (tmp_path / "ortho.safetensors").exists()
    torch.testing.assert_close(out(AutoModelForCausalLM.from_pretrained(tmp_path)), out(m))


def test_backend_is_a_runtime_choice():
    m = converted()
    assert {x.backend for x in ortho_modules(m).values()} == {Backend.AUTO}
    ref = out(m)
    set_backend(m, "torch")
    assert {x.backend for x in ortho_modules(m).values()} == {Backend.TORCH}
    assert torch.equal(out(m), ref)  # on CPU auto is the torch path
    set_backend(m, Backend.TRITON)
    with pytest.raises(ValueError, match="does not apply here"):
        out(m)
    with pytest.raises(ValueError):
        set_backend(m, "cuda")


# -- one alpha per request of a batch -----------------------------------------------------------------------

BATCH_IDS = torch.randint(0, 255, (4, 10), generator=torch.Generator().manual_seed(1))
BATCH_ALPHAS = [0.0, 1.0, 0.0, 0.5]


def batch_vs_alone(m, alphas) -> float:
    """Largest relative logit error of a mixed-alpha batch against each request run alone at its alpha."""
    set_alpha(m, torch.tensor(alphas))
    got = out_ids(m, BATCH_IDS)
    err = 0.0
    for b, a in enumerate(alphas):
        set_alpha(m, a)
        ref = out_ids(m, BATCH_IDS[b:b + 1])[0]
        err = max(err, ((got[b] - ref).norm() / ref.norm()).item())
    return err


def out_ids(m, ids):
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_set_alpha_per_request_matches_each_request_alone():
    m = converted()
    assert batch_vs_alone(m, BATCH_ALPHAS) < 1e-5
    # control: the same check on a batch where every request got the first one's alpha fails
    set_alpha(m, torch.tensor(BATCH_ALPHAS[:1] * 4))
    wrong = out_ids(m, BATCH_IDS)
    set_alpha(m, BATCH_ALPHAS[1])
    ref1 = out_ids(m, BATCH_IDS[1:2])[0]
    assert ((wrong[1] - ref1).norm() / ref1.norm()).item() > 1e-3


def test_set_alpha_number_clears_per_request_alphas_and_vector_is_shared():
    m = converted()
    set_alpha(m, [0.0, 1.0])
    rows = {id(x.row_alpha) for x in ortho_modules(m).values()}
    assert len(rows) == 1  # one tensor for every layer of a device: one in-place update reaches all
    set_alpha(m, 1.0)
    assert all(x.row_alpha is None for x in ortho_modules(m).values())
    with pytest.raises(ValueError, match=r"alpha\[1\] must be finite"):
        set_alpha(m, [0.0, float("inf")])
    assert all(x.row_alpha is None for x in ortho_modules(m).values())  # a refused vector changes nothing


def test_alpha_context_takes_a_vector_and_restores_the_scalar():
    m = converted()
    set_alpha(m, 0.5)
    with alpha(m, torch.tensor(BATCH_ALPHAS)):
        assert all(x.row_alpha is not None for x in ortho_modules(m).values())
        out_ids(m, BATCH_IDS)
    assert all(x.row_alpha is None and x.alpha.item() == 0.5 for x in ortho_modules(m).values())
