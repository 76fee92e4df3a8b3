#!/usr/bin/env bash
# After the gather changes: GPU tests of the touched ops, profile, and the bench with CUDA graphs.
# Usage: bash scripts/device/perf_probe2.sh OUT
set -u
OUT=${1:?OUT}
mkdir -p "$OUT"
git rev-parse HEAD > "$OUT/commit.txt"
timeout 150 python -m pytest -q -m gpu tests/ops/test_point_gather.py tests/ops/test_cluster_attention_triton.py \
  -k "model_shapes or full_size or training_step or compile" > "$OUT/gpu_tests.txt" 2>&1
timeout 100 affmae bench --models aff_small --resolutions 512 --steps 10 --warmup 3 \
  --profile --profile-ops 8 --out "$OUT/profile512.json" > "$OUT/profile512.txt" 2>&1
timeout 200 affmae bench --models aff_small aff_small:pred_ratio=0.5 aff_small:grad_checkpoint=decoder \
  vit_small vit_small_crossmae:pred_ratio=0.5 --resolutions 512 768 --cuda-graph \
  --out "$OUT/graph.json" > "$OUT/graph.txt" 2>&1
echo done >> "$OUT/commit.txt"
