#!/usr/bin/env bash
# Session 13, call 2 (600 s): issue 3's whole table at the current code, every implementation in
# one process (Triton isolated and with shared group structures, the PyTorch reference,
# FlexAttention with and without bias-weight gradients), then the per-kernel device-time profile
# of the grouped kernels (scripts/device/attention_kernels.py).
# Usage: bash scripts/device/verify_session13b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 480 python -u -m affmae.bench.attention --impl triton triton_shared torch flex flex_nograd \
  --out "$R/attention.json" > "$R/attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; cat "$R/attention.txt" | cut -c1-400; pack
timeout $((590 - SECONDS)) python -u scripts/device/attention_kernels.py "$R/attention_kernels.txt" \
  > "$R/attention_kernels.log" 2>&1
echo "== kernels rc=$? $SECONDS s"; cat "$R/attention_kernels.txt"; pack
