#!/usr/bin/env bash
# Issue 17's speed table on a lent H200 in one device call (no staging: shape_only models, no GGUF):
#
#   bash bench/gpu_speed.sh            # LIMIT=540 s; writes $OUT/speed.log and $OUT/speed.json (pytest-benchmark)
#
# Selects, under the h100 profile (the largest in libortho/markers.ini; there is no h200 marker, and `-m h200`
# selects nothing), the 8B shape's decode and prefill of bf16 (graph), tinygemm INT4 (int4mm, the engine-equal
# baseline) and libortho alpha 0 / 1 / 1 with the tensor-core prefill, the batched decode at 1-32 requests (mixed
# alpha and int4mm), and the mixed-alpha targets: every ratio of the acceptance from one run.
set -u
LIMIT=${LIMIT:-540}
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
SELECT='(h100 and llama3-8b and (bf16-static or int4mm or alpha)) or (h100 and (batch or targets))'
s=$(date +%s)
timeout -s INT -k 30 "$LIMIT" python3 -m pytest -m h100 bench/test_throughput.py -k "$SELECT" -q -rA -s \
  -p no:randomly -p no:cacheprovider --benchmark-json="$OUT/speed.json" --benchmark-columns=median,rounds \
  > "$OUT/speed.log" 2>&1
rc=$?
echo "speed: rc=$rc in $(( $(date +%s) - s )) s"
[ $rc = 124 ] && echo "speed: cut by the time limit (LIMIT=$LIMIT); the tests that finished are in speed.log"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/speed.log" | tail -40
exit $rc
