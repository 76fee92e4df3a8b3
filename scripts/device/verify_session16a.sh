#!/usr/bin/env bash
# Session 16, call 1: autograd's backward on the calling thread. The trainer's and the step
# bench's GPU tests (graphed and eager paths); the attention probe (backward_thread.py: worker vs
# caller thread, Function and reference, bitwise-equal gradients); issue 3's table with the
# backward on the calling thread (the default now), 512 px (device time was short).
# Usage: bash scripts/device/verify_session16a.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 220 tests/train/test_pretrain.py tests/train/test_finetune.py tests/bench/test_bench_cuda_graph.py
echo "== tests $SECONDS s"; tail -4 "$R/gpu_tests.txt"
(cd scripts/device && timeout 90 python -u backward_thread.py "$R/backward_thread.txt" > "$R/backward_thread.log" 2>&1)
echo "== probe rc=$? $SECONDS s"; cat "$R/backward_thread.txt"; pack
timeout 200 python -u -m affmae.bench.attention --impl triton triton_shared torch --res 512 \
  --out "$R/attention_caller.json" > "$R/attention_caller.txt" 2>&1
echo "== table caller rc=$? $SECONDS s"; tail -2 "$R/attention_caller.txt" | cut -c1-1200; pack
