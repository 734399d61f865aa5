"""The ortho-tune sweep behind results/exp1_ortho_sweep.json (a script, not a test; minutes on one GPU).

    python bench/ortho_sweep.py results/exp1_ortho_sweep_runs.json

Trains the `ortho_tuned` arm of Experiment 1 at the acceptance size under a few training configurations
and measures it at alpha 0, 0.5 and 1; every other arm does not depend on these settings.
"""
import json
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, ".")
from libortho.experiments.kill_switch import FULL, KillSwitch  # noqa: E402
from libortho.train import TrainConfig  # noqa: E402

GRID = [(3e-3, 2, 0.01), (1e-3, 2, 0.01), (3e-3, 8, 0.01), (1e-3, 8, 0.01), (1e-3, 2, 0.02)]  # lr, chunks, density


def main(path: str) -> None:
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = []
    for lr, chunks, dens in GRID:
        size = replace(FULL, ortho=TrainConfig(lr=lr, max_steps=300, check_every=5, general_chunks=chunks),
                       density=dens)
        t = time.time()
        exp = KillSwitch("smollm2-135m", size, seed=0, device="cuda" if torch.cuda.is_available() else "cpu",
                         progress=False)
        m, setter = exp.build("ortho_tuned")
        row = {"lr": lr, "general_chunks": chunks, "density": dens, "steps": exp.train_info["ortho_tuned"]["steps"]}
        for a in (0.0, 0.5, 1.0):
            setter(m, a)
            r = exp.evaluate(m)
            row[str(a)] = {k: round(r[k], 3) for k in ("extraction_rate", "mean_exposure", "ppl")}
        row["seconds"] = round(time.time() - t, 1)
        print(json.dumps(row), flush=True)
        out.append(row)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
