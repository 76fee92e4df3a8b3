#!/usr/bin/env bash
# Session 10, call 2 (fresh machine, .whl and .cache carried, 600 s): this session's kernel
# changes on a GPU for the first time:
#  - deformable_weights: the decoder's sampling weights in one fused kernel each way, and the
#    query-side projections as one Linear (in_proj);
#  - one-launch column sums and layer-norm / merge parameter-gradient sums (ticket counters).
# A same-machine A/B of the replayed step at 512 px against the session's start (.cache/base =
# git archive 90c0a9f src; the first cur run compiles every kernel, the base run only those
# whose source differs), then the GPU tests, the column-sum timing, the replayed step's
# kernels and an eager op breakdown. Usage: bash scripts/device/verify_session10b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
ab_bench cur aff_small 240
ab_bench base aff_small 150
ab_bench cur aff_small 60
ab_bench base aff_small 60
ab_bench cur vit_small 60
ab_bench base vit_small 60
t 150 tests/ops/test_deformable_weights.py tests/ops/test_tickets.py
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
timeout 60 python -u scripts/device/colsum_last_reduces.py > "$R/colsum_one_pass.txt" 2>&1
tail -16 "$R/colsum_one_pass.txt"; pack
[ $SECONDS -lt 470 ] && { timeout 50 python -u scripts/device/graph_timeline.py --models aff_small \
  --res 512 > "$R/timeline_cur.txt" 2>&1; grep -A30 "kernels per step" "$R/timeline_cur.txt"; pack; }
left=$((575 - SECONDS)); [ $left -gt 40 ] && t $left tests/ops/test_linear.py \
  tests/ops/test_layer_norm.py tests/ops/test_merge_weights.py -k "not full_size_matches_nn"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
