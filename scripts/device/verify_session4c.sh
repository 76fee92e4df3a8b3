#!/usr/bin/env bash
# What session 4 changed after its device time ran out, on one H100/H200 (about 8 minutes):
# the GPU tests of cluster attention (the per-stage transposed neighbourhood `nbr_t`, float32
# blanks), the CUDA-graph loss and the norms; device time per attention kernel with both ways
# to build the transposed neighbourhood ("count" vs "sort"); the AFF vs ViT bench at the
# current code (CUDA graph, 512 / 768 px) for the step time and peak after the
# interpolation-weight and gather changes; and a short `affmae pretrain` with no speed flag and
# the default figures (the CUDA graph is on by default; the final reconstruction figure is an
# eager forward next to it, not yet run on a GPU). Results in OUT/all.tgz (the device tool
# returns at most 8 files). Usage (repository root, .whl and data/em/isbi2012 carried):
#   bash scripts/device/verify_session4c.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
# tar after each step: a call that runs out of time still returns what it finished
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
timeout 200 python -m pytest -q -m gpu tests/ops/test_cluster_attention_triton.py \
  tests/train/test_pretrain.py tests/ops/test_layer_norm.py tests/ops/test_point_gather.py \
  -p no:cacheprovider > "$R/gpu_tests.txt" 2>&1
tail -n 4 "$R/gpu_tests.txt"; pack
timeout 70 python scripts/device/attention_kernels.py "$R/attention_kernels.txt" > /dev/null 2> "$R/kern_err.txt"
cat "$R/attention_kernels.txt"; tail -n 3 "$R/kern_err.txt"; pack
timeout 140 affmae bench --models aff_small vit_small --resolutions 512 768 --cuda-graph \
  --out "$R/bench_graph.json" > "$R/bench_graph.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench_graph.txt"; pack
timeout 130 affmae pretrain --data data/em/isbi2012/train/images --size 512 --model aff_small \
  --batch-size 16 --grad-accum 1 --steps 20 --lr 5e-4 --warmup-steps 5 --precision bf16 \
  --num-workers 8 --crop random_crop --out runs/auto_fig --log-every 10 --no-progress \
  > "$R/pretrain_auto_fig.txt" 2>&1
echo "pretrain rc=$?"; head -n 1 "$R/pretrain_auto_fig.txt"; ls runs/auto_fig/figures
cp runs/auto_fig/figures/*.png "$R/" 2>/dev/null
pack
