#!/usr/bin/env bash
# Written in session 16, run in session 17 (docs/BENCHMARKS.md "Session 17"): finish checking autograd's backward
# on the calling thread. First `git revert 797093f d085f8a` (puts back `python -m
# affmae.bench.attention --backward-thread caller|worker` and the calling-thread backward in
# affmae bench's step; both also capture that backward inside CUDA graphs) and copy the sources
# before session 16 into .cache/base (`git archive 6849383 src | tar x -C .cache/base`). Then,
# in one call:
# 1. the step bench's GPU test (its graph capture with the backward on the calling thread);
# 2. the aff_small eager training step (no CUDA graph), current sources against .cache/base
#    (autograd's worker thread), alternated;
# 3. issue 3's table (python -m affmae.bench.attention --impl triton triton_shared torch) with
#    the backward on the calling thread (the default) and on autograd's worker thread.
# About 10 minutes on an H100: split it over two calls if the limit is tight.
# Usage: bash scripts/device/verify_session17.sh OUT [PART]   (PART 1: steps 1-2, 2: step 3, all: both)
OUT=${1:?OUT}; PART=${2:-all}
source "$(dirname "$0")/lib.sh"
if [ "$PART" != 2 ]; then
t 150 tests/bench/test_bench_cuda_graph.py
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
for which in cur base cur base; do
  P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
  PYTHONPATH=$P timeout 150 python -u -m affmae.cli bench --models aff_small --resolutions 512 \
    --out "$R/step_${which}_$SECONDS.json" > "$R/step_${which}_$SECONDS.txt" 2>&1
  echo "== step $which rc=$? $SECONDS s"; grep -h "^aff_small " "$R"/step_${which}_*.txt | tail -1; pack
done
fi
[ "$PART" = 1 ] && exit 0
for mode in caller worker; do
  timeout 270 python -u -m affmae.bench.attention --impl triton triton_shared torch \
    --backward-thread $mode --out "$R/attention_$mode.json" > "$R/attention_$mode.txt" 2>&1
  echo "== table $mode rc=$? $SECONDS s"; tail -2 "$R/attention_$mode.txt" | cut -c1-1200; pack
done
