import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libortho import OrthoConfig, OrthoLinear, load, orthogonalize_, save, set_alpha
from libortho.convert import BASE_FILE, CONFIG_FILE, ORTHO_FILE, ortho_modules
from libortho.models import tiny_llama

IDS = torch.randint(0, 255, (1, 12), generator=torch.Generator().manual_seed(0))


def small(seed=0):
    return tiny_llama(seed=seed, vocab_size=256)


def calib():
    return [torch.randint(0, 255, (2, 16), generator=torch.Generator().manual_seed(1))]


@pytest.mark.parametrize("score", ["hessian", "magnitude", "random"])
def test_posthoc_swaps_every_target(score):
    m = small()
    ref = m(input_ids=IDS).logits
    orthogonalize_(m, OrthoConfig(density=0.05, group_size=32, score=score), calibration=calib(), progress=False)
    mods = ortho_modules(m)
    assert len(mods) == 2 * 7 and not any(isinstance(x, torch.nn.Linear) for n, x in m.named_modules()
                                          if n.split(".")[-1] in OrthoConfig().targets)
    for lin in mods.values():
        assert lin.nnz == math.ceil(0.05 * lin.in_features * lin.out_features)
    out = m(input_ids=IDS).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 1.0


def test_density_one_posthoc_reproduces_model():
    m = small()
    ref = m(input_ids=IDS).logits
    orthogonalize_(m, OrthoConfig(density=1.0, group_size=32, score="magnitude"), progress=False)
    torch.testing.assert_close(m(input_ids=IDS).logits, ref, rtol=1e-4, atol=1e-4)


def test_delta_mode_base_is_public_and_alpha_one_is_tuned():
    public, tuned = small(0), small(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ref_tuned = tuned(input_ids=IDS).logits
    int4_public = copy.deepcopy(public)
    orthogonalize_(int4_public, OrthoConfig(density=1.0, group_size=32, score="magnitude"), progress=False)
    set_alpha(int4_public, 0.0)
    orthogonalize_(tuned, OrthoConfig(density=1.0, group_size=32, mode="delta", score="magnitude"),
                   public=public, progress=False)
    # alpha=1 at density 1 is the tuned model (embeddings and norms are the tuned ones)
    torch.testing.assert_close(tuned(input_ids=IDS).logits, ref_tuned, rtol=1e-4, atol=1e-4)
    # the base of every linear is exactly INT4 of the public weights
    for name, lin in ortho_modules(tuned).items():
        assert torch.equal(lin.qweight, ortho_modules(int4_public)[name].qweight)


def test_delta_needs_public():
    with pytest.raises(ValueError, match="needs the public weights"):
        orthogonalize_(small(), OrthoConfig(mode="delta", score="magnitude"), progress=False)


def test_hessian_needs_calibration():
    with pytest.raises(ValueError, match="calibration"):
        orthogonalize_(small(), OrthoConfig(score="hessian"), progress=False)


def test_nan_weight_named_in_error():
    m = small()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN/Inf"):
        orthogonalize_(m, OrthoConfig(score="magnitude", group_size=32), progress=False)


def test_group_size_error_names_layer():
    with pytest.raises(ValueError, match=r"q_proj: group_size 48 does not divide"):
        orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=48), progress=False)


@pytest.mark.parametrize("kw", [dict(density=0), dict(density=1.01), dict(group_size=0), dict(targets=()),
                                dict(mode="bogus"), dict(score="bogus")])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        OrthoConfig(**kw)


def test_no_convertible_linears():
    with pytest.raises(ValueError, match="nothing to convert"):
        orthogonalize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), OrthoConfig(score="magnitude"), progress=False)


def test_set_alpha_whole_model_and_errors():
    m = orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32), progress=False)
    set_alpha(m, 0.25)
    assert all(x.alpha.item() == 0.25 for x in ortho_modules(m).values())
    with pytest.raises(ValueError, match="finite"):
        set_alpha(m, float("inf"))
    with pytest.raises(ValueError, match="no OrthoLinear"):
        set_alpha(small(), 0.0)


def test_generate_works_at_both_alphas():
    m = orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32, density=0.1), progress=False)
    for a in (0.0, 1.0):
        set_alpha(m, a)
        out = m.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=2)
        assert out.shape == (1, 17)


