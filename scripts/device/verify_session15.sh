#!/usr/bin/env bash
# For the next session's first call (600 s): session 14's last kernel change (the three kernels
# as a loop over GPP groups per program calling a per-group helper; GPP = 1 by default) was
# made after its device time ran out. First the kernel's GPU tests but the two aff_small steps
# (about 100 s on an H200), then the groups-per-program sweep (scripts/device/tile_sweep.py
# --gpp), then the per-kernel profile of the current sources against .cache/base/src (set that
# to commit 20cd23b's src, the last GPU-verified kernels: git archive 20cd23b src | tar x -C
# .cache/base). The two aff_small step tests need a second call (about 190 s).
# Usage: bash scripts/device/verify_session15.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 200 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
timeout 200 python -u scripts/device/tile_sweep.py "$R/tile_sweep_gpp.txt" --gpp > "$R/tile_sweep_gpp.log" 2>&1
echo "== gpp sweep rc=$? $SECONDS s"; tail -10 "$R/tile_sweep_gpp.txt"; pack
kernels_ab
