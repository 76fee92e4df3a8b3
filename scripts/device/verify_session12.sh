#!/usr/bin/env bash
# Session 12, call 1 (fresh machine, .whl carried, 600 s): the grouped cluster-attention
# kernels against the per-cluster ones (issue 3), then the GPU tests of session 11's chained
# blocks (the whole-step norm tests run both models' chained blocks on a GPU).
# Usage: bash scripts/device/verify_session12.sh OUT
# Ran at commit 805bcf7: scripts/device/grouped_attention.py and the per-cluster kernels it
# compares against were removed in e7c5392 (check that commit out to rerun).
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 330 python -u scripts/device/grouped_attention.py "$R" > "$R/grouped.txt" 2>&1
echo "== grouped rc=$? $SECONDS s"; cat "$R/grouped.txt"; pack
t $((590 - SECONDS)) tests/ops/test_layer_norm.py -k "small_step"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
