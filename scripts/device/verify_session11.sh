#!/usr/bin/env bash
# For the next session's first GPU call (fresh machine, .whl and .cache carried, 600 s).
# Session 10's last seven changes were never run on a GPU:
#  - StochasticDepth: every encoder block's drop-path factors from one draw (56 fewer small
#    kernels per aff_small step; vit_small has drop_path 0, so this one does not touch it);
#  - gather_tokens' flat rows in two kernels instead of three (28 calls per aff_small forward);
#  - the deform-weights kernels' shared preamble moved into a jit helper (same code inlined);
#  - nearest_clusters as one fused kernel (distances in registers + the k argmin rounds; ten
#    searches per aff_small step, each three to four kernels and a (B, Mq, Mk, 2) temporary
#    before);
#  - Linear backward: float32 dx / dW straight from the GEMM (torch.mm out_dtype) where a
#    half-precision product's gradient goes to a float32 tensor (about 100 cast kernels per
#    aff_small step, about 50 per vit_small step; more accurate gradients);
#  - cluster attention's parameter-gradient partials stored parameter-major, so autograd keeps
#    the four gradients as views instead of copying them (64 copies per aff_small step);
#  - the same for the merge backward's parameter gradients (12 copies).
# Before the call: rm -rf .cache/base && mkdir -p .cache/base &&
#   git archive b85f158 src | tar -x -C .cache/base   (b85f158: call 3's 20.2 ms at 512 px)
# Then: a same-machine A/B of the replayed step at 512 px (aff_small cur, base, cur, base;
# vit_small cur, base); the GPU tests of the changed paths; the replayed step's kernels. Keep
# a change only if cur is not slower than base (bisect the seven commits otherwise); the
# issue-4 table (448-1024 px, both models) is a second call.
# Usage: bash scripts/device/verify_session11.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
[ -d .cache/base/src ] || { echo ".cache/base/src is missing (see the header)"; exit 2; }
ab_bench cur aff_small 240
ab_bench base aff_small 150
ab_bench cur aff_small 60
ab_bench base aff_small 60
ab_bench cur vit_small 60   # the Linear change speeds the ViT up too
ab_bench base vit_small 60
# GPU tests, most important first, each within what is left of the call (run the rest in a
# second call if the first is cut)
tt() { local lim=$1; shift; local left=$((575 - SECONDS)); [ $left -lt 40 ] && return
  [ $lim -gt $left ] && lim=$left; t $lim "$@"; }
tt 150 tests/ops/test_linear.py tests/models/test_stochastic_depth.py
tt 150 tests/ops/test_smallest_k.py tests/ops/test_deformable_weights.py
tt 150 tests/ops/test_cluster_attention_triton.py -k "aff_small or full_size"
tt 100 tests/ops/test_merge_weights.py
tt 150 tests/train/test_pretrain.py -k "resumes or graphed"
grep -E "^==|passed|failed|rc=" "$R/gpu_tests.txt"
[ $SECONDS -lt 500 ] && { timeout 60 python -u scripts/device/graph_timeline.py --models aff_small \
  --res 512 > "$R/timeline_cur.txt" 2>&1; grep -A30 "kernels per step" "$R/timeline_cur.txt"; pack; }
