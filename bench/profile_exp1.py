"""Where one Experiment 1 seed's time goes: each phase of `KillSwitch` timed on its own, at the acceptance size
(100 + 100 canaries, |R| 1,000 and 10,000) or a smaller one, so a seed can be planned to fit a device call.

    python -m bench.profile_exp1                                   # smollm2-135m, FULL, CUDA when there is one
    python -m bench.profile_exp1 --model /tmp/s135 --steps 10 --tf32 both --out $OUT
    python -m bench.profile_exp1 --model tiny --device cpu --canaries 10 --candidates 64 --steps 2 --out /tmp/p

Phases (each wall time, CUDA synchronized): the public model and data (`KillSwitch`), ortho-tuning (mask pass
and `--steps` training steps), full fine-tuning (`--steps`), LoRA (`--steps`); then, on the public model, one
evaluation at |R| = `--candidates` split into its parts (candidate scoring, membership-inference token
statistics, perplexity), and candidate scoring alone at the decisive |R|. A torch-profiler table of the top
operators of one scoring pass and one ortho-tuning step follows (CUDA time on a GPU). `--tf32 both` runs the
evaluation with TF32 matmuls off, then on (see the JSON's `max_abs_logp_diff_fp32_tf32`); training runs in the FULL
size's precision (TF32), as `kill_switch.run` trains on a GPU.

Writes profile_exp1.json under --out. Nothing is cached (a temporary LIBORTHO_CACHE), so every phase is computed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def _timed(out: dict, name: str, device: str):
    _sync(device)
    t0 = time.perf_counter()
    yield
    _sync(device)
    out[name] = round(time.perf_counter() - t0, 3)
    print(f"  {name}: {out[name]:.2f} s", flush=True)


def _top_ops(fn, device: str, n: int = 12) -> list[dict]:
    """The `n` operators with the most self time (CUDA time on a GPU) in one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    return [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1e3, 2)} for e in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_exp1", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="public model: smollm2-135m, tiny or a HF directory")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    p.add_argument("--canaries", type=int, default=None, help="trained canaries (and as many held out); default FULL")
    p.add_argument("--candidates", type=int, default=None, help="|R| of the evaluation; default FULL's 1,000")
    p.add_argument("--decisive", type=int, default=None, help="|R| of the decisive scoring; default FULL's 10,000")
    p.add_argument("--steps", type=int, default=10, help="training steps timed per trainer (FULL trains 100)")
    p.add_argument("--tf32", default="off", choices=("off", "on", "both"), help="TF32 matmuls in the evaluation")
    p.add_argument("--chunk", type=int, default=None, help="candidates per forward pass (default the size's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("LIBORTHO_RESULTS_DIR", "results/profile"))
    a = p.parse_args(argv)
    for k in ("canaries", "candidates", "decisive", "chunk"):
        v = getattr(a, k)
        if v is not None and v < 2:
            raise SystemExit(f"--{k} must be >= 2, got {v}")
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {a.steps}")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu)")
    os.makedirs(a.out, exist_ok=True)
    before = (os.environ.get("LIBORTHO_CACHE"), torch.get_float32_matmul_precision(),
              torch.are_deterministic_algorithms_enabled())
    tmp = tempfile.mkdtemp(prefix="profile_exp1_")
    os.environ["LIBORTHO_CACHE"] = tmp  # nothing read back: every phase computed
    try:
        return _profile(a, device)
    finally:  # the caller's cache and precision back (a pytest session goes on), the scratch cache gone
        if before[0] is None:
            os.environ.pop("LIBORTHO_CACHE", None)
        else:
            os.environ["LIBORTHO_CACHE"] = before[0]
        torch.set_float32_matmul_precision(before[1])
        torch.use_deterministic_algorithms(before[2])
        shutil.rmtree(tmp, ignore_errors=True)


