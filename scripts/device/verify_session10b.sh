#!/usr/bin/env bash
# Session 10, call 2 (fresh machine, .whl and .cache carried, 600 s): this session's two kernel
# changes on a GPU for the first time.
#  - deformable_weights: the decoder's sampling weights in one fused kernel each way;
#  - one-launch column sums / layer-norm and merge parameter-gradient sums (ticket counters).
# First their GPU tests (correctness before time), then a same-machine A/B of the replayed
# aff_small step at 512 px against the session's start (.cache/base = git archive 90c0a9f src),
# vit_small once each side, the kernels of the replayed step and an eager op breakdown.
# Usage: bash scripts/device/verify_session10b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 170 tests/ops/test_deformable_weights.py tests/ops/test_tickets.py
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
bench() {  # bench WHICH MODEL LIMIT
  local P=/tmp/site:$PWD/src; [ "$1" = base ] && P=/tmp/site:$PWD/.cache/base/src
  PYTHONPATH=$P timeout "$3" python -m affmae.cli bench --models "$2" --resolutions 512 \
    --cuda-graph > "$R/ab_${SECONDS}_$1_$2.txt" 2>&1
  echo "== $1 $2 $SECONDS s"; grep -hE "^$2 " "$R"/ab_*_$1_$2.txt | tail -1; pack
}
bench cur aff_small 150
bench base aff_small 150
bench cur aff_small 60
bench base aff_small 60
bench cur vit_small 90
bench base vit_small 90
[ $SECONDS -lt 430 ] && { timeout 60 python -u scripts/device/graph_timeline.py --models aff_small \
  --res 512 > "$R/timeline_cur.txt" 2>&1; grep -A28 "kernels per step" "$R/timeline_cur.txt"; pack; }
[ $SECONDS -lt 480 ] && { timeout 60 python -u scripts/device/op_breakdown.py --ops all --top 70 \
  > "$R/op_breakdown_cur.txt" 2>&1; pack; }
left=$((570 - SECONDS)); [ $left -gt 40 ] && t $left tests/ops/test_linear.py \
  tests/ops/test_layer_norm.py tests/ops/test_merge_weights.py -k "colsum or step or merge or weight"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
