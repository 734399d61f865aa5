"""The first honest loop: convert the model, then perplexity and a greedy completion at alpha 0 and 1."""
from __future__ import annotations

import time

import torch

from ..config import OrthoConfig
from ..convert import orthogonalize_
from ..data import calibration_batches, load_text
from ..modules import cache_base_, set_alpha
from ..models import load_model
from ..perplexity import Protocol, encode, perplexity
from . import RunContext, register

DEMO_PROTOCOL = Protocol(max_length=512, stride=512, max_tokens=4096)
# characters one calibration draw reads; seed s > 0 reads slice s past the general fine-tuning text (train.py)
CALIB_CHARS, CALIB_SLICES, CALIB_SEEDED_FROM = 16 * 256 * 8, 8, 400_000


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(next(model.parameters()).device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@register("convert")
def run(ctx: RunContext, density: float = 0.01, group_size: int = 64, symmetric: bool = True) -> dict:
    # Not the OrthoConfig default (g32 asymmetric): on the embedded Q4_1 model that grid reproduces the weights
    # exactly, the residual is zero and alpha would change nothing. g64 symmetric shows the switch at work.
    torch.manual_seed(ctx.seed)
    loaded = load_model(ctx.model, device=ctx.device, bits=ctx.load_bits)
    model, tok = loaded.model, loaded.tokenizer
    text = load_text(ctx.text)
    ids = encode(tok, text.text, DEMO_PROTOCOL)
    prompt = text.text.split("\n\n")[len(text.text.split("\n\n")) // 2][:80]  # a held-out line of real text
    fp_ppl = perplexity(model, ids, DEMO_PROTOCOL, ctx.progress)
    cfg = OrthoConfig(density=density, group_size=group_size, symmetric=symmetric, mode="posthoc", score="hessian",
                      seed=ctx.seed)
    t0 = time.perf_counter()
    # the seed picks which slice of the public calibration text is read (the conversion itself is deterministic)
    offset = 0 if ctx.seed == 0 else CALIB_SEEDED_FROM + (ctx.seed % CALIB_SLICES) * CALIB_CHARS
    calib = calibration_batches(tok, offset=offset)
    orthogonalize_(model, cfg, calibration=calib, progress=ctx.progress)
    convert_s = time.perf_counter() - t0
    cache_base_(model)
    out = {"model": loaded.name, "dataset": text.name, "protocol": DEMO_PROTOCOL.to_dict(),
           "config": cfg.to_dict(), "calibration": {"text": "debian:fortunes", "offset_chars": offset,
                                                    "seed": ctx.seed}, "convert_seconds": round(convert_s, 2), "fp_ppl": fp_ppl,
           "prompt": prompt, "alphas": {}}
    for alpha in (0.0, 1.0):
        set_alpha(model, alpha)
        out["alphas"][str(alpha)] = {"ppl": perplexity(model, ids, DEMO_PROTOCOL, ctx.progress),
                                     "greedy": greedy(model, tok, prompt)}
    grid = "symmetric" if symmetric else "asymmetric"
    print(f"\n== {loaded.name}: posthoc/hessian, density {density:.0%}, INT4 group {group_size} {grid} ==")
    print(f"conversion: {convert_s:.1f} s on {torch.get_num_threads()} threads")
    print(f"perplexity on {text.name} ({ids.numel()} tokens, windows {DEMO_PROTOCOL.max_length}):")
    print(f"  full precision: {fp_ppl:8.3f}")
    for a, r in out["alphas"].items():
        print(f"  alpha {a}:      {r['ppl']:8.3f}   greedy: {prompt!r} -> {r['greedy']!r}")
    return out