def _profile(a, device: str) -> int:
    from libortho.experiments.kill_switch import FULL, KillSwitch
    from libortho.mia import token_stats
    from libortho.perplexity import perplexity
    from libortho.privacy import measure

    size = FULL
    n = a.candidates or size.n_candidates
    big = max(n, a.decisive or size.n_candidates_decisive)
    size = replace(size, num_canaries=a.canaries or size.num_canaries, num_holdout=a.canaries or size.num_holdout,
                   n_candidates=n, n_candidates_decisive=big, chunk=a.chunk or size.chunk,
                   finetune=replace(size.finetune, max_steps=a.steps, check_every=a.steps),
                   ortho=replace(size.ortho, max_steps=a.steps, check_every=a.steps),
                   lora=replace(size.lora, max_steps=a.steps, check_every=a.steps),
                   lr_grid={})  # one run per trainer: a phase's time is one training (FULL trains each lr of its grid)
    if device.startswith("cuda"):  # as `kill_switch.run` does on a GPU (training in the size's precision)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_float32_matmul_precision(size.matmul_precision)
    t: dict = {}
    print(f"profile_exp1: {a.model} on {device}, {size.num_canaries}+{size.num_holdout} canaries, |R| {n} / {big}, "
          f"{a.steps} training steps per trainer", flush=True)
    with _timed(t, "load public model and data", device):
        exp = KillSwitch(a.model, size, a.seed, device=device, progress=False, measure_cache=False)
    with _timed(t, f"ortho-tune (mask pass + {a.steps} steps)", device):
        ortho = exp.ortho_tuned()
    with _timed(t, f"full fine-tune ({a.steps} steps)", device):
        exp.fine_tuned()
    with _timed(t, f"LoRA ({a.steps} steps)", device):
        exp.lora()
    model = exp.public
    cands, cands_big = exp.candidates(n), exp.candidates(big)
    evals, lps = {}, {}
    for tf32 in ((False, True) if a.tf32 == "both" else (a.tf32 == "on",)):
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        e: dict = {}
        tag = "tf32" if tf32 else "fp32"
        print(f" evaluation, matmuls {tag}:", flush=True)
        with _timed(e, f"scoring |R| {n}", device):
            rep = measure(model, exp.tok, exp.canaries, n, exp.seed, size.chunk, exp.oom_events, candidates=cands,
                          extrapolate=False)
        lps[tag] = rep.logprobs
        with _timed(e, "membership token statistics", device):
            token_stats(model, exp.records(), events=exp.oom_events)
        with _timed(e, "perplexity", device):
            perplexity(model, exp.eval_ids, size.ppl)
        with _timed(e, "evaluate (all of it)", device):
            exp.evaluate(model, n)
        with _timed(e, f"scoring |R| {big}", device):
            measure(model, exp.tok, exp.canaries, big, exp.seed, size.chunk, exp.oom_events, candidates=cands_big,
                    extrapolate=False)
        evals[tag] = e
    torch.set_float32_matmul_precision(size.matmul_precision)
    diff = None
    if len(lps) == 2:
        diff = max(float(abs(x - y).max()) for x, y in zip(lps["fp32"], lps["tf32"]))
        print(f"  max |log p| difference fp32 vs tf32 over every candidate: {diff:.3g} nats")
    one = exp.canaries[:1]
    top_scoring = _top_ops(lambda: measure(model, exp.tok, one, n, exp.seed, size.chunk, candidates=cands[:1],
                                           extrapolate=False), device)
    loss_fn = exp._loss(size.ortho)
    from libortho.modules import ortho_modules

    ortho.train()
    params = [m.ortho_values.requires_grad_(True) for m in ortho_modules(ortho).values()]  # what ortho-tuning trains

    def step():
        loss = loss_fn(ortho, 0)
        loss.backward()
        for q in params:
            q.grad = None

    step()  # warm
    top_step = _top_ops(step, device)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # how many evaluations one seed runs (every arm at each of its alphas, the candidate's decisive ones)
    per_seed = {"evaluations_at_R": sum(len(size.alphas_for(arm)) for arm in size.arms), "decisive_scorings": 2,
                "trainers_steps": {"ortho": FULL.ortho.max_steps, "finetune": FULL.finetune.max_steps,
                                   "lora": FULL.lora.max_steps}}
    out = {"model": a.model, "device": device, "num_canaries": size.num_canaries, "n_candidates": n,
           "n_candidates_decisive": big, "chunk": size.chunk, "steps": a.steps, "phases": t, "evaluation": evals,
           "max_abs_logp_diff_fp32_tf32": diff, "top_ops_scoring_one_canary": top_scoring,
           "top_ops_ortho_step": top_step, "a_seed_runs": per_seed, "environment": env}
    path = os.path.join(a.out, "profile_exp1.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    for name, rows in (("scoring one canary", top_scoring), ("one ortho-tuning step", top_step)):
        print(f"\ntop operators, {name}:")
        for r in rows:
            print(f"  {r['self_ms']:9.2f} ms  {r['calls']:6d}  {r['op'][:70]}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
