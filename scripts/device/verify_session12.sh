#!/usr/bin/env bash
# For the next session's first GPU call (fresh machine, .whl carried, 600 s).
# Session 11's kept code (22c7d1a: blocks chained through fused residual norms, cluster
# attention's packed q/k/v gradients) was timed only at 512 px in separate processes
# (aff_small 18.6 ms, vit_small 38.3) and its GPU tests were cut by first compiles. This runs,
# most important first: the GPU tests of those two changes (the whole-step norm tests run the
# chained blocks of both models; the packed-gradient test; the graphed run and its resume),
# then issue 4's table in one process (about 240 s on a cold machine).
# Usage: bash scripts/device/verify_session12.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_layer_norm.py -k "small_step"
t 120 tests/ops/test_cluster_attention_triton.py -k "packed or aff_small"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
left=$((585 - SECONDS))
timeout $left python -u -m affmae.cli bench --models aff_small vit_small --cuda-graph \
  --out "$R/bench_table.json" > "$R/bench_table.txt" 2>&1
echo "== bench $SECONDS s"; grep -E "^(aff|vit|model)" "$R/bench_table.txt" | tail -17; pack
# then, in a second call: t 200 tests/train/test_pretrain.py -k "graphed or resumes"
