#!/usr/bin/env bash
# Session 16, call 2: issue 3's table (python -m affmae.bench.attention --impl triton
# triton_shared torch) with the backward on the calling thread (the default now) and on
# autograd's worker thread, in one call.
# Usage: bash scripts/device/verify_session16b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
for mode in caller worker; do
  timeout 280 python -u -m affmae.bench.attention --impl triton triton_shared torch \
    --backward-thread $mode --out "$R/attention_$mode.json" > "$R/attention_$mode.txt" 2>&1
  echo "== table $mode rc=$? $SECONDS s"; tail -2 "$R/attention_$mode.txt" | cut -c1-900; pack
done
