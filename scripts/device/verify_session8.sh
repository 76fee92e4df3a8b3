#!/usr/bin/env bash
# For the next session's first GPU call (.whl carried; give the call its full 600 s): what
# session 7 could not run for lack of device time. First the GPU tests of its changes (the
# rewritten full-size residual-norm test, the graphed-loss whole-model check, the aff_small
# Triton-vs-reference step, fine-tuning in a CUDA graph), with limits that allow a fresh
# machine's first compiles; then issue 4's full table at the current sources (448-1024 px,
# pred_ratio, CrossMAE). A second call, chained while the machine is warm (Triton cache
# filled), can then run the profile (`affmae bench --models aff_small --resolutions 512
# --cuda-graph --profile --profile-ops 12`) and the memory bench (`python -m affmae.bench.memory
# --models aff_small vit_small --resolutions 512 --batch 2 --device cuda`) and the opt-in
# "window" d_table of the decoder's point gather against the default (`affmae bench --models
# aff_small --resolutions 512 768 --cuda-graph`, with and without
# AFFMAE_POINT_GATHER_DTABLE=window; `python -m affmae.bench.point_gather --no-sweep` for the op).
# Usage: bash scripts/device/verify_session8.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 200 tests/ops/test_add_layer_norm.py tests/ops/test_layer_norm.py
t 120 tests/ops/test_point_gather.py -k window
t 200 tests/train/test_pretrain.py -k graphed_loss_gradients
t 100 tests/ops/test_cluster_attention_triton.py -k training_step_matches
t 100 tests/train/test_finetune.py
grep -E "^==|passed|failed|rc=|Error" "$R/gpu_tests.txt"
[ $SECONDS -gt 330 ] && exit 0
timeout $((590 - SECONDS)) affmae bench --models aff_small aff_small:pred_ratio=0.5 vit_small \
  vit_small_crossmae:pred_ratio=0.5 --resolutions 448 512 768 1024 --cuda-graph \
  --out "$R/bench.json" > "$R/bench.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench.txt"; pack
