#!/usr/bin/env bash
# Ran in session 18 (docs/BENCHMARKS.md "Session 18"); its kernel-time loop moved to lib.sh's kt_ab after the run (same commands).
# Session 18, call 3: backward pass 1 with fewer live registers (dP before the bias, q and dO
# reloaded for the epilogue's sums: 243 registers and no spills where it had 255 and spills),
# checked and timed against .cache/base (HEAD before this session), then single-kernel settings:
# keys per tile and a register cap (register-limited occupancy: 8 warps per SM for pass 1).
# Usage: bash scripts/device/verify_session18c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
kt_ab
PYTHONPATH=/tmp/site:$PWD/src timeout 200 python -u scripts/device/kernel_times.py "$R/kt_configs.json" \
  --configs fwd:32:0,fwd:32:96,q:32:0,q:16:0,q:16:168,q:16:128,kv:32:0,kv:32:128 \
  > "$R/kt_configs.txt" 2>&1
echo "== configs rc=$? $SECONDS s"; grep total "$R/kt_configs.txt"; pack
