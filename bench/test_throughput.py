"""End-to-end throughput and VRAM under each GPU profile of markers.ini.

Decode tokens/s (batch 1, 128 new tokens after a 16-token prompt) and prefill tokens/s (a 512-token
prompt) for: the full-precision model (bf16) and bitsandbytes NF4, both in Hugging Face eager; the same
bf16 model through libortho's static-cache CUDA-graph decoder (`bf16-static`, to separate engine from
kernel); and libortho at alpha 0 and alpha 1 (the fused dual-stream kernels, CUDA-graph decoder).
Models: a Llama-3-8B-shaped model with random values built in packed form (`shape_only`), a
SmolLM2-135M-shaped one on the 6 GB profile, and the user's model with `--model`.
`test_batch_decode_mixed_alpha` (profiles of 16 GiB and more): 8 requests in one CUDA graph, each at its own
alpha (all 0, all 1, half and half), tokens/s of the batch and per request.

Each test runs with the allocator capped to its profile (conftest.py) and NVML polled from a thread;
extra_info carries tokens/s, GB/s (weight bytes read per token x tokens/s), the fraction of the copy
roofline, peak VRAM (NVML process, torch reserved, torch allocated), model, density, alpha, profile.

    pytest -m gtx4050 bench/ --benchmark-autosave
    pytest -m gtx4050 bench/ --benchmark-compare --benchmark-compare-fail=median:15%
"""
from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from bench.measure import measure_copy_bandwidth, now_utc
from libortho.gpu import GIB, NvmlPoller, profiles
from bench.thresholds import load as load_thresholds

PROFILES = profiles()
# int4mm-static: libortho's INT4 base (stream dropped) through torch's tinygemm kernel (`_weight_int4pack_mm`, what
# torchao int4 weight-only runs) in the same graph decoder: the engine-equal INT4 baseline of issue 17
# alpha1-tc: alpha 1 with the tensor-core prefill (`set_prefill_kernel("tensor_core")`; prefill only, its decode is
# alpha1's), side by side with alpha1's dequantize + cuBLAS prefill and bf16-static's
VARIANTS = ["bf16", "nf4", "bf16-static", "int4mm-static", "alpha0", "alpha1", "alpha1-tc"]
ENGINE = {"bf16": "hf-eager", "nf4": "hf-eager", "bf16-static": "libortho-graph", "int4mm-static": "libortho-graph",
          "alpha0": "libortho-graph", "alpha1": "libortho-graph", "alpha1-tc": "libortho-graph"}
DENSITIES = [0.01]
NEW_TOKENS, DECODE_PROMPT, PREFILL_TOKENS, MAX_SEQ = 128, 16, 512, 1024
RESULTS: dict[tuple, dict] = {}


def _models_for(profile: str, user: str | None) -> list[str]:
    models = ["llama3-8b"] + (["smollm2-135m"] if profile == "gtx4050" else [])
    return models + ([f"user:{user}"] if user else [])


def pytest_generate_tests(metafunc):  # noqa: D103 (module-level hook: parametrize over profile x model x ...)
    if metafunc.function.__name__ != "test_throughput":
        return
    user = metafunc.config.getoption("--model")
    params = []
    for prof in PROFILES:
        for model in _models_for(prof, user):
            for variant in VARIANTS:
                for density in (DENSITIES if variant.startswith("alpha") else [None]):
                    for phase in (("prefill",) if variant.endswith("-tc") else ("decode", "prefill")):
                        d = "" if density is None else f"-d{density:g}"
                        params.append(pytest.param(prof, model, variant, density, phase,
                                                   marks=getattr(pytest.mark, prof),
                                                   id=f"{prof}-{model}-{variant}{d}-{phase}"))
    metafunc.parametrize("profile,model,variant,density,phase", params)


# -- models ------------------------------------------------------------------------------------------------

