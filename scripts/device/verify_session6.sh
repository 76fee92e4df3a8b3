#!/usr/bin/env bash
# For the next session's first GPU call (about 8 minutes on one H200; .whl carried): what
# session 5 changed without a GPU left to run it (the whole-model GPU tests' bound with the
# reference path's run-to-run spread, tests/model_checks.py: the graphed-loss test four times,
# the norm steps), the issue-3 table of `affmae.bench.attention` with the current kernels
# (Triton vs the PyTorch reference; last published for session 1's kernels), and the issue-4
# table at 448-1024 px with the pred_ratio rows (last full run: session 4). Results in
# OUT/all.tgz. Usage: bash scripts/device/verify_session6.sh OUT
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
for i in 1 2 3 4; do
  timeout 60 python -m pytest -q -m gpu tests/train/test_pretrain.py -k graphed_loss_gradients \
    -p no:cacheprovider --tb=line >> "$R/gpu_tests.txt" 2>&1
done
timeout 90 python -m pytest -q -m gpu tests/ops/test_layer_norm.py -k small_step \
  -p no:cacheprovider --tb=line >> "$R/gpu_tests.txt" 2>&1
grep -E "passed|failed|Error" "$R/gpu_tests.txt"; pack
timeout 120 python -m affmae.bench.attention --impl triton torch --out "$R/attention.json" \
  > "$R/attention.txt" 2>&1
tail -n 20 "$R/attention.txt"; pack
timeout 230 affmae bench --models aff_small aff_small:pred_ratio=0.5 vit_small \
  vit_small_crossmae:pred_ratio=0.5 --resolutions 448 512 768 1024 --cuda-graph \
  --out "$R/bench_graph.json" > "$R/bench_graph.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench_graph.txt"; pack
