import json
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from libortho import hub, models
from libortho.models import (LOAD_LOG, RANDOM_WEIGHTS_KEY, embedded_dir, hub_unreachable, load_model, model_facts,
                             resolve, tiny_llama)


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


# -- resolve: what a run needs, checked before anything loads ---------------------------------------------------

@pytest.fixture
def model_dir(tmp_path):
    """A directory that looks like a Hugging Face model (config, one weights file, a tokenizer file)."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                               "vocab_size": 128}))
    save_file({"model.embed_tokens.weight": torch.zeros(128, 64), "model.layers.0.w": torch.zeros(1),
               "model.layers.1.w": torch.zeros(1)}, d / "model.safetensors")
    (d / "tokenizer.json").write_text("{}")
    return d


def _edit_config(d, **kw):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **kw}))


def test_resolve_accepts_a_model_directory(model_dir):
    src = resolve(str(model_dir))
    assert src.kind == "dir" and model_facts(src) == {"source": "dir", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "vocab_size": 128, "weights": "pretrained"}


@pytest.mark.parametrize("breakage,needle", [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    # a cut copy failed only when an experiment read it (exit 1, a results file saying failed)
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-8]), "is truncated"),
    # config.json edited against its weights (the fixture's embedding is 128 x 64 in 2 layers)
    (lambda d: _edit_config(d, hidden_size=96), "does not match the weights"),
    (lambda d: _edit_config(d, num_hidden_layers=3), "does not match the weights"),
    (lambda d: (d / "config.json").write_text('{"hidden_size": 8}'), "no model_type"),
])
def test_resolve_names_what_a_directory_lacks(model_dir, breakage, needle):
    breakage(model_dir)
    with pytest.raises((FileNotFoundError, ValueError), match=needle) as e:
        resolve(str(model_dir))
    assert "\n" not in str(e.value) and str(model_dir) in str(e.value)


def test_random_weights_rule(model_dir):
    """tiny is random; so is a checkpoint whose config.json carries libortho_random_weights: true."""
    assert model_facts(resolve("tiny"))["weights"] == "random"
    assert model_facts(resolve("tiny"))["hidden_size"] == 64
    assert model_facts(resolve("smollm2-135m"))["weights"] == "pretrained"
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, RANDOM_WEIGHTS_KEY: True}))
    assert model_facts(resolve(str(model_dir)))["weights"] == "random"


def test_resolve_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        resolve("someorg/does-not-exist")
    assert time.perf_counter() - t < 2
    with pytest.raises(ValueError, match="not a file, a directory"):
        resolve("a/b/c")


@pytest.fixture
def fresh_hub(monkeypatch):
    """No offline flag, no cached probe; restores both (the probe may switch the process offline)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_HUB", {})
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    yield
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the probe sets; monkeypatch then restores the original


def test_hub_probe_is_bounded_and_switches_offline(fresh_hub, monkeypatch):
    """A hub that never answers (DNS hanging) is given up on after the timeout, and the process goes offline, so
    transformers never enters its retry loop; the control: a hub that answers leaves it online."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30))
    t = time.perf_counter()
    reason = hub_unreachable(timeout_s=0.5)
    assert time.perf_counter() - t < 2 and "did not answer within 0.5 s" in reason
    assert c.HF_HUB_OFFLINE is True and models.os.environ["HF_HUB_OFFLINE"] == "1"
    assert hub_unreachable() == reason  # one probe per process


def test_hub_probe_answering(fresh_hub, monkeypatch):
    import huggingface_hub.constants as c

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Conn())
    assert hub_unreachable(timeout_s=0.5) is None and c.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in models.os.environ


# -- load_model applies the precision it is given, and says what it loaded -----------------------------------

def test_tiny_in_4bit_is_nf4_and_logged():
    LOAD_LOG.clear()
    m = load_model("tiny", bits=4).model
    assert sum(type(x).__name__ == "Linear4bit" for x in m.modules()) == 14  # 2 layers x 7 linears
    assert LOAD_LOG == [{"source": "tiny", "bits": 4, "dtype": "float32", "device": "cpu", "quantized_linears": 14}]
    load_model("tiny")
    assert LOAD_LOG[-1]["bits"] is None and LOAD_LOG[-1]["quantized_linears"] == 0  # the control


def test_bits_that_cannot_be_applied_are_refused(tmp_path):
    with pytest.raises(ValueError, match="8-bit loading applies to a model directory"):
        load_model("tiny", bits=8)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ValueError, match="a .gguf is loaded as stored"):
        load_model(str(gguf), bits=4)
    with pytest.raises(ValueError, match="bits must be 4, 8 or None"):
        load_model("tiny", bits=3)


def test_truncated_embedded_cache_is_detected(tmp_path):
    """A cut-off copy of the cached embedded model is noticed (and rebuilt by embedded_dir), a whole one is not."""
    import torch
    from safetensors.torch import save_file

    from libortho.models import readable_safetensors

    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, f)
    assert readable_safetensors(f)
    f.write_bytes(f.read_bytes()[:-100])
    assert not readable_safetensors(f)
    f.write_bytes(b"\x00" * 4)
    assert not readable_safetensors(f)


def test_two_converters_at_once_keep_one_whole_copy(tmp_path, monkeypatch):
    """embedded_dir in two processes at once (pytest -n 2 on a cold cache): this one converts in a folder of its
    own, and when the other renames its whole copy in first, that copy is kept. The control: a competitor's copy
    without weights is an error, never taken for a cache."""
    import os
    from pathlib import Path

    import transformers

    monkeypatch.setenv("LIBORTHO_CACHE", str(tmp_path))
    out = tmp_path / "smollm2-135m-instruct"
    weights = {"theirs": b"their weights"}

    class Tok:  # the GGUF tokenizer; its save is the last write, where the other process wins the race
        def save_pretrained(self, d):
            assert Path(d).name == f"{out.name}.tmp{os.getpid()}"  # fails on a folder shared between processes
            out.mkdir()
            (out / "config.json").write_text("{}")
            if weights["theirs"]:
                (out / "model.safetensors").write_bytes(weights["theirs"])

    monkeypatch.setattr(models, "embedded_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tok())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_llama())
    assert embedded_dir() == out
    assert (out / "model.safetensors").read_bytes() == b"their weights"  # theirs kept, not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locks", out.name]  # this process's folder removed
    import shutil

    shutil.rmtree(out)
    weights["theirs"] = None  # control: the folder in the way holds no weights
    with pytest.raises(OSError):
        embedded_dir()
