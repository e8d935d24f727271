#!/usr/bin/env bash
# Nsight Compute on chosen rows of benchmarks/gemv_lab.cu (each row's index, as the lab's
# g_only argument: the lab then runs that one kernel once). Logs under $OUT.
#   OUT=/tmp/o LAB_ROWS="3 7 8 10" bash scripts/lab_ncu.sh
set -u
OUT=${OUT:-/tmp/opsq_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvcc -O3 -arch=sm_90 -std=c++17 -lineinfo -o /tmp/opsq_gemv_lab_ncu benchmarks/gemv_lab.cu >"$OUT/lab_ncu_build.log" 2>&1 || { echo "lab build failed"; exit 1; }
for row in ${LAB_ROWS:-3 7 8 10}; do
  timeout 120 ncu --clock-control none --kernel-name regex:"gemv|drain" --section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section InstructionStats \
      /tmp/opsq_gemv_lab_ncu "$row" >"$OUT/lab_ncu_row$row.log" 2>&1
  echo "== lab row $row: ncu rc=$?"
  grep -E "ran |_kernel|DRAM Throughput|Duration|Memory Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Executed Ipc A|No Eligible|Warp Cycles Per Issued|Stall|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|Executed Instructions  " \
    "$OUT/lab_ncu_row$row.log" | cut -c1-150 | head -40
done
