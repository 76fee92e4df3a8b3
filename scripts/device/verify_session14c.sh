#!/usr/bin/env bash
# Session 14, call 3 (600 s): launch parameters of the three kernels after the single-sweep
# backward (scripts/device/tile_sweep.py), then the host time of an eager call and its profile
# (scripts/device/attention_host.py).
# Usage: bash scripts/device/verify_session14c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 420 python -u scripts/device/tile_sweep.py "$R/tile_sweep.txt" > "$R/tile_sweep.log" 2>&1
echo "== sweep rc=$? $SECONDS s"; tail -16 "$R/tile_sweep.txt"; pack
timeout $((590 - SECONDS)) python -u scripts/device/attention_host.py "$R/attention_host" > "$R/attention_host.log" 2>&1
echo "== host rc=$? $SECONDS s"; cat "$R/attention_host.txt"; pack
