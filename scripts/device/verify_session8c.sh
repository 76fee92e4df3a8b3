#!/usr/bin/env bash
# Session 8, GPU call A (.whl carried; full 600 s; a fresh machine). The replayed step's kernels
# after this session's changes (graph_timeline.py first: it compiles the model's kernels, which
# the tests then reuse), the GPU tests of the changed and new kernels, and the decoder point
# gather's d_table modes (the op alone, then aff_small steps at 512 px, alternating).
# Usage: bash scripts/device/verify_session8c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 200 python scripts/device/graph_timeline.py --res 512 > "$R/timeline_512.txt" 2>&1
grep -E "kernels per step|under 10" "$R/timeline_512.txt"; echo "timeline $SECONDS s"; pack
t 100 tests/ops/test_cell_lookup.py tests/ops/test_smallest_k.py
t 120 tests/ops/test_point_gather.py -k "model_shapes or window"
t 100 tests/ops/test_layer_norm.py tests/ops/test_add_layer_norm.py
grep -E "^==|passed|failed|rc=|Error" "$R/gpu_tests.txt"; echo "tests $SECONDS s"
for m in default window; do
  [ $SECONDS -gt 500 ] && break
  E=""; [ $m = window ] && E="AFFMAE_POINT_GATHER_DTABLE=window"
  env $E timeout 40 python -m affmae.bench.point_gather --no-sweep > "$R/pg_$m.txt" 2>&1
  echo "== pg $m $SECONDS s"; tail -n 12 "$R/pg_$m.txt"; pack
done
for m in default window default window; do
  [ $SECONDS -gt 540 ] && break
  E=""; [ $m = window ] && E="AFFMAE_POINT_GATHER_DTABLE=window"
  env $E timeout 50 affmae bench --models aff_small --resolutions 512 --cuda-graph \
    > "$R/step_${SECONDS}_$m.txt" 2>&1
  echo "== step $m $SECONDS s"; grep -hE "^aff" "$R"/step_*_$m.txt | tail -1; pack
done
