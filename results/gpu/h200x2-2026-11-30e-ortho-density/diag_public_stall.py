import contextlib, faulthandler, sys, time, torch
strict = sys.argv[1] == "strict"
faulthandler.dump_traceback_later(40, repeat=True, file=sys.stderr)
import libortho.train as T
if not strict:
    T.deterministic = contextlib.nullcontext
from dataclasses import replace
from libortho.experiments.kill_switch import FULL, KillSwitch
torch.set_float32_matmul_precision("high")
t = time.time()
size = replace(FULL, num_canaries=100, num_holdout=100, ortho=replace(FULL.ortho, max_steps=10, check_every=10),
               lr_grid={"ortho": (3e-3,)})
exp = KillSwitch("smollm2-135m", size, seed=0, device="cuda", progress=True, measure_cache=False)
print("prepared", round(time.time() - t, 1), file=sys.stderr, flush=True)
exp.ortho_tuned()
print("trained", round(time.time() - t, 1), exp.train_info, file=sys.stderr, flush=True)
