#!/usr/bin/env bash
# Session 20, call 4: the first tile's union entries loaded at the top of the forward and pass 1,
# and pass 1's ending reloads q and dO through L1 (no .cg). (1) kernel GPU tests; (2) per-kernel
# device time against .cache/base (026500a's src), alternated.
# Usage: bash scripts/device/verify_session20d.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"
kt_ab
