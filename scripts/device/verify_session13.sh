#!/usr/bin/env bash
# For the next session's first GPU call (fresh machine, .whl carried, 600 s): where the grouped
# cluster-attention kernels' time goes now (per kernel, both resolutions), then issue 4's table
# in one process with the current code (about 240 s on a cold machine; last run at ca0475c).
# Usage: bash scripts/device/verify_session13.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 150 python -u scripts/device/attention_kernels.py "$R/attention_kernels.txt" > "$R/attention_kernels.log" 2>&1
echo "== kernels rc=$? $SECONDS s"; cat "$R/attention_kernels.txt"; pack
timeout $((585 - SECONDS)) python -u -m affmae.cli bench --models aff_small vit_small --cuda-graph \
  --out "$R/bench_table.json" > "$R/bench_table.txt" 2>&1
echo "== bench $SECONDS s"; grep -E "^(aff|vit|model)" "$R/bench_table.txt" | tail -17; pack
