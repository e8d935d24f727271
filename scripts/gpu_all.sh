#!/usr/bin/env bash
# The session's device run, phase by phase (PHASES, comma-separated; default: all but the
# sanitizer, timings, ncu_stalls, qlora_prof, llm_prof, decode_prof and int8_prof): build the
# extension, the CUDA op tests (scripts/gpu_run.sh's groups), the rest of the suite on CUDA
# (fixtures, opcheck, compiles,
# training), the FSDP suites with NCCL on 2 GPUs, `opsq demo --device cuda`, the AOTInductor
# per-model probe (aoti), the bitsandbytes optimizer fixture (optim_fixture), `opsq bench --json`
# (every kernel family, int8_linear and optim included, unless BENCH_ONLY narrows it;
# BENCH_FLUSH=read flushes the L2 by a read: opsq bench --flush; the llm
# family is its own phase, `llm`, with LLM_LAYERS / LLM_VARIANTS),
# ncu_stalls (Nsight Compute's warp stall reasons for the gemv, int8 small-M and double_quant
# kernels of scripts/ncu_case.py), decode_prof (scripts/profile_decode.py: gemv chains per
# Llama shape, the decode step's kernels),
# int8_prof (scripts/profile_int8_small_m.py: Linear8bitLt's kernels at M <= 16),
# compute-sanitizer memcheck/racecheck over the op tests, and `lab` (benchmarks/gemv_lab.cu and
# optim_lab.cu: kernel variants timed without torch; LAB_ONLY=gemv,optim). Logs and results
# under $OUT; a summary table is printed last.
#   OUT=/tmp/o bash scripts/gpu_all.sh
#   PHASES=bench,sanitizer bash scripts/gpu_all.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/opsq_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OPSQ_FIXTURES=${OPSQ_FIXTURES:-$PWD/.fixtures}
# bitsandbytes 0.50.2 for the side-by-side columns: a copy of ../shared/peers carried as .peers
[ -d .peers/bitsandbytes ] && export PYTHONPATH="$PYTHONPATH:$PWD/.peers"
PHASES=${PHASES:-build,cuda_ops,tests,fsdp,demo,bench,llm}
PY=${PYTHON:-python3}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
has() { [[ ",$PHASES," == *",$1,"* ]]; }
note() { echo "$1" | tee -a "$SUMMARY"; }
last() { grep -E "passed|failed|error" "$1" | tail -1; }

if has lab; then  # benchmarks/{gemv,optim}_lab.cu (kernel variants, no torch): compiled beside the build
  (nvcc -O3 -arch=sm_90 -std=c++17 -lineinfo -o /tmp/opsq_gemv_lab benchmarks/gemv_lab.cu \
    >"$OUT/gemv_lab_build.log" 2>&1;
   nvcc -O3 -arch=sm_90 -std=c++17 -lineinfo -o /tmp/opsq_optim_lab benchmarks/optim_lab.cu \
    >"$OUT/optim_lab_build.log" 2>&1) &
  LAB_PID=$!
fi
if has build; then
  t0=$(date +%s)
  OPSQ_BUILD_ONLY=1 OUT="$OUT" bash scripts/gpu_run.sh >"$OUT/build_stdout.log" 2>&1
  note "build rc=$? ($(( $(date +%s) - t0 ))s); native ops: $(grep -c cuda-native "$OUT/diagnostics.log") of $(grep -cE "^[a-z][a-z0-9_]+ +(reference|cuda-native)" "$OUT/diagnostics.log")"
fi
if has lab; then
  wait $LAB_PID
  if [[ ",${LAB_ONLY:-gemv,optim}," == *",gemv,"* ]]; then
    timeout 120 /tmp/opsq_gemv_lab >"$OUT/gemv_lab.txt" 2>&1
    note "gemv lab rc=$? (benchmarks/gemv_lab.cu; copy bandwidth, µs, % of it, error vs a float64 host reference)"
    cat "$OUT/gemv_lab.txt" >>"$SUMMARY"
  fi
  if [[ ",${LAB_ONLY:-gemv,optim}," == *",optim,"* ]]; then
    $PY -c "from opsq._constants import create_dynamic_map as m; import torch; torch.cat([m(signed=True), m(signed=False)]).numpy().tofile('/tmp/opsq_maps.bin')"
    timeout 120 /tmp/opsq_optim_lab /tmp/opsq_maps.bin >"$OUT/optim_lab.txt" 2>&1
    note "optim lab rc=$? (benchmarks/optim_lab.cu; 8-bit AdamW update variants, µs, % of copy, bytes differing from production)"
    cat "$OUT/optim_lab.txt" >>"$SUMMARY"
  fi
