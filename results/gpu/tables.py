"""Markdown tables from a results folder written by bench/gpu_acceptance.sh (LIBORTHO_RESULTS_DIR).

    python results/gpu/tables.py results/gpu/h100-2026-11-22
"""
import json
import sys
from pathlib import Path

NAMES = {"bf16": "bf16 (HF eager)", "nf4": "bnb NF4 (HF eager)", "bf16-static": "bf16 (libortho graph decoder)",
         "int4mm-static": "tinygemm INT4 (libortho graph decoder)",
         "alpha0": "libortho alpha 0", "alpha1": "libortho alpha 1"}


def throughput_table(rows, profile, model):
    out = [f"| variant | decode tok/s | decode GB/s | roofline | prefill tok/s (512) | NVML peak GiB | "
           f"torch max reserved GiB | torch max allocated GiB |", "|---|---|---|---|---|---|---|---|"]
    for v in NAMES:
        d = next((r for r in rows if r.get("profile") == profile and r.get("model") == model and r.get("variant") == v
                  and r.get("phase") == "decode"), None)
        p = next((r for r in rows if r.get("profile") == profile and r.get("model") == model and r.get("variant") == v
                  and r.get("phase") == "prefill"), None)
        if d is None and p is None:
            continue
        peak = max(x["nvml_peak_gib"] for x in (d, p) if x)
        res = max(x["max_reserved_gib"] for x in (d, p) if x)
        alc = max(x["max_allocated_gib"] for x in (d, p) if x)
        out.append(f"| {NAMES[v]} | {d['tokens_per_s']:.1f} | {d['gb_s']:.0f} | {d['roofline_fraction']:.0%} | "
                   f"{p['tokens_per_s']:.0f} | {peak:.2f} | {res:.2f} | {alc:.2f} |")
    return "\n".join(out)


def main(folder):
    folder = Path(folder)
    rows = json.loads((folder / "throughput.json").read_text())
    gpu = json.loads((folder / "check_gpu.json").read_text())
    date = next((r["date"] for r in rows if "date" in r), "?")
    print(f"Device: {gpu['name']} ({gpu['arch']}, {gpu['total_gib']} GiB), driver {gpu.get('driver')}, torch "
          f"{gpu['torch']}, Triton {gpu['triton']}; run started {date}.\n")
    for prof, model in (("gtx4050", "llama3-8b"), ("gtx4050", "smollm2-135m"), ("h100", "llama3-8b")):
        print(f"**Profile {prof}, {model} shape (shape_only: random values), batch 1**\n")
        print(throughput_table(rows, prof, model) + "\n")
    for r in rows:
        if r.get("test") == "fit":
            print(f"Fit: Llama-3-8B-shaped, alpha 1, 1% ortho, 128 new tokens under the gtx4050 cap "
                  f"(allocator {r['cap']['allocator_cap_gib']:.2f} GiB): NVML peak {r['nvml_peak_gib']:.2f} GiB "
                  f"({r['nvml_source']}, {r['nvml_samples']} samples), torch max reserved {r['max_reserved_gib']:.2f} GiB.\n")
        if r.get("test") == "speedup":
            print(f"End to end ({r['profile']}): alpha 1 {r['alpha1_tok_s']:.1f} tok/s vs NF4 in HF eager "
                  f"{r['nf4_hf_tok_s']:.1f} tok/s = {r['ratio']:.2f}x; alpha 1 at {r['alpha1_roofline_fraction']:.0%} "
                  f"of the copy roofline.\n")


if __name__ == "__main__":
    main(sys.argv[1])
