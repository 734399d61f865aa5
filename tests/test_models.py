import pytest
import torch

from libortho.models import embedded_dir, load_model, tiny_llama


def test_embedded_cache_is_safetensors():
    d = embedded_dir()
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.bin")) and not list(d.glob("*.pt"))


def test_smollm2_is_llama_layout(smollm2_state):
    m = smollm2_state.model
    assert type(m).__name__ == "LlamaForCausalLM" and m.config.num_hidden_layers == 30
    assert m.model.layers[0].mlp.down_proj.in_features == 1536


def test_tiny_is_seeded():
    a, b = tiny_llama(seed=3, vocab_size=64), tiny_llama(seed=3, vocab_size=64)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_unknown_and_missing_sources():
    with pytest.raises(ValueError, match="unknown model"):
        load_model("bogus")
    with pytest.raises(FileNotFoundError):
        load_model("/no/such/file.gguf")
