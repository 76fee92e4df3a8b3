#!/usr/bin/env bash
# Session 11, call 3 (fresh machine, .whl and .cache carried; the session's last device time).
# Since call 2 (ca0475c): the blocks chained (each block's last residual step fused with the
# next block's input norm), cluster attention's packed q/k/v gradients (22c7d1a = "chain"),
# and the merge gather's backward summing equal rows before its atomics ("cur").
# Before: for c in base:ca0475c chain:22c7d1a; do rm -rf .cache/${c%%:*}; mkdir -p .cache/${c%%:*};
#   git archive ${c#*:} src | tar -x -C .cache/${c%%:*}; done
# 1. issue 4's table with this code, one process, all four resolutions;
# 2. the GPU tests of the changed paths;
# 3. same-machine A/B at 512 px (base, chain, cur), as time allows; 4. the AFF step's kernels.
# Usage: bash scripts/device/verify_session11c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
[ -d .cache/base/src ] && [ -d .cache/chain/src ] || { echo ".cache trees missing (header)"; exit 2; }
timeout 240 python -u -m affmae.cli bench --models aff_small vit_small --cuda-graph \
  --out "$R/bench_table.json" > "$R/bench_table.txt" 2>&1
echo "== bench $SECONDS s"; grep -E "^(aff|vit|model)" "$R/bench_table.txt" | tail -17; pack
tt() { local lim=$1; shift; local left=$((480 - SECONDS)); [ $left -lt 30 ] && return
  [ $lim -gt $left ] && lim=$left; t $lim "$@"; }
tt 90 tests/ops/test_layer_norm.py
tt 90 tests/ops/test_point_gather.py -k "model_shapes or full_size"
tt 60 tests/ops/test_cluster_attention_triton.py -k "aff_small or full_size or packed"
tt 120 tests/train/test_pretrain.py -k "graphed or resumes"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
for which in base chain cur; do [ $SECONDS -lt 540 ] && ab_bench $which aff_small 45; done
[ $SECONDS -lt 555 ] && ab_bench base vit_small 40
[ $SECONDS -lt 550 ] && { timeout $((590 - SECONDS)) python -u scripts/device/graph_timeline.py \
  --models aff_small --res 512 --top 40 > "$R/timeline.txt" 2>&1; grep "kernels per step" "$R/timeline.txt"; }
pack
