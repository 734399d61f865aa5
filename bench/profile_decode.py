"""Where a decode token's time goes: a per-token breakdown from the PyTorch profiler, at alpha 1 and alpha 0.

    python -m bench.profile_decode                       # Llama-3-8B shape (shape_only), CUDA, 32 tokens
    python -m bench.profile_decode --model tiny --device cpu --tokens 4 --out /tmp/p
    python -m bench.profile_decode --fuse on             # only the fused decoder (default: both, unfused first)

`--fuse both` profiles each alpha with StaticDecoder(fuse=False) and then fuse=True (q|k|v and gate|up as one
GEMV each, labelled "qkv" and "gate_up"): the before and after of issue 17 side by side. `--fuse-elementwise both`
does the same for StaticDecoder(fuse_elementwise=...) (residual add + RMSNorm, SiLU * up, rotary + KV write as one
kernel each; columns marked "+ew"), e.g. `--fuse on --fuse-elementwise both`; `--fuse-attention` likewise for
StaticDecoder(fuse_attention=...) (a decode step's attention as one kernel; columns "+attn").

For each alpha, N decode steps run three ways:
- eager with profiler ranges (StaticDecoder(ranges=True)): every kernel is attributed, through the runtime or
  driver call that launched it, to the range it was launched in ("lo:q_proj", "lo:attention", ...); time per part
  is the sum of its kernels' durations (on CPU, where there are no kernels, the ranges' own durations);
- a CUDA graph replay (the real decoder), unprofiled: wall time per token, and profiled: kernels per token as
  the graph runs them (kernels in a graph cannot be attributed to ranges, hence the eager run);
- eager unprofiled: the eager wall time per token.

The roofline share is (weight bytes one token reads / copy bandwidth) / measured wall time per token, the copy
bandwidth measured in the same run with a large device-to-device copy. Writes profile_decode.json and
profile_decode.md under --out. With --batch B, a "token" is one decode step of B requests.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict

import torch

from libortho.decode import RANGES, StaticDecoder, table_on_device, weight_bytes_per_token

PROMPT = 16
WARMUP = 4
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
# kernel name -> group, first match wins (the by-kernel table; the by-part table attributes by launch range)
KERNEL_GROUPS = [("dual_gemv", r"_dual_gemv_kernel"), ("csr_ortho", r"_csr_"), ("dequant", r"_dequant_kernel"),
                 ("gemm_gemv_cublas", r"gemm|gemv|cutlass|xmma|cublas|sm\d+_"), ("softmax", r"softmax"),
                 ("norm", r"norm"), ("reduce", r"reduce"), ("copy", r"[Mm]emcpy|[Mm]emset|copy|index|cat"),
                 ("elementwise", r"elementwise|vectorized|unrolled")]


# -- models -------------------------------------------------------------------------------------------------

def build_model(name: str, density: float, device: str, dtype: torch.dtype):
    """A shape-only model (random packed weights with the real shapes): llama3-8b, smollm2-135m, or tiny (the
    tiny Llama's shape with a 2048-token vocabulary: a CPU check in seconds)."""
    from libortho import shape_only
    from libortho.plan import model_config

    if name in shape_only.CONFIGS:
        cfg = shape_only.CONFIGS[name]()
    elif name == "tiny":
        cfg = model_config("tiny").to_config()
        cfg.vocab_size = 2048
    else:
        raise ValueError(f"--model {name!r}: choose llama3-8b, smollm2-135m or tiny")
    return shape_only.build(cfg, density=density, dtype=dtype, device=device)


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, iters: int = 10) -> float:
    """Copy bandwidth in bytes/s (read + write counted) of one large copy on `device`: the memory roofline."""
    if device.type == "cuda":
        from bench.measure import measure_copy_bandwidth

        return measure_copy_bandwidth(nbytes, iters)
    a = torch.empty(nbytes // 2, dtype=torch.uint8).random_()
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2]


# -- trace parsing -----------------------------------------------------------------------------------------

def kernel_group(name: str) -> str:
    for group, pat in KERNEL_GROUPS:
        if re.search(pat, name):
            return group
    return "other"


