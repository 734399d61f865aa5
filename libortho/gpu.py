"""GPU profiles (libortho/markers.ini, package data), the per-profile memory cap, an NVML memory poller, and `check_gpu()`.

A profile names a card by its VRAM budget. A run "under a profile" caps PyTorch's allocator so that
allocator + CUDA context stay inside the budget; NVML, which sees the whole process (context, cuBLAS and
Triton workspaces included), is the judge of whether it fit.
"""
from __future__ import annotations

import configparser
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

GIB = 1024**3
MARKERS_INI = "markers.ini"  # package data: shipped inside the wheel, read through importlib.resources
# Cards report a little less than their nominal size (an "80 GB" H100: 79.6 GiB): within this share of a
# profile's budget a card still counts as that size.
NOMINAL_SLACK = 0.97
# What the CUDA context, cuBLAS and Triton take outside the caching allocator when it cannot be measured.
DEFAULT_CONTEXT_GIB = 0.8  # measured 0.75 on an H200 once cuBLAS and the Triton kernels are loaded, plus slack


@dataclass(frozen=True)
class Profile:
    name: str
    vram_gib: float
    arch: str = ""
    description: str = ""

    @property
    def budget_bytes(self) -> int:
        return int(self.vram_gib * GIB)


def profiles(path: Path | str | None = None) -> dict[str, Profile]:
    """Every [section] of markers.ini as a Profile; the one source of GPU profiles.

    Args:
        path: another ini file (tests); default: the package's own `libortho/markers.ini`.
    """
    cp = configparser.ConfigParser()
    if path is None:
        from importlib.resources import files

        res = files(__package__).joinpath(MARKERS_INI)
        if not res.is_file():
            raise FileNotFoundError(f"{res} is missing from the installed package: the GPU profiles live there "
                                    "(reinstall libortho)")
        cp.read_string(res.read_text(encoding="utf-8"), source=str(res))
    elif not cp.read(path):
        raise FileNotFoundError(f"{path} is missing: the GPU profiles live there")
    out = {}
    for s in cp.sections():
        try:
            vram = float(cp[s]["vram_gib"])
        except (KeyError, ValueError):
            raise ValueError(f"markers.ini [{s}] needs a numeric vram_gib, got {cp[s].get('vram_gib')!r}") from None
        if vram <= 0:
            raise ValueError(f"markers.ini [{s}] vram_gib must be positive, got {vram}")
        out[s] = Profile(s, vram, cp[s].get("arch", ""), cp[s].get("description", ""))
    return out


def cap_fraction(profile: Profile, total_bytes: int, context_bytes: int | None = None) -> float:
    """Fraction of the card for `torch.cuda.set_per_process_memory_fraction` that keeps the process in budget.

    The allocator gets the budget minus what lives outside it (the CUDA context and library workspaces,
    measured when given, else DEFAULT_CONTEXT_GIB).
    Raises ValueError when the card is smaller than the profile (it cannot emulate it).
    """
    if total_bytes < NOMINAL_SLACK * profile.budget_bytes:
        raise ValueError(f"this GPU has {total_bytes / GIB:.1f} GiB, less than profile {profile.name}'s "
                         f"{profile.vram_gib:g} GiB budget")
    ctx = DEFAULT_CONTEXT_GIB * GIB if context_bytes is None else context_bytes
    allowed = profile.budget_bytes - ctx
    if allowed <= 0:
        raise ValueError(f"profile {profile.name}: the CUDA context ({ctx / GIB:.2f} GiB) leaves no room in "
                         f"{profile.vram_gib:g} GiB")
    return min(1.0, allowed / total_bytes)


def apply_cap(profile: Profile, device: int = 0) -> dict:
    """Cap this process's allocator to `profile`; returns what was applied (for reports)."""
    import torch

    torch.cuda.init()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    ctx = context_bytes(device)
    frac = cap_fraction(profile, total, ctx)
    torch.cuda.set_per_process_memory_fraction(frac, device)
    return {"profile": profile.name, "budget_gib": profile.vram_gib, "fraction": frac,
            "allocator_cap_gib": frac * total / GIB, "context_gib": None if ctx is None else ctx / GIB}


def release_cap(device: int = 0) -> None:
    import torch

    torch.cuda.set_per_process_memory_fraction(1.0, device)
    torch.cuda.empty_cache()


def context_bytes(device: int = 0) -> int | None:
    """NVML's view of this process minus what torch's allocator holds: the context and workspaces."""
    used = process_memory(device)
    if used is None:
        return None
    import torch

    return max(0, used - torch.cuda.memory_reserved(device))


