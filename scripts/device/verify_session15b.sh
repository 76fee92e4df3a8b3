#!/usr/bin/env bash
# Session 15, call 3: GPU tests of the in-kernel parameter-gradient sum (all cluster-attention GPU
# tests but the two aff_small steps), then the eager host-time A/B of the current sources against
# .cache/base/src (the previous commit), alternated twice (attention_host_floor.py).
# Usage: bash scripts/device/verify_session15b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
t 200 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
for round in 1 2; do
  for which in cur base; do
    P=/tmp/site:$PWD/src; [ "$which" = base ] && P=/tmp/site:$PWD/.cache/base/src
    PYTHONPATH=$P timeout 100 python -u scripts/device/attention_host_floor.py "$R/floor_${round}_$which.txt" \
      > "$R/floor_${round}_$which.log" 2>&1
    echo "== floor $round $which rc=$? $SECONDS s"; grep -E "fn fwd\+bwd|torch fwd\+bwd|raw bwd" "$R/floor_${round}_$which.txt"; pack
  done
done
