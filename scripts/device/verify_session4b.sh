#!/usr/bin/env bash
# Session 4, last call (one H100/H200, about 4 minutes): `affmae pretrain` with no speed flag
# (the CUDA graph is now on by default), the forward's gathers alone against the bandwidth
# target, and device time per cluster-attention kernel. Results in OUT/all.tgz.
# Usage (repository root, data/em/isbi2012 and .whl carried): bash scripts/device/verify_session4b.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
timeout 120 affmae pretrain --data data/em/isbi2012/train/images --size 512 --model aff_small \
  --batch-size 16 --grad-accum 1 --steps 40 --lr 5e-4 --warmup-steps 10 --precision bf16 \
  --num-workers 8 --crop random_crop --out runs/auto --figure-every 0 --log-every 10 \
  --ckpt-every 1000 --no-progress > "$R/pretrain_auto.txt" 2>&1
cp runs/auto/log.csv "$R/pretrain_auto_log.csv"
head -n 3 "$R/pretrain_auto.txt"; cut -d, -f1,3,9,10 "$R/pretrain_auto_log.csv"
timeout 40 python scripts/device/gather_ceiling.py "$R/gather_ceiling.txt" > /dev/null 2>"$R/gather_err.txt"
cat "$R/gather_ceiling.txt"; tail -n 3 "$R/gather_err.txt"
timeout 50 python scripts/device/attention_kernels.py "$R/attention_kernels.txt" > /dev/null 2>"$R/kern_err.txt"
cat "$R/attention_kernels.txt"; tail -n 3 "$R/kern_err.txt"
tar czf "$OUT/all.tgz" -C "$OUT" r
