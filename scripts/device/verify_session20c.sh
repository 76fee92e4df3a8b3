#!/usr/bin/env bash
# Session 20, call 3, the final kernels (log2 through lg2.approx, union entries one tile ahead):
# (1) the two aff_small training-step tests against the reference backend; (2) issue 3's table
# with the dense-window yardstick (SDPA flash / cuDNN / memory-efficient).
# Usage: bash scripts/device/verify_session20c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 240 "tests/ops/test_cluster_attention_triton.py::test_gpu_aff_small_training_step_matches_reference_backend"
echo "== step tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"
timeout 300 python -m affmae.bench.attention --impl triton triton_shared torch sdpa_flash sdpa_cudnn sdpa_efficient \
  --out "$R/cluster_attention.json" > "$R/cluster_attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; tail -2 "$R/cluster_attention.txt" | cut -c1-600; pack
