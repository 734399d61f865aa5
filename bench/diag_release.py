"""Which CUDA tensors outlive `stream.release` of an offloaded model (issue 16 diagnosis): load a checkpoint with
accelerate offloading, run one forward, release it, then list the CUDA tensors the garbage collector still sees
and what refers to them.  python bench/diag_release.py CKPT [budget_gib]"""
import gc
import sys

import torch

from libortho.stream import load_offloaded, release


def live_cuda():
    out = []
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda:
                out.append(o)
        except Exception:  # noqa: BLE001 - objects that refuse isinstance
            pass
    return out


def main():
    path, budget = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 3.5
    m = load_offloaded(path, budget, torch.bfloat16, "cuda")
    print("loaded:", round(torch.cuda.memory_allocated() / 2**30, 3), "GiB;", sorted(set(map(str, m.hf_device_map.values()))))
    with torch.no_grad():
        m(input_ids=torch.arange(512, device="cuda")[None])
    print("after forward:", round(torch.cuda.memory_allocated() / 2**30, 3), "GiB")
    left = release(m)
    print("after release:", round(left / 2**30, 3), "GiB")
    del m
    gc.collect()
    torch.cuda.empty_cache()
    print("after del + gc:", round(torch.cuda.memory_allocated() / 2**30, 3), "GiB")
    ts = sorted(live_cuda(), key=lambda t: -t.numel() * t.element_size())
    print(len(ts), "live CUDA tensors seen by gc; largest:")
    for t in ts[:8]:
        refs = [type(r).__name__ + (f"[{len(r)}]" if isinstance(r, (dict, list)) else "") for r in gc.get_referrers(t)
                if r is not ts]
        print(f"  {tuple(t.shape)} {t.dtype} {t.numel() * t.element_size() / 2**20:.0f} MiB  referred by {refs[:5]}")


if __name__ == "__main__":
    main()
