#!/usr/bin/env bash
# One device run: build opsq's CUDA extension (opsq/csrc) in place, print the `python -m opsq`
# diagnostics, run the CUDA test suite, time the main kernels, and print a short summary last.
# Logs go to $OUT (default /tmp/opsq_gpu_run). Run from anywhere; it cds to the repository root.
#   OUT=/tmp/x bash scripts/gpu_run.sh            # everything
#   OPSQ_SKIP_TESTS=1 bash scripts/gpu_run.sh     # build + timings only
#   OPSQ_NCU=1 bash scripts/gpu_run.sh            # also Nsight Compute on gemv / quantize
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/opsq_gpu_run}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OPSQ_CUDA_ARCH_LIST=${OPSQ_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
BUILD_LOG="$OUT/build.log"

# ---- environment -------------------------------------------------------------------------
{
  echo "## nvidia-smi"; nvidia-smi 2>&1 | head -15
  echo "## nvcc"; nvcc --version 2>&1 | tail -2
  echo "## torch"; $PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
} >"$BUILD_LOG" 2>&1

# ---- build ---------------------------------------------------------------------------------
echo "## build (OPSQ_CUDA_ARCH_LIST=$OPSQ_CUDA_ARCH_LIST)" | tee -a "$BUILD_LOG"
t0=$(date +%s)
$PY setup.py build_ext --inplace >>"$BUILD_LOG" 2>&1
BUILD_RC=$?
BUILD_S=$(( $(date +%s) - t0 ))
echo "build rc=$BUILD_RC in ${BUILD_S}s"
if [ $BUILD_RC -ne 0 ]; then grep -E "error|Error" "$BUILD_LOG" | head -40; fi

# ---- diagnostics ---------------------------------------------------------------------------
$PY -m opsq >"$OUT/diagnostics.log" 2>&1
cat "$OUT/diagnostics.log"
NATIVE=$(grep -c "cuda-native" "$OUT/diagnostics.log")
[ "${OPSQ_BUILD_ONLY:-0}" = "1" ] && exit $BUILD_RC

# ---- tests ---------------------------------------------------------------------------------
# One pytest process per op group, so that a fault in one kernel (a sticky CUDA error) cannot
# fail the groups after it. JUnit files are merged into the summary.
TEST_RC=-1
JDIR=/tmp/opsq_junit; rm -rf "$JDIR"; mkdir -p "$JDIR"
if [ "${OPSQ_SKIP_TESTS:-0}" != "1" ]; then
  t0=$(date +%s)
  : >"$OUT/pytest.log"
  TEST_RC=0
  i=0
  for group in "test_quantize_4bit" "test_dequantize_4bit or test_roundtrip or test_errors" \
               "test_linear_4bit" "blockwise and not graph" "transform" \
               "test_vectorwise or test_double_quant or test_int8_quant" "test_mm_dequant" \
               "test_igemmlt" "test_int8_linear" "test_cuda_graph" "beyond_int32"; do
    i=$((i + 1))
    echo "######## group $i: -k '$group'" >>"$OUT/pytest.log"
    $PY -m pytest tests/test_cuda_ops.py -q -rfE -p no:cacheprovider -k "$group" \
        --junitxml="$JDIR/g$i.xml" >>"$OUT/pytest.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && TEST_RC=$rc
    echo "group $i rc=$rc: $(tail -1 "$OUT/pytest.log")"
  done
  TEST_S=$(( $(date +%s) - t0 ))
  echo "pytest rc=$TEST_RC in ${TEST_S}s"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40
  grep -E "^E  " "$OUT/pytest.log" | head -30
fi
TEST_SUMMARY=$($PY - "$JDIR" <<'PYEOF'
import glob, sys, xml.etree.ElementTree as ET
tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for f in glob.glob(sys.argv[1] + "/*.xml"):
    for ts in ET.parse(f).getroot().iter("testsuite"):
        for k in tot:
            tot[k] += int(ts.get(k, 0))
passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
print(f"{passed} passed, {tot['failures']} failed, {tot['errors']} errors, "
      f"{tot['skipped']} skipped (of {tot['tests']})")
PYEOF
)

[ "${OPSQ_SKIP_TIMINGS:-0}" = "1" ] && { echo "$TEST_SUMMARY"; exit 0; }

# ---- timings -------------------------------------------------------------------------------
$PY - >"$OUT/bench.log" 2>&1 <<'PYEOF'
import math
import os
import torch
import torch.nn.functional as F
import opsq
from opsq import reference as ref
from opsq._constants import create_dynamic_map

OPS = torch.ops.opsq
dev = "cuda"
try:
    from triton.testing import do_bench

    def bench(fn):  # median ms; do_bench clears the L2 before every run
        return do_bench(fn, warmup=20, rep=80, return_mode="median")
except Exception:  # pragma: no cover
    _flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)

    def bench(fn):
        for _ in range(3):
            fn()
        ts = []
        for _ in range(30):
            _flush.zero_()
            s, e = torch.cuda.Event(True), torch.cuda.Event(True)
            s.record(); fn(); e.record(); torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        return sorted(ts)[len(ts) // 2]

rows = []


def row(name, ms, nbytes=None, peer_name=None, peer_ms=None):
    gbs = nbytes / ms / 1e6 if nbytes else float("nan")
    rows.append((name, ms * 1e3, gbs, peer_name, None if peer_ms is None else peer_ms * 1e3))


def safe(fn):
    try:
        fn()
    except Exception as e:  # keep the other timings
        rows.append((f"{fn.__name__}: {type(e).__name__}: {str(e)[:80]}", float("nan"),
                     float("nan"), None, None))


g = torch.Generator(device=dev); g.manual_seed(0)

x = torch.empty(2**29, dtype=torch.bfloat16, device=dev).normal_(generator=g)
y = torch.empty_like(x)
copy_ms = bench(lambda: y.copy_(x))
copy_gbs = 2 * x.numel() * 2 / copy_ms / 1e6
row("torch copy 1 GiB bf16 (read+write)", copy_ms, 2 * x.numel() * 2)
del x, y


def dequant_8192():
    n = 8192 * 8192
    W = torch.randn(8192, 8192, device=dev, generator=g, dtype=torch.bfloat16)
    p, am = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
    nbytes = n // 2 + n // 64 * 4 + 2 * n
    out = torch.empty_like(W)
    t_copy = bench(lambda: out.copy_(W))
    t = bench(lambda: OPS.dequantize_4bit(p, am, 64, "nf4", [8192, 8192], torch.bfloat16))
    t_ref = bench(lambda: ref.dequantize_4bit(p, am, 64, "nf4", [8192, 8192], torch.bfloat16))
    row("dequantize_4bit nf4 bs64 8192^2 -> bf16", t, nbytes, "reference", t_ref)
    row("  torch copy of the bf16 8192^2 output", t_copy, 4 * n)
    t = bench(lambda: OPS.dequantize_4bit(p, am, 64, "nf4", [8192, 8192], torch.float32))
    row("dequantize_4bit nf4 bs64 8192^2 -> fp32", t, n // 2 + n // 64 * 4 + 4 * n)
    offset = am.mean().reshape(1)
    code = create_dynamic_map().to(dev)
    q, nabs = OPS.quantize_blockwise(am - offset, code, 256)
    t = bench(lambda: OPS.dequantize_4bit(p, q, 64, "nf4", [8192, 8192], torch.bfloat16, nabs,
                                          code, offset, 256))
    row("dequantize_4bit nf4 bs64 nested -> bf16", t, n // 2 + n // 64 + 2 * n)
    t = bench(lambda: OPS.quantize_4bit(W, 64, "nf4", torch.uint8))
    t_ref = bench(lambda: ref.quantize_4bit(W, 64, "nf4", torch.uint8))
    row("quantize_4bit nf4 bs64 bf16 8192^2", t, 2 * n + n // 2 + n // 64 * 4, "reference", t_ref)
    t = bench(lambda: OPS.quantize_4bit(W, 64, "fp4", torch.uint8))
    row("quantize_4bit fp4 bs64 bf16 8192^2", t, 2 * n + n // 2 + n // 64 * 4)
    t = bench(lambda: OPS.quantize_blockwise(W, code, 256))
    row("quantize_blockwise bs256 bf16 8192^2", t, 2 * n + n + n // 256 * 4)
    qb, ab = OPS.quantize_blockwise(W, code, 256)
    t = bench(lambda: OPS.dequantize_blockwise(qb, ab, code, 256, torch.bfloat16))
    row("dequantize_blockwise bs256 -> bf16 8192^2", t, n + 2 * n + n // 256 * 4)


def gemv():
    N, K = 28672, 8192
    for dt, M, qt, nested in [(torch.bfloat16, 1, "nf4", False), (torch.float16, 1, "fp4", False),
                              (torch.bfloat16, 1, "nf4", True), (torch.bfloat16, 4, "nf4", False),
                              (torch.bfloat16, 8, "nf4", False), (torch.bfloat16, 16, "nf4", False)]:
        W = torch.randn(N, K, device=dev, generator=g, dtype=dt) * 0.02
        p, am = OPS.quantize_4bit(W, 64, qt, torch.uint8)
        extra = ()
        abytes = N * K // 64 * 4
        if nested:
            offset = am.mean().reshape(1)
            code = create_dynamic_map().to(dev)
            q, nabs = OPS.quantize_blockwise(am - offset, code, 256)
            am, extra, abytes = q, (nabs, code, offset, 256), N * K // 64
        A = torch.randn(M, K, device=dev, generator=g, dtype=dt)
        nbytes = N * K // 2 + abytes + M * K * 2 + M * N * 2
        t = bench(lambda: OPS.gemv_4bit(A, p, [N, K], am, 64, qt, None, *extra))
        t_bf16 = bench(lambda: F.linear(A, W))
        row(f"gemv_4bit {qt} bs64 {str(dt)[6:]} {M}x{K}->{N}{' nested' if nested else ''}", t,
            nbytes, f"F.linear {str(dt)[6:]}", t_bf16)
        del W


def prefill():
    M, K, N = 2048, 4096, 11008
    A = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
    W = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
    p, am = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
    t = bench(lambda: OPS.linear_4bit(A, p, [N, K], am, 64, "nf4"))
    t_bf16 = bench(lambda: F.linear(A, W))
    row(f"linear_4bit nf4 prefill {M}x{K}->{N} bf16", t, None, "F.linear bf16", t_bf16)


def int8():
    R, C = 4096, 4096
    A = torch.randn(R, C, device=dev, generator=g, dtype=torch.float16)
    n = R * C
    t = bench(lambda: OPS.vectorwise_quant(A, 0.0))
    t_ref = bench(lambda: ref.vectorwise_quant(A, 0.0))
    row("vectorwise_quant fp16 4096^2 thr=0", t, 2 * n + n + R * 4, "reference", t_ref)
    t = bench(lambda: OPS.vectorwise_quant(A, 3.0))
    row("vectorwise_quant fp16 4096^2 thr=3", t, 2 * n + n + R * 4 + C)
    t = bench(lambda: OPS.double_quant(A, 0.0))
    t_ref = bench(lambda: ref.double_quant(A, 0.0))
    row("double_quant fp16 4096^2 thr=0", t, 2 * n + 2 * n + (R + C) * 4, "reference", t_ref)
    I = torch.randint(-2**20, 2**20, (R, C), device=dev, dtype=torch.int32)
    rs = torch.rand(R, device=dev); cs = torch.rand(C, device=dev)
    t = bench(lambda: OPS.mm_dequant(I, rs, cs, None, torch.float16))
    row("mm_dequant 4096^2 -> fp16", t, 4 * n + 2 * n)
    for M in (1, 16, 64, 2048):
        a = torch.randint(-127, 128, (M, 4096), device=dev, dtype=torch.int8)
        b = torch.randint(-127, 128, (4096, 4096), device=dev, dtype=torch.int8)
        t = bench(lambda: OPS.igemmlt(a, b))
        peer = bench(lambda: torch._int_mm(a, b.t())) if M > 16 else None
        row(f"igemmlt {M}x4096x4096", t, 4096 * 4096 + M * 4096 * 5,
            "torch._int_mm" if peer else None, peer)
    M, K, N = 2048, 4096, 11008
    X = torch.randn(M, K, device=dev, generator=g, dtype=torch.float16)
    W = torch.randn(N, K, device=dev, generator=g, dtype=torch.float16) * 0.02
    CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
    t_fp16 = bench(lambda: F.linear(X, W))
    for thr in (0.0, 6.0):
        t = bench(lambda: OPS.int8_linear(X, CB, SCB, None, thr))
        row(f"int8_linear {M}x{K}->{N} thr={thr:g}", t, None, "F.linear fp16", t_fp16)


for fn in (dequant_8192, gemv, prefill, int8):
    safe(fn)
    torch.cuda.empty_cache()

print(f"copy bandwidth (read+write): {copy_gbs:.0f} GB/s")
print(f"{'kernel':<48} {'us':>9} {'GB/s':>7} {'%copy':>6}  peer")
for name, us, gbs, peer, peer_us in rows:
    pct = 100 * gbs / copy_gbs if gbs == gbs else float("nan")
    ptxt = f"{peer} {peer_us:.1f} us ({peer_us / us:.2f}x)" if peer and peer_us else ""
    gtxt = f"{gbs:7.0f}" if gbs == gbs else "      -"
    ctxt = f"{pct:5.0f}%" if pct == pct else "     -"
    print(f"{name:<48} {us:9.1f} {gtxt} {ctxt}  {ptxt}")
PYEOF
BENCH_RC=$?

# ---- Nsight Compute: one launch each of issue 14's kernels (OPSQ_NCU=1) -----------------------
if [ "${OPSQ_NCU:-0}" = "1" ] && command -v ncu >/dev/null 2>&1; then
  timeout 300 ncu --clock-control none \
      --kernel-name regex:"gemv4_kernel|gemv4_tiled16|dequant4_tiled16|(^|[^e])quant4_kernel|dq_|int8_small_m|small_outliers|update8_kernel|rowreg|outlier_|igemm|mm_dequant" \
      --launch-skip 0 --launch-count 48 --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section LaunchStats --section ComputeWorkloadAnalysis \
      --section InstructionStats --section MemoryWorkloadAnalysis \
      $PY scripts/ncu_case.py >"$OUT/ncu.log" 2>&1
  echo "ncu rc=$? (see ncu.log)"
  grep -E "_kernel<|_kernel\(|DRAM Throughput|Duration|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|Executed Ipc A|Stall" "$OUT/ncu.log" | cut -c1-200 | head -240
fi

# ---- summary (last) -------------------------------------------------------------------------
echo
echo "================================ opsq gpu_run summary ================================"
printf "%-22s %s\n" "build" "rc=$BUILD_RC (${BUILD_S}s), arch $OPSQ_CUDA_ARCH_LIST"
printf "%-22s %s\n" "opsq._C" "$(grep '^opsq._C' "$OUT/diagnostics.log" | cut -c9- | cut -c1-100)"
printf "%-22s %s\n" "ops with CUDA kernels" "$NATIVE / $(grep -cE 'reference|cuda-native' "$OUT/diagnostics.log")"
printf "%-22s %s\n" "pytest (rc=$TEST_RC)" "$TEST_SUMMARY"
printf "%-22s %s\n" "bench" "rc=$BENCH_RC"
cat "$OUT/bench.log" | tail -40