fi
if has cuda_ops; then
  OPSQ_SKIP_TIMINGS=1 OUT="$OUT" bash scripts/gpu_run.sh >"$OUT/cuda_ops_stdout.log" 2>&1
  note "cuda op tests: $(grep -E '^pytest rc' "$OUT/cuda_ops_stdout.log") $(grep -E 'passed' "$OUT/cuda_ops_stdout.log" | tail -1)"
fi
if has timings; then
  # kernel timings of scripts/gpu_run.sh (gemv modes, quantizers, int8) and Nsight Compute
  OPSQ_SKIP_TESTS=1 OPSQ_NCU=${OPSQ_NCU:-1} OUT="$OUT" bash scripts/gpu_run.sh >"$OUT/timings_stdout.log" 2>&1
  note "kernel timings rc=$?"
  sed -n '/^copy bandwidth/,$p' "$OUT/timings_stdout.log" | grep -v "^====\|^build\|^opsq._C\|^ops with\|^pytest\|^bench " | head -60 | tee -a "$SUMMARY"
  grep -E "ncu rc|gemv4_kernel|quant4_kernel|DRAM Throughput|Duration|Issue Slots Busy|Achieved Occupancy|Registers Per" "$OUT/timings_stdout.log" | head -40 | tee -a "$SUMMARY"
  [ -f "$OUT/ncu.log" ] && $PY scripts/ncu_digest.py "$OUT/ncu.log" >"$OUT/ncu_digest.txt" \
    && cat "$OUT/ncu_digest.txt" >>"$SUMMARY"
fi
if has ncu_stalls; then
  # Nsight Compute's warp stall reasons (cycles a warp spends in each, per issued instruction)
  # for the kernels behind issue 14's open targets, as scripts/ncu_case.py launches them
  t0=$(date +%s)
  timeout ${NCU_STALLS_TIMEOUT:-240} ncu --clock-control none \
      --kernel-name regex:"${NCU_STALLS_KERNELS:-gemv4_tiled16|int8_small_m|small_outliers|dq_stats|dq_quant}" \
      --launch-count ${NCU_STALLS_COUNT:-14} --section SpeedOfLight --section SchedulerStats \
      --section WarpStateStats --print-details all \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      $PY scripts/ncu_case.py >"$OUT/ncu_stalls.txt" 2>&1
  note "ncu stall reasons rc=$? ($(( $(date +%s) - t0 ))s; ncu_stalls.txt)"
fi
if has qlora_prof; then
  timeout 300 $PY scripts/profile_qlora.py --steps 5 >"$OUT/qlora_profile.log" 2>&1
  note "QLoRA profile rc=$?"
  grep -vE "^-+|^\s*$|Warning|warn" "$OUT/qlora_profile.log" | cut -c1-200 | head -70 | tee -a "$SUMMARY"
fi
if has optim_fixture; then  # bitsandbytes' optimizers recorded on CUDA (tests/test_optim.py)
  timeout 120 $PY scripts/make_optim_fixture.py --out "$OUT/bnb_optim_cuda.pt" >"$OUT/optim_fixture.log" 2>&1
  note "bitsandbytes optimizer fixture rc=$?: $(tail -1 "$OUT/optim_fixture.log" | cut -c1-200)"
  [ -f "$OUT/bnb_optim_cuda.pt" ] && mkdir -p tests/data && cp "$OUT/bnb_optim_cuda.pt" tests/data/
fi
if has tests; then
  # every CUDA-parametrized test of tests/ and compile_tests/ but the op tests (the cuda_ops
  # phase) and the NCCL suites (the fsdp phase)
  t0=$(date +%s)
  # (TESTS_PATHS / TESTS_K narrow it: a focused re-run)
  timeout ${TESTS_TIMEOUT:-480} $PY -m pytest -q -rfE -p no:cacheprovider \
    ${TESTS_PATHS:-tests compile_tests --ignore=tests/test_cuda_ops.py} \
    -k "${TESTS_K:-(cuda or Cuda or CUDA) and not nccl}" >"$OUT/tests_cuda.log" 2>&1
  note "CUDA suite (all CUDA-parametrized tests but the op tests) rc=$? ($(( $(date +%s) - t0 ))s): $(last "$OUT/tests_cuda.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_cuda.log" | cut -c1-300 | head -30 | tee -a "$SUMMARY"
fi
if has aoti; then  # AOTInductor package + load, one process per model (a crash stays in it)
  t0=$(date +%s)
  timeout 400 $PY scripts/aoti_probe.py --device ${AOTI_DEVICE:-cuda} >"$OUT/aoti_probe.log" 2>&1
  note "AOTInductor probe (scripts/aoti_probe.py) rc=$? ($(( $(date +%s) - t0 ))s)"
  cut -c1-220 "$OUT/aoti_probe.log" | head -80 | tee -a "$SUMMARY"
