#!/usr/bin/env bash
# Ran in session 18 (docs/BENCHMARKS.md "Session 18"); its kernel-time loop moved to lib.sh's kt_ab after the run (same commands).
# Session 18, call 1: the cluster-attention kernels with fewer instructions per logit
# (bias as four fused multiply-adds, masks as per-column offsets, unmasked gathers).
# .cache/base holds HEAD's src (git archive d00686c src | tar x -C .cache/base).
# 1. GPU tests of the kernels; 2. per-kernel device time, current vs base, alternated;
# 3. a register-cap sweep (maxnreg) of the current kernels; 4. Nsight Compute sections of both
# at 768 px stage 1. The aff_small step tests: call 2.
# Usage: bash scripts/device/verify_session18.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$R/gpu.txt" 2>&1
t 200 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
kt_ab
PYTHONPATH=/tmp/site:$PWD/src timeout 150 python -u scripts/device/kernel_times.py "$R/kt_maxnreg.json" \
  --maxnreg 0,128,96,80,64 > "$R/kt_maxnreg.txt" 2>&1
echo "== maxnreg rc=$? $SECONDS s"; tail -5 "$R/kt_maxnreg.txt"; pack
SECS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SourceCounters --section InstructionStats"
for which in cur base; do
  P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
  PYTHONPATH=$P timeout 150 ncu --clock-control none -k "regex:_fwd_kernel|_bwd_q_kernel|_bwd_kv_kernel" \
    -s 3 -c 3 $SECS python scripts/device/ncu_attention.py 768 1 > "$R/ncu_$which.txt" 2>&1
  echo "== ncu $which rc=$? $SECONDS s"; grep -E "^\s+(Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Issue Slots Busy|Registers Per Thread)" "$R/ncu_$which.txt" | head -24; pack
done
