"""python -m libortho {run, check-gpu, plan}: the user's front door."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """A problem with what the user asked for: one line, exit code 2, no traceback."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="libortho", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
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


def cmd_run(a) -> int:
    from .experiments import RunContext, load_all
    from .results import environment, results_path, write_json

    _check_run_args(a)
    experiments = load_all()
    wanted = list(experiments) if a.experiment == "all" else [{"1": "kill_switch", "2": "null_test"}.get(
        a.experiment, a.experiment)]
    missing = [w for w in wanted if w not in experiments]
    if missing:
        raise UsageError(f"experiment {missing[0]} is not available in this version")
    ctx = RunContext(model=a.model, output_dir=a.output_dir, seed=a.seed, device=a.device, text=a.text,
                     profile=a.profile, num_canaries=a.num_canaries, canary_format=a.canary_format,
                     quantization_bits=a.quantization_bits, no_quantization=a.no_quantization,
                     progress=not a.no_progress)
    path = results_path(a.output_dir, a.profile)
    payload = {"environment": environment(a.device), "args": {k: str(v) for k, v in vars(a).items()}}
    for name in wanted:
        payload[name if name != "kill_switch" else "exp1_kill_switch"] = experiments[name](ctx)
        payload["run_facts"] = ctx.extra
        write_json(path, payload)  # after each experiment: nothing lost if a later one fails
    print(f"\nresults: {path}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"run": cmd_run}[args.command](args)
    except UsageError as e:
        print(f"libortho: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"libortho: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
