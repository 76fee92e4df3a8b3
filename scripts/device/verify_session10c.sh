#!/usr/bin/env bash
# Session 10, call 3 (fresh machine, .whl carried, about 200 s of device time left): the
# session's final code (the fused deformable weights and in_proj; the ticket reductions
# reverted after call 2) timed against the ViT in one process, 512 px first.
# Usage: bash scripts/device/verify_session10c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 230 python -u -m affmae.cli bench --models aff_small vit_small --resolutions 512 768 \
  --cuda-graph --out "$R/bench_final.json" > "$R/bench_final.txt" 2>&1
echo "== bench $SECONDS s"; cat "$R/bench_final.txt" | grep -vE "^(GFLOPs|WARNING)"; pack
