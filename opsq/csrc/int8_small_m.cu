// int8_linear at decode batch sizes (1 to 16 rows of A, int8 weight, K % 16 == 0): one kernel
// streams the int8 weight CB once and ends in int8_linear's epilogue, instead of igemmlt's
// int32 product in global memory and a separate epilogue pass (int8_matmul.cu).
//
// Products on tensor cores, mma.m16n8k32 (s8 x s8 -> s32): the 16 mma rows are A's rows (zeros
// past `rows`), an mma's 8 columns are 8 rows of CB. Any permutation of k applied to both
// operands leaves a dot product unchanged, so each lane feeds the mma the bytes it loaded, in
// the order it loaded them: lane (g = lane / 4, t = lane % 4) reads 16 contiguous bytes at
// k0 + 16 t of CB row n0 + g and of A rows g and g + 8, and these are its B and A fragments of
// two mmas (first 8 bytes: mma 1, last 8: mma 2). In fragment terms (PTX ISA, m16n8k32 .s8):
// a0 / a2 hold row g at k slots 4t..4t+3 / 16+4t..16+4t+3, a1 / a3 row g + 8 at the same slots,
// b0 / b1 column g at the same slots; A's and B's slot j come from lanes of the same t, so
// slot 4t + i stands for k0 + 16t + i and slot 16 + 4t + i for k0 + 16t + 4 + i in both.
//
// A CTA owns 64 output columns (8 n-tiles) and all of K; its warps take interleaved 64-byte k
// steps (warp w: steps w, w + W, ...: together the W warps read W * 64 contiguous bytes of each
// of the 64 CB rows at a time), each holding the int32 sums of all 8 tiles in registers. The
// sums meet in shared memory (integer adds: exact, any order), then the CTA's threads run the
// epilogue of int8_matmul.cu on them: mm_dequant_value, the outlier term (threshold > 0: an fp32
// FMA chain over the outlier columns in ascending order, the columns compacted on the device by
// outlier_compact_kernel), the bias, one rounding to A's dtype. The int32 sums equal igemmlt's
// and every fp32 operation is the one the two-kernel path does, so the bytes are the same.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <utility>

#include "common.cuh"
#include "int8_matmul.cuh"
#include "int8_quant.h"
#include "launch.h"

