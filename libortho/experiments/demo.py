"""The first honest loop: convert the model, then perplexity and a greedy completion at alpha 0 and 1."""
from __future__ import annotations

import time

import torch

from ..config import OrthoConfig
from ..convert import orthogonalize_
from ..data import calibration_batches, load_text
from ..modules import cache_base_, input_device, set_alpha
from ..models import load_model
from ..perplexity import Protocol, encode, perplexity
from . import RunContext, register

DEMO_PROTOCOL = Protocol(max_length=512, stride=512, max_tokens=4096)
# characters one calibration draw reads; seed s > 0 reads slice s past the general fine-tuning text (train.py)
CALIB_CHARS, CALIB_SLICES, CALIB_SEEDED_FROM = 16 * 256 * 8, 8, 400_000


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(input_device(model))
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _streamed(ctx: RunContext, text, cfg: OrthoConfig, offset: int):
    """The demo for a checkpoint whose full precision does not fit the budget: the fp perplexity with
    accelerate's offloading, then `convert_checkpoint` (INT4 head, embeddings in host memory) on the device."""
    from transformers import AutoTokenizer

    from ..convert import convert_checkpoint
    from ..models import LOAD_LOG
    from ..stream import load_offloaded, offload_budget_gib, release

    tok = AutoTokenizer.from_pretrained(ctx.model)
    ids = encode(tok, text.text, DEMO_PROTOCOL)
    offload_gib = offload_budget_gib(ctx.budget_gib)
    fp = load_offloaded(ctx.model, offload_gib, torch.bfloat16, ctx.device)
    LOAD_LOG.append({"source": str(ctx.model), "bits": None, "dtype": "bfloat16", "device": str(ctx.device),
                     "how": f"accelerate offload, {offload_gib:g} GiB on the device", "reference": True})
    fp_ppl = perplexity(fp, ids, DEMO_PROTOCOL, ctx.progress)
    release(fp)
    del fp
    t0 = time.perf_counter()
    calib = calibration_batches(tok, offset=offset)
    model = convert_checkpoint(ctx.model, cfg, calibration=calib, device=ctx.device, dtype=torch.bfloat16,
                               head_bits=4, host_embeddings=True, progress=ctx.progress)
    LOAD_LOG.append({"source": str(ctx.model), "bits": 4, "dtype": "bfloat16", "device": str(ctx.device),
                     "how": "streamed conversion"})
    return model, tok, str(ctx.model), fp_ppl, ids, calib, time.perf_counter() - t0


@register("convert")
def run(ctx: RunContext, density: float = 0.01, group_size: int = 64, symmetric: bool = True) -> dict:
    # Not the OrthoConfig default (g32 asymmetric): on the embedded Q4_1 model that grid reproduces the weights
    # exactly, the residual is zero and alpha would change nothing. g64 symmetric shows the switch at work.
    torch.manual_seed(ctx.seed)
    text = load_text(ctx.text)
    cfg = OrthoConfig(density=density, group_size=group_size, symmetric=symmetric, mode="posthoc", score="hessian",
                      seed=ctx.seed)
    # the seed picks which slice of the public calibration text is read (the conversion itself is deterministic)
    offset = 0 if ctx.seed == 0 else CALIB_SEEDED_FROM + (ctx.seed % CALIB_SLICES) * CALIB_CHARS
    if ctx.streamed:  # too large to load in full precision: fp offloaded, the conversion layer by layer
        model, tok, name, fp_ppl, ids, calib, convert_s = _streamed(ctx, text, cfg, offset)
    else:
        loaded = load_model(ctx.model, device=ctx.device, bits=ctx.load_bits)
        model, tok, name = loaded.model, loaded.tokenizer, loaded.name
        ids = encode(tok, text.text, DEMO_PROTOCOL)
        fp_ppl = perplexity(model, ids, DEMO_PROTOCOL, ctx.progress)
        t0 = time.perf_counter()
        calib = calibration_batches(tok, offset=offset)
        orthogonalize_(model, cfg, calibration=calib, progress=ctx.progress)
        convert_s = time.perf_counter() - t0
        if not str(ctx.device).startswith("cuda"):
            cache_base_(model)
    prompt = text.text.split("\n\n")[len(text.text.split("\n\n")) // 2][:80]  # a held-out line of real text
    out = {"model": name, "dataset": text.name, "protocol": DEMO_PROTOCOL.to_dict(), "streamed": ctx.streamed,
           "config": cfg.to_dict(), "calibration": {"text": "debian:fortunes", "offset_chars": offset,
                                                    "seed": ctx.seed}, "convert_seconds": round(convert_s, 2), "fp_ppl": fp_ppl,
           "prompt": prompt, "alphas": {}}
    for alpha in (0.0, 1.0):
        set_alpha(model, alpha)
        out["alphas"][str(alpha)] = {"ppl": perplexity(model, ids, DEMO_PROTOCOL, ctx.progress),
                                     "greedy": greedy(model, tok, prompt)}
    grid = "symmetric" if symmetric else "asymmetric"
    print(f"\n== {name}: posthoc/hessian, density {density:.0%}, INT4 group {group_size} {grid} ==")
    print(f"conversion: {convert_s:.1f} s on {torch.get_num_threads()} threads")
    print(f"perplexity on {text.name} ({ids.numel()} tokens, windows {DEMO_PROTOCOL.max_length}):")
    print(f"  full precision: {fp_ppl:8.3f}")
    for a, r in out["alphas"].items():
        print(f"  alpha {a}:      {r['ppl']:8.3f}   greedy: {prompt!r} -> {r['greedy']!r}")
    return out
