#!/usr/bin/env bash
# What session 3 could not run on a GPU (its device time was spent): the CUDA-graph tests after
# the gradient-accumulation fix, the loop with --grad-accum 4 eager vs graphed, the fused
# LayerNorm's GPU tests and its step time (norm_backend=triton, both model families alike), and
# the eager bench after the gather changes. One H100/H200, about 8 minutes.
# Usage (repository root, data/em/isbi2012 and .whl carried; see docs/RESULTS.md section 0):
#   bash scripts/device/verify_session3.sh OUT
set -u
OUT=${1:?OUT}
mkdir -p "$OUT"
timeout 200 python -m pytest -q -m gpu tests/train/test_pretrain.py tests/ops/test_layer_norm.py \
  -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1
timeout 150 affmae bench --models aff_small aff_small:norm_backend=triton vit_small \
  vit_small:norm_backend=triton --resolutions 512 768 --cuda-graph \
  --out "$OUT/bench_norm.json" > "$OUT/bench_norm.txt" 2>&1
for mode in eager graph; do
  flag="--no-cuda-graph"; [ "$mode" = graph ] && flag="--cuda-graph"
  timeout 120 affmae pretrain --data data/em/isbi2012/train/images --size 512 --model aff_small \
    --batch-size 4 --grad-accum 4 --steps 40 --lr 5e-4 --warmup-steps 10 --precision bf16 \
    --device cuda --num-workers 8 --crop random_crop --out "runs/accum_$mode" --figure-every 0 \
    --log-every 10 --ckpt-every 1000 --no-progress $flag > "$OUT/accum_$mode.txt" 2>&1
  cp "runs/accum_$mode/log.csv" "$OUT/accum_${mode}_log.csv"
done
timeout 150 affmae bench --models aff_small vit_small --resolutions 512 768 \
  --out "$OUT/bench_eager.json" > "$OUT/bench_eager.txt" 2>&1
