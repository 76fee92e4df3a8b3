#!/usr/bin/env bash
# For the next session's first GPU call (.whl and .cache/base carried; .cache/base/src = the
# sources of 8feee23: session 8's fused AdamW in the bench step and nothing else of it): what
# session 8's kernel changes did to an aff_small step, which no call of that session isolated
# (its table, 23.5 ms at 512 px, ran on another machine than its 22.1 ms start). Alternates
# current / base three times at 512 px, then the replayed step's kernels of each (flushed).
# The changes: stage-output norms through FusedLayerNorm(autocast_out=False), smallest_k's
# wider launch, the cell_lookup kernel, the merge backward's per-program sums of equal target
# rows, the decoder softmax's in-kernel cast; after session 8's GPU calls (never run on a GPU):
# the clustering glue, cached sine-cosine frequencies, far_padding, DropPath.residual_add. If
# the current step is slower, the merge backward (an (8, 8, 128) float32 select-and-sum per
# slot) is the first suspect. Then run the GPU tests (tests/train/test_pretrain.py -m gpu,
# tests/train/test_finetune.py -m gpu, tests/ops -m gpu) with limits that allow first compiles.
# Usage: bash scripts/device/ab_session8.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
BASE="/tmp/site:$PWD/.cache/base/src"
CUR="/tmp/site:$PWD/src"
lim=280  # the first run compiles every kernel on a fresh machine (about 200 s in session 8)
for which in cur base cur base cur base; do
  [ $SECONDS -gt 380 ] && break
  P=$CUR; [ $which = base ] && P=$BASE
  PYTHONPATH=$P timeout $lim python -m affmae.cli bench --models aff_small --resolutions 512 \
    --cuda-graph > "$R/ab_${SECONDS}_$which.txt" 2>&1
  lim=120
  echo "== $which $SECONDS s"; grep -hE "^aff" "$R"/ab_*_$which.txt | tail -1; pack
done
for which in base cur; do
  [ $SECONDS -gt 500 ] && break
  P=$CUR; [ $which = base ] && P=$BASE
  PYTHONPATH=$P timeout 90 python -u scripts/device/graph_timeline.py --models aff_small \
    --res 512 > "$R/timeline_$which.txt" 2>&1
  grep -E "kernels per step" "$R/timeline_$which.txt"; pack
done
