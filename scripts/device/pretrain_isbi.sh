#!/usr/bin/env bash
# AFFMAE pretraining of aff_small on the ISBI 2012 images (issue 2 GPU check), then the
# AFF vs ViT bench. Run on a GPU machine from the repository root with the images copied to
# data/isbi_unlabelled (60 PNGs: train + test images, unlabelled use):
#   bash scripts/device/pretrain_isbi.sh [OUT_DIR] [ATTENTION_BACKEND] [STEPS]
set -uo pipefail
OUT=${1:-${OUT:-outputs}}
BACKEND=${2:-torch}
STEPS=${3:-300}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
RUN=runs/isbi_aff_small_$BACKEND
python -m affmae.cli pretrain --data data/isbi_unlabelled --size 512 --model aff_small \
  --model-overrides "{attention_backend: $BACKEND}" --batch-size 16 --grad-accum 1 \
  --steps "$STEPS" --lr 5e-4 --warmup-steps 30 --precision bf16 --device cuda --num-workers 6 \
  --out "$RUN" --figure-every $((STEPS / 2)) --log-every 10 --ckpt-every "$STEPS" --no-progress
cp "$RUN/log.csv" "$OUT/pretrain_${BACKEND}_log.csv"
cp "$(ls "$RUN"/figures/*.png | tail -1)" "$OUT/pretrain_${BACKEND}_reconstruction.png"
python - "$RUN/log.csv" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
loss = [float(r["loss_rec"]) for r in rows]
ips = [float(r["img_s"]) for r in rows[2:]]
print(f"loss_rec first {loss[0]:.4f} last {loss[-1]:.4f}; median img/s {statistics.median(ips):.1f} "
      f"(step {16 / statistics.median(ips) * 1000:.1f} ms at batch 16)")
PY
