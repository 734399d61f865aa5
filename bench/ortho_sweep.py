"""Learning-rate sweep of the trained arms of Experiment 1 at a fixed budget (a script, not a test; a GPU).

    python bench/ortho_sweep.py out/exp1_lr_sweep.json [--arms ortho_tuned,lora] [--seed 0]

For each arm and learning rate, trains the arm at the acceptance size (`FULL`: 100 canaries, a fixed number of
steps, never "until extracted") and measures it at alpha 0, 0.5 and 1: extraction, exposure and perplexity on a
**validation split** of the evaluation text (the Jargon File tokens after those the experiment reports), so
the rate picked here is never tuned on the text whose perplexity the README reports. The former sweep
(results/exp1_ortho_sweep.json, 20 canaries, until extracted, perplexity on the reported text) predates this.
"""
import argparse
import json
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, ".")
from libortho.experiments.kill_switch import FULL, KillSwitch  # noqa: E402
from libortho.perplexity import encode, perplexity  # noqa: E402
from libortho.train import TrainConfig  # noqa: E402

GRID = {"ortho_tuned": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3), "fine_tuned": (3e-5, 1e-4, 3e-4)}
FIELD = {"ortho_tuned": "ortho", "lora": "lora", "fine_tuned": "finetune"}


def validation_ids(exp: KillSwitch) -> torch.Tensor:
    """Jargon File tokens after the reported window: the text the sweep may look at."""
    p = exp.size.ppl
    start = 16 * (p.max_tokens or 0)
    return encode(exp.tok, exp.text.text[start: start + 16 * (p.max_tokens or 8192)], p)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--arms", default="ortho_tuned,lora")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for arm in a.arms.split(","):
        for lr in GRID[arm]:
            base = getattr(FULL, FIELD[arm])
            size = replace(FULL, lr_grid={},  # this lr alone (FULL's grid would train and pick among its own)
                           **{FIELD[arm]: TrainConfig(**{**base.to_dict(), "lr": lr})})
            t = time.time()
            exp = KillSwitch("smollm2-135m", size, seed=a.seed, device=device, progress=False, measure_cache=False)
            val = validation_ids(exp)
            m, setter = exp.build(arm)
            row = {"arm": arm, "lr": lr, "steps": exp.train_info[arm]["steps"], "validation_tokens": int(val.numel())}
            for alpha in ((0.0, 0.5, 1.0) if setter else (1.0,)):
                if setter:
                    setter(m, alpha)
                r = exp.evaluate(m)
                row[str(alpha)] = {"extraction_rate": r["extraction_rate"], "mean_exposure": r["mean_exposure"],
                                   "mean_exposure_ext": r["mean_exposure_ext"],
                                   "validation_ppl": perplexity(m, val, size.ppl)}
            row["seconds"] = round(time.time() - t, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
