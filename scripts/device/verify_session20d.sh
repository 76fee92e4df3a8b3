#!/usr/bin/env bash
# Session 20, call 4: the first tile's union entries loaded at the top of the forward and pass 1,
# and pass 1's ending reloads q and dO through L1 (no .cg). (1) kernel GPU tests; (2) per-kernel
# device time against .cache/base (026500a's src): cur, base, cur (the session's device time was
# nearly spent).
# Usage: bash scripts/device/verify_session20d.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"
for which in cur base cur; do
  P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
  f=$R/kt_${which}_$SECONDS
  PYTHONPATH=$P timeout 60 python -u scripts/device/kernel_times.py "$f.json" > "$f.txt" 2>&1
  echo "== kt $which rc=$? $SECONDS s"; grep total "$f.txt"; pack
done
