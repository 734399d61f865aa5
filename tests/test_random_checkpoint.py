import json
import subprocess
import sys
import textwrap

import pytest
import torch

from libortho.models import tiny_llama
from libortho.random_checkpoint import SHAPES, main, shape_config, write_random_llama


def tiny_config(**kw):
    """The tiny Llama's config (2 layers, hidden 64), with overrides."""
    cfg = tiny_llama(layers=2).config
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def files(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.suffix in (".safetensors", ".json")}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random checkpoint in 3 shards with the default tokenizer."""
    path = tmp_path_factory.mktemp("rc") / "ckpt"
    return write_random_llama(path, tiny_config(), max_shard_size="100KB", tokenizer_text="default", progress=False)


def test_loads_and_generates(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt)
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    assert cfg["libortho_random_weights"] is True and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == "bfloat16" and model.dtype == torch.bfloat16
    assert (tiny_ckpt / "generation_config.json").is_file() and len(list(tiny_ckpt.glob("*.safetensors"))) == 3
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert len(tok) == 2000 <= cfg["vocab_size"]
    ids = tok("This License applies to any program", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id  # Llama 3's tokenizer prepends BOS
    out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    assert isinstance(tok.decode(out[0]), str)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|begin_of_text|><|start_header_id|>user") and chat.endswith("assistant<|end_header_id|>\n\n")


def test_bytes_equal_save_pretrained(tiny_ckpt, tmp_path):
    """Shards and index are byte-identical to save_pretrained of a model holding the same values."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_ckpt), dtype=torch.bfloat16)
    state = {k: v for f in tiny_ckpt.glob("*.safetensors") for k, v in load_file(f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
    model.save_pretrained(tmp_path / "re", max_shard_size="100KB")
    ours = {k: v for k, v in files(tiny_ckpt).items() if k.startswith("model")}
    theirs = {k: v for k, v in files(tmp_path / "re").items() if k.startswith("model")}
    assert len(ours) == 4 and ours == theirs
    # control: one changed value is seen
    with torch.no_grad():
        model.model.norm.weight[0] = 2.0
    model.save_pretrained(tmp_path / "re2", max_shard_size="100KB")
    assert {k: v for k, v in files(tmp_path / "re2").items() if k.startswith("model")} != ours


def test_seed_determinism(tmp_path):
    a = write_random_llama(tmp_path / "a", tiny_config(), seed=3, max_shard_size="100KB", progress=False)
    b = write_random_llama(tmp_path / "b", tiny_config(), seed=3, max_shard_size="100KB", progress=False)
    c = write_random_llama(tmp_path / "c", tiny_config(), seed=4, max_shard_size="100KB", progress=False)
    assert files(a) == files(b)
    fc = files(c)
    assert fc.keys() == files(a).keys() and fc != files(a)
    assert fc["model.safetensors.index.json"] == files(a)["model.safetensors.index.json"]  # same layout


def test_init_like_hf_and_finite_through_32_layers(tmp_path):
    """normal(0, initializer_range) keeps the residual stream small through 32 layers; control: std 1 blows it up."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def max_activation(std, name):
        cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=224, num_hidden_layers=32,
                          num_attention_heads=4, num_key_value_heads=1, initializer_range=std, pad_token_id=5)
        model = AutoModelForCausalLM.from_pretrained(write_random_llama(tmp_path / name, cfg, progress=False))
        with torch.no_grad():
            hs = model(input_ids=torch.arange(64).unsqueeze(0), output_hidden_states=True).hidden_states
        return model, max(h.float().abs().max().item() for h in hs[:-1])

    model, peak = max_activation(0.02, "ok")
    w = model.model.layers[7].mlp.up_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert torch.equal(model.model.layers[7].input_layernorm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert model.model.embed_tokens.weight[5].abs().max() == 0  # padding row, as HF zeroes it
    assert 0 < peak < 10
    assert max_activation(1.0, "bad")[1] > 1000


def test_errors(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        write_random_llama(tmp_path / "full", tiny_config(), progress=False)
    with pytest.raises(ValueError, match="smaller than the tokenizer's 2000 tokens"):
        write_random_llama(tmp_path / "a", tiny_config(), vocab_size=1000, tokenizer_text="default", progress=False)
    with pytest.raises(ValueError, match="eos_token_id 128001 does not exist in a vocabulary of 1000"):
        write_random_llama(tmp_path / "b", tiny_config(eos_token_id=128001, pad_token_id=None), vocab_size=1000,
                           progress=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_random_llama(tmp_path / "c", tiny_config(), dtype=torch.int8, progress=False)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_config("llama9")
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())  # nothing written before the check


def test_shapes_and_cli(tmp_path, capsys):
    cfg = shape_config("llama3-8b")
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size) == (4096, 14336, 32, 128256)
    assert set(SHAPES) >= {"llama3-8b", "smollm2-135m"}
    assert main([str(tmp_path / "s"), "--shape", "smollm2-135m", "--layers", "1", "--tokenizer-text", "none"]) == 0
    assert "smollm2-135m, 1 shards" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["libortho_random_weights"]) == (576, 1, True)
    assert main([str(tmp_path / "s"), "--shape", "smollm2-135m"]) == 2  # exists: one line, exit 2
    assert capsys.readouterr().err.startswith("error: ")


RSS = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from libortho.random_checkpoint import write_random_llama
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(cfg)  # warm what both paths import
    kib = lambda key: int(open("/proc/self/status").read().split(key)[1].split()[0]) * 1024
    base = kib("VmRSS:")
    if sys.argv[1] == "stream":
        write_random_llama(sys.argv[2], cfg, progress=False)
    else:  # the control: the whole model in memory, then save_pretrained
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(sys.argv[2])
    # VmHWM, not ru_maxrss: getrusage's peak survives execve, so a child of a big pytest would report the parent's
    print(kib("VmHWM:") - base)
""")


@pytest.mark.slow
def test_peak_memory_is_one_chunk_not_the_model(tmp_path):
    """Writing 450 MB of weights raises peak RSS by far less than their size; control: save_pretrained of the
    materialized model raises it by at least their size (so the measurement can see a whole model)."""
    def grow(mode):
        out = subprocess.run([sys.executable, "-c", RSS, mode, str(tmp_path / mode)], capture_output=True, text=True,
                             check=True).stdout
        return int(out.split()[-1])

    stream = grow("stream")
    total = sum(f.stat().st_size for f in (tmp_path / "stream").glob("*.safetensors"))
    assert 400e6 < total < 500e6
    assert stream < 0.4 * total, (stream, total)
    assert grow("materialize") > 0.9 * total
