"""One GPU is not the limit (issue 16): a 70B-shaped packed model (INT4 + 1% ortho, built without dense
weights) placed across two GPUs by accelerate (`libortho.placement`) generates with the Hugging Face forward.

Runs where the host has two CUDA GPUs (a lent nvidia-h200-x2): `pytest -s bench/test_multi_gpu.py`. Writes
results/gpu/multi_gpu_70b.json (or under LIBORTHO_RESULTS_DIR). max_memory per GPU is set below the model's
size so that one GPU cannot hold it (the control: the same map on one GPU is refused before anything is built).
"""
import time

import pytest
import torch

from libortho.results import environment, results_dir, write_json

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA GPUs (a lent nvidia-h200-x2); places a 70B-shaped model")

MODEL = "meta-llama/Meta-Llama-3-70B-Instruct"
PER_GPU_GIB = 28  # under the packed 70B (~40 GiB): it must split
NEW_TOKENS = 16


def test_70b_shape_generates_across_two_gpus():
    from libortho import shape_only
    from libortho.placement import device_map, dispatch
    from libortho.plan import model_config

    cfg = model_config(MODEL).to_config()
    with pytest.raises(ValueError, match="does not fit 1 GPU"):
        device_map(cfg, {0: f"{PER_GPU_GIB}GiB"})
    dm = device_map(cfg, {0: f"{PER_GPU_GIB}GiB", 1: f"{PER_GPU_GIB}GiB"})
    assert set(dm.values()) == {0, 1}
    t0 = time.perf_counter()
    model = dispatch(shape_only.build(cfg, density=0.01, device_map=dm), dm)
    build_s = time.perf_counter() - t0
    ids = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to("cuda:0")
    for i in range(2):
        torch.cuda.reset_peak_memory_stats(i)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: kernels compile per device
        for i in range(2):
            torch.cuda.synchronize(i)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS)
        for i in range(2):
            torch.cuda.synchronize(i)
        gen_s = time.perf_counter() - t0
    assert out.shape == (1, ids.shape[1] + NEW_TOKENS)
    layers_on = {d: sum(1 for k, v in dm.items() if k.startswith("model.layers.") and v == d) for d in (0, 1)}
    assert layers_on[0] > 0 and layers_on[1] > 0
    per_gpu = {str(i): {"allocated_gib": round(torch.cuda.memory_allocated(i) / 2**30, 2),
                        "peak_gib": round(torch.cuda.max_memory_allocated(i) / 2**30, 2), "layers": layers_on[i]}
               for i in (0, 1)}
    facts = {"environment": environment("cuda"), "model": MODEL, "shape_only": True, "density": 0.01,
             "max_memory_per_gpu_gib": PER_GPU_GIB, "device_map_by": "accelerate.infer_auto_device_map on the packed "
             "skeleton (libortho.placement.device_map)", "per_gpu": per_gpu, "build_seconds": round(build_s, 1),
             "new_tokens": NEW_TOKENS, "generate_seconds": round(gen_s, 2),
             "tokens_per_second": round(NEW_TOKENS / gen_s, 2),
             "note": "HF generate through accelerate's hooks (eager, batch 1): placement shown, not decode speed"}
    print(facts)
    write_json(results_dir("results/gpu") / "multi_gpu_70b.json", facts)
