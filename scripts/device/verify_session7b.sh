#!/usr/bin/env bash
# Session 7, second GPU call (.whl and .cache/base carried; .cache/base/src = the sources of
# cd3d6b5, session 6's last): GPU tests of this session's kernels (LayerNorm backward tiles,
# residual add + LayerNorm, Linear with the Triton bias gradient), the column-sum micro-bench,
# then aff_small and vit_small at 512 / 768 px with the current sources and the baseline's,
# alternating. Results in OUT/all.tgz.
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
BASE="/tmp/site:$PWD/.cache/base/src"
CUR="/tmp/site:$PWD/src"
i=0
for which in cur tests base; do
  i=$((i + 1))
  [ $SECONDS -gt 270 ] && break  # the session's device time
  if [ $which = tests ]; then
    timeout 150 python -m pytest -q -m gpu tests/ops/test_layer_norm.py tests/ops/test_add_layer_norm.py -p no:cacheprovider --tb=short > "$R/gpu_tests.txt" 2>&1
    echo "tests rc=$?"; tail -n 25 "$R/gpu_tests.txt"; pack
    continue
  fi
  P=$CUR; [ $which = base ] && P=$BASE
  PYTHONPATH=$P timeout 120 python -m affmae.cli bench --models aff_small vit_small --resolutions 512 768 \
    --cuda-graph --out "$R/bench_${i}_$which.json" > "$R/bench_${i}_$which.txt" 2>&1
  echo "== $i $which $SECONDS s"; grep -E "^(aff|vit)" "$R/bench_${i}_$which.txt"; pack
done
