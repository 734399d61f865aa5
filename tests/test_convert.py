import copy
import json
import math

import pytest
import torch

from libortho import OrthoConfig, OrthoLinear, orthogonalize_, set_alpha
from libortho.models import tiny_llama
from libortho.modules import ortho_modules

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
                                dict(mode="bogus"), dict(score="bogus"), dict(density=True), dict(group_size=True),
                                dict(density="0.1"), dict(symmetric="yes"), dict(seed=-1), dict(seed=2**63),
                                dict(targets="q_proj"), dict(score="saliency"), dict(mode="tune")])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        OrthoConfig(**kw)


def test_config_round_trips_and_names_unknown_fields():
    from libortho import OrthoTuneConfig, TrainConfig

    for c in (OrthoConfig(density=0.2, score="random"), OrthoTuneConfig(density=0.05, train=TrainConfig(lr=1e-3))):
        assert OrthoConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="no field 'densty'"):
        OrthoConfig.from_dict({"densty": 0.1})


def test_already_converted_refused():
    m = orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32), progress=False)
    with pytest.raises(ValueError, match="already converted"):
        orthogonalize_(m, OrthoConfig(score="magnitude", group_size=32), progress=False)


def test_filter_fn_selects_modules():
    m = orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32), progress=False,
                       filter_fn=lambda mod, name: ".mlp." in name)
    assert set(n.rsplit(".", 1)[-1] for n in ortho_modules(m)) == {"gate_proj", "up_proj", "down_proj"}


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("break_it", ["group_size", "inf_last_layer", "nan_norm", "oov_calibration"])
def test_failed_conversion_leaves_the_model_as_it_was(break_it):
    """A conversion either completes or changes nothing: the same module objects, the same tensors."""
    m = small()
    cfg, batches = OrthoConfig(score="hessian", group_size=32), calib()
    if break_it == "group_size":  # 64 divides every input width but down_proj's 96: fails part-way
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
        cfg = OrthoConfig(score="hessian", group_size=64)
    elif break_it == "inf_last_layer":
        with torch.no_grad():
            m.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    elif break_it == "nan_norm":
        with torch.no_grad():
            m.model.layers[0].input_layernorm.weight[0] = float("nan")
    else:
        batches = [torch.tensor([[1, 2, 300]])]
    before_mods = dict(m.named_modules())
    before = _state(m)
    with pytest.raises(ValueError):
        orthogonalize_(m, cfg, calibration=batches, progress=False)
    assert dict(m.named_modules()) == before_mods and not ortho_modules(m)
    after = _state(m)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]) or (torch.isnan(before[k]).any() and torch.equal(
            torch.nan_to_num(after[k]), torch.nan_to_num(before[k]))), k


def test_nan_in_norm_or_embedding_is_named():
    m = small()
    with torch.no_grad():
        m.model.embed_tokens.weight[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has 1 NaN/Inf"):
        orthogonalize_(m, OrthoConfig(score="magnitude", group_size=32), progress=False)


def test_oov_calibration_ids_named():
    with pytest.raises(ValueError, match=r"outside \[0, 256\).*max 300"):
        orthogonalize_(small(), OrthoConfig(group_size=32), calibration=[torch.tensor([[1, 300]])], progress=False)


def test_no_convertible_linears():
    with pytest.raises(ValueError, match="nothing to convert"):
        orthogonalize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), OrthoConfig(score="magnitude"), progress=False)


def test_generate_works_at_both_alphas():
    m = orthogonalize_(small(), OrthoConfig(score="magnitude", group_size=32, density=0.1), progress=False)
    for a in (0.0, 1.0):
        set_alpha(m, a)
        out = m.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=2)
        assert out.shape == (1, 17)


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
    from bench.thresholds import load as thresholds

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


