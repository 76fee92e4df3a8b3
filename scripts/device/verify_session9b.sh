#!/usr/bin/env bash
# Session 9, GPU call 3, chained on call 2's warm machine (kernels compiled): the GPU tests no
# session has run yet (graphed loss and CUDA-graph pretraining, fine-tuning in a CUDA graph),
# the point-gather tests after the merge-backward revert, then the other ops' GPU tests.
# Usage: bash scripts/device/verify_session9b.sh OUT [LIMIT_S]
OUT=${1:?OUT}
LIMIT=${2:-590}
source "$(dirname "$0")/lib.sh"
run_t() { local left=$((LIMIT - SECONDS)); [ $left -gt 30 ] && t $left "$@"; }
run_t tests/train/test_pretrain.py
run_t tests/train/test_finetune.py
run_t tests/ops/test_point_gather.py
run_t tests/ops/test_linear.py tests/ops/test_layer_norm.py tests/ops/test_add_layer_norm.py
run_t tests/ops/test_cluster_attention_triton.py tests/ops/test_cell_lookup.py \
  tests/ops/test_smallest_k.py tests/ops/test_cell_table.py tests/ops/test_interpolate_weights.py \
  tests/ops/test_merge_weights.py
run_t tests --ignore=tests/ops --ignore=tests/train/test_pretrain.py --ignore=tests/train/test_finetune.py
[ -f "$R/gpu_tests.txt" ] && grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
