#!/usr/bin/env bash
# Session 9, GPU call 2 (fresh machine, .whl carried, 600 s): issue 4's table in one run at
# the current sources (merge backward reverted to 8feee23's, weights cast once per forward),
# the replayed aff_small step's kernels at 512 px, then the GPU tests of this session's
# changes (the once-per-forward weight casts; the whole aff_small step against the reference
# backend).
# Usage: bash scripts/device/verify_session9.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 450 affmae bench --models aff_small vit_small --resolutions 448 512 768 1024 \
  --cuda-graph --out "$R/bench_main.json" > "$R/bench_main.txt" 2>&1
echo "== bench $SECONDS s"; grep -E "^(aff|vit)" "$R/bench_main.txt"; pack
timeout 70 python -u scripts/device/graph_timeline.py --models aff_small --res 512 \
  > "$R/timeline_512.txt" 2>&1
grep -E "kernels per step|under 10" "$R/timeline_512.txt"; echo "timeline $SECONDS s"; pack
left=$((585 - SECONDS)); [ $left -gt 30 ] && t $left tests/ops/test_linear.py -k "cast or full_size"
left=$((590 - SECONDS)); [ $left -gt 30 ] && t $left tests/ops/test_cluster_attention_triton.py -k aff_small_training_step
[ -f "$R/gpu_tests.txt" ] && grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
