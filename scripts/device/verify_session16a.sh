#!/usr/bin/env bash
# Session 16, call 1: autograd's backward on the calling thread. The attention probe
# (backward_thread.py: worker vs caller thread, Function and reference, bitwise-equal gradients);
# the aff_small eager training step (no CUDA graph) of the current sources (backward on the
# calling thread) against .cache/base (HEAD before the change: autograd's worker thread),
# alternated; the trainer's and the step bench's GPU tests (graphed and eager paths).
# Usage: bash scripts/device/verify_session16a.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
(cd scripts/device && timeout 150 python -u backward_thread.py "$R/backward_thread.txt" > "$R/backward_thread.log" 2>&1)
echo "== probe rc=$? $SECONDS s"; cat "$R/backward_thread.txt"; pack
for which in cur base cur base; do
  P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
  PYTHONPATH=$P timeout 150 python -u -m affmae.cli bench --models aff_small --resolutions 512 \
    --out "$R/step_${which}_$SECONDS.json" > "$R/step_${which}_$SECONDS.txt" 2>&1
  echo "== step $which rc=$? $SECONDS s"; grep -h "^aff_small " "$R"/step_${which}_*.txt | tail -1; pack
done
t 240 tests/train/test_pretrain.py tests/train/test_finetune.py tests/bench/test_bench_cuda_graph.py
tail -5 "$R/gpu_tests.txt"
