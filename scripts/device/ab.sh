#!/usr/bin/env bash
# Same-machine A/B of an aff_small training step (or any bench spec) between the current
# sources and a base revision, then the replayed step's kernels of each. Machines differ by
# several percent, so a change is only measured against its base on one machine.
# Before the call: rm -rf .cache/base && mkdir -p .cache/base &&
#   git archive BASE_REV src | tar -x -C .cache/base      (carry .whl and .cache)
# Each side compiles its own Triton kernels on a fresh machine (about 200 s for aff_small), so
# each side's first run gets a long limit (session 9's base runs hit 120 s and left nothing).
# Usage: bash scripts/device/ab.sh OUT [MODEL] [RES]
OUT=${1:?OUT}
MODEL=${2:-aff_small}
RES=${3:-512}
source "$(dirname "$0")/lib.sh"
[ -d .cache/base/src ] || { echo ".cache/base/src is missing (see the header)"; exit 2; }
declare -A lim=([cur]=280 [base]=220)
for which in cur base cur base cur base; do
  [ $SECONDS -gt 420 ] && break
  P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
  PYTHONPATH=$P timeout ${lim[$which]} python -m affmae.cli bench --models "$MODEL" \
    --resolutions "$RES" --cuda-graph > "$R/ab_${SECONDS}_$which.txt" 2>&1
  lim[$which]=90
  echo "== $which $SECONDS s"; grep -hE "^$MODEL" "$R"/ab_*_$which.txt | tail -1; pack
done
for which in base cur; do
  [ $SECONDS -gt 520 ] && break
  P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
  PYTHONPATH=$P timeout 60 python -u scripts/device/graph_timeline.py --models "$MODEL" \
    --res "$RES" > "$R/timeline_$which.txt" 2>&1
  grep -E "kernels per step" "$R/timeline_$which.txt"; pack
done