@pytest.mark.parametrize("score", ["hessian", "magnitude"])
def test_convert_checkpoint_streams_to_the_same_model(tmp_path, score):
    """Layer by layer from a sharded checkpoint (propagate='fp'): the same packed layers and the same logits as
    orthogonalize_ on the loaded model, bit for bit."""
    from libortho.convert import convert_checkpoint

    small().save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg = OrthoConfig(density=0.05, group_size=32, score=score)
    streamed = convert_checkpoint(tmp_path, cfg, calibration=calib(), progress=False)
    loaded = orthogonalize_(small(), cfg, calibration=calib(), progress=False)
    for (n, a), b in zip(ortho_modules(streamed).items(), ortho_modules(loaded).values()):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.ortho_col, b.ortho_col), n
    for alpha in (0.0, 1.0):
        set_alpha(streamed, alpha), set_alpha(loaded, alpha)
        with torch.no_grad():
            assert torch.equal(streamed(input_ids=IDS).logits, loaded(input_ids=IDS).logits)


def test_convert_checkpoint_int4_head_and_host_embeddings(tmp_path):
    """An untied model: INT4 head (no stream), embedding table kept on the host; it runs, saves and reloads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from libortho import load
    from libortho.convert import convert_checkpoint
    from libortho.modules import HostEmbedding

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
                     ).save_pretrained(tmp_path / "dense")
    m = convert_checkpoint(tmp_path / "dense", OrthoConfig(density=0.05, group_size=32, score="magnitude"),
                           head_bits=4, host_embeddings=True, progress=False)
    assert isinstance(m.model.embed_tokens, HostEmbedding) and "lm_head" in ortho_modules(m)
    assert ortho_modules(m)["lm_head"].nnz == 0
    m.to(torch.float32)  # a .to() keeps the table on the host
    assert m.model.embed_tokens.weight.device.type == "cpu"
    with torch.no_grad():
        ref = m(input_ids=IDS).logits
    m.save_pretrained(tmp_path / "conv")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "conv")(input_ids=IDS).logits, ref)


def test_convert_checkpoint_refuses_what_it_cannot_stream(tmp_path):
    from libortho.convert import convert_checkpoint
    from libortho.train import OrthoTuneConfig

    small().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="streams posthoc"):
        convert_checkpoint(tmp_path, OrthoConfig(mode="delta", score="magnitude"), progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        convert_checkpoint(tmp_path, OrthoTuneConfig(score="random", group_size=32), progress=False)
    with pytest.raises(ValueError, match="need calibration"):
        convert_checkpoint(tmp_path, OrthoConfig(score="hessian"), progress=False)
    with pytest.raises(ValueError, match=r"layer 0: .*group_size 48"):
        convert_checkpoint(tmp_path, OrthoConfig(score="magnitude", group_size=48), progress=False)


def test_convert_checkpoint_ortho_tunes_like_the_loaded_model(tmp_path, tokenizer):
    """OrthoTuneConfig through the stream: INT4(public) bases built layer by layer, then the same masks and the
    same trained values as orthogonalize_ on the loaded model (score 'saliency': no statistics to differ)."""
    from libortho.convert import convert_checkpoint
    from libortho.privacy import make_canaries
    from libortho.train import OrthoTuneConfig, TrainConfig, canary_loss

    cs = make_canaries(tokenizer, 2, seed=0, groups=(3,))
    general = torch.randint(0, 255, (256,), generator=torch.Generator().manual_seed(0))
    train = TrainConfig(lr=1e-2, max_steps=3, general_chunks=1, general_length=16, target=None)
    cfg = OrthoTuneConfig(density=0.05, group_size=32, score="saliency", train=train)
    model = tiny_llama(seed=0, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    streamed = convert_checkpoint(tmp_path, cfg, loss_fn=canary_loss(cs, general, train, 0), progress=False)
    loaded = orthogonalize_(model, cfg, loss_fn=canary_loss(cs, general, train, 0), progress=False)
    assert streamed.libortho_stats["steps"] == 3
    for (n, a), b in zip(ortho_modules(streamed).items(), ortho_modules(loaded).values()):
        assert torch.equal(a.ortho_col, b.ortho_col), n
        torch.testing.assert_close(a.ortho_values, b.ortho_values, rtol=1e-4, atol=1e-6)
    assert any(m.ortho_values.abs().sum() > 0 for m in ortho_modules(streamed).values())
