"""bench/profile_decode.py: the per-token breakdown on a tiny model on the CPU (fast), its kernel attribution on
a synthetic CUDA trace, and the real profile of the Llama-3-8B shape on a GPU (profiles of >= 16 GiB)."""
import json
import os

import pytest
import torch

from bench.profile_decode import RANGES, breakdown, markdown, profile_decode
from libortho.gpu import profiles


def test_tiny_cpu_breakdown_is_complete_and_sees_the_stream(tmp_path):
    rec = profile_decode("tiny", "cpu", steps=2, alphas=(1.0, 0.0), out=str(tmp_path))
    assert json.loads((tmp_path / "profile_decode.json").read_text()) == rec
    assert "| lm_head |" in (tmp_path / "profile_decode.md").read_text()
    a1, a0 = rec["runs"]
    for r in (a1, a0):
        assert set(r["by_part_us"]) == {*RANGES, "other"}
        assert all(r["by_part_us"][p] > 0 for p in ("q_proj", "down_proj", "lm_head", "attention", "norm"))
        # the parts and what no range covers add up to the profiled wall time (CPU: ranges are CPU time)
        assert sum(r["by_part_us"].values()) == pytest.approx(r["wall_us_per_step"]["eager_profiled"], rel=1e-6)
        assert 0 < r["roofline"]["share"] and r["wall_us_per_step"]["graph"] is None
    # alpha 0 neither reads nor counts the stream: fewer bytes and fewer ops per token (the check can fail: a
    # kill switch that still ran the ortho branch would dispatch as many ops as alpha 1)
    assert a0["weight_bytes_per_step"] < a1["weight_bytes_per_step"]
    assert a0["ops_per_step"] < a1["ops_per_step"]


def _x(name, cat, ts, dur, tid=1, **args):
    return dict(ph="X", name=name, cat=cat, ts=ts, dur=dur, tid=tid, pid=1, args=args)


def test_kernels_go_to_the_range_they_were_launched_in():
    """A synthetic CUDA trace of 2 steps: kernels are attributed through their launch call's correlation id,
    whenever they run; one launched outside every range is "other" (it would be q_proj if matched by time)."""
    ev = [_x("lo:q_proj", "user_annotation", 0, 10), _x("lo:attention", "user_annotation", 20, 10),
          _x("cudaLaunchKernel", "cuda_runtime", 2, 1, correlation=1),
          _x("cuLaunchKernel", "cuda_driver", 22, 1, correlation=2),
          _x("cudaLaunchKernel", "cuda_runtime", 40, 1, correlation=3),
          _x("_dual_gemv_kernel", "kernel", 25, 6, tid=7, correlation=1),  # runs during the attention range
          _x("softmax_warp_forward", "kernel", 31, 4, tid=7, correlation=2),
          _x("Memcpy DtoD", "gpu_memcpy", 5, 2, tid=7, correlation=3)]
    out = breakdown({"traceEvents": ev}, steps=2, device_type="cuda", wall_s=1e-4)
    assert out["by_part_us"]["q_proj"] == 3.0 and out["by_part_us"]["attention"] == 2.0
    assert out["by_part_us"]["other"] == 1.0
    assert out["by_kernel_us"] == {"dual_gemv": 3.0, "softmax": 2.0, "copy": 1.0}
    assert out["kernels_per_step"] == 1.5 and out["device_us_per_step"] == 6.0


@pytest.mark.parametrize("profile", [pytest.param(p, marks=getattr(pytest.mark, p)) for p in profiles()
                                     if profiles()[p].vram_gib >= 16])
def test_profile_llama3_8b_shape(gpu_profile, profile):
    """The Llama-3-8B shape (1% ortho), 32 graph-replayed and eager tokens at alpha 1 and 0; JSON and markdown
    go to $LIBORTHO_RESULTS_DIR (or results/profile)."""
    out = os.environ.get("LIBORTHO_RESULTS_DIR", "results/profile")
    rec = profile_decode("llama3-8b", "cuda", steps=32, alphas=(1.0, 0.0), out=out)
    print("\n" + markdown(rec))
    a1, a0 = rec["runs"]
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    for r in (a1, a0):
        dev = r["device_us_per_step"]
        assert sum(r["by_part_us"].values()) == pytest.approx(dev, rel=1e-6)
        # attribution works (kernels linked to their launch): the weights' linears dominate, little is unlabelled
        assert sum(r["by_part_us"][p] for p in linears) > 0.5 * dev and r["by_part_us"]["other"] < 0.2 * dev
        assert r["by_kernel_us"].get("dual_gemv", 0) > 0 and r["wall_us_per_step"]["graph"] > 0
        assert 0 < r["roofline"]["share"] < 1.5
    assert a0["weight_bytes_per_step"] < a1["weight_bytes_per_step"]
    torch.cuda.empty_cache()