namespace opsq {
namespace {

constexpr int kTiles = 8;               // n-tiles of 8 columns per CTA (each warp: all of them)
constexpr int kCtaCols = 8 * kTiles;    // 64 output columns per CTA
constexpr int kStepK = 64;              // k per warp step: 4 lanes x 16 bytes of each row
constexpr int kMinWarps = 4;
constexpr int kMaxWarps = 16;
// Epilogue outputs per thread (16 rows x 64 columns over at least kMinWarps warps).
constexpr int kOutPerThread = static_cast<int>(kSmallMRows) * kCtaCols / (kMinWarps * 32);

// 16 bytes of the weight: read-only path, not allocated in L1 (each byte is read once), L2
// fetching the 256-byte block around it (the CTA's other warps read its neighbours). volatile:
// never executed speculatively outside the bounds check that guards it.
__device__ __forceinline__ uint4 ld_weight16(const int8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// c += A (16 x 32, s8, row) * B (32 x 8, s8, col), s32 accumulate. Not volatile: the compiler
// may move it (it is executed by the whole warp, outside any branch) around the weight loads.
__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                       uint32_t a3, uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One CTA: output columns [n0, n0 + 64) of every row. CA (rows x K int8, 16-byte aligned rows),
// CB (N x K int8, idem). OUTL: threshold > 0 (A, idx and cnt are read; else unused).
// Launched as a programmatic dependent of A's quantizer (rowreg_kernel or
// small_outliers_kernel, which let it start at once): before it waits for their results
// (pdl_wait), thread c < 64 asks L2 for the first `prefetch` bytes of CB row n0 + c, so the
// weight starts streaming while A is still being quantized.
// RAW (igemmlt at M <= 16): T = int32_t, no epilogue: out[r][n] is the int32 sum itself
// (row_stats, scb, bias, A, idx and cnt unused).
template <typename T, bool OUTL, bool RAW = false>
__global__ void __launch_bounds__(kMaxWarps * 32)
int8_small_m_kernel(const int8_t* __restrict__ CA, int rows, int64_t K,
                    const int8_t* __restrict__ CB, int64_t N, const float* __restrict__ row_stats,
                    const float* __restrict__ scb, const float* __restrict__ bias,
                    const T* __restrict__ A, const int64_t* __restrict__ idx,
                    const int64_t* __restrict__ cnt_p, T* __restrict__ out, uint32_t prefetch) {
  // Sums of the CTA, in C-fragment order: [tile][fragment register][lane] (conflict-free adds).
  __shared__ int s_sum[kTiles][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = int64_t{blockIdx.x} * kCtaCols;

  if (prefetch != 0u && threadIdx.x < kCtaCols && n0 + threadIdx.x < N)
    prefetch_l2(CB + (n0 + threadIdx.x) * K, prefetch);
  for (int i = threadIdx.x; i < kTiles * 4 * 32; i += blockDim.x) (&s_sum[0][0][0])[i] = 0;
  pdl_wait();  // CA, row_stats, idx and cnt are written by the kernel before this one

  // ---- int32 sums: this warp's k steps of all 8 tiles -------------------------------------
  int acc[kTiles][4];
#pragma unroll
  for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0;
  const bool arow0 = g < rows, arow1 = g + 8 < rows;
  const int8_t* pa = CA + int64_t{g} * K + 16 * t;  // A row g (row g + 8: + 8 K)
  const int8_t* pb = CB + (n0 + g) * K + 16 * t;    // CB row n0 + g (tile j: + 8 K j)
  uint32_t tiles = 0;                               // tiles whose CB row n0 + 8 j + g exists
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
    if (n0 + 8 * j + g < N) tiles |= 1u << j;
  const int64_t steps = (K + kStepK - 1) / kStepK;
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  // Unrolled twice: a warp has two steps' loads (8 KB) in flight.
#pragma unroll 2
  for (int64_t s = warp; s < steps; s += nwarps) {
    const int64_t k = s * kStepK;
    const bool kin = k + 16 * t < K;  // K % 16 == 0: a lane's 16 bytes are all in or all out
    uint4 w[kTiles];
#pragma unroll
    for (int j = 0; j < kTiles; ++j)
      w[j] = (kin && ((tiles >> j) & 1u)) ? ld_weight16(pb + 8 * K * j + k) : z;
    const uint4 x = (kin && arow0) ? __ldg(reinterpret_cast<const uint4*>(pa + k)) : z;
    const uint4 y = (kin && arow1) ? __ldg(reinterpret_cast<const uint4*>(pa + 8 * K + k)) : z;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      mma_s8(acc[j], x.x, y.x, x.y, y.y, w[j].x, w[j].y);
      mma_s8(acc[j], x.z, y.z, x.w, y.w, w[j].z, w[j].w);
    }
  }
  __syncthreads();  // s_sum zeroed
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) atomicAdd(&s_sum[j][q][lane], acc[j][q]);
  __syncthreads();

  // ---- epilogue: thread owns outputs e = tid + m * blockDim (row e / 64, column e % 64) ---
  const int nout = rows * kCtaCols;
  float osum[kOutPerThread];  // outlier sums (threshold > 0)
#pragma unroll
  for (int m = 0; m < kOutPerThread; ++m) osum[m] = 0.f;
  if constexpr (OUTL) {
    __shared__ float s_w[kOutCap][kCtaCols];              // outlier weights, [column i][n]
    __shared__ float s_a[kSmallMRows][kOutCap];           // A at the outlier columns, [row][i]
    __shared__ int64_t s_idx[kOutCap];
    const int64_t cnt = *cnt_p;
    for (int64_t base = 0; base < cnt; base += kOutCap) {
      const int nc = static_cast<int>(min(cnt - base, int64_t{kOutCap}));
      __syncthreads();  // the previous chunk is consumed
      if (threadIdx.x < nc) s_idx[threadIdx.x] = idx[base + threadIdx.x];
      __syncthreads();
#pragma unroll 4
      for (int e = threadIdx.x; e < nc * kCtaCols; e += blockDim.x) {
        const int i = e / kCtaCols, c = e % kCtaCols;
        const int64_t n = n0 + c;
        s_w[i][c] = n < N ? outlier_weight(CB[n * K + s_idx[i]], __ldg(scb + n)) : 0.f;
      }
      for (int e = threadIdx.x; e < rows * nc; e += blockDim.x) {
        const int r = e / nc, i = e - r * nc;
        s_a[r][i] = Cvt<T>::to_float(A[r * K + s_idx[i]]);
      }
      __syncthreads();
      // Ascending columns, one FMA each: the chain of outlier_dequant_kernel.
      for (int i = 0; i < nc; ++i) {
#pragma unroll
        for (int m = 0; m < kOutPerThread; ++m) {
          const int e = threadIdx.x + m * blockDim.x;
          if (e < nout) osum[m] = fma_rn(s_a[e / kCtaCols][i], s_w[i][e % kCtaCols], osum[m]);
        }
      }
    }
    // outlier_dequant_kernel pads its last group of 4 columns with (0, 0) terms.
    if ((cnt & 3) != 0) {
#pragma unroll
      for (int m = 0; m < kOutPerThread; ++m) osum[m] = fma_rn(0.f, 0.f, osum[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < kOutPerThread; ++m) {
    const int e = threadIdx.x + m * blockDim.x;
    const int r = e / kCtaCols, c = e % kCtaCols;
    const int64_t n = n0 + c;
    if (e < nout && n < N) {
      const int cc = c & 7;  // column in its tile: fragment register (cc & 1) (+ 2 for row >= 8)
      const int32_t v = s_sum[c >> 3][2 * (r >> 3) + (cc & 1)][4 * (r & 7) + (cc >> 1)];
      if constexpr (RAW) {
        out[r * N + n] = v;
      } else {
        const float cs = __ldg(scb + n);
        float yv = mm_dequant_value(v, __ldg(row_stats + r), cs);
        if constexpr (OUTL) {
          // A non-finite SCB makes the reference's whole outlier column NaN (int8_matmul.cu).
          yv = add_rn(yv, finite_bits(cs) ? osum[m] : __int_as_float(0x7fffffff));
        }
        if (bias != nullptr) yv = add_rn(yv, __ldg(bias + n));
        out[r * N + n] = Cvt<T>::from_float(yv);
      }
    }
  }
}

// Whether int8_small_m_kernel<T, *> may be launched as a programmatic dependent on the current
// device: compute capability >= 9.0 and kernel code compiled for it (a build for older targets
// JIT-compiled on a newer GPU has no griddepcontrol.wait in it, and a dependent launch would
// read A's codes before they are visible). Asked once per device (once_per_device).
template <typename T>
bool small_m_pdl_runs() {
  static std::array<std::atomic<int8_t>, C10_COMPILE_TIME_MAX_GPUS> known{};
  return once_per_device(known, []() -> std::optional<bool> {
    const std::optional<bool> a = sm90_code_runs<int8_small_m_kernel<T, true>>();
    const std::optional<bool> b = sm90_code_runs<int8_small_m_kernel<T, false>>();
    if (!a.has_value() || !b.has_value()) return std::nullopt;  // asked again next time
    return *a && *b;
  });
}

// The one-wave grid of int8_small_m_kernel: 64 columns a CTA, and as many warps a CTA as keep
// every CTA resident at up to 128 registers a thread (16 warps for N <= 64 x SMs, 8 up to
// twice that, else 4), but no more warps than 64-byte k steps.
inline std::pair<dim3, dim3> small_m_grid(int64_t N, int64_t K) {
  const int64_t ctas = ceil_div(N, kCtaCols);
  const int64_t sms = sm_count();
  int64_t warps = ctas <= sms ? 16 : (ctas <= 2 * sms ? 8 : kMinWarps);
  warps = std::max<int64_t>(kMinWarps, std::min<int64_t>(warps, ceil_div(K, kStepK)));
  return {dim3(static_cast<unsigned>(ctas)), dim3(static_cast<unsigned>(warps * 32))};
}

template <typename T>
void launch_small_m(const at::Tensor& a, const at::Tensor& CA, const at::Tensor& row_stats,
                    const at::Tensor& CB, const at::Tensor& scb, const float* bias,
                    const int64_t* idx, const int64_t* cnt, int64_t rows, int64_t N, int64_t K,
                    at::Tensor& out, cudaStream_t stream) {
  const auto [grid, block] = small_m_grid(N, K);
  const auto* cap = reinterpret_cast<const int8_t*>(CA.data_ptr());
  const auto* cbp = reinterpret_cast<const int8_t*>(CB.data_ptr());
  const float* rs = row_stats.data_ptr<float>();
  const float* sp = scb.data_ptr<float>();
  const T* ap = reinterpret_cast<const T*>(a.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const int r = static_cast<int>(rows);
  // A programmatic dependent launch (see the kernel) where its sm_90 code runs, prefetching
  // the first bytes of every CB row: a third of L2 in all (what streams in while A's quantizer
  // runs), whole 256-byte units, at most the row; rows that would get less prefetch nothing.
  const bool pdl = small_m_pdl_runs<T>();
  const int64_t per_row = int64_t{at::cuda::getCurrentDeviceProperties()->l2CacheSize} / 3 / N;
  const uint32_t prefetch =
      pdl ? static_cast<uint32_t>(std::min<int64_t>(K, per_row / 256 * 256)) : 0u;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = pdl ? 1 : 0;
  if (idx != nullptr) {
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, int8_small_m_kernel<T, true>, cap, r, K, cbp, N, rs,
                                      sp, bias, ap, idx, cnt, op, prefetch));
  } else {
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, int8_small_m_kernel<T, false>, cap, r, K, cbp, N, rs,
                                      sp, bias, ap, nullptr, nullptr, op, prefetch));
  }
}

}  // namespace

void igemm_small_m(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t rows = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_INTERNAL_ASSERT(int8_small_m_applies(rows, N, K, b.data_ptr()) &&
                        reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0);
  const auto [grid, block] = small_m_grid(N, K);
  int8_small_m_kernel<int32_t, false, true>
      <<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          a.data_ptr<int8_t>(), static_cast<int>(rows), K, b.data_ptr<int8_t>(), N, nullptr,
          nullptr, nullptr, nullptr, nullptr, nullptr, out.data_ptr<int32_t>(), 0u);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void int8_linear_small_m(const at::Tensor& a, const at::Tensor& CB, const at::Tensor& scb,
                         const float* bias, double threshold, at::Tensor& out) {
  const int64_t rows = a.size(0), K = a.size(1), N = CB.size(0);
  TORCH_INTERNAL_ASSERT(int8_small_m_applies(rows, N, K, CB.data_ptr()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor scratch;  // [cnt (16 bytes) | idx (K int64)], threshold > 0 only
  int64_t* idx = nullptr;
  int64_t* cnt = nullptr;
  Int8Stats aq;
  if (threshold > 0.0) {
    scratch = at::empty({16 + 8 * K}, CB.options().dtype(at::kByte));
    auto* base = static_cast<unsigned char*>(scratch.data_ptr());
    cnt = reinterpret_cast<int64_t*>(base);
    idx = reinterpret_cast<int64_t*>(base + 16);
    if (!int8_quant_small_outliers(a, threshold, idx, cnt, aq)) {
      // K > kSmallMaxK, A unaligned, or no cluster: the row quantizer, then the compaction
      aq = int8_quant(a, threshold, false);
      launch_outlier_compact(reinterpret_cast<const uint8_t*>(aq.mask.data_ptr()), K, idx, cnt,
                             stream);
    }
  } else {
    aq = int8_quant(a, 0.0, false);
  }
  const at::Tensor& CA = aq.CA;
  const at::Tensor& row_stats = aq.row_stats;
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(CA.data_ptr()) % 16 == 0);
  switch (out.scalar_type()) {
    case at::kFloat:
      launch_small_m<float>(a, CA, row_stats, CB, scb, bias, idx, cnt, rows, N, K, out, stream);
      break;
    case at::kHalf:
      launch_small_m<__half>(a, CA, row_stats, CB, scb, bias, idx, cnt, rows, N, K, out, stream);
      break;
    default:
      launch_small_m<__nv_bfloat16>(a, CA, row_stats, CB, scb, bias, idx, cnt, rows, N, K, out,
                                    stream);
      break;
  }
}

}  // namespace opsq