def breakdown(trace: dict, steps: int, device_type: str, wall_s: float) -> dict:
    """Per-step time by part (range) and by kernel group from a Chrome trace of `steps` eager decode steps.

    CUDA: each kernel / memcpy / memset goes to the "lo:" range its launch call sat in (by correlation id and
    launch time); kernels launched outside any range are "other". CPU: each range's own duration; "other" is
    the wall time no range covers.
    Returns:
        dict with by_part_us, by_kernel_us, top_kernels, kernels_per_step, device_us_per_step (CUDA) or
        ops_per_step (CPU: top-level aten ops).
    """
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    ranges = sorted((e for e in ev if e.get("cat") == "user_annotation" and e["name"].startswith("lo:")),
                    key=lambda e: e["ts"])
    by_part = defaultdict(float)
    out = {}
    if device_type == "cuda":
        # ranges of every host thread together: the decoder launches from one thread, and the trace may name a
        # thread differently in its range and launch events
        keys = [r["ts"] for r in ranges]
        launch = {e["args"]["correlation"]: e for e in ev if e.get("cat") in LAUNCH_CATS
                  and "correlation" in e.get("args", {})}
        by_kernel, names = defaultdict(float), defaultdict(lambda: [0.0, 0])
        n_dev = 0
        for k in ev:
            if k.get("cat") not in DEVICE_CATS:
                continue
            n_dev += 1
            part = "other"
            call = launch.get(k.get("args", {}).get("correlation"))
            if call is not None:
                i = bisect.bisect_right(keys, call["ts"]) - 1
                if i >= 0 and call["ts"] <= ranges[i]["ts"] + ranges[i]["dur"]:
                    part = ranges[i]["name"][3:]
            by_part[part] += k["dur"]
            by_kernel[kernel_group(k["name"])] += k["dur"]
            names[k["name"]][0] += k["dur"]
            names[k["name"]][1] += 1
        out["by_kernel_us"] = {g: v / steps for g, v in sorted(by_kernel.items(), key=lambda kv: -kv[1])}
        out["top_kernels"] = [dict(name=n[:120], us_per_step=v[0] / steps, per_step=v[1] / steps)
                              for n, v in sorted(names.items(), key=lambda kv: -kv[1][0])[:12]]
        out["kernels_per_step"] = n_dev / steps
        out["device_us_per_step"] = sum(by_part.values()) / steps
    else:
        for r in ranges:
            by_part[r["name"][3:]] += r["dur"]
        by_part["other"] = max(0.0, wall_s * 1e6 - sum(by_part.values()))
        out["ops_per_step"] = _top_level_ops(ev) / steps
    out["by_part_us"] = {p: by_part.get(p, 0.0) / steps for p in (*RANGES, "other")}
    return out


def _top_level_ops(ev) -> int:
    """aten ops not nested in another aten op (what eager execution dispatches), counted over all threads."""
    n = 0
    for tid in {e["tid"] for e in ev}:
        ops = sorted((e for e in ev if e["tid"] == tid and e.get("cat") == "cpu_op" and e["name"].startswith("aten::")),
                     key=lambda e: (e["ts"], -e["dur"]))
        end = -1.0
        for e in ops:
            if e["ts"] >= end:
                n += 1
                end = e["ts"] + e["dur"]
    return n


def _trace(prof) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)


# -- runs --------------------------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _profiled(dec, prompt, steps: int, acts, device):
    """(profiler, seconds) of `steps` decode steps of `dec` after a prefill and WARMUP steps."""
    from torch.profiler import profile

    dec.prepare()
    try:
        dec.prefill(prompt)
        dec.decode(WARMUP)
        _sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            dec.decode(steps)
            _sync(device)
            seconds = time.perf_counter() - t0
    finally:
        dec._clear_hints()
    return prof, seconds


def _timed_decode(dec: StaticDecoder, prompt, steps: int) -> float:
    """Seconds per step of `steps` decode steps after a prefill and a warm-up."""
    dec.prepare()
    try:
        dec.prefill(prompt)
        dec.decode(WARMUP)
        _sync(dec.device)
        t0 = time.perf_counter()
        dec.decode(steps)
        _sync(dec.device)
        return (time.perf_counter() - t0) / steps
    finally:
        dec._clear_hints()


