#!/usr/bin/env bash
# Session 6, second GPU call (.whl and .cache/base carried; .cache/base/src = the sources of
# commit 3705164, session 5's last): GPU tests of this session's kernels (interpolation weights,
# shared-slot point gather, int32 neighbour tables) and of whole models built on them (graphed
# loss vs eager vs float32, the aff_small Triton-backend step), then aff_small at 512 / 768 px
# with the current sources and with the baseline's, alternating. Results in OUT/all.tgz.
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
timeout 200 python -m pytest -q -m gpu tests/ops/test_interpolate_weights.py tests/ops/test_cell_table.py \
  tests/ops/test_point_gather.py tests/train/test_pretrain.py \
  -k "not cuda_graph_run and not (full_size and sorted)" -p no:cacheprovider --tb=short \
  > "$R/gpu_tests.txt" 2>&1
tail -n 25 "$R/gpu_tests.txt"; pack
BASE="/tmp/site:$PWD/.cache/base/src"
CUR="/tmp/site:$PWD/src"
i=0
for which in cur base cur; do
  i=$((i + 1))
  [ $i = 3 ] && [ $SECONDS -gt 440 ] && break  # the call's 600 s limit
  P=$CUR; [ $which = base ] && P=$BASE
  PYTHONPATH=$P timeout 130 python -m affmae.cli bench --models aff_small --resolutions 512 768 \
    --cuda-graph --out "$R/bench_${i}_$which.json" > "$R/bench_${i}_$which.txt" 2>&1
  echo "== $i $which"; grep -E "^aff" "$R/bench_${i}_$which.txt"; pack
done