# -- NVML --------------------------------------------------------------------------------------------------

def allocated_peak_gib(device) -> float | None:
    """torch's peak allocated GiB on `device` so far (None off CUDA). Never reset here: a run's meter and the
    experiments read the same counter for the whole step."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _nvml():
    import pynvml  # from nvidia-ml-py

    pynvml.nvmlInit()
    return pynvml


def process_memory(device: int = 0, nvml=None, pid: int | None = None) -> int | None:
    """Bytes of GPU memory NVML charges to this process (None if NVML cannot say)."""
    try:
        nv = nvml or _nvml()
        h = nv.nvmlDeviceGetHandleByIndex(device)
        pid = os.getpid() if pid is None else pid
        for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
    except Exception:
        return None
    return None


@dataclass
class NvmlPoller:
    """Polls NVML from a background thread; NVML keeps no peak, so the poller does.

    `peak_process` is this process's used memory (by pid); when the driver cannot attribute memory to
    processes (some containers), `peak_device` (device used minus the baseline at start) stands in and
    `source` says so.

    Example:
        >>> with NvmlPoller() as p:   # doctest: +SKIP
        ...     run()
        >>> p.peak_bytes
    """

    device: int = 0
    interval_s: float = 0.005
    nvml: object = None
    pid: int | None = None
    peak_process: int = 0
    peak_device: int = 0
    baseline_device: int = 0
    samples: int = 0
    attributed: bool = False  # NVML has charged memory to this pid at least once
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _sample(self, nv, h) -> None:
        pid = os.getpid() if self.pid is None else self.pid
        for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory is not None:
                self.peak_process = max(self.peak_process, int(p.usedGpuMemory))
                self.attributed = True  # kept across take_peak: what `source` reports
        used = int(nv.nvmlDeviceGetMemoryInfo(h).used)
        self.peak_device = max(self.peak_device, used - self.baseline_device)
        self.samples += 1

    def _run(self, nv, h) -> None:
        while not self._stop.is_set():
            try:
                self._sample(nv, h)
            except Exception as e:  # keep polling; report the first failure
                self.error = self.error or repr(e)
            self._stop.wait(self.interval_s)

    def start(self) -> "NvmlPoller":
        try:
            nv = self.nvml or _nvml()
            h = nv.nvmlDeviceGetHandleByIndex(self.device)
            self.baseline_device = 0
            self._sample(nv, h)  # one sample before the first allocation
        except Exception as e:
            self.error = f"NVML unavailable: {e!r}"
            return self
        self._thread = threading.Thread(target=self._run, args=(nv, h), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "NvmlPoller":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def source(self) -> str:
        if self.attributed:
            return "nvml-process"
        return "nvml-device" if self.samples and not self.error else "none"

    @property
    def peak_bytes(self) -> int:
        return self.peak_process or self.peak_device

    def take_peak(self) -> int:
        """The peak since the last call (or the start), then start a new one: per-step peaks of one poller."""
        peak = self.peak_bytes
        self.peak_process = self.peak_device = 0
        return peak


class BudgetMeter:
    """A run under a GPU profile, as the pytest profile markers run a test: the allocator capped to the profile
    (`apply_cap`), NVML polled for the whole run, torch's peak read per step.

    Without CUDA (or without a profile) nothing is capped and the report says why; peaks are still measured on
    CUDA. `start()` raises ValueError when the GPU is smaller than the profile (before any computation).

    Example:
        >>> m = BudgetMeter(profile, "cuda").start()   # doctest: +SKIP
        >>> run(); m.step_peaks(); m.stop().report()
    """

    def __init__(self, profile: Profile | None, device: str = "cpu"):
        self.profile, self.device = profile, str(device)
        self.cuda = self.device.startswith("cuda")
        self.cap: dict | None = None
        self.cap_reason = None
        self.poller: NvmlPoller | None = None
        self.nvml_peak = 0
        self.torch_peak = 0

    def start(self) -> "BudgetMeter":
        if not self.cuda:
            self.cap_reason = f"device {self.device}: no GPU allocator to cap"
            return self
        import torch

        idx = torch_device_index(self.device)
        if self.profile is None:
            self.cap_reason = "no --profile: allocator not capped"
        else:
            self.cap = apply_cap(self.profile, idx)
        torch.cuda.reset_peak_memory_stats(idx)
        self.poller = NvmlPoller(device=idx).start()
        return self

    def step_peaks(self) -> dict:
        """{nvml_peak_gib, torch_max_reserved_gib} since the previous call; the run's peaks keep the maximum."""
        if not self.cuda:
            return {"nvml_peak_gib": None, "torch_max_reserved_gib": None}
        import torch

        idx = torch_device_index(self.device)
        nv = self.poller.take_peak() if self.poller else 0
        tp = torch.cuda.max_memory_reserved(idx)
        torch.cuda.reset_peak_memory_stats(idx)
        self.nvml_peak, self.torch_peak = max(self.nvml_peak, nv), max(self.torch_peak, tp)
        return {"nvml_peak_gib": round(nv / GIB, 3) if nv else None, "torch_max_reserved_gib": round(tp / GIB, 3)}

    def peak_gib(self) -> float | None:
        """The highest peak measured so far (NVML, else torch's reserved), for out-of-memory messages."""
        if not self.cuda:
            return None
        import torch

        idx = torch_device_index(self.device)
        nv = max(self.nvml_peak, self.poller.peak_bytes if self.poller else 0)
        return max(nv, self.torch_peak, torch.cuda.max_memory_reserved(idx)) / GIB

    def stop(self) -> "BudgetMeter":
        if self.cuda:
            self.step_peaks()
        if self.poller is not None:
            self.poller.stop()
        if self.cap is not None:
            release_cap(torch_device_index(self.device))
        return self

    def report(self) -> dict:
        """`run_facts.memory` of the results JSON."""
        out = {"profile": self.profile.name if self.profile else None,
               "budget_gib": self.profile.vram_gib if self.profile else None,
               "cap_applied": self.cap is not None,
               "nvml_peak_gib": round(self.nvml_peak / GIB, 3) if self.nvml_peak else None,
               "torch_max_reserved_gib": round(self.torch_peak / GIB, 3) if self.cuda else None}
        if self.cap is not None:
            out["cap"] = self.cap
        else:
            out["cap_reason"] = self.cap_reason
        if self.poller is not None:
            out["nvml_source"] = self.poller.source
            out["nvml_samples"] = self.poller.samples
            if self.poller.error:
                out["nvml_error"] = self.poller.error
        if self.profile and self.nvml_peak:
            out["within_budget"] = self.nvml_peak <= self.profile.budget_bytes
        return out


