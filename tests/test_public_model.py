"""The public model off the 4-bit grid: the embedded Q4_1 SmolLM2 is reproduced by INT4 g32-asym, the derived
model is not (by any INT4 grid tried), and the construction is seeded and keyed by its recipe."""
from __future__ import annotations

import copy

import pytest
import torch

from libortho.baselines import int4_rtn_
from libortho.models import tiny_llama
from libortho.public_model import (DEFAULT, PUBLIC, Q4, Q4_CAVEAT, Recipe, dither_, grid_offset, load_public,
                                   public_dir)

GRIDS = [(32, False), (32, True), (64, False), (64, True), (128, False), (128, True)]


def test_grid_offset_is_zero_on_int4_weights_and_not_on_random_ones():
    """The measure itself: 0 on weights INT4 put on the grid; about a quarter step on generic weights
    (uniform within their cells), the control that it is not 0 by construction."""
    m = tiny_llama(seed=0, vocab_size=64)
    generic = grid_offset(m)
    assert 0.2 < generic["mean_offset_steps"] < 0.26 and generic["frac_off_grid"] > 0.9
    int4_rtn_(m, 32, False)
    on = grid_offset(m)
    assert on["mean_offset_steps"] < 1e-5 and on["frac_off_grid"] < 1e-3


def test_dither_is_seeded_and_moves_every_weight_within_half_a_step():
    base = tiny_llama(seed=0, vocab_size=64)
    int4_rtn_(base, 32, False)  # on the grid, like the Q4_1 model
    a, b, c = (dither_(copy.deepcopy(base), 1.0, 32, seed=s) for s in (7, 7, 8))
    wa, wb, wc, w0 = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c, base))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)  # seeded
    g = w0.reshape(w0.shape[0], -1, 32)
    step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, 1)
    moved = (wa - w0).abs()
    assert (moved <= step / 2 + 1e-7).all() and (moved > 0).float().mean() > 0.99
    assert grid_offset(a)["mean_offset_steps"] > 0.2  # off the grid it came from


def test_recipe_is_checked_and_keys_the_cache():
    with pytest.raises(ValueError, match="dither"):
        Recipe(dither=1.5)
    with pytest.raises(ValueError, match="steps"):
        Recipe(steps=-1)
    with pytest.raises(ValueError, match="lr"):
        Recipe(lr=0.0)
    assert public_dir(DEFAULT) == public_dir(Recipe()) != public_dir(Recipe(steps=DEFAULT.steps + 1))


def test_load_public_names():
    loaded, facts = load_public("tiny")
    assert facts["key"] == "tiny" and loaded.name == "tiny-llama"
    with pytest.raises(ValueError, match="full precision"):
        load_public(PUBLIC, bits=4)


@pytest.mark.slow  # derives the public model the first time (about 80 s on 2 cores, cached after), then ~10 s
def test_int4_no_longer_reproduces_the_public_model(smollm2_state):
    """The claim that made the former results artefacts, on both models: INT4 g32-asym reproduces the shipped
    Q4_1 SmolLM2 exactly (the control: the check can pass), and no INT4 grid reproduces the derived one."""
    q4 = smollm2_state.model
    layers = [f"model.layers.{i}.{p}" for i in (0, 14, 29) for p in ("self_attn.q_proj", "mlp.down_proj")]
    on = grid_offset(q4, 32, False, layers)
    assert on["max_abs_err"] == 0.0 and on["frac_off_grid"] == 0.0  # fails if the embedded model changed grid
    derived, facts = load_public(PUBLIC)
    assert facts["recipe"] == DEFAULT.to_dict() and facts["grid_offset"]["source_q4_1"]["max_abs_err"] == 0.0
    for gs, sym in GRIDS:  # fails if some INT4 grid put the derived weights back where they are
        off = grid_offset(derived.model, gs, sym, layers)
        assert off["mean_offset_steps"] > 0.2 and off["frac_off_grid"] > 0.9, (gs, sym, off)
    ids = derived.tokenizer("The Jargon File is a glossary of hacker slang.", return_tensors="pt").input_ids
    int4 = copy.deepcopy(derived.model)
    int4_rtn_(int4, 32, False)
    q4_int4 = copy.deepcopy(q4)
    int4_rtn_(q4_int4, 32, False)
    with torch.no_grad():
        assert torch.equal(q4_int4(input_ids=ids).logits, q4(input_ids=ids).logits)
        gap = (int4(input_ids=ids).logits - derived.model(input_ids=ids).logits).abs().max()
    assert gap > 0.1, gap  # INT4 changes the derived model's outputs by a real quantization error


def test_q4_is_a_named_caveated_option(smollm2_state):
    loaded, facts = load_public(Q4)
    assert facts["caveat"] == Q4_CAVEAT and loaded.source == Q4 and loaded.name.endswith("Q4_1")
