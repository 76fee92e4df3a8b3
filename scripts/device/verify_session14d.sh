#!/usr/bin/env bash
# Session 14, call 4 (600 s): two pipelining stages (num_stages=2) for the three kernels. Per-kernel
# device time of the current sources and of the previous commit's (.cache/base/src: Triton's
# default, three), same machine and call; issue 3's table (no FlexAttention); then the kernel's
# GPU tests but the bf16-autocast training step (run in call 2 at three stages; the stage count
# changes the load schedule, not the arithmetic).
# Usage: bash scripts/device/verify_session14d.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
kernels_ab
timeout 120 python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --out "$R/attention.json" > "$R/attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; grep "^#" "$R/attention.txt" | cut -c1-300; pack
t $((590 - SECONDS)) tests/ops/test_cluster_attention_triton.py -k "not bf16_autocast"
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
