#!/usr/bin/env bash
# What session 4 changed after its device time ran out, on one H100/H200 (about 8 minutes):
# the GPU tests of cluster attention (the per-stage transposed neighbourhood `nbr_t`, float32
# blanks), the CUDA-graph loss and the norms; device time per attention kernel with both ways
# to build the transposed neighbourhood ("count" vs "sort"); the AFF vs ViT bench at the
# current code (CUDA graph, 512 / 768 px) for the step time and peak after the
# interpolation-weight and gather changes. Results in OUT/all.tgz (the device tool returns at
# most 8 files). Usage (repository root, .whl carried): bash scripts/device/verify_session4c.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
timeout 240 python -m pytest -q -m gpu tests/ops/test_cluster_attention_triton.py \
  tests/train/test_pretrain.py tests/ops/test_layer_norm.py tests/ops/test_point_gather.py \
  -p no:cacheprovider > "$R/gpu_tests.txt" 2>&1
tail -n 4 "$R/gpu_tests.txt"
timeout 80 python scripts/device/attention_kernels.py "$R/attention_kernels.txt" > /dev/null 2> "$R/kern_err.txt"
cat "$R/attention_kernels.txt"; tail -n 3 "$R/kern_err.txt"
timeout 150 affmae bench --models aff_small vit_small --resolutions 512 768 --cuda-graph \
  --out "$R/bench_graph.json" > "$R/bench_graph.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench_graph.txt"
tar czf "$OUT/all.tgz" -C "$OUT" r