fi
if has fsdp; then
  t0=$(date +%s)
  timeout 300 $PY -m pytest -q -rfE -s -p no:cacheprovider compile_tests/test_fsdp.py -k nccl \
    >"$OUT/fsdp_nccl.log" 2>&1
  note "FSDP NCCL 2 GPUs rc=$? ($(( $(date +%s) - t0 ))s): $(last "$OUT/fsdp_nccl.log")"
  grep "^\[fsdp\]" "$OUT/fsdp_nccl.log" | tee -a "$SUMMARY"
  grep -E "^E  .*(Error|error):" "$OUT/fsdp_nccl.log" | cut -c1-300 | sort | uniq | head -8 | tee -a "$SUMMARY"
fi
if has demo; then
  t0=$(date +%s)
  # the model package is not installed there and too large to carry: a local copy of the same
  # model (fp16 weights, 45 MB) in .demo_model is used when present
  DEMO_MODEL=(); [ -d .demo_model ] && DEMO_MODEL=(--model .demo_model)
  timeout 300 $PY -m opsq.cli demo --device cuda --no-progress "${DEMO_MODEL[@]}" \
    --json "$OUT/demo_cuda.json" >"$OUT/demo_cuda.log" 2>&1
  note "opsq demo --device cuda rc=$? ($(( $(date +%s) - t0 ))s)"
  grep -v "^opsq demo:" "$OUT/demo_cuda.log" | tail -6 | tee -a "$SUMMARY"
fi
if has qlora; then
  t0=$(date +%s)
  timeout 240 $PY examples/lora_qlora.py --device cuda --steps 300 --plot "$OUT/qlora_loss.png" \
    >"$OUT/qlora_cuda.log" 2>&1
  note "QLoRA example on CUDA rc=$? ($(( $(date +%s) - t0 ))s): $(grep -iE 'loss' "$OUT/qlora_cuda.log" | head -1) ... $(grep -iE 'loss' "$OUT/qlora_cuda.log" | tail -1)"
fi
if has surface; then
  timeout 200 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_cuda_surface.py \
    >"$OUT/surface_cuda.log" 2>&1
  note "CUDA surface (embeddings, SwitchBack, integrations) rc=$?: $(last "$OUT/surface_cuda.log")"
  grep -E "^(FAILED|ERROR)|^E  .*Error" "$OUT/surface_cuda.log" | cut -c1-250 | head -8 | tee -a "$SUMMARY"
fi
if has qlora_bench; then
  timeout 240 $PY -m opsq.cli bench --only qlora --json "$OUT/bench_qlora.json" \
    >"$OUT/bench_qlora.log" 2>&1
  note "QLoRA step bench rc=$?: $(grep -E 'qlora step' "$OUT/bench_qlora.log" | tail -1)"
fi
if has bench; then
  t0=$(date +%s)
  timeout ${BENCH_TIMEOUT:-540} $PY -m opsq.cli bench --only ${BENCH_ONLY:-gemv,4bit,int8,int8_linear,transform,igemmlt,decode,prefill,qlora,optim} --flush ${BENCH_FLUSH:-write} --plot "$OUT/bench.png" --json "$OUT/bench.json" >"$OUT/bench_table.log" 2>"$OUT/bench_progress.log"
  note "opsq bench rc=$? ($(( $(date +%s) - t0 ))s)"
fi
if has llm_prof; then
  t0=$(date +%s)
  timeout ${LLM_PROF_TIMEOUT:-300} $PY scripts/profile_llm.py --layers ${LLM_PROF_LAYERS:-8} \
    --tokens 32 --variants ${LLM_PROF_VARIANTS:-bf16,nf4} >"$OUT/llm_profile.log" 2>&1
  note "LLM host profile rc=$? ($(( $(date +%s) - t0 ))s)"
  grep -vE "Warning|warn|^\s*$" "$OUT/llm_profile.log" | cut -c1-120 | head -${LLM_PROF_LINES:-140} >>"$SUMMARY"
fi
if has decode_prof; then  # scripts/profile_decode.py: gemv chains per Llama shape, decode-step kernels
  t0=$(date +%s)
  timeout ${DECODE_PROF_TIMEOUT:-300} $PY scripts/profile_decode.py --layers ${DECODE_PROF_LAYERS:-8} \
    >"$OUT/decode_profile.log" 2>&1
  note "decode profile rc=$? ($(( $(date +%s) - t0 ))s)"
  grep -vE "Warning|warn|^\s*$" "$OUT/decode_profile.log" | cut -c1-120 | head -80 >>"$SUMMARY"
fi
if has int8_prof; then  # Linear8bitLt at M <= 16: kernel durations and the span of a call
  timeout 200 $PY scripts/profile_int8_small_m.py >"$OUT/int8_profile.log" 2>&1
  note "int8 small-M profile rc=$?"
  grep -E "^[0-9]+x" "$OUT/int8_profile.log" | cut -c1-220 | tee -a "$SUMMARY"