def _config(model: str):
    from libortho import shape_only

    if model.startswith("user:"):
        from transformers import AutoConfig

        from libortho.models import embedded_dir

        src = model[5:]
        return AutoConfig.from_pretrained(embedded_dir() if src == "smollm2-135m" else src)
    return shape_only.CONFIGS[model]()


def estimate_gib(model: str, variant: str, density: float | None) -> float:
    """Weights + KV cache the variant needs on the GPU (GiB), from the config alone."""
    c = _config(model)
    H, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    hd = getattr(c, "head_dim", None) or H // c.num_attention_heads
    lin = L * (2 * H * H + 2 * H * c.num_key_value_heads * hd + 3 * H * I)
    tied = getattr(c, "tie_word_embeddings", False)
    kv = 2 * L * c.num_key_value_heads * hd * MAX_SEQ * 2
    if variant in ("bf16", "bf16-static"):
        w = 2 * (lin + V * H * (1 if tied else 2))
    elif variant == "nf4":
        w = lin * (0.5 + 1 / 64) + 2 * V * H * (1 if tied else 2)
    else:  # INT4 base + scales (tinygemm: + zeros) + ortho (value + int16 col); INT4 head; embeddings on the CPU
        emb_gpu = V * H * 2 <= 256 * 2**20   # when large
        meta = (4 if variant == "int4mm-static" else 2) / 128
        w = lin * (0.5 + meta + 4 * (density or 0)) + V * H * (0.5 + meta) + (V * H * 2 if emb_gpu else 0)
    return (w + kv) / GIB


class _Slot:
    """One model on the GPU at a time: the next key frees the last before building."""

    key, obj = None, None

    @classmethod
    def get(cls, key, build):
        if cls.key != key:
            cls.obj = cls.key = None
            gc.collect()
            torch.cuda.empty_cache()
            cls.obj, cls.key = build(), key
        return cls.obj


