#!/usr/bin/env bash
# Ran in session 19 (docs/BENCHMARKS.md "Session 19"); its configs step moved to lib.sh's kt_configs after the run (same commands).
# Session 19, call 1: the bias weights' gradient moved from backward pass 1 to pass 2 (pass 1's
# loop 768 -> 457 instructions, pass 2's 474 -> 600, Triton 3.6 counts; r2 carries 1e-30 instead of a
# clamp: the forward 437 -> 421). GPU tests of the
# kernels, per-kernel device time against .cache/base (81503f1) alternated, register caps for
# the two passes, the kernel tests again under the caps (the aff_small step tests: call 2).
# Usage: bash scripts/device/verify_session19.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"
kt_ab
kt_configs 150 q:32:168,q:32:128,kv:32:168,kv:16:0
echo "== caps q=168,kv=168: tests/ops/test_cluster_attention_triton.py -k 'not training_step'" >> "$R/gpu_tests.txt"
timeout 120 python scripts/device/with_maxnreg.py q=168,kv=168 -m pytest -q -m gpu -p no:cacheprovider \
  --tb=short tests/ops/test_cluster_attention_triton.py -k "not training_step" >> "$R/gpu_tests.txt" 2>&1
echo "rc=$?" >> "$R/gpu_tests.txt"; echo "== capped tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"; pack
