#!/usr/bin/env bash
# Session 19, call 4: Nsight Compute sections of the three kernels at 768 px stage 1 with the
# default register caps (backward passes at 168), to compare with session 18's profile.
# Usage: bash scripts/device/verify_session19c.sh OUT
OUT=${1:?OUT}
source "$(dirname "$0")/lib.sh"
SECS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats"
PYTHONPATH=/tmp/site:$PWD/src timeout 150 ncu --clock-control none -k "regex:_fwd_kernel|_bwd_q_kernel|_bwd_kv_kernel" \
  -s 3 -c 3 $SECS python scripts/device/ncu_attention.py 768 1 > "$R/ncu_cur.txt" 2>&1
echo "== ncu rc=$? $SECONDS s"; grep -E "^\s+(Duration|Registers Per Thread|Theoretical Occupancy|Issue Slots Busy|Eligible Warps Per Scheduler|Active Warps Per Scheduler|DRAM Throughput)" "$R/ncu_cur.txt" | head -30; pack
