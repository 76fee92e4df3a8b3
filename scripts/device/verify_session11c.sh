#!/usr/bin/env bash
# Session 11, call 3 (fresh machine, .whl and .cache carried; the session's last device time):
# the blocks chained (each block's last residual step fused with the next block's input norm)
# and cluster attention's packed q/k/v gradients, against ca0475c (call 2's code).
# Before: rm -rf .cache/base && mkdir -p .cache/base && git archive ca0475c src | tar -x -C .cache/base
# 1. issue 4's table with this code, one process, all four resolutions;
# 2. the GPU tests of the changed paths (norms in whole steps of both models, cluster attention
#    at full size and in the aff_small step, the graphed run and its resume);
# 3. same-machine A/B at 512 px against the base, as time allows; 4. the replayed AFF step's kernels.
# Usage: bash scripts/device/verify_session11c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
[ -d .cache/base/src ] || { echo ".cache/base/src is missing (see the header)"; exit 2; }
timeout 240 python -u -m affmae.cli bench --models aff_small vit_small --cuda-graph \
  --out "$R/bench_table.json" > "$R/bench_table.txt" 2>&1
echo "== bench $SECONDS s"; grep -E "^(aff|vit|model)" "$R/bench_table.txt" | tail -16; pack
tt() { local lim=$1; shift; local left=$((540 - SECONDS)); [ $left -lt 30 ] && return
  [ $lim -gt $left ] && lim=$left; t $lim "$@"; }
tt 100 tests/ops/test_layer_norm.py
tt 100 tests/ops/test_cluster_attention_triton.py -k "aff_small or full_size or packed"
tt 120 tests/train/test_pretrain.py -k "graphed or resumes"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
[ $SECONDS -lt 470 ] && ab_bench base aff_small 60
[ $SECONDS -lt 500 ] && ab_bench cur aff_small 40
[ $SECONDS -lt 520 ] && ab_bench base vit_small 40
[ $SECONDS -lt 530 ] && { timeout $((585 - SECONDS)) python -u scripts/device/graph_timeline.py \
  --models aff_small --res 512 --top 40 > "$R/timeline.txt" 2>&1; grep "kernels per step" "$R/timeline.txt"; }
pack
