#!/usr/bin/env bash
# Session 15, call 1: the eager call's host-time floors (attention_host_floor.py), then the
# groups-per-program sweep of the reverted refactor, which runs the GPP = 1 baseline in the same
# process. Its sources go under .cache/gpp: on a scratch branch from a2c9746, git revert a2c9746
# d1136fa 32e6e49 331cbe8 6ef274c 28776d2, then git archive HEAD src scripts tests | tar x -C .cache/gpp.
# Usage: bash scripts/device/verify_session15a.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 150 python -u scripts/device/attention_host_floor.py "$R/attention_host_floor.txt" > "$R/floor.log" 2>&1
echo "== floor rc=$? $SECONDS s"; cat "$R/attention_host_floor.txt"; pack
PYTHONPATH=/tmp/site:$PWD/.cache/gpp/src timeout 240 python -u .cache/gpp/scripts/device/tile_sweep.py \
  "$R/tile_sweep_gpp.txt" --gpp > "$R/tile_sweep_gpp.log" 2>&1
echo "== gpp sweep rc=$? $SECONDS s"; tail -40 "$R/tile_sweep_gpp.txt"; pack