def profile_alpha(model, alpha: float, steps: int, batch: int, device: torch.device, dtype, bandwidth: float,
                  fuse: bool = False, fuse_elementwise: bool = False, fuse_attention: bool = False,
                  share: bool = True, embed_gather: str = "auto") -> dict:
    """The breakdown at one alpha (every OrthoLinear at `alpha`), with the decoder's fused projections or not, and
    its fused elementwise kernels or not."""
    from torch.profiler import ProfilerActivity, profile

    from libortho.modules import set_alpha

    set_alpha(model, alpha)
    max_seq = PROMPT + 3 * (WARMUP + steps) + 8
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=gen)
    prompt = prompt.to(model.model.embed_tokens.weight.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    labelled = StaticDecoder(model, max_seq, dtype, device, use_graph=False, batch=batch, ranges=True, fuse=fuse,
                             fuse_elementwise=fuse_elementwise, fuse_attention=fuse_attention, share=share,
                             embed_gather=embed_gather)
    eager_s = _timed_decode(labelled, prompt, steps)  # also compiles and tunes every kernel before profiling
    prof, profiled_s = _profiled(labelled, prompt, steps, acts, device)
    # where the decode step's embedding row comes from: the device's own table, or a host table read by the GPU
    # ("device") or copied through the host with a sync per token ("host")
    gather = "on device" if labelled.embed_on_device else ("device" if labelled.gather_on_device else "host")
    run = dict(alpha=alpha, fuse=labelled.fuse, share=share if labelled.fuse else None, embed_gather=gather,
               fuse_elementwise=fuse_elementwise, fuse_attention=fuse_attention, **breakdown(_trace(prof), steps, device.type, profiled_s))
    wall = dict(eager=eager_s * 1e6, eager_profiled=profiled_s / steps * 1e6, graph=None)
    graph_kernels = None
    del labelled
    if device.type == "cuda":
        dec = StaticDecoder(model, max_seq, dtype, device, batch=batch, fuse=fuse, fuse_elementwise=fuse_elementwise,
                            fuse_attention=fuse_attention, share=share, embed_gather=embed_gather)
        wall["graph"] = _timed_decode(dec, prompt, steps) * 1e6
        gprof, _ = _profiled(dec, prompt, steps, acts, device)
        n = sum(1 for e in _trace(gprof)["traceEvents"] if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS)
        graph_kernels = n / steps if n else None  # None: this profiler does not see kernels inside graphs
        del dec
    bpt = weight_bytes_per_token(model, alpha != 0)
    ideal_us = bpt / bandwidth * 1e6
    best = wall["graph"] if wall["graph"] is not None else wall["eager"]
    run.update(wall_us_per_step=wall, graph_kernels_per_step=graph_kernels, weight_bytes_per_step=bpt,
               roofline=dict(ideal_us=ideal_us, share=ideal_us / best,
                             measured_on="graph" if wall["graph"] is not None else "eager"),
               tokens_per_s=batch / (best / 1e6))
    return run


def profile_decode(model_name: str = "llama3-8b", device: str | None = None, steps: int = 32,
                   alphas=(1.0, 0.0), batch: int = 1, density: float = 0.01, out: str | None = None,
                   fuse=(False,), fuse_elementwise=(False,), fuse_attention=(False,), share=(True,),
                   embed_gather=("auto",)) -> dict:
    """Build the model, profile each alpha (for each of `fuse`: the decoder's fused projections off / on; within
    it each of `fuse_elementwise`, within that each of `fuse_attention`, of `share` for fused runs, and of
    `embed_gather`), write profile_decode.json / .md under
    `out` (if given).

    Returns:
        the JSON record (model, device, copy bandwidth, one entry per alpha in "runs").
    """
    from bench.measure import now_utc

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU here; use --device cpu (with --model tiny)")
    if steps < 1 or batch < 1:
        raise ValueError(f"--tokens and --batch must be >= 1, got {steps} and {batch}")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # decode ops are tiny: one thread, no OpenMP waits on a busy machine (30x under load)
        torch.set_num_threads(1)
    try:
        model = build_model(model_name, density, str(dev), dtype)
        bw = copy_bandwidth(dev)
        if len(embed_gather) > 1 and table_on_device(model.model.embed_tokens.weight, dev):
            print("profile_decode: the embedding table is on the device; --embed-gather has nothing to compare, one "
                  "run", file=sys.stderr)
            embed_gather = embed_gather[:1]
        runs = [profile_alpha(model, float(a), steps, batch, dev, dtype, bw, f, fe, fa, sh, g)
                for f in fuse for fe in fuse_elementwise for fa in fuse_attention
                for sh in (share if f else (True,)) for g in embed_gather for a in alphas]
    finally:
        torch.set_num_threads(threads)
    rec = dict(model=model_name, weights="shape_only", density=density, dtype=str(dtype).removeprefix("torch."),
               device=dev.type, device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               batch=batch, steps=steps, torch=torch.__version__, cpu_threads=1 if dev.type == "cpu" else None,
               copy_bandwidth_gb_s=bw / 1e9, date=now_utc(), runs=runs)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "profile_decode.json"), "w") as f:
            json.dump(rec, f, indent=1)
        with open(os.path.join(out, "profile_decode.md"), "w") as f:
            f.write(markdown(rec))
    return rec


