#!/usr/bin/env bash
# Session 16, the one call that ran (H100, cut by the device budget at 227 s: three of the four tests passed, the fourth and the table did not finish): the trainer's and the step bench's GPU tests with the backward
# on the calling thread, then the probe (backward_thread.py), then issue 3's table at 512 px as
# far as the device time lasts.
# Usage: bash scripts/device/verify_session16c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 200 tests/train/test_pretrain.py tests/train/test_finetune.py tests/bench/test_bench_cuda_graph.py
echo "== tests $SECONDS s"; tail -4 "$R/gpu_tests.txt"
(cd scripts/device && timeout 80 python -u backward_thread.py "$R/backward_thread.txt" > "$R/backward_thread.log" 2>&1)
echo "== probe rc=$? $SECONDS s"; cat "$R/backward_thread.txt"; pack
timeout 200 python -u -m affmae.bench.attention --impl triton triton_shared torch --res 512 \
  --out "$R/attention_caller.json" > "$R/attention_caller.txt" 2>&1
echo "== table caller rc=$? $SECONDS s"; tail -2 "$R/attention_caller.txt" | cut -c1-1200; pack
