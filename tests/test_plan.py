import pytest

from libortho.plan import KNOWN_CONFIGS, count_params, decide, model_config, plan_all


def test_llama3_8b_parameter_count():
    c = count_params(model_config("meta-llama/Meta-Llama-3-8B"))
    total = c.linears + c.embeddings + c.head + c.other
    assert total == pytest.approx(8.03e9, rel=0.01)  # the published 8.03B
    assert c.embeddings == c.head == 128256 * 4096 and not c.tied


@pytest.mark.parametrize("name", ["meta-llama/Meta-Llama-3-8B", "meta-llama/Llama-3.2-3B",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_closed_form_equals_meta_device_count(name):
    shape = model_config(name)
    assert count_params(shape) == count_params(shape.to_config())  # the latter instantiates on meta


def test_smollm2_matches_real_model(smollm2_state):
    c = count_params(model_config("smollm2-135m"))
    real = sum(p.numel() for p in smollm2_state.model.parameters())
    assert c.linears + c.embeddings + c.other == real and c.tied


def test_plan_ordering_and_kv():
    plans = plan_all(model_config("meta-llama/Meta-Llama-3-8B"), seq_len=2048)
    t = {k: v.total_gib for k, v in plans.items()}
    assert t["fp16"] > t["int8"] > t["libortho"] > t["int4"]
    # 2 (k,v) x 32 layers x 8 heads x 128 dims x 2048 tokens x 2 bytes = 256 MiB
    assert plans["fp16"].kv_cache_gib == pytest.approx(0.25)


def test_policy_gtx4050():
    p8 = plan_all(model_config("meta-llama/Llama-3.1-8B-Instruct"))
    d = decide(p8, 6.0)
    assert d.precision == "int4" and d.auto_4bit
    d70 = decide(plan_all(model_config("meta-llama/Meta-Llama-3-70B")), 6.0)
    assert d70.precision is None and "Meta-Llama-3-8B" in d70.message
    assert decide(p8, 80.0).precision == "fp16"


def test_unknown_model_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="unknown model"):
        model_config("nobody/no-such-model")
    with pytest.raises(FileNotFoundError):
        model_config("/no/such/model.gguf")


def test_known_configs_are_llama3_vocab():
    assert all(v["vocab_size"] == 128256 for k, v in KNOWN_CONFIGS.items() if "meta-llama" in k)


def test_policy_steps_down_only_when_not_asked():
    """No precision asked: the widest that fits (int8 for 70B on 80 GiB); asked: kept or refused, never changed."""
    p70 = plan_all(model_config("meta-llama/Meta-Llama-3-70B-Instruct"))
    d = decide(p70, 80.0)
    assert d.precision == "int8" and d.automatic and not d.auto_4bit and d.fitting == ["int8", "int4", "libortho"]
    refused = decide(p70, 80.0, "fp16")
    assert refused.precision is None and "fits: int8, int4, libortho" in refused.message
    assert decide(p70, 80.0, "int4").precision == "int4"
    p8 = plan_all(model_config("meta-llama/Meta-Llama-3-8B"))
    assert decide(p8, 6.0, "int8").precision is None  # int8 asked on 6 GiB: refused, not silently 4-bit
    with pytest.raises(ValueError, match="requested precision"):
        decide(p8, 6.0, "int3")


def test_refusal_hint_uses_the_same_seq_len():
    p = plan_all(model_config("meta-llama/Meta-Llama-3-8B"), seq_len=100_000_000)
    d = decide(p, 80.0, seq_len=100_000_000)
    assert d.precision is None and "none of the known models" in d.message


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                                  "meta-llama/Meta-Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-8B",
                                  "meta-llama/Meta-Llama-3.1-8B"])
def test_llama31_known_offline(monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = model_config(name)
    assert cfg.vocab_size == 128256 and cfg.max_position_embeddings == 131072
    assert cfg.hidden_size == (8192 if "70B" in name else 4096)


def test_tiny_known_offline():
    from libortho.models import tiny_llama

    c = count_params(model_config("tiny"))
    assert c.linears + c.embeddings + c.other == sum(p.numel() for p in tiny_llama().parameters())
