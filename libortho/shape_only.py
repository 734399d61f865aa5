"""Models with a real model's shapes and random values, built directly in packed form.

`build(llama3_8b_config(), density=0.01)` gives a Llama-3-8B-shaped model whose linears are OrthoLinear
(random INT4 codes, random scales, a random 1% CSR ortho stream) created layer by layer on the GPU: the
dense weights never exist, so it builds inside a 6 GB card. Its outputs mean nothing; its speed and memory
are those of the real model. Everything measured on one is labelled `shape_only`.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import OrthoLinear
from .quant import QuantizedTensor, n_groups
from .sparse import CSR, index_dtype

CODE_STD = 4.6  # std of (q - 8) for q uniform in 0..15


def llama3_8b_config():
    """Meta-Llama-3-8B's architecture (no weights), from the shapes `plan` knows."""
    from .plan import model_config

    return model_config("meta-llama/Meta-Llama-3-8B").to_config()


def smollm2_135m_config():
    """SmolLM2-135M's architecture (no weights)."""
    from .plan import model_config

    return model_config("smollm2-135m").to_config()


CONFIGS = {"llama3-8b": llama3_8b_config, "smollm2-135m": smollm2_135m_config}


def random_ortho_linear(out_f: int, in_f: int, density: float, group_size: int, dtype=torch.bfloat16,
                        device="cuda", gen: torch.Generator | None = None, std: float = 0.02) -> OrthoLinear:
    """An OrthoLinear with random packed codes and a random CSR stream of `density` (same nnz per row)."""
    qweight = torch.randint(0, 256, (out_f, in_f // 2), dtype=torch.uint8, device=device, generator=gen)
    g = n_groups(in_f, group_size)
    scales = ((1 + 0.1 * torch.randn(out_f, g, device=device, generator=gen)) * (std / CODE_STD)).to(dtype)
    base = QuantizedTensor(qweight, scales, None, group_size, (out_f, in_f))
    per_row = int(round(density * in_f))
    crow = torch.arange(out_f + 1, device=device, dtype=torch.int32) * per_row
    # one column per stratum of the row: unique and sorted, as a selection mask gives them
    width = in_f // max(per_row, 1)
    off = torch.randint(0, max(width, 1), (out_f, per_row), device=device, generator=gen, dtype=torch.int32)
    cols = (torch.arange(per_row, device=device, dtype=torch.int32) * width + off).flatten().to(index_dtype(in_f))
    values = (torch.randn(out_f * per_row, device=device, generator=gen) * std / 2).to(dtype)
    return OrthoLinear.from_parts(base, CSR(crow, cols, values, (out_f, in_f)))


@torch.no_grad()
def build(config=None, density: float = 0.01, group_size: int | None = None, dtype=torch.bfloat16, device="cuda",
          embed_device: str | None = None, seed: int = 0, head_bits: int = 4, device_map: dict | None = None):
    """A shape-only Llama-family model: OrthoLinear linears and an INT4 head, built without dense weights.

    Args:
        config: a LlamaConfig (default: Llama-3-8B's).
        density: ortho share of every converted linear.
        group_size: INT4 group; default the largest of 128/64/32 dividing every layer width.
        embed_device: where the embedding table lives; "cpu" keeps its 1 GB (8B shape) off the GPU (the
            decoder gathers one row per token). Default: "cpu" when the table is over 256 MB.
        head_bits: 4 -> the LM head is an INT4 OrthoLinear with no ortho stream; 16 -> dense in `dtype`.
        device_map: {module name: GPU index} (`libortho.placement.device_map`): each part is built on the GPU
            the map gives it (a 70B across two GPUs); `placement.dispatch` then makes the HF forward work.
    Returns:
        a LlamaForCausalLM skeleton (meta tensors replaced) with `.shape_only = True`. Run it with
        `libortho.decode.StaticDecoder` (or, placed by a device_map and dispatched, the HF forward).
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from .placement import device_of

    cfg = config or llama3_8b_config()
    where = (lambda name: device_of(device_map, name)) if device_map else (lambda name: torch.device(device))
    gens: dict = {}

    def gen_on(dev: torch.device) -> torch.Generator:  # one seeded stream per device
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        return gens[dev]

    if group_size is None:
        group_size = next(g for g in (128, 64, 32, 16, 2) if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    H, V = cfg.hidden_size, cfg.vocab_size
    if device_map:
        embed_device = embed_device or where("model.embed_tokens")
    elif embed_device is None:
        embed_device = "cpu" if V * H * torch.finfo(dtype).bits // 8 > 256 * 2**20 else device
    cpu_gen = torch.Generator().manual_seed(seed)
    emb = (torch.randn(V, H, generator=cpu_gen, dtype=torch.float32) * 0.02).to(dtype) if V * H < 2**27 else \
        torch.empty(V, H, dtype=dtype).normal_(0, 0.02, generator=cpu_gen)
    model.model.embed_tokens.weight = nn.Parameter(emb.to(embed_device), requires_grad=False)
    for i, layer in enumerate(model.model.layers):
        dev = where(f"model.layers.{i}")
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                meta = getattr(parent, n)
                setattr(parent, n, random_ortho_linear(meta.out_features, meta.in_features, density, group_size,
                                                       dtype, dev, gen_on(dev)))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = nn.Parameter(torch.ones(H, dtype=dtype, device=dev), requires_grad=False)
    dev = where("model.norm")
    model.model.norm.weight = nn.Parameter(torch.ones(H, dtype=dtype, device=dev), requires_grad=False)
    dev = where("lm_head")
    if head_bits == 4:
        model.lm_head = random_ortho_linear(V, H, 0.0, group_size, dtype, dev, gen_on(dev))
    else:
        model.lm_head = nn.Linear(H, V, bias=False, dtype=dtype, device=dev)
        model.lm_head.weight.requires_grad_(False).normal_(0, 0.02)
    # the rotary table of the HF forward (built on meta above): real, where the first layer runs
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(where("model.layers.0"))
    model.shape_only = True
    model.eval()
    return model
