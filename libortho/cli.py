"""python -m libortho {run, check-gpu, plan}: the user's front door.

Exit codes: 0 done; 1 an experiment failed (what finished is saved, status "failed: ...") or a claim it decides
did not hold (status "complete", the claims in "claims_failed"); 2 bad input (one line on stderr, checked
before any computation); 3 out of memory (saved, status "failed: out of memory in
<step> (peak X GiB)"); 130 interrupted by Ctrl-C (saved, status "interrupted").
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import traceback
from pathlib import Path

SEED_MAX = 2**32 - 1  # every seeded path accepts it (numpy's legacy seed, train's per-step seed * 1_000_003 + step)
SECTION_KEYS = {"kill_switch": "exp1_kill_switch", "null_test": "exp2_null_test", "secrets": "exp1_secrets",
                "utility": "exp1_utility"}
EXPERIMENT_NAMES = {"1": "kill_switch", "2": "null_test"}


class UsageError(Exception):
    """A problem with what the user asked for: one line, exit code 2, no traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        raise UsageError(message)


def _seed(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if not 0 <= n <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{n} is out of range: a seed is an integer from 0 to 2**32-1 ({SEED_MAX})")
    return n


def _path(value: str) -> Path:
    """A path flag's value; an empty one (Path("") is the current directory) is refused."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty path")
    return Path(value)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="libortho", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("check-gpu", help="GPU name, memory, capabilities and which profiles it can emulate")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    pl = sub.add_parser("plan", help="memory needed per precision, from the model's config alone")
    pl.add_argument("--model", required=True)
    pl.add_argument("--profile", default="gtx4050", help="GPU profile from libortho/markers.ini")
    pl.add_argument("--seq-len", type=int, default=2048)
    pl.add_argument("--density", type=float, default=0.01)
    r = sub.add_parser("run", help="run experiments and write a results JSON and plots",
                       description="Run experiments; write <output-dir>/<profile|cpu>_results_<time>_<pid>.json "
                                   "(status complete | interrupted | failed: ...) and the plots named after it.")
    r.add_argument("--experiment", default="all", choices=["convert", "1", "2", "secrets", "utility", "all"],
                   help="convert: conversion demo; 1: kill switch; 2: null test; secrets: Exp 1's insertion-frequency "
                        "curve and PII records with paraphrased probes; utility: private-domain fine-tuning, ours vs "
                        "LoRA matched on parameters and on bytes vs full; all: convert, 1 and 2")
    r.add_argument("--model", default="smollm2-135m",
                   help="HF id, local directory, .gguf file, smollm2-135m (embedded default) or tiny")
    q = r.add_mutually_exclusive_group()
    q.add_argument("--quantization-bits", type=int, choices=[4, 8], default=None,
                   help="load the model in 4-bit (NF4) or 8-bit (bitsandbytes); with --profile it must fit the "
                        "budget; default: as stored, or what --profile's policy picks")
    q.add_argument("--no-quantization", action="store_true",
                   help="load the model as stored (full precision); with --profile it must fit the budget")
    r.add_argument("--profile", default=None,
                   help="GPU profile from libortho/markers.ini (e.g. gtx4050): pick the load precision for its "
                        "budget, cap the allocator to it, measure the peak")
    r.add_argument("--output-dir", type=Path, default=Path("out"))
    r.add_argument("--seed", type=_seed, default=0, help="0 to 2**32-1 (default 0)")
    r.add_argument("--num-canaries", type=int, default=None)
    r.add_argument("--canary-format", choices=["plain", "chat"], default="plain")
    r.add_argument("--candidate", default=None,
                   help="experiment 1: the arm tested as the kill switch (default ortho_tuned); its claims decide "
                        "the exit code (a negative control such as delta or int4_of_fine_tuned exits 1)")
    r.add_argument("--text", default="default",
                   help="evaluation text: default (the Jargon File, Debian jargon-text), wikitext (WikiText-2 test; "
                        "when the hub does not answer within 3 s the run says so and uses the default text), or a "
                        "UTF-8 text file")
    r.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    r.add_argument("--size", choices=["auto", "quick", "full"], default="auto",
                   help="experiment size: full = the acceptance size (hours on a CPU), quick = the small size; "
                        "auto = full on a GPU, quick on a CPU")
    r.add_argument("--full-finetune", action="store_true",
                   help="experiment 1 on a checkpoint too large for the device: also fully fine-tune it (AdamW, ~16 "
                        "bytes a parameter) where the budget holds that; otherwise the run stops with exit 3 naming the "
                        "planned memory before experiment 1 builds anything (earlier steps stay saved)")
    r.add_argument("--no-progress", action="store_true")
    f = sub.add_parser("finetune", help="ortho-tune a model on your chat records (JSONL); resumable",
                       description="Train only a sparse ortho stream over INT4 of the model's weights on chat records "
                                   "(one JSON object a line: {\"messages\": [...]} or alpaca instruction/input/output). "
                                   "OUTPUT becomes a libortho checkpoint; the same command resumes an interrupted run.")
    f.add_argument("--model", required=True, help="local checkpoint directory (read layer by layer), HF id, "
                                                  "smollm2-135m or tiny")
    f.add_argument("--data", required=True, type=_path, help="JSONL file of chat records")
    f.add_argument("--output", required=True, type=_path, help="directory for the checkpoint (and the run's state)")
    f.add_argument("--density", type=float, default=0.01, help="share of each weight in the trained stream")
    f.add_argument("--group-size", type=int, default=64)
    f.add_argument("--asymmetric", action="store_true", help="asymmetric INT4 grid (default symmetric)")
    b = f.add_mutually_exclusive_group()
    b.add_argument("--steps", type=int, default=None)
    b.add_argument("--epochs", type=float, default=None, help="default: 1 epoch")
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch-size", type=int, default=1)
    f.add_argument("--max-length", type=int, default=512, help="records are cut to this many tokens")
    f.add_argument("--score", choices=["saliency_hessian", "saliency", "random"], default="saliency_hessian")
    f.add_argument("--checkpoint-every", type=int, default=10, help="steps between resumable states (0: none)")
    f.add_argument("--seed", type=_seed, default=0)
    f.add_argument("--profile", default=None, help="GPU profile: cap the allocator to its budget, measure the peak")
    f.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    f.add_argument("--no-progress", action="store_true")
    gen = sub.add_parser("generate", help="generate from a libortho checkpoint at a chosen alpha")
    gen.add_argument("--model", required=True, type=_path, help="a libortho checkpoint directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--alpha", type=float, default=1.0, help="1: as fine-tuned; 0: the kill switch (the ortho file "
                                                              "is then not even read)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--no-chat", action="store_true", help="feed the prompt as plain text, not as a user turn")
    gen.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    return p


def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


# -- plan ----------------------------------------------------------------------------------------------------

def _is_libortho_checkpoint(d: Path) -> bool:
    """Whether `d`'s config.json names libortho as its quantization method (a checkpoint this tool wrote)."""
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "libortho"


def _profile(name: str):
    from .gpu import profiles

    known = profiles()
    if name not in known:
        raise UsageError(f"--profile {name}: unknown; libortho/markers.ini has {', '.join(known)}")
    return known[name]


def _model_config(model: str):
    from .plan import model_config

    try:
        return model_config(model)
    except (OSError, ValueError) as e:  # a broken or unknown config: one line
        raise UsageError(f"--model {model}: {_one_line(e)}") from None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns as wide as their widest cell (the first left-aligned)."""
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)).rstrip()
            for r in [header, *rows]]


def cmd_plan(a) -> int:
    from .config import validate_density
    from .plan import decide, plan_all

    if a.seq_len <= 0:
        raise UsageError(f"--seq-len must be positive, got {a.seq_len}")
    validate_density(a.density)
    budget = _profile(a.profile).vram_gib
    plans = plan_all(_model_config(a.model), a.seq_len, a.density)
    print(f"{a.model} on {a.profile} ({budget:g} GiB), seq_len {a.seq_len}, batch 1 (GiB)")
    rows = [[p.precision, *(f"{x:.2f}" for x in (p.weights_gib, p.embeddings_gib, p.head_gib, p.kv_cache_gib,
                                                 p.context_gib, p.total_gib)),
             "yes" if p.total_gib <= budget else "no"] for p in plans.values()]
    for line in _table(["precision", "weights", "embed", "head", "kv", "context", "total", "fits"], rows):
        print(line)
    d = decide(plans, budget, seq_len=a.seq_len)
    if d.precision is None:
        raise UsageError(f"{a.model} on {a.profile}: {d.message}")
    print(("4-bit required: " if d.auto_4bit else "") + d.message)
    how = "as stored (the fp16 row)" if d.precision == "fp16" else f"in {d.precision} (chosen by the policy)"
    print(f"decision: `run --profile {a.profile}` loads this model {how}; fits: {', '.join(d.fitting)}")
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


# -- run: everything checked before any computation --------------------------------------------------------

def _requested(a) -> str:
    if a.no_quantization:
        return "fp16"
    return {None: "auto", 4: "int4", 8: "int8"}[a.quantization_bits]


def _memory_policy(a, profile, config) -> dict:
    """The load precision this run applies: the profile's policy, or the flag as given without a profile."""
    requested = _requested(a)
    if profile is None:
        prec = {"auto": "full", "fp16": "full"}.get(requested, requested)
        return {"profile": None, "budget_gib": None, "requested": requested, "precision": prec, "automatic": False,
                "reason": "no --profile: no budget checked; " + ("loaded as stored" if prec == "full" else
                                                                  f"loaded in {prec} as --quantization-bits asks")}
    from .plan import decide, plan_all

    plans = plan_all(config)
    d = decide(plans, profile.vram_gib, requested)
    if d.precision is None:
        raise UsageError(f"{a.model} on {profile.name}: {d.message}")
    return {"profile": profile.name, "budget_gib": profile.vram_gib, "requested": requested,
            "precision": "full" if d.precision == "fp16" else d.precision, "automatic": d.automatic,
            "planned_gib": round(plans[d.precision].total_gib, 3), "reason": d.message}


def _text(a, facts: dict) -> str:
    """The text the run reads (checked now); `wikitext` falls back to the default when the hub does not answer."""
    from . import data

    for what, path in (("evaluation", data.JARGON), ("calibration", data.FORTUNES)):
        if not path.exists():  # every experiment calibrates on fortunes; the default evaluates on jargon
            if what == "evaluation" and a.text != "default":
                continue
            raise UsageError(f"the {what} text {path} is missing; {data.INSTALL_HINT}")
    if a.text == "wikitext":
        from .hub import hub_unreachable

        reason = hub_unreachable()
        if reason:
            print(f"libortho: note: --text wikitext: WikiText-2 is on the Hugging Face hub, which is unreachable "
                  f"({reason}); using the default text (the Jargon File) instead", file=sys.stderr)
            facts["text"] = {"requested": "wikitext", "used": "default", "fallback": reason}
            return "default"
    elif a.text != "default":
        try:
            data.load_text(a.text)  # the same checks the experiments' read makes, now, in one line
        except (OSError, ValueError) as e:
            raise UsageError(f"--text {a.text}: {_one_line(e)}") from None
    facts["text"] = {"requested": a.text, "used": a.text}
    return a.text


class _Run:
    """What `prepare` checked and decided; `execute` runs it."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def prepare(a) -> _Run:
    """Check everything the run needs and reserve its results file; raise UsageError (one line) otherwise.

    The checks that need no torch / transformers come first (bad input answers in about a second); the results
    file reserved on the way is removed again when a later check fails."""
    from . import models
    from .experiments import ORDER
    from .plan import ALIASES, KNOWN_CONFIGS, LlamaShape
    from .results import reserve_results_path

    from .config import MAX_CANARIES

    # as many never-trained canaries are drawn beside them (membership inference), from one user id each
    if a.num_canaries is not None and not 2 <= a.num_canaries <= MAX_CANARIES // 2:
        raise UsageError(f"--num-canaries must be in [2, {MAX_CANARIES // 2}] (as many held-out canaries are drawn "
                         f"beside them, {MAX_CANARIES} user ids in all), got {a.num_canaries}")
    profile = _profile(a.profile) if a.profile is not None else None
    facts: dict = {}
    text = _text(a, facts)
    wanted = list(ORDER) if a.experiment == "all" else [EXPERIMENT_NAMES.get(a.experiment, a.experiment)]
    if a.candidate is not None and "kill_switch" not in wanted:
        raise UsageError(f"--candidate {a.candidate}: applies to experiment 1 (--experiment 1 or all)")
    if getattr(a, "full_finetune", False):
        if "kill_switch" not in wanted:
            raise UsageError("--full-finetune: applies to experiment 1 (--experiment 1 or all)")
        facts["full_finetune"] = True  # experiment 1 reads it from ctx.extra
    key = ALIASES.get(a.model, a.model)
    known = LlamaShape(**KNOWN_CONFIGS[key]) if key in KNOWN_CONFIGS else None
    try:
        if known is not None:  # a model too large for the budget is refused before anything is downloaded
            facts["memory_policy"] = _memory_policy(a, profile, known)
        src = models.resolve(a.model)
        if src.kind == "dir" and _is_libortho_checkpoint(Path(a.model)):
            raise UsageError(f"--model {a.model} is a libortho checkpoint (INT4 base + stream): the experiments start "
                             "from the model it was built from; `libortho generate` runs the checkpoint itself")
        if known is None:
            facts["memory_policy"] = _memory_policy(a, profile, _model_config(a.model) if profile else None)
        models.check_bits(src.kind, {"int4": 4, "int8": 8}.get(facts["memory_policy"]["precision"]), a.model)
        facts["model"] = models.model_facts(src)
    except (OSError, ValueError) as e:
        raise UsageError(_one_line(e)) from None
    try:
        path = reserve_results_path(a.output_dir, a.profile)
    except OSError as e:
        raise UsageError(_one_line(e)) from None
    try:  # the checks that need torch and the experiments' code
        import torch

        from .experiments import load_all
        from .gpu import BudgetMeter

        if a.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible (run `python -m libortho check-gpu`)")
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        experiments = load_all()
        missing = [w for w in wanted if w not in experiments]
        if missing:
            raise UsageError(f"experiment {missing[0]} is not available in this version")
        if a.candidate is not None:
            from .experiments.kill_switch import CANDIDATES

            if a.candidate not in CANDIDATES:
                raise UsageError(f"--candidate {a.candidate}: not a candidate arm; choose from "
                                 f"{', '.join(CANDIDATES)}")
            facts["candidate"] = a.candidate  # experiment 1 reads it from ctx.extra
        try:
            meter = BudgetMeter(profile, device).start()  # caps the allocator now: a GPU too small is refused here
        except ValueError as e:
            raise UsageError(f"--profile {a.profile}: {_one_line(e)}") from None
    except BaseException:
        path.unlink(missing_ok=True)  # bad input leaves no file behind
        raise
    return _Run(args=a, device=device, text=text, facts=facts, experiments=experiments, wanted=wanted, meter=meter,
                path=path)


# -- run: execution, nothing lost ------------------------------------------------------------------------------

def _verdicts(d: dict, prefix: str = "") -> list[tuple[str, bool]]:
    """Boolean leaves of an acceptance / claims dict (thresholds left out)."""
    out = []
    for k, v in d.items():
        if k == "thresholds":
            continue
        if isinstance(v, bool):
            out.append((prefix + str(k), v))
        elif isinstance(v, dict):
            out += _verdicts(v, f"{prefix}{k}.")
    return out


def summary_line(key: str, section: dict) -> str | None:
    """One line per experiment from its "claims" or "acceptance" block: how many checks hold, which do not."""
    for block in ("claims", "acceptance"):
        if isinstance(section, dict) and isinstance(section.get(block), list):  # [{"name", "passed", ...}]
            v = [(c["name"], bool(c["passed"])) for c in section[block]]
        elif isinstance(section, dict) and isinstance(section.get(block), dict):
            v = _verdicts(section[block])
        else:
            continue
        if not v:
            return None
        failed = [n for n, ok in v if not ok]
        return (f"{key} {block}: {len(v) - len(failed)} of {len(v)} met"
                + (f"; not met: {', '.join(failed)}" if failed else ""))
    return None


def claims_failed(payload: dict) -> list[str]:
    """"<section>.<claim>" of every claim a section's "claims" block decides and that did not hold."""
    out = []
    for key, section in payload.items():
        if not isinstance(section, dict):
            continue
        claims = section.get("claims")
        if isinstance(claims, list):
            out += [f"{key}.{c['name']}" for c in claims if not c.get("passed")]
        elif isinstance(claims, dict):
            out += [f"{key}.{n}" for n, ok in _verdicts(claims) if not ok]
    return out


def _save(path: Path, payload: dict) -> None:
    """Write the JSON atomically with Ctrl-C held off, so a second Ctrl-C cannot lose the first one's save."""
    from .results import write_json

    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
    try:
        write_json(path, payload)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _terminated(signum, frame):
    """SIGTERM (a scheduler, `kill`) ends the run like Ctrl-C: what finished is saved, status "interrupted"."""
    raise KeyboardInterrupt


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def execute(run: _Run) -> int:
    from . import models
    from .experiments import RunContext
    from .oom import is_oom
    from .results import environment

    a, facts, path = run.args, run.facts, run.path
    ctx = RunContext(model=a.model, output_dir=a.output_dir, seed=a.seed, device=run.device, text=run.text,
                     profile=a.profile, num_canaries=a.num_canaries, canary_format=a.canary_format,
                     quantization_bits=a.quantization_bits, no_quantization=a.no_quantization,
                     progress=not a.no_progress, size=a.size, extra=facts, run_id=path.stem)
    args = {k: str(v) for k, v in vars(a).items()}
    args["device"] = run.device
    payload: dict = {"run_id": path.stem, "status": "running", "environment": environment(run.device),
                     "args": args, "run_facts": facts, "notes": []}
    if facts["model"]["weights"] == "random":
        note = (f"the weights of {a.model} are random: its numbers test the pipeline, not a language model "
                f"(a perplexity near the vocabulary size, {facts['model']['vocab_size']}, is expected)")
        payload["notes"].append(note)
        print(f"libortho: note: {note}")
    facts["steps"] = []
    print(f"results: {path}")
    _save(path, payload)
    status, rc, current = "complete", 0, None
    old_term = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    try:
        for name in run.wanted:
            current = name
            models.LOAD_LOG.clear()
            t0 = time.perf_counter()
            step = {"experiment": name, "status": "running"}
            facts["steps"].append(step)
            section = run.experiments[name](ctx)
            step.update(status="complete", seconds=round(time.perf_counter() - t0, 1), **run.meter.step_peaks(),
                        loads=list(models.LOAD_LOG))
            _check_policy_applied(step, ctx.load_bits, facts)
            key = SECTION_KEYS.get(name, name)
            payload[key] = section
            _save(path, payload)  # after each experiment: nothing lost if a later one fails
            line = summary_line(key, section)
            if line:
                print(line)
    except KeyboardInterrupt as e:
        status, rc = "interrupted", 130
        msg = f"interrupted during {current}; the experiments finished before it are saved in {path}"
        partial = getattr(e, "partial_section", None)  # what the interrupted experiment measured so far
        if isinstance(partial, dict):
            payload[SECTION_KEYS.get(current, current)] = {**partial, "status": "interrupted"}
    except Exception as e:  # one line here, the traceback in the JSON: nothing computed is lost
        if is_oom(e):
            peak = run.meter.peak_gib()
            # an error that names its step (e.g. one refused by its planned memory) says which and how much
            where = f"{current}: {_one_line(e)}" if getattr(e, "names_step", False) else current
            status = f"failed: out of memory in {where} (peak {peak:.2f} GiB)" if peak is not None else \
                f"failed: out of memory in {where}"
            rc = 3
        else:
            status, rc = f"failed: {current}: {e.__class__.__name__}: {_one_line(e)[:300]}", 1
        payload["error"] = {"experiment": current, "type": e.__class__.__name__, "message": str(e),
                            "traceback": traceback.format_exc()}
        partial = getattr(e, "partial_section", None)  # what the failed experiment measured before it stopped
        if isinstance(partial, dict):
            payload[SECTION_KEYS.get(current, current)] = partial
        msg = f"{status[len('failed: '):]}; what finished before it is saved in {path} (traceback in its \"error\")"
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        step = facts["steps"][-1] if facts["steps"] else None
        if step is not None and step["status"] == "running":
            step.update(status="interrupted" if rc == 130 else "failed", seconds=round(time.perf_counter() - t0, 1))
        run.meter.stop()
        facts["memory"] = run.meter.report()
        payload["status"] = status
        _save(path, payload)
    failed = claims_failed(payload) if rc == 0 else []
    if failed:  # the run is complete; what it claims does not hold
        rc, msg = 1, f"claims not met: {', '.join(failed)} (saved in {path})"
        payload["claims_failed"] = failed
        _save(path, payload)
    if rc:
        print(f"libortho: {'error: ' if rc != 130 else ''}{msg}", file=sys.stderr)
    else:
        print(f"\nresults: {path}")
    return rc


def _check_policy_applied(step: dict, bits: int | None, facts: dict) -> None:
    """Compare every model load of the step with the memory policy; say so (JSON and stderr) when they differ."""
    # a full-precision reference evaluated with offloading (a comparison arm by design) is not the run's load
    wrong = [ld for ld in step["loads"] if ld["bits"] != bits and not ld.get("reference")]
    step["memory_policy_applied"] = not wrong
    if wrong:
        facts["memory_policy"]["applied"] = False
        print(f"libortho: warning: {step['experiment']} loaded {wrong[0]['source']} with bits={wrong[0]['bits']}, "
              f"not {bits} as the memory policy decided (recorded in run_facts.steps)", file=sys.stderr)
    elif step["loads"]:
        facts["memory_policy"].setdefault("applied", True)


def cmd_run(a) -> int:
    return execute(prepare(a))


def _device(a) -> str:
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible (run `python -m libortho check-gpu`)")
    return a.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_finetune(a) -> int:
    """Everything checked first (model, records with their line numbers, output, profile), then the job under the
    profile's cap with NVML measuring; `finetune.json` beside the checkpoint records the facts and the memory."""
    import hashlib

    from filelock import Timeout

    from . import models
    from .config import validate_density

    # every number before anything is read or written: a bad one must not leave (or overwrite) a finetune.json
    try:
        validate_density(a.density)
    except ValueError as e:
        raise UsageError(f"--{_one_line(e)}") from None
    for k in ("steps", "batch_size", "max_length", "group_size"):
        v = getattr(a, k)
        if v is not None and v < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be positive, got {v}")
    if a.max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {a.max_length}")
    if a.epochs is not None and not (math.isfinite(a.epochs) and a.epochs > 0):
        raise UsageError(f"--epochs must be a positive finite number, got {a.epochs}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {a.lr}")
    if a.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be 0 (no resumable states) or positive, got {a.checkpoint_every}")
    if not a.data.is_file():
        raise UsageError(f"--data {a.data}: " + ("is a directory; pass a JSONL file" if a.data.is_dir() else
                                                 "no such file"))
    # one job an --output: a second finetune into it is refused at once (they would write the same files). The lock
    # lives under the cache; where the cache cannot be written the job runs unlocked, and says so
    lock = None
    try:
        lock = models.cache_lock("finetune-" + hashlib.sha256(str(a.output.resolve()).encode()).hexdigest()[:16])
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"--output {a.output} is in use by another libortho finetune; wait for it to finish or "
                         "pass another directory") from None
    except OSError as e:
        lock = None
        print(f"libortho: note: no --output lock ({models.cache_dir()} is not writable: {e.__class__.__name__}); "
              "two finetunes into one --output would collide", file=sys.stderr)
    try:
        return _finetune_job(a)
    finally:
        if lock is not None:
            lock.release()