fi
if has llm; then
  t0=$(date +%s)
  timeout ${LLM_TIMEOUT:-560} $PY -m opsq.cli bench --only llm --llm-layers ${LLM_LAYERS:-32} \
    ${LLM_VARIANTS:+--llm-variants $LLM_VARIANTS} --json "$OUT/bench_llm.json" \
    --plot "$OUT/bench_llm.png" >"$OUT/bench_llm_table.log" 2>"$OUT/bench_llm_progress.log"
  note "opsq bench --only llm rc=$? ($(( $(date +%s) - t0 ))s)"
  grep -E "ERROR|Error|\[llm\]" "$OUT/bench_llm_progress.log" | cut -c1-200 | head -30 >>"$SUMMARY"
  cat "$OUT/bench_llm_table.log" >>"$SUMMARY"
fi
if has reliability; then
  timeout 200 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_cuda_reliability.py \
    $(ls tests/test_fuzz.py tests/test_determinism.py tests/test_edge_cases.py tests/test_bad_inputs.py 2>/dev/null) \
    >"$OUT/reliability_cuda.log" 2>&1
  note "CUDA reliability (streams, threads, determinism, NaN/Inf, fuzz, bad inputs) rc=$?: $(last "$OUT/reliability_cuda.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/reliability_cuda.log" | cut -c1-250 | head -8 | tee -a "$SUMMARY"
fi
if has sanitizer; then
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
    # tools listed in SANITIZER_FULL run the whole CUDA op, fixture and reliability suites (but
    # the > 2^31-element and slow tests); the others a subset: every op family once (blocksize
    # 64 for the 4-bit/blockwise grids), graph capture, transform, gemv modes, int8_linear paths
    SANITIZER_SCOPE=subset
    SAN_TESTS="tests/test_cuda_ops.py tests/test_cuda_fixtures.py"
    # (layer_state_and_decode compiles with mode="reduce-overhead": under compute-sanitizer
    # cudagraph trees' pool check fails for a plain nn.Linear too; session 11, call 5)
    SAN_K="((matches_reference and -64-) or tiled16 or merged or test_cuda_graph or (matches_reference and not 4bit and not blockwise) or transform_matches or outlier_column_counts or outlier_prologue or threshold0_bit_exact) and not layer_state_and_decode"
    if [[ " ${SANITIZER_FULL:-} " == *" $tool "* ]]; then
      SANITIZER_SCOPE=full
      SAN_TESTS="tests/test_cuda_ops.py tests/test_cuda_fixtures.py tests/test_cuda_reliability.py"
      SAN_K="not beyond_int32 and not slow and not layer_state_and_decode"
    fi
    t0=$(date +%s)
    timeout $([ $SANITIZER_SCOPE = full ] && echo ${SANITIZER_FULL_TIMEOUT:-300} || echo ${SANITIZER_TIMEOUT:-170}) compute-sanitizer --tool $tool --error-exitcode 9 --print-limit 20 \
      $PY -m pytest -q -p no:cacheprovider $SAN_TESTS -k "$SAN_K" \
      >"$OUT/sanitizer_$tool.log" 2>&1
    note "compute-sanitizer $tool ($SANITIZER_SCOPE) rc=$? ($(( $(date +%s) - t0 ))s): $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1) $(last "$OUT/sanitizer_$tool.log")"
    grep -E "^========= (Uninitialized|Invalid|Race|Barrier|Program hit)|^=========     at .*(opsq|kernel)" "$OUT/sanitizer_$tool.log" | sort | uniq -c | sort -rn | head -6 | tee -a "$SUMMARY"
    if [ "$tool" = initcheck ]; then
      timeout 120 compute-sanitizer --tool initcheck --print-limit 4 $PY scripts/initcheck_probe.py \
        >"$OUT/initcheck_probe.log" 2>&1
      note "initcheck probe (torch._int_mm + clone, then opsq igemmlt + mm_dequant) rc=$?: $(grep -E 'ERROR SUMMARY' "$OUT/initcheck_probe.log" | tail -1)"
      grep -E "^step|^values|Uninitialized|^=========     at " "$OUT/initcheck_probe.log" | cut -c1-160 | head -14 | tee -a "$SUMMARY"
    fi
  done
fi
# at most 8 files come back: keep the results, pack the logs
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls *.log 2>/dev/null) 2>/dev/null)
echo "================ summary ================"
cat "$SUMMARY"
[ -f "$OUT/bench.json" ] && $PY -c "import json,sys; from opsq.bench import format_table; print(format_table(json.load(open(sys.argv[1]))))" "$OUT/bench.json"
exit 0
