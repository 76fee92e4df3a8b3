#!/usr/bin/env bash
# Session 12, call 4: the compile fix of the packed backward, the graphed pretraining test with
# the grouped kernels, and why the Triton-norm bf16 step's merge score bias misses the
# three-way bound: the current code chained and unchained, and the tree before chaining
# (.cache/s10 = ca0475c). Usage: bash scripts/device/verify_session12d.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 120 tests/ops/test_cluster_attention_triton.py -k "compile"
t 120 tests/train/test_pretrain.py -k "graphed"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
for v in "cur" "cur --unchain" "s10"; do
  set -- $v; P=/tmp/site:$PWD/src; [ "$1" = s10 ] && P=/tmp/site:$PWD/.cache/s10/src
  echo "== diag $v $SECONDS s" | tee -a "$R/diag.txt"
  PYTHONPATH=$P timeout $(( (590 - SECONDS) / 2 )) python scripts/device/norm_step_diag.py ${2:-} >> "$R/diag.txt" 2>&1
  tail -9 "$R/diag.txt"; pack
done
