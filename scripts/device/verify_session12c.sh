#!/usr/bin/env bash
# Session 12, call 3: the grouped cluster-attention kernels in the package (kernel.py now):
# their GPU tests, the issue-3 table (isolated calls and with the stage's group structures
# shared), and the aff_small step at 512 px against the tree before them (.cache/s11).
# Usage: bash scripts/device/verify_session12c.sh OUT   (carry .whl and .cache/s11)
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 170 tests/ops/test_cluster_attention_triton.py
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
timeout 150 python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --out "$R/attention.json" > "$R/attention.txt" 2>&1
echo "== attention rc=$? $SECONDS s"; cat "$R/attention.txt"; pack
ab_bench cur aff_small $(( (590 - SECONDS) / 2 ))
ab_bench s11 aff_small $((590 - SECONDS))
ab_bench cur aff_small $((595 - SECONDS))
