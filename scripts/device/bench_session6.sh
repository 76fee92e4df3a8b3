#!/usr/bin/env bash
# Session 6, last GPU call (chained warm after verify_session6c.sh; .whl carried): issue 4's
# table (aff_small and vit_small, each also with CrossMAE-style pred_ratio 0.5, 448-1024 px,
# --cuda-graph), then labelled profiles of one aff_small step at 768 and 512 px.
set -u
OUT=${1:?OUT}
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
timeout 260 affmae bench --models aff_small aff_small:pred_ratio=0.5 vit_small \
  vit_small_crossmae:pred_ratio=0.5 --resolutions 448 512 768 1024 --cuda-graph \
  --out "$R/bench.json" > "$R/bench.txt" 2>&1
grep -E "^(aff|vit)" "$R/bench.txt"; pack
for px in 768 512; do
  [ $SECONDS -gt 480 ] && break
  timeout 100 affmae bench --models aff_small --resolutions $px --cuda-graph --profile \
    --profile-ops 12 --out "$R/profile_$px.json" > "$R/profile_$px.txt" 2>&1
  sed -n '/^profile:/,/^decoder\/knn/p' "$R/profile_$px.txt" | grep -vE "^    aten::(fill_|arange|index|cat|pow|where|neg)" | head -50; pack
done
