#!/usr/bin/env bash
# Session-3 probe on one GPU: where an AFF step's time goes, and what CUDA graphs, regional
# compilation, decoder checkpointing and pred_ratio do to step time and peak memory.
# Usage: bash scripts/device/perf_probe.sh OUT
set -u
OUT=${1:?OUT}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> "$OUT/gpu.txt"
timeout 100 python scripts/device/count_kernels.py --res 512 > "$OUT/kernels.txt" 2>&1
timeout 110 affmae bench --models aff_small vit_small --resolutions 512 --steps 10 --warmup 3 \
  --profile --profile-ops 8 --out "$OUT/profile512.json" > "$OUT/profile512.txt" 2>&1
timeout 200 affmae bench --models aff_small aff_small:grad_checkpoint=decoder aff_small:pred_ratio=0.5 \
  vit_small vit_small:grad_checkpoint=decoder --resolutions 512 768 --cuda-graph \
  --out "$OUT/graph.json" > "$OUT/graph.txt" 2>&1
timeout 170 affmae bench --models aff_small vit_small --resolutions 512 768 --cuda-graph \
  --compile blocks --out "$OUT/graph_blocks.json" > "$OUT/graph_blocks.txt" 2>&1
echo done >> "$OUT/gpu.txt"
