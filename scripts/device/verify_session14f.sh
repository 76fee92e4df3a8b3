#!/usr/bin/env bash
# Session 14, call 6 (the rest of the session's device time): AFF-Small against the ViT-S/8 MAE
# at 512 and 768 px in one process, whole steps in CUDA graphs (issue 4's table, two sizes).
# Usage: bash scripts/device/verify_session14f.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 270 python -u -m affmae.cli bench --models aff_small vit_small --resolutions 512 768 \
  --cuda-graph --out "$R/bench.json" > "$R/bench.txt" 2>&1
echo "== bench rc=$? $SECONDS s"; grep -vE "^\s*$" "$R/bench.txt" | tail -20; pack
