#!/usr/bin/env bash
# Session 5, last GPU call: the GPU tests of what changed after verify_session5.sh (the decoder's
# neighbour-table kernel, the LayerNorm and cluster-attention reductions, the CUDA graph in
# fine-tuning, the generalised GraphedLoss), the AFF vs ViT bench at 512 / 768 px, fine-tuning
# on ISBI at 512 px eager vs graphed, and device time per attention kernel. Results in
# OUT/all.tgz. Usage (repository root, .whl and data/em/isbi2012 carried):
#   bash scripts/device/verify_session5b.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
timeout 220 python -m pytest -q -m gpu tests/ops/test_cell_table.py tests/ops/test_layer_norm.py \
  tests/train/test_finetune.py tests/train/test_pretrain.py tests/ops/test_cluster_attention_triton.py \
  -k "not cuda_graph_run_matches_eager_and_resumes and not (cluster_attention_triton and (atomic or fp16 or large_logits or compile or auto_backend or fp32))" \
  -p no:cacheprovider > "$R/gpu_tests.txt" 2>&1
tail -n 5 "$R/gpu_tests.txt"; pack
timeout 130 affmae bench --models aff_small vit_small --resolutions 512 768 --cuda-graph \
  --out "$R/bench_graph.json" > "$R/bench_graph.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench_graph.txt"; pack
ft() {  # NAME [FLAGS...]
  local name=$1; shift
  timeout 60 affmae finetune --data data/em/isbi2012/train --val-fraction 0.2 --class-values 0 255 \
    --class-names membrane cell --model aff_small --size 512 --batch-size 8 --grad-accum 1 \
    --steps 40 --warmup-steps 4 --lr 3e-4 --precision bf16 --num-workers 4 --eval-every 40 \
    --eval-batch 8 --figure-every 0 --ckpt-every 40 --log-every 10 --out "runs/ft_$name" \
    --no-progress "$@" > "$R/ft_$name.txt" 2>&1
  echo "finetune $name rc=$?"; head -n 1 "$R/ft_$name.txt" | cut -c1-400
  cp "runs/ft_$name/log.csv" "$R/ft_$name.csv" 2>/dev/null
  python - "runs/ft_$name/log.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
for r in rows:
    print({k: r[k] for k in r if k in ("step", "loss", "img_s", "time_s", "miou")})
PY
}
ft eager --no-cuda-graph; pack
ft graph; pack
timeout 60 python scripts/device/attention_kernels.py "$R/attention_kernels.txt" > /dev/null 2> "$R/kern_err.txt"
cat "$R/attention_kernels.txt"; pack
