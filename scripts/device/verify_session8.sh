#!/usr/bin/env bash
# Session 8, first GPU call (.whl and .cache/base carried; .cache/base/src = the sources of
# b195b4e, session 7's last; give the call its full 600 s). Where the replayed step's time goes
# now (kernel count, busy time, gaps: graph_timeline.py) and the per-label eager profile; then
# the GPU tests session 7 could not run (the rewritten full-size residual-norm test, the
# window d_table, the graphed-loss whole-model check, the aff_small Triton-vs-reference step,
# fine-tuning in a CUDA graph); then the bench at 512 px, current sources (fused AdamW in the
# bench's step, as training has) against the base, alternating.
# Usage: bash scripts/device/verify_session8.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
timeout 200 python scripts/device/graph_timeline.py --res 512 > "$R/timeline_512.txt" 2>&1
grep -E "kernels per step|under 10" "$R/timeline_512.txt"; echo "timeline $SECONDS s"; pack
timeout 90 affmae bench --models aff_small --resolutions 512 --cuda-graph --profile \
  --profile-ops 12 --out "$R/profile_512.json" > "$R/profile_512.txt" 2>&1
echo "profile $SECONDS s"; pack
t 150 tests/ops/test_add_layer_norm.py tests/ops/test_layer_norm.py
t 80 tests/ops/test_point_gather.py -k window
t 120 tests/train/test_pretrain.py -k graphed_loss_gradients
t 80 tests/ops/test_cluster_attention_triton.py -k training_step_matches
t 80 tests/train/test_finetune.py
grep -E "^==|passed|failed|rc=|Error" "$R/gpu_tests.txt"; echo "tests $SECONDS s"
BASE="/tmp/site:$PWD/.cache/base/src"
CUR="/tmp/site:$PWD/src"
for which in cur base cur base; do
  [ $SECONDS -gt 540 ] && break
  P=$CUR; [ $which = base ] && P=$BASE
  PYTHONPATH=$P timeout $((595 - SECONDS)) python -m affmae.cli bench --models aff_small vit_small \
    --resolutions 512 --cuda-graph --out "$R/ab_${SECONDS}_$which.json" > "$R/ab_${SECONDS}_$which.txt" 2>&1
  echo "== $which $SECONDS s"; grep -hE "^(aff|vit)" "$R"/ab_*_$which.txt | tail -2; pack
done
