#!/usr/bin/env bash
# Session 11, call 2 (fresh machine, .whl carried): issue 4's table with the code call 1
# verified (ca0475c: 19.3 vs 38.3 ms at 512 px), all four default resolutions in one process,
# with the labelled eager profile of one AFF step at 512 px; then the replayed step's kernels
# of both models (where the next milliseconds are).
# Usage: bash scripts/device/verify_session11b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 420 python -u -m affmae.cli bench --models aff_small vit_small --cuda-graph \
  --profile --profile-res 512 --profile-ops 6 --out "$R/bench_table.json" \
  > "$R/bench_table.txt" 2>&1
echo "== bench $SECONDS s"; grep -vE "^(GFLOPs|WARNING)" "$R/bench_table.txt" | grep -E "^(aff|vit|model|step| )" | head -40; pack
left=$((570 - SECONDS))
[ $left -gt 30 ] && timeout $left python -u scripts/device/graph_timeline.py --models aff_small vit_small \
  --res 512 --top 40 > "$R/timeline.txt" 2>&1
grep -E "kernels per step" "$R/timeline.txt"; pack
