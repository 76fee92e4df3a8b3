#!/usr/bin/env bash
# For the next session's first GPU call (fresh machine, .whl carried, 600 s): what session 9
# changed after its last GPU call, none of it run on a GPU yet:
#  - the weight casts as one allocation each (session 9 measured the 512-byte aligned views of
#    one buffer: aff_small 20.4 ms at 512 px, 1.94x the ViT; the per-allocation layout should
#    time the same and peak lower);
#  - graphed training runs pin batches in the training thread (the crashed-and-resumed graphed
#    run's capture failed, likely racing the loader's pin-memory thread);
#  - the whole-model cast test with gradients to rtol 1e-3.
# Then the one-launch column-sum prototype (scripts/device/colsum_last_reduces.py: the
# second-stage reductions were 1.11 ms of the step) and the remaining ops GPU tests.
# Usage: bash scripts/device/verify_session10.sh OUT
OUT=${1:?OUT}
LIMIT=570
source "$(dirname "$0")/lib.sh"
timeout 300 affmae bench --models aff_small vit_small --resolutions 512 768 \
  --cuda-graph --out "$R/bench_main.json" > "$R/bench_main.txt" 2>&1
echo "== bench $SECONDS s"; grep -E "^(aff|vit)" "$R/bench_main.txt"; pack
run_t() { local left=$((LIMIT - SECONDS)); [ $left -gt 30 ] && t $left "$@"; }
run_t tests/train/test_pretrain.py -k resumes
timeout 90 python -u scripts/device/colsum_last_reduces.py > "$R/colsum_one_pass.txt" 2>&1
echo "== colsum one pass $SECONDS s"; tail -14 "$R/colsum_one_pass.txt"; pack
run_t tests/ops/test_linear.py -k cast
run_t tests/ops/test_point_gather.py tests/ops/test_layer_norm.py tests/ops/test_add_layer_norm.py
run_t tests/ops/test_cluster_attention_triton.py tests/ops/test_interpolate_weights.py \
  tests/ops/test_merge_weights.py tests/ops/test_cell_table.py
[ -f "$R/gpu_tests.txt" ] && grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"; pack
