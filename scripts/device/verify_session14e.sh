#!/usr/bin/env bash
# Session 14, call 5: the bf16-autocast aff_small step test at two pipelining stages, and the
# whole aff_small pretraining step (512 px, CUDA graph) of the current sources and of the
# previous commit's (.cache/base/src, three stages), same machine.
# Usage: bash scripts/device/verify_session14e.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 250 tests/ops/test_cluster_attention_triton.py -k bf16_autocast
echo "== tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"
ab_bench cur aff_small 100
ab_bench base aff_small 100
ab_bench cur aff_small 100
