#!/usr/bin/env bash
# Session 19, call 2 (same warm machine): the aff_small training-step tests, the GPU tests
# session 18 could not run (the graphed trainer and the bench step), then issue 3's table,
# all with the register caps CAPS
# (scripts/device/with_maxnreg.py; "none" for the compiler's choice).
# Usage: bash scripts/device/verify_session19b.sh OUT CAPS
OUT=${1:?OUT}
CAPS=${2:?CAPS}
source "$(dirname "$0")/lib.sh"
W="python scripts/device/with_maxnreg.py $CAPS -m"
echo "== caps $CAPS: aff_small step, graphed trainer, bench step" >> "$R/gpu_tests.txt"
timeout 330 $W pytest -q -m gpu -p no:cacheprovider --tb=short tests/train/test_pretrain.py \
  tests/bench/test_bench_cuda_graph.py "tests/ops/test_cluster_attention_triton.py::test_gpu_aff_small_training_step_matches_reference_backend" \
  >> "$R/gpu_tests.txt" 2>&1
echo "rc=$?" >> "$R/gpu_tests.txt"; echo "== tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"; pack
timeout 240 $W affmae.bench.attention --impl triton triton_shared torch --out "$R/cluster_attention.json" \
  > "$R/cluster_attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; tail -3 "$R/cluster_attention.txt" | cut -c1-400; pack
