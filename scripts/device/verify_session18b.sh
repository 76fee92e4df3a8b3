#!/usr/bin/env bash
# Session 18, call 2 (after verify_session18.sh): the aff_small training-step GPU tests of the
# cluster-attention kernels, issue 3's table, and the replayed aff_small step, current sources
# against .cache/base (HEAD before this session's kernel change), alternated.
# Usage: bash scripts/device/verify_session18b.sh OUT [PART]   (PART 1: tests + table, 2: step A/B)
OUT=${1:?OUT}; PART=${2:-1}
source "$(dirname "$0")/lib.sh"
if [ "$PART" = 1 ]; then
t 240 tests/ops/test_cluster_attention_triton.py -k "training_step"
echo "== step tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
timeout 300 python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --out "$R/attention.json" > "$R/attention.txt" 2>&1
echo "== table rc=$? $SECONDS s"; tail -3 "$R/attention.txt" | cut -c1-1500; pack
else
for which in cur base cur base; do ab_bench $which aff_small 120; done
fi
