#!/usr/bin/env bash
# Session 15, call 6: which pinning halves the eager host time (attention_host_pin2.py); the
# aff_small eager training step (no CUDA graph) with the process free and pinned to one core
# (taskset); issue 3's table with the process pinned to one core.
# Usage: bash scripts/device/verify_session15c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 120 python -u scripts/device/attention_host_pin2.py "$R/pin2.txt" > "$R/pin2.log" 2>&1
echo "== pin2 rc=$? $SECONDS s"; cat "$R/pin2.txt"; pack
for how in free pinned free pinned; do
  pre=""; [ $how = pinned ] && pre="taskset -c 3"
  $pre timeout 150 python -u -m affmae.cli bench --models aff_small --resolutions 512 \
    --out "$R/step_${how}_$SECONDS.json" > "$R/step_${how}_$SECONDS.txt" 2>&1
  echo "== step $how rc=$? $SECONDS s"; grep -h "^aff_small " "$R"/step_${how}_*.txt | tail -1; pack
done
taskset -c 3 timeout 280 python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --out "$R/attention_pinned.json" > "$R/attention_pinned.txt" 2>&1
echo "== table pinned rc=$? $SECONDS s"; tail -2 "$R/attention_pinned.txt"; pack
