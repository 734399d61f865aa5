"""Measurement helpers only the benchmarks use: the memory roofline, timestamps."""
from __future__ import annotations

import time


def measure_copy_bandwidth(nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted): the memory roofline."""
    import torch

    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del a, b
    torch.cuda.empty_cache()
    return nbytes / times[len(times) // 2]


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
