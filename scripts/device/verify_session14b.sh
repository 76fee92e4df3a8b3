#!/usr/bin/env bash
# Session 14, call 2 (600 s): the GPU tests call 1 did not reach (the aff_small training step
# with bf16 autocast) and the other GPU tests that run aff_small steps or CUDA graphs through the
# kernel; then the whole aff_small pretraining step at 512 px (CUDA graph) of the current
# sources and of the previous commit's (.cache/base/src), same machine.
# Usage: bash scripts/device/verify_session14b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 200 tests/ops/test_cluster_attention_triton.py -k training_step
t 150 tests/bench/test_bench_cuda_graph.py tests/ops/test_deformable_weights.py tests/ops/test_layer_norm.py -k "step or graph"
echo "== tests $SECONDS s"; grep -E "passed|failed|rc=|==" "$R/gpu_tests.txt"
ab_bench cur aff_small 110
ab_bench base aff_small 110
ab_bench cur aff_small 110
