#!/usr/bin/env bash
# Session 12, call 2: grouped attention with BLOCK_K 32 / 16, the group builders (Triton),
# each backward pass; then the GPU tests of session 11's code (norm step with three reruns
# for the noise bound, packed q/k/v, graphed pretraining and resume).
# Ran at commit 2736ba9: scripts/device/grouped_attention.py and the per-cluster kernels it
# compares against were removed in e7c5392 (check that commit out to rerun).
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 200 python -u scripts/device/grouped_attention.py "$R" > "$R/grouped.txt" 2>&1
echo "== grouped rc=$? $SECONDS s"; cat "$R/grouped.txt"; pack
t 170 tests/ops/test_layer_norm.py -k "small_step"
t 100 tests/ops/test_cluster_attention_triton.py -k "packed"
t $((590 - SECONDS)) tests/train/test_pretrain.py -k "graphed or resumes"
grep -E "^==|passed|failed|rc=|Error" "$R/gpu_tests.txt"
