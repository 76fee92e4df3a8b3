#!/usr/bin/env bash
# Session 8, GPU call B, chained on call A's warm machine: issue 4's table at the current
# sources (--cuda-graph) in three runs, so a cut call keeps what finished: aff_small and
# vit_small at 512 / 768 px, the pred_ratio / CrossMAE variants there, then 448 / 1024 px;
# then the graphed-loss whole-model GPU test as time allows.
# Usage: bash scripts/device/verify_session8d.sh OUT [LIMIT_S]
OUT=${1:?OUT}
LIMIT=${2:-400}
source "$(dirname "$0")/lib.sh"
b() { local name=$1; shift
  [ $SECONDS -gt $((LIMIT - 40)) ] && return
  timeout $((LIMIT - SECONDS - 5)) affmae bench "$@" --cuda-graph --out "$R/bench_$name.json" \
    > "$R/bench_$name.txt" 2>&1
  echo "== $name $SECONDS s"; grep -E "^(aff|vit)" "$R/bench_$name.txt"; pack; }
b main --models aff_small vit_small --resolutions 512 768
b ratio --models aff_small:pred_ratio=0.5 vit_small_crossmae:pred_ratio=0.5 vit_small \
  --resolutions 512 768
b ends --models aff_small vit_small aff_small:pred_ratio=0.5 vit_small_crossmae:pred_ratio=0.5 \
  --resolutions 448 1024
[ $SECONDS -lt $((LIMIT - 130)) ] && t $((LIMIT - SECONDS - 5)) tests/train/test_pretrain.py -k graphed_loss_gradients
[ -f "$R/gpu_tests.txt" ] && grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
