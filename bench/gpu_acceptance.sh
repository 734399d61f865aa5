#!/usr/bin/env bash
# The acceptance run on a lent GPU (issues 5, 6 and 7): check-gpu, parity tests, `pytest -m gtx4050 bench/`
# with autosave (issue 6), the h100 layer claims (issue 7), a second kernel run compared against the first.
# Logs and JSON land in $OUT (or ./out/gpu); the logs are also packed into logs.tgz.
set -u
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LIBORTHO_RESULTS_DIR="$OUT"
python3 -m libortho check-gpu --json > "$OUT/check_gpu.json"; echo "check-gpu rc=$?"
timeout 300 python3 -m pytest -q -x tests/test_kernels.py -p no:randomly > "$OUT/parity.log" 2>&1
echo "parity rc=$?"; tail -2 "$OUT/parity.log"
timeout 300 python3 -m pytest -m gtx4050 bench/ -q -rs --benchmark-autosave --benchmark-columns=median,rounds \
  --benchmark-sort=name > "$OUT/bench_gtx4050.log" 2>&1
echo "gtx4050 rc=$?"; tail -3 "$OUT/bench_gtx4050.log"
timeout 100 python3 -m pytest -m h100 bench/test_kernels.py -q -rs --benchmark-columns=median \
  --benchmark-sort=name > "$OUT/bench_h100_kernels.log" 2>&1
echo "h100 kernels rc=$?"; grep -A12 "^Kernels, batch" "$OUT/bench_h100_kernels.log"; tail -3 "$OUT/bench_h100_kernels.log"
timeout 80 python3 -m pytest -m gtx4050 bench/test_kernels.py -q --benchmark-autosave --benchmark-compare \
  --benchmark-compare-fail=median:25% --benchmark-columns=median --benchmark-sort=name > "$OUT/bench_compare.log" 2>&1
echo "compare run rc=$?"; tail -3 "$OUT/bench_compare.log"
tar czf "$OUT/logs.tgz" -C "$OUT" parity.log bench_compare.log
tar czf "$OUT/benchmarks.tgz" .benchmarks 2>/dev/null
rm -f "$OUT/parity.log" "$OUT/bench_compare.log"
