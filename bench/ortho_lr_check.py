"""Does FULL's lr rule find an ortho stream that memorizes? A quick check on a CPU or GPU (a script, not a test).

    python bench/ortho_lr_check.py results/exp1_ortho_lr_check_cpu.json [--canaries 20] [--steps 50] [--lrs 1e-3,1e-2]

Trains the ortho_tuned arm of Experiment 1 (the off-grid public model, FULL's settings) with fewer canaries and
steps at each lr, keeps the one `KillSwitch` keeps (lowest tail training loss), and reports every lr's greedy
extraction at alpha 1 beside its loss: whether the rule, judged on training loss alone, lands where the stream
memorizes. Extraction is reported, never used to choose.
"""
import argparse
import json
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, ".")
from libortho.experiments.kill_switch import FULL, KillSwitch, tail_loss  # noqa: E402
from libortho.hf import load as load_checkpoint  # noqa: E402
from libortho.privacy import extraction_rate  # noqa: E402
from libortho.results import environment, write_json  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--canaries", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lrs", default="1e-3,1e-2")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    lrs = tuple(float(x) for x in a.lrs.split(","))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    size = replace(FULL, num_canaries=a.canaries, num_holdout=a.canaries,
                   ortho=replace(FULL.ortho, max_steps=a.steps, check_every=a.steps), lr_grid={"ortho": lrs})
    if device == "cuda":  # as `run` does: the precision is in the cache key, so the sweep reads these arms back
        torch.set_float32_matmul_precision(size.matmul_precision)
    t = time.time()
    exp = KillSwitch("smollm2-135m", size, seed=a.seed, device=device, progress=False, measure_cache=False)
    exp.ortho_tuned()  # trains every lr of the grid (or reads it from the cache) and keeps one
    info = exp.train_info["ortho_tuned"]
    runs = {}
    for cfg in size.train_configs("ortho"):
        hist = json.loads((exp.ortho_cache(cfg) / "meta.json").read_text())["history"]
        model = load_checkpoint(exp.ortho_cache(cfg)).to(device).eval()
        runs[repr(cfg.lr)] = {"tail_loss": round(tail_loss(hist["loss"]), 6),  # what the lr rule compares
                              "final_loss": hist["loss"][-1], "extraction_rate_alpha1": extraction_rate(model, exp.canaries)}
    write_json(a.out, {"exp1_ortho_lr_check": {
        "what": f"ortho_tuned at FULL's settings but {a.canaries} canaries and {a.steps} steps, one run per lr; "
                "kept_lr is what the lr rule (lowest tail training loss) keeps",
        "kept_lr": info["lr"], "runs": runs, "seed": a.seed, "device": device, "density": size.density,
        "nnz": info.get("nnz"), "measured_density": info.get("density"),
        "kept_run_read_from_cache": info["cached"],  # then "seconds" is the reading and measuring only
        "seconds": round(time.time() - t), "environment": environment(device)}})
    print(json.dumps(runs, indent=1), "\nkept lr", info["lr"])


if __name__ == "__main__":
    main()
