#!/usr/bin/env bash
# For the next session's first GPU call (.whl carried): the one change of session 6 made after
# its last GPU call (the interpolation-weight kernels' shared row prologue, `_rows` in
# src/affmae/ops/_interp_weights_kernel.py), then the graphed-loss whole-model check, with
# limits that allow a fresh machine's first compiles (session 6 saw 60 s and 130 s limits hit
# while compiling). On a machine with two GPUs it also runs the never-run 2-GPU CUDA-graph test.
# Usage: bash scripts/device/verify_session7.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
t() { local lim=$1; shift; echo "== $*" >> "$R/gpu_tests.txt"
  timeout "$lim" python -m pytest -q -m gpu -p no:cacheprovider --tb=short "$@" >> "$R/gpu_tests.txt" 2>&1
  echo "rc=$?" >> "$R/gpu_tests.txt"; pack; }
t 120 tests/ops/test_interpolate_weights.py
t 200 tests/train/test_pretrain.py -k graphed_loss_gradients
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  t 240 tests/train/test_ddp.py
fi
grep -E "^==|passed|failed|rc=|Error" "$R/gpu_tests.txt"
