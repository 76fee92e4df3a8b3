#!/usr/bin/env bash
# Session 20, call 1: (1) the kernel GPU tests at this commit (session 19's last commit moved a
# host line of attention_backward untested on a GPU); (2) issue 3's table for the shared Triton
# call next to the dense-window yardstick (SDPA's flash, cuDNN and memory-efficient kernels over
# the same tokens in windows of 64: affmae.bench.attention's module docstring); (3) Nsight
# Compute of the three kernels at 768 px stage 1 with the package's register caps, and the
# per-instruction stall samples (source page, SASS) of each; (4) per-kernel device time against
# .cache/base (e9c97f8's src: the log2 of the log-sum-exp through lg2.approx).
# Usage: bash scripts/device/verify_session20.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$R/gpu.txt" 2>&1
t 200 tests/ops/test_cluster_attention_triton.py -k "not training_step"
echo "== tests $SECONDS s"; tail -3 "$R/gpu_tests.txt"
timeout 240 python -m affmae.bench.attention --impl triton_shared sdpa_flash sdpa_cudnn sdpa_efficient \
  --out "$R/yardstick.json" > "$R/yardstick.txt" 2>&1
echo "== yardstick rc=$? $SECONDS s"; grep -o "px s[0-9].*" "$R/yardstick.txt" | grep -o "px s[0-9]\|[a-z_]* bw [0-9]*% / [0-9]*%" | paste -sd' ' | sed 's/px s/\npx s/g'; pack
SECS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SourceCounters --section InstructionStats"
timeout 200 ncu --clock-control none -k "regex:_fwd_kernel|_bwd_q_kernel|_bwd_kv_kernel" -s 3 -c 3 $SECS \
  --import-source yes -f -o /tmp/ncu_cur python scripts/device/ncu_attention.py 768 1 > "$R/ncu_run.txt" 2>&1
echo "== ncu rc=$? $SECONDS s"
ncu -i /tmp/ncu_cur.ncu-rep > "$R/ncu_cur.txt" 2>&1
grep -E "^\s+(Duration|Issue Slots Busy|Registers Per Thread|L1/TEX Cache Throughput|Eligible Warps)" "$R/ncu_cur.txt" | head -24
for k in _fwd_kernel _bwd_q_kernel _bwd_kv_kernel; do
  ncu -i /tmp/ncu_cur.ncu-rep -k "$k" --page source --csv --print-source sass > "$R/ncu_src$k.csv" 2>&1
  echo "== source $k rc=$? $(wc -l < "$R/ncu_src$k.csv") lines"
done
pack
kt_ab
