#!/usr/bin/env bash
# Pretraining in the loop, eager vs --cuda-graph (ISBI 2012 train images, 512 px, batch 16,
# bf16, 60 steps). Usage: bash scripts/device/loop_probe.sh OUT   (data/em/isbi2012 carried)
set -u
OUT=${1:?OUT}
for mode in eager graph; do
  flag="--no-cuda-graph"; [ "$mode" = graph ] && flag="--cuda-graph"
  timeout 100 affmae pretrain --data data/em/isbi2012/train/images --size 512 --model aff_small \
    --batch-size 16 --grad-accum 1 --steps 60 --lr 5e-4 --warmup-steps 10 --precision bf16 \
    --device cuda --num-workers 8 --crop random_crop --out runs/loop_$mode --figure-every 0 \
    --log-every 10 --ckpt-every 1000 --no-progress $flag > "$OUT/pretrain_$mode.txt" 2>&1
  cp runs/loop_$mode/log.csv "$OUT/pretrain_${mode}_log.csv"
done
