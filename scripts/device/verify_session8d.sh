#!/usr/bin/env bash
# Session 8, GPU call B, chained on call A's warm machine: issue 4's table at the current
# sources (448-1024 px, pred_ratio, CrossMAE; --cuda-graph), then the whole-model GPU tests
# (the graphed loss against eager, fine-tuning in a CUDA graph) as time allows.
# Usage: bash scripts/device/verify_session8d.sh OUT [LIMIT_S]
OUT=${1:?OUT}
LIMIT=${2:-400}
source "$(dirname "$0")/lib.sh"
timeout $((LIMIT - 10)) affmae bench --models aff_small vit_small aff_small:pred_ratio=0.5 \
  vit_small_crossmae:pred_ratio=0.5 --resolutions 512 768 448 1024 --cuda-graph \
  --out "$R/bench.json" > "$R/bench.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench.txt"; echo "bench $SECONDS s"; pack
[ $SECONDS -lt $((LIMIT - 130)) ] && t $((LIMIT - SECONDS - 5)) tests/train/test_pretrain.py -k graphed_loss_gradients
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
