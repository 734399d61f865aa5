"""Random-weight Llama checkpoints in Hugging Face format, written tensor by tensor.

`write_random_llama(path, config)` writes what `save_pretrained` writes (same shard names, same index
json, byte-identical safetensors files for the same values) without ever holding the model: each tensor
is generated in row chunks and streamed into its shard, so writing the 16 GB Llama-3-8B shape needs about
one chunk of memory. `safetensors.torch.save_file` takes a whole shard as a dict of tensors, so the shard
files are written here from the format's specification (8-byte header length, JSON header padded with
spaces to 8 bytes, raw little-endian data in the header's order); a test checks the bytes against
`save_pretrained`. A small byte-level BPE tokenizer trained on a Debian text goes beside it, so the
checkpoint exercises the user's path end to end without hub access.

    python -m libortho.random_checkpoint /tmp/l3 --shape llama3-8b
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from torch import nn

GPL3 = Path("/usr/share/common-licenses/GPL-3")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIALS = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
TOKENIZER_VOCAB = 2000
# Meta-Llama-3-8B-Instruct's chat template (its tokenizer_config.json), so chat rendering works as on the real model.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SHAPES = {"llama3-8b": "meta-llama/Meta-Llama-3-8B", "llama3.2-3b": "meta-llama/Llama-3.2-3B",
          "llama3-70b": "meta-llama/Meta-Llama-3-70B", "smollm2-135m": "smollm2-135m"}
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
CHUNK_ELEMENTS = 2**22  # rows drawn at a time: 16 MiB of float32 (peak RSS of a write: about 5x this)


def train_tokenizer(text: str, vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer (Llama 3's kind, every byte representable) trained on `text`, with Llama 3's
    special tokens, a BOS-prepending post-processor and Llama 3's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   chat_template=LLAMA3_CHAT_TEMPLATE)


def tokenizer_corpus(source) -> str:
    """Text to train the tokenizer on: "default" (the GPL-3 of Debian's base-files, else the Jargon File) or a path."""
    from .data import jargon, load_text

    if str(source) == "default":
        return load_text(GPL3).text if GPL3.is_file() else jargon().text
    return load_text(source).text


def _tensor_seed(seed: int, name: str) -> int:
    # A tensor's values depend on (seed, name) only: shard layout and write order never change them.
    # 32 bits, all of them mixed: the CPU generator (mt19937) reads only the low 32 bits of a seed.
    return zlib.crc32(f"{seed}:{name}".encode())


def _init_rule(model: nn.Module, name: str, config) -> tuple[str, float, int | None]:
    """How HF's `_init_weights` initialises parameter `name`: ("normal", std, padding row) or ("ones"/"zeros")."""
    parent, _, leaf = name.rpartition(".")
    mod = model.get_submodule(parent)
    std = getattr(config, "initializer_range", 0.02) or 0.02
    if isinstance(mod, nn.Linear):
        return ("normal", std, None) if leaf == "weight" else ("zeros", 0.0, None)
    if isinstance(mod, nn.Embedding):
        return "normal", std, mod.padding_idx
    if "norm" in type(mod).__name__.lower() and leaf == "weight":
        return "ones", 0.0, None
    raise ValueError(f"no init rule for {name} ({type(mod).__name__}): write_random_llama supports Llama-family models")


def _chunks(shape, rule, seed, name, dtype, device):
    """The tensor's values, rows at a time, as CPU tensors of `dtype`."""
    kind, std, pad = rule
    if kind != "normal":
        yield (torch.ones if kind == "ones" else torch.zeros)(shape, dtype=dtype)
        return
    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    cols = math.prod(shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, shape[0], step):
        rows = min(step, shape[0] - r0)
        chunk = torch.empty((rows, *shape[1:]), dtype=torch.float32, device=device).normal_(0.0, std, generator=gen)
        if pad is not None and r0 <= pad < r0 + rows:
            chunk[pad - r0] = 0.0  # HF zeroes the padding row of an embedding
        yield chunk.to(dtype).cpu()


def write_safetensors_streaming(file, shapes: dict[str, tuple], dtype: torch.dtype, chunks) -> int:
    """Write a safetensors file whose tensors are produced chunk by chunk, as `save_file` would lay it out.

    Args:
        file: output path.
        shapes: {tensor name: shape}, all of `dtype`.
        chunks: chunks(name) -> iterable of CPU tensors of `dtype` whose rows concatenate to the tensor.
    Returns:
        bytes of tensor data written.
    """
    itemsize = torch.finfo(dtype).bits // 8
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = sorted(shapes)  # save_file's order for tensors of one dtype: by name
    for n in names:
        size = math.prod(shapes[n]) * itemsize
        header[n] = {"dtype": ST_DTYPES[dtype], "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n in names:
            written = 0
            for c in chunks(n):
                buf = c.contiguous().view(torch.uint8).numpy()  # raw bytes, little-endian as on every torch host
                f.write(buf)
                written += buf.nbytes
            if written != header[n]["data_offsets"][1] - header[n]["data_offsets"][0]:
                raise RuntimeError(f"{n}: wrote {written} bytes, header says {header[n]['data_offsets']}")
    return offset


def _check_config(config, vocab_size, tok) -> object:
    """A copy of `config` with the tokenizer's ids and `vocab_size` applied, validated before any writing."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**config) if isinstance(config, dict) else copy.deepcopy(config)
    if vocab_size is not None:
        if not (isinstance(vocab_size, int) and vocab_size > 0):
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        cfg.vocab_size = vocab_size
    if tok is not None:
        if len(tok) > cfg.vocab_size:
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tok)} tokens: "
                             f"pass vocab_size >= {len(tok)}")
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = getattr(cfg, field, None)
        for t in ids if isinstance(ids, (list, tuple)) else [ids]:
            if t is not None and not 0 <= t < cfg.vocab_size:
                raise ValueError(f"{field} {t} does not exist in a vocabulary of {cfg.vocab_size}: "
                                 f"set it below vocab_size (or pass tokenizer_text to take the tokenizer's ids)")
    return cfg


@torch.no_grad()
def write_random_llama(path, config, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                       max_shard_size: int | str = "2GB", tokenizer_text=None, vocab_size: int | None = None,
                       device="cpu", progress: bool = True) -> Path:
    """Write a random-weight Llama-family checkpoint in Hugging Face format, one tensor chunk at a time.

    Args:
        path: output directory (must not exist, or be empty); written beside it and renamed when complete.
        config: a LlamaConfig (or its dict): the shapes.
        seed: same seed -> same bytes (on the same `device`).
        dtype: stored dtype (bfloat16, float16, float32).
        max_shard_size: as in save_pretrained ("2GB", or bytes).
        tokenizer_text: None (no tokenizer), "default" (Debian's GPL-3, else the Jargon File) or a text file:
            trains a 2000-token byte-level BPE tokenizer; the config takes its BOS / EOS ids.
        vocab_size: override the config's (default: the config's, so embeddings and head keep the real shape).
        device: where values are drawn ("cuda" is faster for 8B; values differ from the CPU's).
    Returns:
        the checkpoint directory. Its config.json carries `"libortho_random_weights": true`.
    Example:
        >>> write_random_llama("/tmp/l3", llama3_8b_config(), tokenizer_text="default")   # doctest: +SKIP
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from transformers import AutoModelForCausalLM, GenerationConfig

    if dtype not in ST_DTYPES:
        raise ValueError(f"dtype must be one of {list(ST_DTYPES)}, got {dtype!r}")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not empty: choose a new directory or delete it")
    tok = train_tokenizer(tokenizer_corpus(tokenizer_text)) if tokenizer_text is not None else None
    cfg = _check_config(config, vocab_size, tok)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = dict(model.named_parameters())  # shared (tied) parameters appear once, under their first name
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if n in params}
    extra = set(model.state_dict()) - set(dict(model.named_parameters(remove_duplicate=False)))
    if extra:
        raise ValueError(f"persistent buffers {sorted(extra)[:3]} are not supported: write_random_llama writes parameters")
    rules = {n: _init_rule(model, n, cfg) for n in shapes}  # checked before any file is written
    itemsize = torch.finfo(dtype).bits // 8
    split = split_state_dict_into_shards_factory(
        shapes, get_storage_size=lambda s: math.prod(s) * itemsize, filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    from tqdm.auto import tqdm

    for shard, names in tqdm(split.filename_to_tensors.items(), desc="write shards", disable=not progress, leave=False):
        write_safetensors_streaming(tmp / shard, {n: shapes[n] for n in names}, dtype,
                                    lambda n: _chunks(shapes[n], rules[n], seed, n, dtype, device))
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    cfg.architectures = [type(model).__name__]
    cfg.dtype = dtype
    cfg.libortho_random_weights = True
    cfg.save_pretrained(tmp)
    GenerationConfig.from_model_config(cfg).save_pretrained(tmp)
    if tok is not None:
        tok.save_pretrained(tmp)
    if path.exists():
        path.rmdir()  # empty (checked above)
    os.replace(tmp, path)  # atomic: a half-written checkpoint never looks complete
    return path


def shape_config(shape: str, layers: int | None = None):
    """The LlamaConfig of a named shape (`SHAPES`), optionally with fewer layers."""
    from .plan import model_config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)}")
    cfg = model_config(SHAPES[shape]).to_config()
    if layers is not None:
        if not (isinstance(layers, int) and layers > 0):
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        cfg.num_hidden_layers = layers
    return cfg


def llama3_8b(path, **kwargs) -> Path:
    """A random-weight Meta-Llama-3-8B-shaped checkpoint (16 GB in bf16) with a small tokenizer at `path`."""
    kwargs.setdefault("tokenizer_text", "default")
    return write_random_llama(path, shape_config("llama3-8b"), **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m libortho.random_checkpoint",
                                description="Write a random-weight Llama checkpoint in Hugging Face format.")
    p.add_argument("out_dir")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape has")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--tokenizer-text", default="default", help="'default', 'none' or a UTF-8 text file")
    p.add_argument("--device", default="cpu", help="where values are drawn (cuda: faster)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = write_random_llama(a.out_dir, shape_config(a.shape, a.layers), a.seed, getattr(torch, a.dtype),
                                 a.max_shard_size, None if a.tokenizer_text == "none" else a.tokenizer_text,
                                 device=a.device)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"{out}: {a.shape}, {len(files)} shards, {size / 2**30:.2f} GiB, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
