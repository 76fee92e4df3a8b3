#!/usr/bin/env bash
# Session 5, first GPU call after verify_session4c.sh (which ran out of its test time after the
# 22 cluster-attention GPU tests, all passed): the GPU tests it did not reach (the graphed loss
# and the CUDA-graph run, the fused norm, the point gather), the aff_small step on the Triton
# backend again (the transposed neighbourhood is now built by "auto": a sort for large stages),
# the saved activations per component on CUDA (the Triton paths, not the CPU reference's upper
# bounds), and a labelled profile of one aff_small step at 512 px. Results in OUT/all.tgz.
# Usage (repository root, .whl carried): bash scripts/device/verify_session5.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
timeout 330 python -m pytest -q -m gpu tests/ops/test_layer_norm.py tests/ops/test_point_gather.py \
  tests/train/test_pretrain.py tests/ops/test_cluster_attention_triton.py \
  -k "not (cluster_attention_triton and (full_size or large_logits or compile_fullgraph))" \
  -p no:cacheprovider > "$R/gpu_tests.txt" 2>&1
tail -n 6 "$R/gpu_tests.txt"; pack
timeout 90 python -m affmae.bench.memory --models aff_small vit_small --resolutions 512 --batch 2 \
  --device cuda --out "$R/saved_cuda.json" > "$R/saved_cuda.txt" 2>&1
tail -n 40 "$R/saved_cuda.txt"; pack
timeout 120 affmae bench --models aff_small --resolutions 512 --cuda-graph --profile \
  --profile-ops 10 --out "$R/profile.json" > "$R/profile.txt" 2>&1
tail -n 70 "$R/profile.txt"; pack