def _finetune_job(a) -> int:
    """cmd_finetune under its --output lock: the output checked, the model and records read, then the job."""
    from . import models
    from .finetune import STATE_DIR, OtherJobState, check_output, finetune, load_records
    from .gpu import BudgetMeter
    from .oom import is_oom

    try:
        check_output(a.output, a.model)  # under the lock: a job that finished meanwhile is seen
    except ValueError as e:
        raise UsageError(_one_line(e)) from None
    device = _device(a)
    profile = _profile(a.profile) if a.profile is not None else None
    src = models.resolve(a.model)
    if src.kind == "dir" and _is_libortho_checkpoint(Path(a.model)):
        raise UsageError(f"--model {a.model} is already a libortho checkpoint (INT4 base + stream); fine-tune the "
                         "model it was built from, or use `libortho generate` with it")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model) if src.kind == "dir" else models.load_model(a.model).tokenizer
    load_records(a.data, tok, a.max_length)  # a bad record: its line and reason, before anything trains
    try:
        a.output.mkdir(parents=True, exist_ok=True)
        probe = a.output / ".libortho_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output {a.output}: not writable ({e.__class__.__name__})") from None
    try:
        meter = BudgetMeter(profile, device).start()
    except ValueError as e:
        raise UsageError(f"--profile {a.profile}: {_one_line(e)}") from None
    t0 = time.perf_counter()
    try:
        facts = finetune(a.model, a.data, a.output, density=a.density, group_size=a.group_size,
                         symmetric=not a.asymmetric, steps=a.steps, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size,
                         max_length=a.max_length, seed=a.seed, device=device, score=a.score,
                         checkpoint_every=a.checkpoint_every, progress=not a.no_progress)
    except KeyboardInterrupt:
        meter.stop()
        _interrupted(a.output / STATE_DIR, a.output / "finetune.json", meter.report(), device)
        raise
    except OtherJobState as e:  # bad input found on reading the state: that job's files stay as they are
        meter.stop()
        raise UsageError(_one_line(e)) from None
    except Exception as e:
        meter.stop()
        (a.output / "finetune.json").write_text(json.dumps(
            {"status": f"failed: {e.__class__.__name__}: {_one_line(e)[:300]}", "traceback": traceback.format_exc(),
             "run_facts": {"memory": meter.report(), "device": device}}, indent=1, default=str))
        if is_oom(e):
            peak = meter.peak_gib()
            print("libortho: error: out of memory in finetune" + (f" (peak {peak:.2f} GiB)" if peak else "") +
                  f"; the last resumable state is in {a.output / '.train_state'}", file=sys.stderr)
            return 3
        raise
    meter.stop()
    facts["wall_seconds"] = round(time.perf_counter() - t0, 1)  # finetune() returned: facts["status"] is complete
    facts["run_facts"] = {"memory": meter.report(), "device": device, "model": models.model_facts(src)}
    path = a.output / "finetune.json"
    path.write_text(json.dumps(facts, indent=1, default=str))
    print(f"finetuned {facts['steps']} steps (loss {facts['loss_first']} -> {facts['loss_last']}); "
          f"checkpoint: {a.output}; facts: {path}")
    return 0


