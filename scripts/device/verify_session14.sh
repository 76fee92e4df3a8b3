#!/usr/bin/env bash
# Session 14, call 1 (600 s): lever 3, the single-sweep backward pass 1. Per-kernel device time
# of the current sources and of the previous commit's (.cache/base/src, same machine, same call),
# the GPU tests of the Triton kernel, then issue 3's table without FlexAttention.
# Usage: bash scripts/device/verify_session14.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
kernels_ab
t 220 tests/ops/test_cluster_attention_triton.py
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
timeout $((590 - SECONDS)) python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --out "$R/attention.json" > "$R/attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; cut -c1-300 "$R/attention.txt"; pack