def _label(r: dict, fused_any: bool, ew_any: bool = False, attn_any: bool = False) -> str:
    """A run's column name: "alpha 1", or "alpha 1 fused" / "alpha 1 unfused" where the record holds fused runs,
    with " +ew" / " -ew" where it holds runs with fused elementwise kernels, " +attn" / " -attn" likewise."""
    return f"alpha {r['alpha']:g}" + ((" fused" if r.get("fuse") else " unfused") if fused_any else "") + \
        ((" +ew" if r.get("fuse_elementwise") else " -ew") if ew_any else "") + \
        ((" +attn" if r.get("fuse_attention") else " -attn") if attn_any else "") + \
        (" copy" if r.get("share") is False else "") + \
        (" host-row" if r.get("embed_gather") == "host" else "")  # the row through the host, a sync per token


def markdown(rec: dict) -> str:
    """The breakdown as markdown tables: time per part and per kernel group, per token, one column per run (alpha,
    and fused or not)."""
    runs = rec["runs"]
    fa = any(r.get("fuse") for r in runs)
    ew = any(r.get("fuse_elementwise") for r in runs)
    at = any(r.get("fuse_attention") for r in runs)
    unit = "kernel time" if rec["device"] == "cuda" else "CPU time in each range"
    lines = [f"# Decode per token: {rec['model']} ({rec['weights']}, density {rec['density']:g}, {rec['dtype']}, "
             f"batch {rec['batch']}) on {rec['device_name']}", "",
             f"{rec['steps']} steps per alpha, torch {rec['torch']}, {rec['date']}; copy bandwidth "
             f"{rec['copy_bandwidth_gb_s']:.1f} GB/s. Parts: {unit} per token (eager run with profiler ranges).", ""]
    head = "| part | " + " | ".join(f"{_label(r, fa, ew, at)} (us)" for r in runs) + " | " + \
           " | ".join(f"{_label(r, fa, ew, at)} share" for r in runs) + " |"
    lines += [head, "|" + "---|" * (1 + 2 * len(runs))]
    tot = [sum(r["by_part_us"].values()) or 1.0 for r in runs]
    for p in runs[0]["by_part_us"]:
        vals = [r["by_part_us"][p] for r in runs]
        lines.append(f"| {p} | " + " | ".join(f"{v:.1f}" for v in vals) + " | " +
                     " | ".join(f"{v / t:.1%}" for v, t in zip(vals, tot)) + " |")
    lines.append("| **sum** | " + " | ".join(f"**{t:.1f}**" for t in tot) + " |" + " |" * len(runs))
    if rec["device"] == "cuda":
        lines += ["", "| kernel group | " + " | ".join(f"{_label(r, fa, ew, at)} (us)" for r in runs) + " |",
                  "|" + "---|" * (1 + len(runs))]
        for g in dict.fromkeys(k for r in runs for k in r["by_kernel_us"]):
            lines.append(f"| {g} | " + " | ".join(f"{r['by_kernel_us'].get(g, 0.0):.1f}" for r in runs) + " |")
    def fmt(v, spec=".1f"):
        return "n/a" if v is None else format(v, spec)

    lines += ["", "| per token | " + " | ".join(_label(r, fa, ew, at) for r in runs) + " |",
              "|" + "---|" * (1 + len(runs))]
    rows = [("wall, CUDA graph (us)", lambda r: fmt(r["wall_us_per_step"]["graph"])),
            ("wall, eager (us)", lambda r: fmt(r["wall_us_per_step"]["eager"])),
            ("wall, eager under the profiler (us)", lambda r: fmt(r["wall_us_per_step"]["eager_profiled"])),
            ("kernels (eager)" if rec["device"] == "cuda" else "top-level aten ops (eager)",
             lambda r: fmt(r.get("kernels_per_step", r.get("ops_per_step")), ".0f")),
            ("kernels (graph replay)", lambda r: fmt(r["graph_kernels_per_step"], ".0f")),
            ("weight bytes read (MB)", lambda r: f"{r['weight_bytes_per_step'] / 1e6:.1f}"),
            ("copy-roofline time (us)", lambda r: f"{r['roofline']['ideal_us']:.1f}"),
            ("share of copy roofline", lambda r: f"{r['roofline']['share']:.1%} ({r['roofline']['measured_on']})"),
            ("tokens/s", lambda r: f"{r['tokens_per_s']:.1f}")]
    for name, f in rows:
        lines.append(f"| {name} | " + " | ".join(f(r) for r in runs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3-8b", help="llama3-8b | smollm2-135m | tiny (shape_only weights)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps profiled per alpha")
    p.add_argument("--alphas", default="1,0", help="comma-separated alphas, one run each")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--fuse", default="both", choices=("off", "on", "both"),
                   help="the decoder's fused q|k|v and gate|up: off, on, or both (unfused runs first)")
    p.add_argument("--fuse-elementwise", default="on", choices=("off", "on", "both"),
                   help="the decoder's fused add+RMSNorm, SiLU*up and rotary+KV-write kernels (its default: on)")
    p.add_argument("--fuse-attention", default="on", choices=("off", "on", "both"),
                   help="the decoder's fused decode attention (its default: on)")
    p.add_argument("--share", default="on", choices=("off", "on", "both"),
                   help="fused runs: the parts as views of their fused copy (the decoder's default: on), a second "
                        "copy (off), or both")
    p.add_argument("--embed-gather", default="auto", choices=("auto", "device", "host", "both"),
                   help="a host embedding table's row per token: read by the GPU from pinned memory (device), "
                        "through the host with a sync (host), the decoder's choice (auto), or device then host")
    p.add_argument("--out", default=os.environ.get("LIBORTHO_RESULTS_DIR", "results/profile"))
    a = p.parse_args(argv)
    try:
        alphas = [float(x) for x in a.alphas.split(",") if x.strip()]
    except ValueError:
        p.error(f"--alphas {a.alphas!r}: give numbers separated by commas, e.g. 1,0")
    fuse = {"off": (False,), "on": (True,), "both": (False, True)}[a.fuse]
    fe = {"off": (False,), "on": (True,), "both": (False, True)}[a.fuse_elementwise]
    fa = {"off": (False,), "on": (True,), "both": (False, True)}[a.fuse_attention]
    sh = {"off": (False,), "on": (True,), "both": (True, False)}[a.share]
    eg = ("device", "host") if a.embed_gather == "both" else (a.embed_gather,)
    rec = profile_decode(a.model, a.device, a.tokens, alphas, a.batch, a.density, a.out, fuse, fe, fa, sh, eg)
    print(markdown(rec))
    print(f"wrote {os.path.join(a.out, 'profile_decode.json')} and profile_decode.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