def _interrupted(state, facts_path: Path, memory: dict, device: str) -> None:
    """Ctrl-C in a finetune: finetune.json says so, with the step the resumable state holds; stderr says how to go
    on. A stop after the checkpoint was saved and said complete leaves that record as it is."""
    from .finetune import saved_step

    try:
        if json.loads(facts_path.read_text()).get("status") == "complete":
            print(f"libortho: finetune interrupted after its checkpoint was saved; facts: {facts_path}",
                  file=sys.stderr)
            return
    except (OSError, ValueError, AttributeError):
        pass
    step = saved_step(state)
    facts_path.write_text(json.dumps({"status": "interrupted", "resumable_state": str(state) if step else None,
                                      "step": step, "run_facts": {"memory": memory, "device": device}}, indent=1,
                                     default=str))
    how = (f"the same command resumes from step {step} ({state})" if step else
           "no resumable state was saved yet (see --checkpoint-every): the same command starts over")
    print(f"libortho: finetune interrupted; {how}; facts: {facts_path}", file=sys.stderr)


def cmd_generate(a) -> int:
    """Greedy text from a libortho checkpoint at --alpha; at 0 the ortho file is not read at all."""
    from .config import validate_alpha

    try:
        alpha = validate_alpha(a.alpha)
    except ValueError as e:
        raise UsageError(f"--{_one_line(e)}") from None
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be positive, got {a.max_new_tokens}")
    if not a.prompt.strip():
        raise UsageError("--prompt is empty")
    if not (a.model / "config.json").is_file():
        raise UsageError(f"--model {a.model}: not a checkpoint directory (no config.json)")
    from .models import TOKENIZER_FILES

    if not any((a.model / f).is_file() for f in TOKENIZER_FILES):  # else found only after the model has loaded
        raise UsageError(f"--model {a.model}: no tokenizer (expected {' or '.join(TOKENIZER_FILES)})")
    if alpha != 0 and _is_libortho_checkpoint(a.model) and not (a.model / "ortho.safetensors").is_file():
        saved = json.loads((a.model / "config.json").read_text())["quantization_config"].get("ortho_sha256")
        why = "is missing (deleted, or the save did not finish)" if saved else "was never saved (a base-only checkpoint)"
        raise UsageError(f"--alpha {alpha:g}: {a.model / 'ortho.safetensors'} {why}, so the checkpoint holds no "
                         "stream: only --alpha 0 is possible")
    device = _device(a)
    import torch
    from transformers import AutoTokenizer

    from .hf import load
    from .modules import HostEmbedding, set_alpha

    import time

    t0 = time.perf_counter()
    model = load(a.model, with_ortho=alpha != 0)
    if device == "cuda":  # the embedding table stays in host memory: one row per token reaches the GPU
        model.model.embed_tokens = HostEmbedding.from_embedding(model.model.embed_tokens, device)
    model.to(device)
    set_alpha(model, alpha)
    tok = AutoTokenizer.from_pretrained(a.model)
    if not a.no_chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = a.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    new = out.shape[1] - ids.shape[1]
    t2 = time.perf_counter()
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    # timing on stderr: stdout stays the text alone (pipeable); the first call on a GPU includes kernel compilation
    print(f"libortho: loaded in {t1 - t0:.1f} s; {new} tokens in {t2 - t1:.1f} s at alpha {alpha:g} on {device}",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        return {"run": cmd_run, "plan": cmd_plan, "check-gpu": cmd_check_gpu, "finetune": cmd_finetune,
                "generate": cmd_generate}[args.command](args)
    except KeyboardInterrupt:
        print("libortho: interrupted", file=sys.stderr)
        return 130
    except (UsageError, OSError, ValueError) as e:
        print(f"libortho: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
