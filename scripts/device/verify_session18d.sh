#!/usr/bin/env bash
# Session 18, call 5: GPU tests of the graphed trainer and of the bench's graphed step with the
# session's cluster-attention kernels (regression guard for the kernels inside whole models).
# Usage: bash scripts/device/verify_session18d.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/train/test_pretrain.py -k "resumes or graphed"
echo "== pretrain $SECONDS s"; tail -2 "$R/gpu_tests.txt"
t 150 tests/bench/test_bench_cuda_graph.py
echo "== bench graph $SECONDS s"; tail -2 "$R/gpu_tests.txt"
