#!/usr/bin/env bash
# The user's path at Llama-3-8B scale under the gtx4050 profile (issue 16), on a lent GPU with no hub access:
# a random-weight Llama-3-8B checkpoint in Hugging Face format is written, then the commands a user runs.
#
#   bash bench/gpu_user_path.sh A    plan, run --experiment convert, run --experiment 2 (quick)
#   bash bench/gpu_user_path.sh B    finetune on 200 chat records for 50 steps, generate at alpha 0 and 1
#   bash bench/gpu_user_path.sh exp2 finetune ...   any of: plan convert exp2 exp1 refuse finetune (in that order)
#   (refuse: Experiment 1 with --full-finetune, which the profile cannot hold: exit 3 after the other arms)
#
# Each part fits one 10-minute device call. Run from the checkout root with the project importable; carry
# .gpu/c (bench/stage_user_path.sh makes it: the Debian texts and a trimmed bitsandbytes). Logs, the results
# JSONs and finetune.json land in $OUT.
set -u
PARTS=" ${*:-A} "
has() { case "$PARTS" in *" $1 "*) return 0;; esac; return 1; }
has A && PARTS="$PARTS plan convert exp2 "
has B && PARTS="$PARTS finetune "
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu/c/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 LIBORTHO_CACHE=/tmp/locache \
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation under the 6 GiB cap
mkdir -p /usr/share/doc/jargon-text /usr/share/games /usr/share/dictd /usr/share/common-licenses
cp .gpu/c/texts/jargon.txt.gz /usr/share/doc/jargon-text/ && cp -r .gpu/c/texts/fortunes /usr/share/games/ \
  && cp .gpu/c/texts/devil.dict.dz /usr/share/dictd/ && cp .gpu/c/texts/GPL-3 /usr/share/common-licenses/
CKPT=/tmp/l3
step() {  # name, timeout, command...: log to $OUT/<name>.log, print rc and wall time
  local name=$1 limit=$2; shift 2
  local s; s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - s )) s"; grep -v -i -E "warn|it/s\]|Loading|Writing" "$OUT/$name.log" | tail -8
}
[ -f $CKPT/config.json ] || step write_checkpoint 120 python3 -m libortho.random_checkpoint $CKPT --shape llama3-8b \
  --device cuda
has plan && step plan 60 python3 -m libortho plan --model $CKPT --profile gtx4050
has convert && step convert 240 python3 -m libortho run --experiment convert --model $CKPT --profile gtx4050 \
  --output-dir "$OUT" --no-progress
has exp2 && step exp2 ${EXP2_S:-280} python3 -m libortho run --experiment 2 --model $CKPT --profile gtx4050 --output-dir "$OUT" \
  --no-progress
has exp1 && step exp1 ${EXP1_S:-540} python3 -m libortho run --experiment 1 --num-canaries 4 --model $CKPT --profile gtx4050 \
  --output-dir "$OUT" --no-progress
has refuse && step refuse ${REFUSE_S:-400} python3 -m libortho run --experiment 1 --full-finetune --num-canaries 2 \
  --model $CKPT --profile gtx4050 --output-dir "$OUT/refuse" --no-progress
if has finetune; then
  python3 - <<'PY'
import json
from libortho.data import fortunes
answers = [f for f in fortunes().text.split("\n\n") if 40 < len(f) < 300][:200]
with open("/tmp/records.jsonl", "w") as f:
    for i, a in enumerate(answers):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me fortune number {i}."},
                                         {"role": "assistant", "content": a}]}) + "\n")
PY
  step finetune ${FT_S:-360} python3 -m libortho finetune --model $CKPT --data /tmp/records.jsonl --output /tmp/ft --steps 50 \
    --density 0.005 --group-size 128 --profile gtx4050 --no-progress
  cp /tmp/ft/finetune.json "$OUT/" 2>/dev/null; grep -E "status|OutOfMemory|line [0-9]+, in" /tmp/ft/finetune.json | tail -6
  step generate_a0 ${GEN_S:-90} python3 -m libortho generate --model /tmp/ft --alpha 0 --prompt "Tell me fortune number 3." \
    --max-new-tokens 16
  step generate_a1 ${GEN_S:-90} python3 -m libortho generate --model /tmp/ft --alpha 1 --prompt "Tell me fortune number 3." \
    --max-new-tokens 16
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
