#!/usr/bin/env bash
# Session 13, call 1 (fresh machine, .whl carried, 600 s): the cached kernel launch
# (affmae.ops.launch): its GPU test, the cluster-attention GPU tests (also the first GPU run of
# session 12's last changes), host time per eager attention call with it off / on, the issue-3
# table, then the eager aff_small step with it off / on.
# Usage: bash scripts/device/verify_session13.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 240 tests/ops/test_launch.py tests/ops/test_cluster_attention_triton.py
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; echo "== tests $SECONDS s"
timeout 90 python -u scripts/device/attention_host.py "$R/attention_host" > "$R/attention_host.log" 2>&1
echo "== host rc=$? $SECONDS s"; cat "$R/attention_host.txt"; pack
timeout $((560 - SECONDS)) python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --out "$R/attention.json" > "$R/attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; grep -E "^#" "$R/attention.txt"; pack
