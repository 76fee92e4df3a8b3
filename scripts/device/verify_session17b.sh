#!/usr/bin/env bash
# Session 17, call 3: the calling-thread backward on a whole eager training step
# (scripts/device/step_thread.py: aff_small, batch 16, caller vs worker alternated in one
# process) at 512 px, then again with the process pinned to one core.
# Usage: bash scripts/device/verify_session17b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
cd scripts/device
timeout 300 python -u step_thread.py "$R/step_thread_free.txt" 512 > "$R/step_thread_free.log" 2>&1
echo "== free rc=$? $SECONDS s"; cat "$R/step_thread_free.txt"; pack
timeout 150 taskset -c 3 python -u step_thread.py "$R/step_thread_pinned.txt" 512 > "$R/step_thread_pinned.log" 2>&1
echo "== pinned rc=$? $SECONDS s"; cat "$R/step_thread_pinned.txt"; tail -3 "$R/step_thread_pinned.log"; pack
