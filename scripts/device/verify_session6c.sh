#!/usr/bin/env bash
# Session 6, third GPU call (.whl carried): GPU tests of everything this session changed, with
# their own time limits: the whole-model graphed-loss check (graph vs eager vs float32, with the
# eager run-to-run spread), the aff_small Triton-backend training step, then the kernels
# (interpolation weights, merge weights, point gather with shared slots and in-row slot
# merging, int32 cell tables). Results in OUT/all.tgz.
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 130 tests/train/test_pretrain.py -k graphed_loss_gradients
t 40 tests/ops/test_interpolate_weights.py tests/ops/test_merge_weights.py tests/ops/test_cell_table.py
t 60 tests/ops/test_point_gather.py -k "model_shapes or (full_size and atomic) or compile or auto"
t 70 tests/ops/test_cluster_attention_triton.py -k aff_small_training_step
t 60 tests/train/test_pretrain.py -k graphed_loss_gradients
grep -E "^==|passed|failed|rc=|Error|assert" "$R/gpu_tests.txt" | head -60