def torch_device_index(device: str) -> int:
    import torch

    return torch.device(device).index or 0


# -- check_gpu -----------------------------------------------------------------------------------------------

def check_gpu(device: int = 0) -> dict:
    """What this machine's GPU is and which markers.ini profiles it can emulate; works without CUDA.

    Returns a dict with `cuda_available` and, when a GPU is there: name, compute capability, total/free
    memory (NVML when it answers, else torch), tensor-core support, bf16 support, CUDA/torch/driver
    versions, and `profiles`: {name: {"fits": bool, "reason": str}}.
    """
    import torch

    info: dict = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": False}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    profs = profiles()
    if not torch.cuda.is_available():
        info["reason"] = ("no CUDA GPU visible to PyTorch" + ("" if torch.version.cuda else
                          " (this PyTorch build is CPU-only)"))
        info["profiles"] = {n: {"fits": False, "reason": "no CUDA GPU"} for n in profs}
        return info
    props = torch.cuda.get_device_properties(device)
    cc = (props.major, props.minor)
    total, free, src = props.total_memory, None, "torch"
    try:
        nv = _nvml()
        h = nv.nvmlDeviceGetHandleByIndex(device)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        total, free, src = int(mem.total), int(mem.free), "nvml"
        info["driver"] = nv.nvmlSystemGetDriverVersion()
    except Exception as e:
        info["nvml_error"] = repr(e)
        free = torch.cuda.mem_get_info(device)[0]
    info.update(
        cuda_available=True, name=props.name, compute_capability=f"{cc[0]}.{cc[1]}", arch=f"sm_{cc[0]}{cc[1]}",
        multiprocessors=props.multi_processor_count, total_gib=round(total / GIB, 2),
        free_gib=round(free / GIB, 2), memory_source=src,
        tensor_cores=cc >= (7, 0), bf16=torch.cuda.is_bf16_supported(), int4_kernels=cc >= (8, 0),
    )
    info["profiles"] = {}
    for n, p in profs.items():
        fits = total >= NOMINAL_SLACK * p.budget_bytes
        info["profiles"][n] = {"fits": fits, "vram_gib": p.vram_gib,
                               "reason": f"{total / GIB:.1f} GiB >= {p.vram_gib:g} GiB budget" if fits else
                               f"{total / GIB:.1f} GiB < {p.vram_gib:g} GiB budget"}
    return info
