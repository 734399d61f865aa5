#!/usr/bin/env bash
# The acceptance run on a lent GPU (issues 6 and 7): parity tests, the gtx4050 + h100 benchmarks with autosave,
# a second kernel run compared against the first. Logs and JSON land in $OUT (or ./out/gpu).
set -u
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LIBORTHO_RESULTS_DIR="$OUT"
python3 -c "import json; from libortho.gpu import check_gpu; print(json.dumps(check_gpu()))" | tee "$OUT/check_gpu.json"
timeout 170 python3 -m pytest -q -x tests/test_kernels.py -p no:randomly 2>&1 | tail -5 | tee "$OUT/parity.log"
timeout 360 python3 -m pytest -m "gtx4050 or h100" bench/ -q -rs --benchmark-autosave --benchmark-columns=median,rounds \
  --benchmark-sort=name 2>&1 | tee "$OUT/bench_run1.log" | grep -v "^bench.*PASSED" | tail -60
timeout 60 python3 -m pytest -m gtx4050 bench/test_kernels.py -q --benchmark-autosave --benchmark-compare \
  --benchmark-compare-fail=median:25% --benchmark-columns=median --benchmark-sort=name 2>&1 > "$OUT/bench_compare.log"
echo "compare run rc=$?"; tail -5 "$OUT/bench_compare.log"
tar czf "$OUT/benchmarks.tgz" .benchmarks 2>/dev/null
