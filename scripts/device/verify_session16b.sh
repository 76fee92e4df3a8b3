#!/usr/bin/env bash
# Session 16, call 2: the aff_small eager training step (no CUDA graph) of the current sources
# (backward on the calling thread) against .cache/base (the commit before: autograd's worker
# thread), alternated; issue 3's table with the backward on autograd's worker thread.
# Usage: bash scripts/device/verify_session16b.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
for which in cur base cur base; do
  P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
  PYTHONPATH=$P timeout 150 python -u -m affmae.cli bench --models aff_small --resolutions 512 \
    --out "$R/step_${which}_$SECONDS.json" > "$R/step_${which}_$SECONDS.txt" 2>&1
  echo "== step $which rc=$? $SECONDS s"; grep -h "^aff_small " "$R"/step_${which}_*.txt | tail -1; pack
done
timeout 270 python -u -m affmae.bench.attention --impl triton triton_shared torch \
  --backward-thread worker --out "$R/attention_worker.json" > "$R/attention_worker.txt" 2>&1
echo "== table worker rc=$? $SECONDS s"; tail -2 "$R/attention_worker.txt" | cut -c1-1200; pack
