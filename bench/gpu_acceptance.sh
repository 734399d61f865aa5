#!/usr/bin/env bash
# The acceptance run on a lent GPU (issues 5, 6 and 7), in two parts that each fit one 10-minute device call:
#   bash bench/gpu_acceptance.sh 1   check-gpu, parity tests, `pytest -m h100 bench/` (issue 7: layer ratios
#                                    and end to end)
#   bash bench/gpu_acceptance.sh 2   `pytest -m gtx4050 bench/` with autosave (issue 6), then a second kernel
#                                    run compared against the first
# No argument runs both. Logs and JSON land in $OUT (or ./out/gpu); logs are packed into logs.tgz.
set -u
PART=${1:-all}
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LIBORTHO_RESULTS_DIR="$OUT"
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  python3 -m libortho check-gpu --json > "$OUT/check_gpu.json"; echo "check-gpu rc=$?"
  timeout 300 python3 -m pytest -q -x tests/test_kernels.py -p no:randomly > "$OUT/parity.log" 2>&1
  echo "parity rc=$?"; tail -2 "$OUT/parity.log"
  timeout 280 python3 -m pytest -m h100 bench/ -q -rs --benchmark-columns=median --benchmark-sort=name \
    > "$OUT/bench_h100.log" 2>&1
  echo "h100 rc=$?"; grep -A12 "^Kernels, batch" "$OUT/bench_h100.log"; tail -3 "$OUT/bench_h100.log"
  tar czf "$OUT/logs1.tgz" -C "$OUT" parity.log && rm -f "$OUT/parity.log"
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  timeout 300 python3 -m pytest -m gtx4050 bench/ -q -rs --benchmark-autosave --benchmark-columns=median,rounds \
    --benchmark-sort=name > "$OUT/bench_gtx4050.log" 2>&1
  echo "gtx4050 rc=$?"; tail -3 "$OUT/bench_gtx4050.log"
  timeout 120 python3 -m pytest -m gtx4050 bench/test_kernels.py -q --benchmark-autosave --benchmark-compare \
    --benchmark-compare-fail=median:25% --benchmark-columns=median --benchmark-sort=name > "$OUT/bench_compare.log" 2>&1
  echo "compare run rc=$?"; tail -3 "$OUT/bench_compare.log"
  tar czf "$OUT/logs2.tgz" -C "$OUT" bench_compare.log && rm -f "$OUT/bench_compare.log"
  tar czf "$OUT/benchmarks.tgz" .benchmarks 2>/dev/null
fi
