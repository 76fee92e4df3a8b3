#!/usr/bin/env bash
# Session 20, call 2: the forward's and pass 1's union entries loaded one tile ahead (and every
# kernel's group bounds loaded first). (1) the kernel GPU tests; (2) per-kernel device time
# against .cache/base (the previous commit's src), alternated; (3) the same with three
# pipelining stages for the forward and pass 1 (kernel.NUM_STAGES, through with_maxnreg.py),
# alternated with the two-stage default.
# Usage: bash scripts/device/verify_session20b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 150 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -2 "$R/gpu_tests.txt"
kt_ab
for i in 1 2; do
  for st in 3 2; do
    f=$R/kt_stages${st}_$SECONDS
    PYTHONPATH=/tmp/site:$PWD/src timeout 90 python -u scripts/device/with_maxnreg.py stages.fwd=$st,stages.q=$st \
      -m kernel_times "$f.json" > "$f.txt" 2>&1
    echo "== stages $st rc=$? $SECONDS s"; grep total "$f.txt"; pack
  done
done
