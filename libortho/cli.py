"""python -m libortho {run, check-gpu, plan}: the user's front door."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """A problem with what the user asked for: one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="libortho", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("check-gpu", help="GPU name, memory, capabilities and which profiles it can emulate")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    pl = sub.add_parser("plan", help="memory needed per precision, from the model's config alone")
    pl.add_argument("--model", required=True)
    pl.add_argument("--profile", default="gtx4050", help="GPU profile from markers.ini")
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--density", type=float, default=0.01)
    r = sub.add_parser("run", help="run experiments and write a results JSON and plots")
    r.add_argument("--experiment", default="all", choices=["convert", "1", "2", "all"],
                   help="convert: conversion demo; 1: kill switch; 2: null test; all: every one")
    r.add_argument("--model", default="smollm2-135m",
                   help="HF id, local directory, .gguf file, smollm2-135m (embedded default) or tiny")
    r.add_argument("--quantization-bits", type=int, choices=[4, 8], default=4)
    r.add_argument("--no-quantization", action="store_true", help="load the model in full precision")
    r.add_argument("--profile", default=None, help="GPU profile from markers.ini (e.g. gtx4050)")
    r.add_argument("--output-dir", type=Path, default=Path("out"))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--num-canaries", type=int, default=None)
    r.add_argument("--canary-format", choices=["plain", "chat"], default="plain")
    r.add_argument("--text", default="default", help="evaluation text: default, wikitext, or a file path")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--size", choices=["auto", "quick", "full"], default="auto",
                   help="experiment size: full = the acceptance size (hours on a CPU), quick = the small size; "
                        "auto = full on a GPU, quick on a CPU")
    r.add_argument("--no-progress", action="store_true")
    return p


def _check_run_args(a) -> None:
    if a.text not in ("default", "wikitext"):
        path = Path(a.text)
        if not path.is_file():
            raise UsageError(f"--text {a.text}: no such file")
        try:
            path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--text {a.text}: cannot read as UTF-8 text ({e.__class__.__name__})")
    if a.num_canaries is not None and a.num_canaries <= 0:
        raise UsageError(f"--num-canaries must be positive, got {a.num_canaries}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible (run `python -m libortho check-gpu`)")
    m = a.model
    if m not in ("smollm2-135m", "tiny") and not Path(m).exists() and ("/" not in m or m.startswith(("/", "."))):
        raise UsageError(f"--model {m}: not a file, a directory, a Hugging Face id (org/name), smollm2-135m or tiny")


def _profile_budget(name: str) -> float:
    from .gpu import profiles

    known = profiles()
    if name not in known:
        raise UsageError(f"--profile {name}: unknown; markers.ini has {', '.join(known)}")
    return known[name].vram_gib


def cmd_plan(a) -> int:
    from .config import validate_density
    from .plan import decide, model_config, plan_all

    if a.seq_len <= 0:
        raise UsageError(f"--seq-len must be positive, got {a.seq_len}")
    validate_density(a.density)
    budget = _profile_budget(a.profile)
    plans = plan_all(model_config(a.model), a.seq_len, a.density)
    print(f"{a.model} on {a.profile} ({budget:g} GiB), seq_len {a.seq_len}, batch 1")
    print(f"{'precision':<10}{'weights':>9}{'embed':>8}{'head':>8}{'kv':>8}{'context':>9}{'total':>9}  fits")
    for p in plans.values():
        print(f"{p.precision:<10}{p.weights_gib:>9.2f}{p.embeddings_gib:>8.2f}{p.head_gib:>8.2f}{p.kv_cache_gib:>8.2f}"
              f"{p.context_gib:>9.2f}{p.total_gib:>9.2f}  {'yes' if p.total_gib <= budget else 'no'}")
    d = decide(plans, budget)
    if d.precision is None:
        raise UsageError(f"{a.model} on {a.profile}: {d.message}")
    print(("4-bit required: " if d.auto_4bit else "") + d.message)
    return 0


def cmd_check_gpu(a) -> int:
    import json

    from .gpu import check_gpu

    report = check_gpu()
    if a.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for k, v in report.items():
            print(f"{k:>22}: {v}")
    return 0


def _apply_policy(a, ctx_extra: dict) -> None:
    """Before anything loads: under 8 GB a large model goes 4-bit; one that never fits is refused."""
    if not a.profile:
        return
    from .plan import decide, model_config, plan_all

    budget = _profile_budget(a.profile)
    requested = "fp16" if a.no_quantization else {4: "int4", 8: "int8"}[a.quantization_bits]
    d = decide(plan_all(model_config(a.model)), budget, requested)
    if d.precision is None:
        raise UsageError(f"{a.model} on {a.profile}: {d.message}")
    ctx_extra["memory_policy"] = {"profile": a.profile, "budget_gib": budget, "requested": requested,
                                  "precision": d.precision, "auto_4bit": d.auto_4bit, "reason": d.message}


def cmd_run(a) -> int:
    from .experiments import RunContext, load_all
    from .results import environment, results_path, write_json

    _check_run_args(a)
    facts: dict = {}
    _apply_policy(a, facts)
    experiments = load_all()
    wanted = list(experiments) if a.experiment == "all" else [{"1": "kill_switch", "2": "null_test"}.get(
        a.experiment, a.experiment)]
    missing = [w for w in wanted if w not in experiments]
    if missing:
        raise UsageError(f"experiment {missing[0]} is not available in this version")
    ctx = RunContext(model=a.model, output_dir=a.output_dir, seed=a.seed, device=a.device, text=a.text,
                     profile=a.profile, num_canaries=a.num_canaries, canary_format=a.canary_format,
                     quantization_bits=a.quantization_bits, no_quantization=a.no_quantization,
                     progress=not a.no_progress, size=a.size, extra=facts)
    path = results_path(a.output_dir, a.profile)
    payload = {"environment": environment(a.device), "args": {k: str(v) for k, v in vars(a).items()}}
    keys = {"kill_switch": "exp1_kill_switch", "null_test": "exp2_null_test"}
    for name in wanted:
        payload[keys.get(name, name)] = experiments[name](ctx)
        payload["run_facts"] = ctx.extra
        write_json(path, payload)  # after each experiment: nothing lost if a later one fails
    print(f"\nresults: {path}")
    return 0


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        return {"run": cmd_run, "plan": cmd_plan, "check-gpu": cmd_check_gpu}[args.command](args)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"libortho: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
