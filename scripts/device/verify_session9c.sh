#!/usr/bin/env bash
# Session 9, GPU call 3 (fresh machine, .whl carried): call 2 found the once-per-forward weight
# casts packed end to end in their buffer (cuBLAS then chose SM75 "align1" GEMMs: aff_small
# 25.6 ms at 512 px); the casts now start 512 bytes apart. Issue 4's table in one run, the
# replayed step's kernels, the weight-cast GPU test, then the never-run pretraining and
# fine-tuning GPU tests as time allows.
# Usage: bash scripts/device/verify_session9c.sh OUT [LIMIT_S]
OUT=${1:?OUT}
LIMIT=${2:-560}
source "$(dirname "$0")/lib.sh"
timeout 300 affmae bench --models aff_small vit_small --resolutions 448 512 768 1024 \
  --cuda-graph --out "$R/bench_main.json" > "$R/bench_main.txt" 2>&1
echo "== bench $SECONDS s"; grep -E "^(aff|vit)" "$R/bench_main.txt"; pack
timeout 60 python -u scripts/device/graph_timeline.py --models aff_small vit_small --res 512 \
  > "$R/timeline_512.txt" 2>&1
grep -E "kernels per step|under 10" "$R/timeline_512.txt"; echo "timeline $SECONDS s"; pack
run_t() { local left=$((LIMIT - SECONDS)); [ $left -gt 30 ] && t $left "$@"; }
run_t tests/ops/test_linear.py -k cast
run_t tests/train/test_pretrain.py
run_t tests/train/test_finetune.py
[ -f "$R/gpu_tests.txt" ] && grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