@given(st.integers(0, 1000), st.sampled_from([0.01, 0.2, 1.0]), st.booleans(), st.sampled_from([32, -1]))
@settings(max_examples=6, deadline=None)
def test_save_load_bit_exact(tmp_path_factory, seed, density, symmetric, group_size):
    d = tmp_path_factory.mktemp("ckpt")
    m = orthogonalize_(small(seed), OrthoConfig(density=density, symmetric=symmetric, group_size=group_size,
                                                score="random", seed=seed), progress=False)
    save(m, d)
    m2 = load(d)
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    for a in (0.0, 1.0):
        set_alpha(m, a), set_alpha(m2, a)
        assert torch.equal(m(input_ids=IDS).logits, m2(input_ids=IDS).logits)


def test_load_without_ortho_has_no_ortho(tmp_path):
    m = orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32, density=0.1), progress=False)
    save(m, tmp_path)
    base_only = load(tmp_path, with_ortho=False)
    assert all(x.nnz == 0 and not x.has_ortho for x in ortho_modules(base_only).values())
    set_alpha(m, 0.0)
    assert torch.equal(base_only(input_ids=IDS).logits, m(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="without its ortho stream"):
        set_alpha(base_only, 1.0)


def test_ortho_on_wrong_base_rejected(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save(orthogonalize_(small(0), OrthoConfig(score="magnitude", group_size=32), progress=False), a)
    save(orthogonalize_(small(1), OrthoConfig(score="magnitude", group_size=32), progress=False), b)
    (a / ORTHO_FILE).write_bytes((b / ORTHO_FILE).read_bytes())
    with pytest.raises(ValueError, match="belongs to a different base"):
        load(a)


def test_truncated_and_foreign_files_rejected(tmp_path):
    save(orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32), progress=False), tmp_path)
    data = (tmp_path / BASE_FILE).read_bytes()
    (tmp_path / BASE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or not a safetensors"):
        load(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / BASE_FILE)
    with pytest.raises(ValueError, match="not a libortho-base file"):
        load(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a libortho config"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a libortho checkpoint"):
        load(tmp_path / "nowhere")


def test_ortholinear_is_exported():
    assert OrthoLinear.__module__ == "libortho.linear"


def test_convert_from_bnb_nf4_model(tmp_path, tokenizer):
    """A model loaded in 4-bit to fit a small card converts from its dequantized NF4 weights."""
    from libortho.models import load_model

    small().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), bits=4)
    nf4 = loaded.model
    ref = nf4(input_ids=IDS).logits
    orthogonalize_(nf4, OrthoConfig(density=1.0, group_size=32, score="magnitude"), progress=False)
    torch.testing.assert_close(nf4(input_ids=IDS).logits, ref, rtol=1e-3, atol=1e-3)


def test_smollm2_posthoc_one_percent(smollm2, calib_batches, tokenizer, eval_text):
    """The real model: conversion time within budget, alpha 1 beats alpha 0, generate works, alpha 0 = INT4."""
    import time

    from libortho import cache_base_
    from libortho.baselines import int4_rtn_
    from libortho.perplexity import Protocol, encode, perplexity
    from libortho.thresholds import load as thresholds

    prot = Protocol(max_length=256, stride=256, max_tokens=768)
    ids = encode(tokenizer, eval_text.text, prot)
    rtn = copy.deepcopy(smollm2)
    int4_rtn_(rtn, group_size=64)
    t0 = time.perf_counter()
    orthogonalize_(smollm2, OrthoConfig(density=0.01, group_size=64, symmetric=True), calibration=calib_batches,
                   progress=False)
    secs = time.perf_counter() - t0
    assert secs < thresholds("convert")["max_convert_seconds"]
    cache_base_(smollm2)
    ppl = {}
    for a in (0.0, 1.0):
        set_alpha(smollm2, a)
        ppl[a] = perplexity(smollm2, ids, prot)
    assert ppl[1.0] < ppl[0.0]
    assert ppl[0.0] == perplexity(rtn, ids, prot)  # the kill switch is exactly plain INT4 of these weights
    out = smollm2.generate(ids[:8].unsqueeze(0), max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 12)


def test_backend_reaches_every_layer():
    m = orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32, backend="torch"), progress=False)
    assert {x.backend for x in ortho_modules(m).values()} == {"torch"}