def _hf_random(model: str, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    if model.startswith("user:"):
        from libortho.models import load_model

        return load_model(model[5:], dtype=dtype, device="cuda").model
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(_config(model), dtype=dtype)
    return m.eval()


def _build(model: str, variant: str, density: float | None):
    from libortho.decode import StaticDecoder

    if variant in ("bf16", "bf16-static"):
        m = _hf_random(model)
        return {"model": m, "decoder": StaticDecoder(m, MAX_SEQ) if variant == "bf16-static" else None,
                "label": "shape_only" if not model.startswith("user:") else "real"}
    if variant == "nf4":
        from libortho.baselines import nf4_

        m = _hf_random(model)
        nf4_(m, compute_dtype=torch.bfloat16)
        return {"model": m, "decoder": None, "label": "shape_only" if not model.startswith("user:") else "real"}
    if variant == "int4mm-static":  # the shape-only model's INT4 base, built without a stream, through tinygemm
        from libortho import shape_only
        from libortho.baselines import int4pack_

        m = shape_only.build(_config(model), density=0.0) if not model.startswith("user:") else None
        if m is None:
            pytest.skip("int4mm-static runs on the shape-only models (a real checkpoint converts through alpha0)")
        int4pack_(m)
        return {"model": m, "decoder": StaticDecoder(m, MAX_SEQ), "label": "shape_only"}
    if model.startswith("user:"):
        from libortho import OrthoConfig, orthogonalize_
        from libortho.models import load_model

        m = load_model(model[5:], dtype=torch.bfloat16).model
        orthogonalize_(m, OrthoConfig(density=density, score="magnitude", pad=True), progress=False)
        m = m.to("cuda")
        label = "real"
    else:
        from libortho import shape_only

        m = shape_only.build(_config(model), density=density)
        label = "shape_only"
    return {"model": m, "decoder": StaticDecoder(m, MAX_SEQ), "label": label}


# -- timing -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def copy_bandwidth():
    """Device-to-device copy bandwidth (bytes/s, read + write): the memory roofline of this GPU."""
    return measure_copy_bandwidth(256 * 2**20)


def _hf_decode_fns(m, vocab):
    from transformers import DynamicCache

    state = {}
    prompt = torch.randint(0, vocab, (1, DECODE_PROMPT), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def setup():
        with torch.no_grad():
            cache = DynamicCache()
            out = m(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            state.update(cache=out.past_key_values, tok=out.logits[:, -1:].argmax(-1))
        torch.cuda.synchronize()

    def run():
        with torch.no_grad():
            tok, cache = state["tok"], state["cache"]
            for _ in range(NEW_TOKENS):
                out = m(tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()

    return setup, run


@pytest.mark.gtx4050
def test_llama3_8b_alpha1_fits_gtx4050(gpu_profile):
    """Issue 6: the Llama-3-8B-shaped model at alpha 1 (1% ortho) builds and generates 128 tokens in 6 GiB."""
    from libortho import shape_only
    from libortho.decode import StaticDecoder

    _Slot.get(None, lambda: None)  # free whatever the last test left
    limit = load_thresholds("speed")["gtx4050_nvml_peak_gib_max"]
    torch.cuda.reset_peak_memory_stats()
    with NvmlPoller() as poller:
        m = shape_only.build(shape_only.llama3_8b_config(), density=0.01)
        dec = StaticDecoder(m, MAX_SEQ)
        prompt = torch.randint(0, m.config.vocab_size, (1, DECODE_PROMPT))
        toks = dec.generate(prompt, NEW_TOKENS)
        torch.cuda.synchronize()
    assert toks.shape == (NEW_TOKENS,)
    info = dict(test="fit", model="llama3-8b", weights="shape_only", density=0.01, alpha=1.0, profile="gtx4050",
                new_tokens=NEW_TOKENS, nvml_peak_gib=poller.peak_bytes / GIB, nvml_source=poller.source,
                nvml_samples=poller.samples, max_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                max_allocated_gib=torch.cuda.max_memory_allocated() / GIB, cap=gpu_profile[1],
                device=torch.cuda.get_device_name(), date=now_utc())
    print("\n" + json.dumps(info, default=str))
    RESULTS[("fit",)] = info
    _dump()
    del dec, m
    gc.collect()
    torch.cuda.empty_cache()
    assert poller.peak_bytes > 0, f"NVML gave no reading: {poller.error}"
    assert poller.peak_bytes / GIB <= limit, f"NVML peak {poller.peak_bytes / GIB:.2f} GiB > {limit} GiB"


def test_throughput(benchmark, gpu_profile, copy_bandwidth, profile, model, variant, density, phase):
    from libortho.modules import set_alpha
    from libortho.decode import weight_bytes_per_token
    from libortho.kernels import set_prefill_kernel

    prof = gpu_profile[0]
    need = estimate_gib(model, variant, density)
    if need + 0.75 > prof.vram_gib:
        pytest.skip(f"{variant} {model} needs about {need:.1f} GiB of weights and cache (estimate), over the "
                    f"{prof.vram_gib:g} GiB budget of {prof.name}")
    key = (profile, model, "libortho" if variant.startswith("alpha") else variant, density)
    if _Slot.key != key:  # free the last model before measuring, so the peaks below are this one's
        _Slot.get(None, lambda: None)
    torch.cuda.reset_peak_memory_stats()
    with NvmlPoller() as poller:
        built = _Slot.get(key, lambda: _build(model, variant, density))
        m, dec = built["model"], built["decoder"]
        alpha = None
        if variant.startswith("alpha"):
            alpha = 1.0 if variant.startswith("alpha1") else 0.0
            set_alpha(m, alpha)
        vocab = m.config.vocab_size
        gen = torch.Generator("cuda").manual_seed(1)
        if phase == "decode":
            if dec is None:
                setup, run = _hf_decode_fns(m, vocab)
            else:
                prompt = torch.randint(0, vocab, (1, DECODE_PROMPT), device="cuda", generator=gen)

                def setup():
                    dec.prepare()
                    dec.prefill(prompt.to(dec.embed.device))
                    torch.cuda.synchronize()

                def run():
                    dec.decode(NEW_TOKENS)
                    torch.cuda.synchronize()
            n_tok, rounds = NEW_TOKENS, 3
            benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1, iterations=1)
        else:
            ids = torch.randint(0, vocab, (1, PREFILL_TOKENS), device="cuda", generator=gen)
            if dec is None:
                def run():
                    with torch.no_grad():
                        m(ids, logits_to_keep=1)
                    torch.cuda.synchronize()
            else:
                dec.prepare()
                ids_e = ids.to(dec.embed.device)

                def run():
                    dec.prefill(ids_e)
                    torch.cuda.synchronize()
            n_tok = PREFILL_TOKENS
            before = set_prefill_kernel("tensor_core" if variant.endswith("-tc") else "dequant")
            try:
                benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
            finally:
                set_prefill_kernel(before)
        if dec is not None:
            dec._clear_hints()
        torch.cuda.synchronize()
    med = benchmark.stats.stats.median
    tok_s = n_tok / med
    bpt = weight_bytes_per_token(m, None if alpha is None else alpha != 0)
    gb_s = bpt * (tok_s if phase == "decode" else 1 / med) / 1e9
    info = dict(model=model, weights=built["label"], variant=variant, engine=ENGINE[variant], phase=phase,
                density=density, alpha=alpha, profile=prof.name, budget_gib=prof.vram_gib,
                tokens_per_s=tok_s, weight_bytes_per_token=bpt, gb_s=gb_s,
                roofline_fraction=(gb_s * 1e9 / copy_bandwidth) if phase == "decode" else None,
                copy_bandwidth_gb_s=copy_bandwidth / 1e9,
                nvml_peak_gib=poller.peak_bytes / GIB, nvml_source=poller.source,
                max_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                max_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                cap=gpu_profile[1], device=torch.cuda.get_device_name(), date=now_utc())
    benchmark.extra_info.update(info)
    RESULTS[(profile, model, variant, density, phase)] = info
    _dump()


def _dump():
    out = os.environ.get("LIBORTHO_RESULTS_DIR")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "throughput.json"), "w") as f:
            json.dump([v for v in RESULTS.values()], f, indent=1, default=str)


@pytest.mark.parametrize("profile", [pytest.param(p, marks=getattr(pytest.mark, p)) for p in PROFILES
                                     if PROFILES[p].vram_gib >= 16])
def test_decode_speedup_vs_nf4_hf(gpu_profile, profile):
    """Issue 7, end to end: libortho alpha 1 decode >= 5x bitsandbytes NF4 in HF eager, same run, 8B shape."""
    a1 = RESULTS.get((profile, "llama3-8b", "alpha1", 0.01, "decode"))
    nf4 = RESULTS.get((profile, "llama3-8b", "nf4", None, "decode"))
    if a1 is None or nf4 is None:
        pytest.skip("run with the test_throughput cases of this profile in the same session")
    ratio = a1["tokens_per_s"] / nf4["tokens_per_s"]
    RESULTS[("speedup", profile)] = dict(test="speedup", profile=profile, alpha1_tok_s=a1["tokens_per_s"],
                                         nf4_hf_tok_s=nf4["tokens_per_s"], ratio=ratio,
                                         alpha1_roofline_fraction=a1["roofline_fraction"])
    _dump()
    print(f"\nalpha1 {a1['tokens_per_s']:.1f} tok/s vs NF4-HF {nf4['tokens_per_s']:.1f} tok/s: {ratio:.2f}x; "
          f"alpha1 at {a1['roofline_fraction']:.0%} of the copy roofline")
    assert ratio >= load_thresholds("speed")["decode_alpha1_over_nf4_hf_min"], f"measured {ratio:.2f}x"


# -- issue 17: a batch of requests, each at its own alpha -------------------------------------------------------

BATCHES = (1, 4, 8, 16, 32)
MIXES = ("all0", "all1", "half")  # every request at 0, every one at 1, the first half at 0 and the rest at 1
BIG = [p for p in PROFILES if PROFILES[p].vram_gib >= 16]


def _mix(mix: str, batch: int) -> list[float]:
    return {"all0": [0.0] * batch, "all1": [1.0] * batch, "half": [0.0] * (batch // 2) + [1.0] * (batch - batch // 2)}[mix]


def _batch_cases():
    """(profile, batch, mix, kernel): over 8 requests a decode step is a prefill-shaped product, so both prefill
    kernels are measured there (the dequantize path would dequantize every weight at every token)."""
    from libortho.kernels import DECODE_MAX_ROWS, PREFILL_KERNELS

    return [pytest.param(p, b, mix, k, marks=getattr(pytest.mark, p), id=f"{p}-b{b}-{mix}-{k}")
            for p in BIG for b in BATCHES for mix in MIXES
            for k in (PREFILL_KERNELS if b > DECODE_MAX_ROWS else ("gemv",))]


def _decode_batch(benchmark, gpu_profile, copy_bandwidth, profile, variant: str, batch: int, alphas, kernel: str,
                  label: tuple):
    """Decode NEW_TOKENS for `batch` requests in one CUDA graph on the Llama-3-8B shape (`variant`: the libortho
    model, or int4mm-static); records tokens/s of the batch and per request under RESULTS[label]."""
    from libortho.decode import StaticDecoder, weight_bytes_per_token
    from libortho.kernels import PREFILL_KERNELS, set_prefill_kernel

    key = (profile, "llama3-8b", "libortho" if variant.startswith("alpha") else variant,
           0.01 if variant.startswith("alpha") else None)
    if _Slot.key != key:
        _Slot.get(None, lambda: None)
    torch.cuda.reset_peak_memory_stats()
    before = set_prefill_kernel(kernel if kernel in PREFILL_KERNELS else "dequant")  # gemv, tinygemm: unused
    with NvmlPoller() as poller:
        built = _Slot.get(key, lambda: _build("llama3-8b", variant, 0.01 if variant.startswith("alpha") else None))
        m = built["model"]
        if built.get("batch_decoder") is None or built["batch_decoder"].B != batch:
            built["batch_decoder"] = None  # one KV cache at a time (32 requests: 4 GiB)
            gc.collect()
            torch.cuda.empty_cache()
            built["batch_decoder"] = StaticDecoder(m, MAX_SEQ, batch=batch)
        dec = built["batch_decoder"]
        gen = torch.Generator("cuda").manual_seed(2)
        prompt = torch.randint(0, m.config.vocab_size, (batch, DECODE_PROMPT), device="cuda", generator=gen)
        prompt = prompt.to(dec.embed.device)

        def setup():
            if alphas is not None:
                dec.set_alphas(torch.tensor(alphas))
            dec.prepare()
            dec.prefill(prompt)
            torch.cuda.synchronize()

        def run():
            dec.decode(NEW_TOKENS)
            torch.cuda.synchronize()

        try:
            benchmark.pedantic(run, setup=setup, rounds=3, warmup_rounds=1, iterations=1)
        finally:
            dec._clear_hints()
            dec.graph = None  # the next kernel choice captures its own graph
            set_prefill_kernel(before)
        torch.cuda.synchronize()
    med = benchmark.stats.stats.median
    step_s = med / NEW_TOKENS
    on = alphas is not None and any(a != 0 for a in alphas)
    bpt = weight_bytes_per_token(m, on)  # weights are read once per step for the batch
    info = dict(test="batch_decode", model="llama3-8b", weights=built["label"], variant=variant, mix=label[3],
                kernel=kernel,
                engine="libortho-graph", batch=batch, alphas=alphas, density=0.01 if variant.startswith("alpha") else None,
                profile=profile, tokens_per_s=batch / step_s, tokens_per_s_per_request=1 / step_s,
                step_ms=step_s * 1e3, weight_bytes_per_step=bpt, gb_s=bpt / step_s / 1e9,
                roofline_fraction=bpt / step_s / copy_bandwidth, copy_bandwidth_gb_s=copy_bandwidth / 1e9,
                nvml_peak_gib=poller.peak_bytes / GIB, nvml_source=poller.source,
                max_reserved_gib=torch.cuda.max_memory_reserved() / GIB, cap=gpu_profile[1],
                device=torch.cuda.get_device_name(), date=now_utc())
    benchmark.extra_info.update(info)
    RESULTS[label] = info
    _dump()
    print(f"\n{variant} batch {batch} {kernel}: {info['tokens_per_s']:.1f} tok/s "
          f"({info['tokens_per_s_per_request']:.1f} per request), {info['roofline_fraction']:.0%} of the copy roofline")


@pytest.mark.parametrize("profile,batch,mix,kernel", _batch_cases())
def test_batch_decode_mixed_alpha(benchmark, gpu_profile, copy_bandwidth, profile, batch, mix, kernel):
    """`batch` requests decoded together by one CUDA graph, each at its own alpha (all 0, all 1, half and half), on
    the Llama-3-8B shape at 1% density."""
    _decode_batch(benchmark, gpu_profile, copy_bandwidth, profile, "alpha1", batch, _mix(mix, batch), kernel,
                  ("batch", profile, batch, mix, kernel))


@pytest.mark.parametrize("profile,batch", [pytest.param(p, b, marks=getattr(pytest.mark, p), id=f"{p}-b{b}")
                                           for p in BIG for b in BATCHES])
def test_batch_decode_int4mm(benchmark, gpu_profile, copy_bandwidth, profile, batch):
    """The engine-equal INT4 baseline at the same batches: libortho's INT4 base through tinygemm, same decoder."""
    _decode_batch(benchmark, gpu_profile, copy_bandwidth, profile, "int4mm-static", batch, None, "tinygemm",
                  ("batch", profile, batch, "int4mm", "tinygemm"))


@pytest.mark.parametrize("profile", [pytest.param(p, marks=getattr(pytest.mark, p)) for p in BIG])
def test_batch_mixed_alpha_targets(gpu_profile, profile):
    """Issue 17, acceptance 3, same run: at 8 and 32 requests, half at alpha 0 and half at 1, the batch decodes at
    least as fast as the INT4 baseline at that batch and within 10% of the all-alpha-0 batch (each with the faster
    of the measured kernels, named in the message). Fails on a mix that pays for the ortho stream in every row."""
    failures, seen = [], 0
    for b in (8, 32):
        runs = {k[3:]: v for k, v in RESULTS.items() if k[:3] == ("batch", profile, b)}
        best = lambda mix: max((v["tokens_per_s"], k[1]) for k, v in runs.items() if k[0] == mix)  # noqa: E731
        if not all(any(k[0] == mix for k in runs) for mix in ("half", "all0", "int4mm")):
            continue
        seen += 1
        half, all0, int4 = best("half"), best("all0"), best("int4mm")
        print(f"\nbatch {b}: half {half[0]:.1f} tok/s ({half[1]}), all0 {all0[0]:.1f} ({all0[1]}), int4mm {int4[0]:.1f}")
        if half[0] < int4[0] or half[0] < 0.9 * all0[0]:
            failures.append(f"batch {b}: half {half[0]:.1f} ({half[1]}) vs int4mm {int4[0]:.1f}, all0 {all0[0]:.1f}")
    if not seen:
        pytest.skip("run with test_batch_decode_mixed_alpha and test_batch_decode_int4mm of this profile, same session")
    assert not failures, failures
