"""Placement of a packed model across GPUs (accelerate's device_map on the packed sizes)."""
import pytest
import torch

from libortho.placement import device_map, device_of, dispatch, packed_skeleton


def _cfg(layers=4):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


def _total_bytes(cfg, density=0.01):
    from accelerate.utils import compute_module_sizes

    return compute_module_sizes(packed_skeleton(cfg, density, 32))[""]


def test_packed_skeleton_counts_packed_bytes_not_dense():
    cfg = _cfg()
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        dense = compute_module_sizes(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16))[""]
    packed = _total_bytes(cfg)
    assert packed < 0.6 * dense  # INT4 linears and head: under a third of bf16 for them, embeddings as they are


def test_device_map_splits_layers_across_two_gpus_and_refuses_what_does_not_fit():
    cfg = _cfg(layers=6)
    total = _total_bytes(cfg)
    half = int(total * 0.6)
    dm = device_map(cfg, {0: half, 1: half}, group_size=32)
    assert set(dm.values()) == {0, 1}  # both GPUs used
    layers = [device_of(dm, f"model.layers.{i}") for i in range(6)]
    assert layers == sorted(layers, key=lambda d: d.index)  # in order: 0 ... then 1 ...
    with pytest.raises(ValueError, match="does not fit 1 GPU"):  # the control: one such GPU is too small
        device_map(cfg, {0: half}, group_size=32)
    with pytest.raises(ValueError, match="GPUs only"):
        device_map(cfg, {0: half, "cpu": half}, group_size=32)


def test_shape_only_built_by_a_device_map_runs_the_hf_forward_after_dispatch():
    from libortho import shape_only

    cfg = _cfg(layers=2)
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
          "lm_head": "cpu"}
    m = dispatch(shape_only.build(cfg, density=0.05, group_size=32, dtype=torch.float32, device_map=dm), dm)
    out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    with pytest.raises(ValueError, match="places no module"):
        device_of({"model.layers.0": 0}, "lm_head")
