#!/usr/bin/env bash
# Session 7, first GPU call (.whl carried): GPU tests of session 6's commits made after its last
# GPU call (interpolation-weight `_rows` prologue, int32 row guards, AFFMAE_KERNELS, merge-weight
# dispatch), the whole aff_small step Triton vs reference; then where the block code's time goes:
# kernels per step and device time by op and owner, aff_small and vit_small at 512 px.
# Usage: bash scripts/device/verify_session7.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_interpolate_weights.py tests/ops/test_merge_weights.py tests/ops/test_layer_norm.py
t 120 tests/ops/test_cluster_attention_triton.py -k "training_step_matches or auto_backend"
grep -E "^==|passed|failed|rc=|Error" "$R/gpu_tests.txt"
timeout 90 python scripts/device/count_kernels.py --models aff_small vit_small --res 512 > "$R/kernels.txt" 2>&1; cat "$R/kernels.txt" | tail -5; pack
for m in aff_small vit_small; do
  timeout 90 python scripts/device/op_breakdown.py --model $m --res 512 --ops all --top 70 > "$R/ops_$m.txt" 2>&1; pack
done
head -3 "$R/ops_aff_small.txt" "$R/ops_vit_small.txt"
