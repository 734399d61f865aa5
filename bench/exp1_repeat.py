"""Same seed, same numbers, wherever it ran (issue 15, acceptance 3): measure arms of a committed Experiment 1 seed
JSON again in this process (one GPU, measurement cache off) and compare every number of each entry with the JSON's.

The committed seeds ran three at a time on two GPUs (xdist workers sharing a GPU); a repeat alone on one GPU that
gives the same entries, bit for bit, is the evidence that placement changes nothing. Arms needing no training
(never_trained, int4_of_public, nf4_of_public) take a minute or two on an H200 after the public model is loaded;
a trained arm is trained again at every lr of its grid (or read from the training cache).

    python -m bench.exp1_repeat results/gpu/h200x2-2026-11-30c-exp1-lr-grid/exp1_kill_switch_seed0.json \
        --arms never_trained,int4_of_public --out out/repeat.json

Exit status: 0 when every compared entry is identical, 1 when any number differs, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

def differences(a, b, path: str = "") -> list[tuple[str, object, object]]:
    """Every leaf where `a` and `b` differ: (path, a's value, b's value). Floats compare exactly (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [(f"{path}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(f"{path}[len]", len(a), len(b))]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    return [] if a == b else [(path, a, b)]


def _max_abs(diffs) -> float:
    gaps = [abs(x - y) for _, x, y in diffs if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    return max(gaps, default=0.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("seed_json", help="a committed exp1_kill_switch_seed<N>.json")
    p.add_argument("--arms", default="never_trained,int4_of_public", help="comma-separated arms to measure again")
    p.add_argument("--model", default="smollm2-135m", help="the experiment's model key (its JSON holds the display name)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when there is one)")
    p.add_argument("--out", default=None, help="write the comparison here (JSON)")
    p.add_argument("--retrain", action="store_true",
                   help="train the trained arms again from an empty training cache (the public and embedded models "
                        "are reused): whether training itself repeats, not only the measurement")
    a = p.parse_args(argv)
    from libortho.experiments.kill_switch import ARMS, FULL, SMALL

    path = Path(a.seed_json)
    try:
        inner = json.loads(path.read_text())["exp1_kill_switch"]
        seed, fmt, size_d, name = inner["seed"], inner["canary_format"], inner["size"], inner.get("model")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"exp1_repeat: {path} is not an Experiment 1 seed JSON ({e})", file=sys.stderr)
        return 2
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS or x not in inner["arms"]]
    if bad or not arms:
        print(f"exp1_repeat: --arms {bad or a.arms!r}: choose among the JSON's arms {sorted(inner['arms'])}",
              file=sys.stderr)
        return 2
    sizes = {"full": FULL, **{k: v for k, v in SMALL.items()}}
    size = next((s for s in sizes.values() if json.loads(json.dumps(s.to_dict(), default=str)) == size_d), None)
    if size is None:
        print(f"exp1_repeat: {path} was run at a size this code does not define (FULL or SMALL); nothing to repeat",
              file=sys.stderr)
        return 2
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):  # as `kill_switch.run` sets them
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_float32_matmul_precision(size.matmul_precision)
    before = os.environ.get("LIBORTHO_CACHE")
    fresh = _fresh_training_cache() if a.retrain else None
    try:
        return _repeat(a, path, inner, arms, size, seed, fmt, name, device, fresh)
    finally:
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)  # its links only: the entries they point at stay
            if before is None:
                os.environ.pop("LIBORTHO_CACHE", None)
            else:
                os.environ["LIBORTHO_CACHE"] = before


def _fresh_training_cache() -> Path:
    """A cache dir holding links to every entry of the current one except exp1/ (the trained arms and measurements),
    made the cache for this process: the public model is read, every trained arm is trained again."""
    from libortho.models import cache_dir

    src, fresh = cache_dir(), Path(tempfile.mkdtemp(prefix="exp1_repeat_cache_"))
    for e in (src.iterdir() if src.is_dir() else ()):
        if e.name != "exp1":
            (fresh / e.name).symlink_to(e.resolve())
    os.environ["LIBORTHO_CACHE"] = str(fresh)
    return fresh


def _repeat(a, path, inner, arms, size, seed, fmt, name, device, fresh) -> int:
    from libortho.experiments.kill_switch import KillSwitch

    exp = KillSwitch(a.model, size, seed, fmt, device=device, progress=True, measure_cache=False)
    if name is not None and exp.name != name:
        print(f"exp1_repeat: {path} measured {name}; --model {a.model} loads {exp.name}", file=sys.stderr)
        return 2
    report, total = {}, 0
    for arm in arms:
        report[arm] = {}
        by_n = {}  # one build of the arm per |R|: measure_arm rebuilds (or retrains) it each call
        for alpha, entry in inner["arms"][arm].items():
            by_n.setdefault(entry["n_candidates"], []).append(float(alpha))
        got_all = {}
        for n, alphas in by_n.items():
            got_all.update(exp.measure_arm(arm, tuple(alphas), n))
        for alpha, entry in inner["arms"][arm].items():
            got = json.loads(json.dumps(got_all[str(float(alpha))], default=str))  # as write_json stores it
            diffs = differences(entry, got)
            total += len(diffs)
            report[arm][alpha] = {"identical": not diffs, "n_candidates": entry["n_candidates"],
                                  "differing_leaves": len(diffs), "max_abs_diff": _max_abs(diffs),
                                  "first_differences": [[p_, str(x), str(y)] for p_, x, y in diffs[:10]]}
            print(f"{arm} alpha {alpha} |R| {entry['n_candidates']}: "
                  + ("identical" if not diffs else f"{len(diffs)} numbers differ, max |diff| {_max_abs(diffs):.3g}"))
    from libortho.results import environment, write_json

    rec = {"seed_json": str(path), "seed": inner["seed"], "ran_at": inner.get("environment", {}),
           "repeated_at": environment(device), "arms": report, "identical": total == 0,
           "retrained": fresh is not None,  # with it, each trained arm's "cached" below is false
           "training": dict(exp.train_info)}  # by trainer: int4_of_fine_tuned's training is fine_tuned's
    if a.out:
        write_json(a.out, rec)
    return 0 if total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
