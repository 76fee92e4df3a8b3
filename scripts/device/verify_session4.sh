#!/usr/bin/env bash
# Session 4 on one H100/H200 (about 7 minutes): the GPU tests of the CUDA-graph loss and the
# fused LayerNorm (now the default on CUDA), the AFF vs ViT bench with the new default
# (--cuda-graph, 448-1024 px) and a kernel profile of one aff_small step at 512 px.
# Results go to OUT/r and one archive OUT/all.tgz (the device tool returns at most 8 files).
# Usage (repository root, .whl carried; see docs/RESULTS.md section 0):
#   bash scripts/device/verify_session4.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
timeout 200 python -m pytest -q -m gpu tests/train/test_pretrain.py tests/ops/test_layer_norm.py \
  -p no:cacheprovider > "$R/gpu_tests.txt" 2>&1
tail -n 4 "$R/gpu_tests.txt"
timeout 240 affmae bench --models aff_small aff_small:pred_ratio=0.5 vit_small \
  vit_small_crossmae:pred_ratio=0.5 --resolutions 448 512 768 1024 --cuda-graph \
  --out "$R/bench_graph.json" > "$R/bench_graph.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench_graph.txt"
timeout 100 affmae bench --models aff_small --resolutions 512 --profile --profile-ops 8 \
  --out "$R/profile_aff512.json" > "$R/profile_aff512.txt" 2>&1
tar czf "$OUT/all.tgz" -C "$OUT" r
