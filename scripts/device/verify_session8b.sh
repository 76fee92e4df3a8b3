#!/usr/bin/env bash
# Session 8, second GPU call, chained on the warm machine of the first (Triton cache filled):
# the GPU tests the first call's limits cut (add-LN and layer norm, graphed-loss whole-model
# check, fine-tuning), then the decoder point gather's d_table modes: the op alone
# (bench.point_gather, default "atomic" vs "window") and aff_small steps at 512 px.
# Usage: bash scripts/device/verify_session8b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_add_layer_norm.py tests/ops/test_layer_norm.py
t 150 tests/train/test_pretrain.py -k graphed_loss_gradients
t 100 tests/train/test_finetune.py
grep -E "^==|passed|failed|rc=|Error" "$R/gpu_tests.txt"; echo "tests $SECONDS s"
for m in default window default window; do
  [ $SECONDS -gt 520 ] && break
  E=""; [ $m = window ] && E="AFFMAE_POINT_GATHER_DTABLE=window"
  env $E timeout 60 python -m affmae.bench.point_gather --no-sweep > "$R/pg_${SECONDS}_$m.txt" 2>&1
  env $E timeout 60 affmae bench --models aff_small --resolutions 512 --cuda-graph \
    > "$R/step_${SECONDS}_$m.txt" 2>&1
  echo "== $m $SECONDS s"; grep -hE "^aff" "$R"/step_*_$m.txt | tail -1; pack
done
