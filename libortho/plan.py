"""Memory planning from a model's config alone: does it fit a GPU profile, and at which precision.

The model is instantiated on the meta device (no weights, no download), its parameters counted by role,
and each role priced per precision. Policy from the Llama 3 guides: under 8 GB of budget a large model
is loaded in 4-bit; one that does not fit even in 4-bit is refused before anything loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path

from .llama import is_target, LLAMA_LINEARS

GIB = 1024**3
CUDA_CONTEXT_GIB = 0.5  # CUDA context + allocator slack, the allowance every plan reserves
AUTO_4BIT_BELOW_GIB = 8.0

_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
               rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
_8B = dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
           tie_word_embeddings=False)
_3B = dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
           tie_word_embeddings=True)
_31 = dict(max_position_embeddings=131072)  # Llama 3.1: same shapes, 128k context
_70B = dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
            tie_word_embeddings=False)
_405B = dict(_LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
             tie_word_embeddings=False)
# Shapes of the models the Llama 3 guides name (from their published config.json), so `plan` needs no network.
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": _8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _8B,
    "meta-llama/Llama-3.1-8B": dict(_8B, **_31),
    "meta-llama/Llama-3.1-8B-Instruct": dict(_8B, **_31),
    "meta-llama/Meta-Llama-3.1-8B": dict(_8B, **_31),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": dict(_8B, **_31),
    "meta-llama/Llama-3.2-3B": _3B,
    "meta-llama/Llama-3.2-3B-Instruct": _3B,
    "meta-llama/Meta-Llama-3-70B": _70B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _70B,
    "meta-llama/Llama-3.1-70B": dict(_70B, **_31),
    "meta-llama/Llama-3.1-70B-Instruct": dict(_70B, **_31),
    "meta-llama/Meta-Llama-3.1-70B": dict(_70B, **_31),
    "meta-llama/Meta-Llama-3.1-70B-Instruct": dict(_70B, **_31),
    "meta-llama/Llama-3.1-405B": dict(_405B, **_31),
    "meta-llama/Meta-Llama-3.1-405B": dict(_405B, **_31),
    "meta-llama/Llama-3.1-405B-Instruct": dict(_405B, **_31),
    "meta-llama/Meta-Llama-3.1-405B-Instruct": dict(_405B, **_31),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                               tie_word_embeddings=True, max_position_embeddings=8192,
                                               rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2),
}
# The tiny random Llama's shape (the same layout as Llama 3); vocab is the embedded tokenizer's.
TINY_CONFIG = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
ALIASES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class LlamaShape(SimpleNamespace):
    """The shape of a known Llama-family model: the config fields `plan` reads, without transformers."""

    def to_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(**vars(self))


def model_config(model: str):
    """The config of `model` without downloading weights: known ids and `tiny` need no network (and no
    transformers import, which alone takes seconds), local dirs and .gguf files are read, other ids fetched
    (offline at once when the hub does not answer: `hub.hub_unreachable`)."""
    key = ALIASES.get(model, model)
    if key in KNOWN_CONFIGS:
        return LlamaShape(**KNOWN_CONFIGS[key])
    if key == "tiny":
        return LlamaShape(**TINY_CONFIG)
    from transformers import AutoConfig

    p = Path(model)
    if p.is_dir():
        return AutoConfig.from_pretrained(p)
    if p.suffix == ".gguf" and p.is_file():
        return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    if p.suffix == ".gguf" or model.startswith(("/", ".")):
        raise FileNotFoundError(f"model {model} not found")
    from .hub import hub_unreachable

    hub_unreachable()  # when the hub does not answer: offline mode, so AutoConfig reads the cache or fails now
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ValueError(f"unknown model {model!r}: not a known id (e.g. {', '.join(sorted(KNOWN_CONFIGS)[:3])}, ...), "
                         f"and its config could not be read ({(str(e).splitlines() or [''])[0][:120]})") from None


@dataclass
class ParamCount:
    linears: int = 0  # the converted q/k/v/o/gate/up/down weights
    embeddings: int = 0
    head: int = 0
    other: int = 0  # norms, biases
    rows: int = 0  # output rows of the linears (CSR row pointers)
    tied: bool = False


def llama_param_count(cfg: LlamaShape) -> ParamCount:
    """Closed form for the Llama layout; tests check it equals `count_params` on the meta device."""
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
    rows = q + 2 * kv + h + 2 * cfg.intermediate_size + h
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    return ParamCount(linears=layers * per_layer, embeddings=vocab * h, head=vocab * h,
                      other=(2 * layers + 1) * h, rows=layers * rows, tied=tied)


def count_params(config) -> ParamCount:
    """Count parameters by role on the meta device: no memory, no weights (known Llama shapes: closed form)."""
    if isinstance(config, LlamaShape):
        return llama_param_count(config)
    from transformers import AutoModelForCausalLM

    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    c = ParamCount(tied=bool(getattr(config, "tie_word_embeddings", False)))
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and is_target(name, LLAMA_LINEARS):
            c.linears += mod.weight.numel()
            c.rows += mod.out_features
    c.embeddings = model.get_input_embeddings().weight.numel()
    c.head = model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once here
    c.other = total - c.linears - c.embeddings - (0 if c.tied else c.head)
    return c


@dataclass
class Plan:
    precision: str
    weights_gib: float
    embeddings_gib: float
    head_gib: float
    kv_cache_gib: float
    context_gib: float
    notes: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.embeddings_gib + self.head_gib + self.kv_cache_gib + self.context_gib


def bytes_per_weight(precision: str, group_size: int = 64) -> float:
    return {"fp16": 2.0, "int8": 1.0 + 2 / 4096, "int4": (4 + 16 / group_size) / 8}[precision]


def plan_all(config, seq_len: int = 2048, density: float = 0.01, batch: int = 1, group_size: int = 64
             ) -> dict[str, Plan]:
    """GPU memory for fp16, 8-bit, 4-bit and libortho (4-bit base + `density` ortho in fp16/int16 CSR).

    Quantized plans keep the embedding table in CPU memory (a lookup of one row per token; the guides'
    advice for small cards) and quantize the head like the linears.
    """
    c = count_params(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * seq_len * batch * 2 / GIB
    other = c.other * 2 / GIB
    out = {}
    for prec in ("fp16", "int8", "int4", "libortho"):
        b = bytes_per_weight("int4" if prec == "libortho" else prec, group_size)
        weights = c.linears * b / GIB + other
        notes = []
        if prec == "libortho":
            nnz = density * c.linears
            weights += (nnz * (2 + 2) + (c.rows + 1) * 4) / GIB  # fp16 values, int16 columns, int32 row pointers
            notes.append(f"ortho stream at density {density:g}")
        if prec == "fp16":
            emb = c.embeddings * 2 / GIB
            head = 0.0 if c.tied else c.head * 2 / GIB
        else:
            emb = 0.0
            head = c.head * b / GIB
            notes.append("embeddings kept in CPU memory; head quantized like the linears")
        out[prec] = Plan(prec, weights, emb, head, kv, CUDA_CONTEXT_GIB, notes)
    return out


LOAD_PRECISIONS = ("fp16", "int8", "int4")  # what a model can be loaded in ("libortho" is built after loading)


@dataclass
class Decision:
    """What a run under a GPU profile loads the model in.

    precision: "fp16" (as stored, 16-bit on a GPU), "int8", "int4", or None (refused).
    automatic: the precision was chosen by the policy, not requested.
    fitting: every precision of the plan (libortho included) that fits the budget.
    """

    precision: str | None
    automatic: bool
    message: str
    fitting: list[str] = field(default_factory=list)

    @property
    def auto_4bit(self) -> bool:
        return self.automatic and self.precision == "int4"


def decide(plans: dict[str, Plan], budget_gib: float, requested: str = "auto", seq_len: int = 2048) -> Decision:
    """The policy of the Llama 3 guides for a budget.

    `requested="auto"` (no precision asked for): as stored when it fits; else under 8 GiB 4-bit, otherwise the
    widest of 8-bit / 4-bit that fits; else refused. An explicit request ("fp16", "int8", "int4") is kept when it
    fits and refused otherwise, naming what would fit.
    """
    fitting = [p for p in plans if plans[p].total_gib <= budget_gib]

    def gib(p):
        return f"{plans[p].total_gib:.2f}"

    if requested not in ("auto", *LOAD_PRECISIONS):
        raise ValueError(f"requested precision must be auto, fp16, int8 or int4, got {requested!r}")
    want = "fp16" if requested == "auto" else requested
    if want in fitting:
        return Decision(want, False, f"{want} fits: {gib(want)} of {budget_gib:g} GiB", fitting)
    loadable = [p for p in LOAD_PRECISIONS if p in fitting]
    if requested == "auto" and loadable:
        pick = "int4" if budget_gib < AUTO_4BIT_BELOW_GIB else loadable[0]
        if pick in loadable:
            bits = {"int8": "8-bit", "int4": "4-bit"}[pick]
            return Decision(pick, True, f"fp16 needs {gib('fp16')} GiB > {budget_gib:g} GiB: loading in {bits} "
                                        f"({gib(pick)} GiB)", fitting)
    if loadable:
        return Decision(None, False, f"{want} needs {gib(want)} GiB > {budget_gib:g} GiB; fits: {', '.join(fitting)}"
                                     f" (--quantization-bits {8 if loadable[0] == 'int8' else 4})", fitting)
    return Decision(None, False, f"does not fit in {budget_gib:g} GiB even in 4-bit "
                                 f"({plans['int4'].total_gib:.1f} GiB needed); {fits_hint(budget_gib, seq_len)}", fitting)


def fits_hint(budget_gib: float, seq_len: int = 2048) -> str:
    """Which known models would fit the budget in 4-bit at `seq_len`, for refusal messages."""
    names, seen = [], set()
    for name, shape in KNOWN_CONFIGS.items():
        key = tuple(sorted(shape.items()))
        if key in seen:
            continue
        seen.add(key)
        if plan_all(LlamaShape(**shape), seq_len)["int4"].total_gib <= budget_gib:
            names.append(name)
    return f"what fits in 4-bit at seq_len {seq_len}: " + (", ".join(names) if names else "none of the known models")
