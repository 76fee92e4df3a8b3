#!/usr/bin/env bash
# 1 GPU vs 2 GPUs (torchrun, DDP) at equal global batch: aff_small on the ISBI 2012 images.
# Drop path off, so the two runs differ only in reduction order (same images, same masks).
# Run on a machine of >= 2 GPUs from the repository root, images in data/isbi_unlabelled:
#   bash scripts/device/ddp_isbi.sh [OUT_DIR] [STEPS]
set -uo pipefail
OUT=${1:-${OUT:-outputs}}
STEPS=${2:-200}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
ARGS=(pretrain --data data/isbi_unlabelled --size 512 --model aff_small
      --model-overrides "{attention_backend: torch, drop_path: 0.0}" --batch-size 16 --grad-accum 1
      --steps "$STEPS" --lr 5e-4 --warmup-steps 30 --precision bf16 --device cuda
      --num-workers 2 --figure-every 0 --log-every 10 --ckpt-every "$STEPS" --no-progress
      --no-cuda-graph)  # eager on both: the 2-GPU run (DDP) cannot replay graphs
CUDA_VISIBLE_DEVICES=0 python -m affmae.cli "${ARGS[@]}" --out runs/ddp_1gpu 2>&1 | grep -v Warn
torchrun --standalone --nproc_per_node 2 -m affmae.cli "${ARGS[@]}" --out runs/ddp_2gpu 2>&1 | grep -v Warn
cp runs/ddp_1gpu/log.csv "$OUT/ddp_1gpu_log.csv"; cp runs/ddp_2gpu/log.csv "$OUT/ddp_2gpu_log.csv"
python - runs/ddp_1gpu/log.csv runs/ddp_2gpu/log.csv <<'PY'
import csv, sys
a, b = ([float(r["loss_rec"]) for r in csv.DictReader(open(p))] for p in sys.argv[1:3])
ia = [float(r["img_s"]) for r in csv.DictReader(open(sys.argv[1]))]
ib = [float(r["img_s"]) for r in csv.DictReader(open(sys.argv[2]))]
print("step  1gpu    2gpu    |diff|")
for i, (x, y) in enumerate(zip(a, b)):
    print(f"{(i + 1) * 10:4d}  {x:.4f}  {y:.4f}  {abs(x - y):.4f}")
print(f"max |diff| {max(abs(x - y) for x, y in zip(a, b)):.4f}; mean img/s 1gpu {sum(ia)/len(ia):.1f} "
      f"2gpu {sum(ib)/len(ib):.1f}")
PY
