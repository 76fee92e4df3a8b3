#!/usr/bin/env bash
# Session 3, part B: pretraining in the loop, eager vs --cuda-graph (ISBI 2012 train images,
# 512 px, batch 16, bf16), then the bench with the whole step in a CUDA graph and a profile.
# Usage: bash scripts/device/perf_probe3.sh OUT   (data/em/isbi2012 carried)
set -u
OUT=${1:?OUT}
mkdir -p "$OUT"
git rev-parse HEAD > "$OUT/commit.txt"
for mode in eager graph; do
  flag=""; [ "$mode" = graph ] && flag="--cuda-graph"
  timeout 100 affmae pretrain --data data/em/isbi2012/train/images --size 512 --model aff_small \
    --batch-size 16 --grad-accum 1 --steps 60 --lr 5e-4 --warmup-steps 10 --precision bf16 --device cuda \
    --num-workers 8 --crop random_crop --out runs/loop_$mode --figure-every 0 --log-every 10 \
    --ckpt-every 1000 --no-progress $flag > "$OUT/pretrain_$mode.txt" 2>&1
  cp runs/loop_$mode/log.csv "$OUT/pretrain_${mode}_log.csv"
done
timeout 200 affmae bench --models aff_small aff_small:pred_ratio=0.5 vit_small \
  vit_small_crossmae:pred_ratio=0.5 --resolutions 448 512 768 1024 --cuda-graph \
  --out "$OUT/graph.json" > "$OUT/graph.txt" 2>&1
timeout 80 affmae bench --models aff_small --resolutions 512 --steps 10 --warmup 3 \
  --profile --profile-ops 6 --out "$OUT/profile512.json" > "$OUT/profile512.txt" 2>&1
echo done >> "$OUT/commit.txt"
