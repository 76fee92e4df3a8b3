#!/usr/bin/env bash
# Session 6, first GPU call (about 8 minutes on one H200; .whl carried): a labelled profile of
# one aff_small step at 768 px (never profiled at that size) and at 512 px (last profiled before
# session 5's kernels), the whole-model GPU tests' three-way bound with the reference's
# run-to-run spread (tests/model_checks.py; graphed-loss test three times, the norm steps), and
# the issue-3 table of `affmae.bench.attention` with the current kernels. Results in OUT/all.tgz.
# Usage: bash scripts/device/verify_session6a.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
for px in 768 512; do
  timeout 100 affmae bench --models aff_small --resolutions $px --cuda-graph --profile \
    --profile-ops 12 --out "$R/profile_$px.json" > "$R/profile_$px.txt" 2>&1
  tail -n 45 "$R/profile_$px.txt"; pack
done
for i in 1 2 3; do
  timeout 60 python -m pytest -q -m gpu tests/train/test_pretrain.py -k graphed_loss_gradients \
    -p no:cacheprovider --tb=line >> "$R/gpu_tests.txt" 2>&1
done
timeout 70 python -m pytest -q -m gpu tests/ops/test_layer_norm.py -k small_step \
  -p no:cacheprovider --tb=line >> "$R/gpu_tests.txt" 2>&1
grep -E "passed|failed|Error" "$R/gpu_tests.txt"; pack
timeout 110 python -m affmae.bench.attention --impl triton torch --out "$R/attention.json" \
  > "$R/attention.txt" 2>&1
tail -n 20 "$R/attention.txt"; pack
