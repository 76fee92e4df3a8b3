#!/usr/bin/env bash
# Session 13, call 1 (fresh machine, .whl carried, 600 s): the cached kernel launch
# (affmae.ops.launch): its GPU test and the cluster-attention GPU tests (also the first GPU run
# of session 12's last changes); host time per eager attention call with it off / on; then the
# heads-per-program prototype kernels against the one-head ones (scripts/device/heads_per_program.py).
# Usage: bash scripts/device/verify_session13.sh OUT
# Ran at commit 698dc2f with the heads-per-program files of commit (next) untracked; the cached
# launch it tests and its test were reverted after this call (no host-time gain: BENCHMARKS,
# session 13), so rerun it at 698dc2f.
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 230 tests/ops/test_launch.py tests/ops/test_cluster_attention_triton.py
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; echo "== tests $SECONDS s"
timeout 90 python -u scripts/device/attention_host.py "$R/attention_host" > "$R/attention_host.log" 2>&1
echo "== host rc=$? $SECONDS s"; cat "$R/attention_host.txt"; pack
timeout $((585 - SECONDS)) python -u scripts/device/heads_per_program.py "$R/heads_per_program.txt" \
  > "$R/heads_per_program.log" 2>&1
echo "== hp rc=$? $SECONDS s"; cat "$R/heads_per_program.txt"; tail -5 "$R/heads_per_program.log"; pack
