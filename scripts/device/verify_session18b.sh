#!/usr/bin/env bash
# Session 18, call 2 (after verify_session18.sh, same warm machine; ran as written): the
# aff_small training-step GPU tests of the cluster-attention kernels, then issue 3's table.
# Usage: bash scripts/device/verify_session18b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 240 tests/ops/test_cluster_attention_triton.py -k "training_step"
echo "== step tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
timeout 300 python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --out "$R/attention.json" > "$R/attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; tail -3 "$R/attention.txt" | cut -c1-1500; pack
