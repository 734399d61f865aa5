"""CPU-side tests of the GPU plumbing: markers.ini parsing, the profile cap, the NVML poller, check_gpu."""
import time
from types import SimpleNamespace

import pytest

from libortho import gpu
from libortho.gpu import GIB, NvmlPoller, Profile, cap_fraction, check_gpu, profiles


def test_markers_ini_has_the_issue_profiles():
    p = profiles()
    assert {"gtx4050", "rtx4090", "a100", "h100"} <= set(p)
    assert p["gtx4050"].vram_gib == 6 and p["gtx4050"].arch == "sm_89"
    assert p["rtx4090"].vram_gib == 24 and p["h100"].vram_gib == 80
    assert all(x.description for x in p.values())


def test_profiles_reject_bad_budget(tmp_path):
    f = tmp_path / "m.ini"
    f.write_text("[tiny]\nvram_gib = zero\n")
    with pytest.raises(ValueError, match="numeric vram_gib"):
        profiles(f)
    with pytest.raises(FileNotFoundError):
        profiles(tmp_path / "missing.ini")


def test_markers_registered_with_pytest(pytestconfig):
    lines = pytestconfig.getini("markers")
    assert any(line.startswith("gtx4050:") for line in lines)


def test_cap_fraction_leaves_room_for_the_context():
    p = Profile("gtx4050", 6)
    f = cap_fraction(p, 80 * GIB, context_bytes=int(0.5 * GIB))
    assert f * 80 * GIB == pytest.approx(5.5 * GIB)
    f_default = cap_fraction(p, 80 * GIB)
    assert f_default * 80 * GIB == pytest.approx((6 - gpu.DEFAULT_CONTEXT_GIB) * GIB)
    assert cap_fraction(Profile("h100", 80), 80 * GIB, 0) == 1.0


def test_cap_fraction_refuses_small_cards_and_tiny_budgets():
    with pytest.raises(ValueError, match="less than profile"):
        cap_fraction(Profile("rtx4090", 24), 6 * GIB)
    with pytest.raises(ValueError, match="no room"):
        cap_fraction(Profile("toy", 0.5), 80 * GIB, context_bytes=GIB)


class FakeNvml:
    """Mimics the pynvml calls the poller makes; memory rises then falls, like a real run."""

    def __init__(self, pid, series):
        self.pid, self.series, self.i = pid, series, 0

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        v = self.series[min(self.i, len(self.series) - 1)]
        self.i += 1
        return [SimpleNamespace(pid=self.pid + 1, usedGpuMemory=99 * GIB), SimpleNamespace(pid=self.pid, usedGpuMemory=v)]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self.series[min(self.i, len(self.series) - 1)] + GIB, total=80 * GIB)


def test_poller_keeps_the_peak_of_this_process():
    fake = FakeNvml(pid=1234, series=[1 * GIB, 3 * GIB, 5 * GIB, 2 * GIB])
    with NvmlPoller(nvml=fake, pid=1234, interval_s=0.001) as p:
        while fake.i < 6:
            time.sleep(0.001)
    assert p.peak_process == 5 * GIB  # the other process's 99 GiB is not ours
    assert p.peak_bytes == 5 * GIB and p.source == "nvml-process"
    assert p.samples >= 4 and p.error is None
    assert p.take_peak() == 5 * GIB and p.peak_bytes == 0
    assert p.source == "nvml-process"  # a per-step reset does not turn the report into "none"


def test_poller_without_nvml_reports_instead_of_raising():
    class Broken:
        def nvmlDeviceGetHandleByIndex(self, i):
            raise RuntimeError("NVML Shared Library Not Found")

    p = NvmlPoller(nvml=Broken()).start()
    p.stop()
    assert p.peak_bytes == 0 and "NVML unavailable" in p.error and p.source == "none"


def test_check_gpu_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = check_gpu()
    assert info["cuda_available"] is False and "no CUDA GPU" in info["reason"]
    assert set(info["profiles"]) >= {"gtx4050", "h100"}
    assert not any(v["fits"] for v in info["profiles"].values())
    assert info["torch"] == torch.__version__


def test_kernels_fall_back_on_cpu():
    import torch

    from libortho.kernels import reference
    from libortho.linear import OrthoLinear
    from libortho.quant import quantize
    from libortho.sparse import csr_from_mask

    w = torch.randn(32, 64)
    base = quantize(w, 32)
    ortho = csr_from_mask(w - base.dequantize(), torch.rand(32, 64) < 0.05)
    m = OrthoLinear.from_parts(base, ortho)
    x = torch.randn(3, 64)
    ref = reference.dual_linear(x, m.qweight, m.scales, m.zeros, 32, m.ortho_crow, m.ortho_col, m.ortho_values, 1.0)
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    m.set_backend("triton")
    with pytest.raises(ValueError, match="does not apply here"):  # CPU input: the kernel cannot run, and says so
        m(x)


def test_shape_only_builds_tiny_on_cpu():
    import torch
    from transformers import LlamaConfig

    from libortho.decode import weight_bytes_per_token
    from libortho.linear import OrthoLinear
    from libortho.shape_only import build

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = build(cfg, density=0.05, group_size=32, dtype=torch.float32, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, OrthoLinear) and q.nnz == 64 * round(0.05 * 64)
    assert (q.ortho_crow[1:] >= q.ortho_crow[:-1]).all()
    assert model.shape_only and isinstance(model.lm_head, OrthoLinear) and model.lm_head.nnz == 0
    on, off = weight_bytes_per_token(model, True), weight_bytes_per_token(model, False)
    assert on > off > 0


def test_take_peak_starts_a_new_step():
    fake = FakeNvml(pid=7, series=[4 * GIB])
    p = NvmlPoller(nvml=fake, pid=7)
    p._sample(fake, 0)
    assert p.take_peak() == 4 * GIB and p.peak_bytes == 0


def test_budget_meter_on_cpu_says_why_nothing_was_capped():
    from libortho.gpu import BudgetMeter

    m = BudgetMeter(profiles()["gtx4050"], "cpu").start()
    assert m.step_peaks() == {"nvml_peak_gib": None, "torch_max_reserved_gib": None} and m.peak_gib() is None
    r = m.stop().report()
    assert r == {"profile": "gtx4050", "budget_gib": 6.0, "cap_applied": False, "nvml_peak_gib": None,
                 "torch_max_reserved_gib": None, "cap_reason": "device cpu: no GPU allocator to cap"}


@pytest.mark.gpu
def test_budget_meter_caps_and_measures_on_cuda():
    """GPU check: under gtx4050 an allocation past 6 GiB fails, one inside it is measured by NVML and torch."""
    import torch

    from libortho.gpu import BudgetMeter

    m = BudgetMeter(profiles()["gtx4050"], "cuda").start()
    try:
        x = torch.empty(int(2 * GIB), dtype=torch.uint8, device="cuda")
        time.sleep(0.05)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(6 * GIB), dtype=torch.uint8, device="cuda")
        del x
    finally:
        r = m.stop().report()
    assert r["cap_applied"] and r["cap"]["allocator_cap_gib"] < 6
    assert 2 <= r["torch_max_reserved_gib"] < 6 and (r["nvml_peak_gib"] is None or 2 <= r["nvml_peak_gib"] <= 6)
