// CUDA kernels of the LLM.int8 matmul family: igemmlt (int8 x int8 -> int32), mm_dequant, and
// the int8_linear composition. Semantics of opsq/reference/int8.py.
// int8_linear: quantize A (int8_quant.cu), igemmlt, then one epilogue pass over the int32
// product straight to A's dtype: mm_dequant_kernel (threshold 0: dequantize, + bias, one
// rounding), or, with outliers, outlier_compact_kernel / outlier_gather_kernel /
// outlier_dequant_kernel (the outlier columns' fp32 term fused into the same pass; no host
// synchronisation).
// Small-M path (int8_small_m.cu): with <= 16 rows, an int8 weight, K % 16 == 0 and 16-byte
// aligned weight rows, int8_linear runs the quantization of A and the outlier compaction (one
// launch, int8_quant.cu's small_outliers_kernel, where threshold > 0) and then one kernel that
// streams CB once with 16-byte loads, forms the int32 sums on tensor cores (mma.m16n8k32 s8,
// A's rows as the 16 mma rows) and applies this file's epilogue arithmetic (int8_matmul.cuh) in
// the same CTA: the output bytes equal those of the path below.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "checks.h"
#include "common.cuh"
#include "int8_matmul.cuh"
#include "int8_quant.h"
#include "launch.h"
#include "ops.h"

namespace opsq {
namespace {

constexpr int kThreads = 256;
constexpr int kDequantRowsPerCta = 16;  // rows a CTA of mm_dequant_kernel walks

// ---- mm_dequant: out = ((A * row) * col) * (1/127^2) (+ bias), each product rounded in fp32
// (mm_dequant_value of int8_matmul.cuh, shared with int8_linear's outlier and small-M epilogues).

template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
mm_dequant_kernel(const int32_t* __restrict__ A, int64_t rows, int64_t N,
                  const float* __restrict__ row_stats, const float* __restrict__ col_stats,
                  const float* __restrict__ bias, T* __restrict__ out) {
  const int64_t c0 = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * W;
  if (c0 >= N) return;
  float cs[W], bs[W];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    cs[j] = col_stats[c0 + j];
    bs[j] = bias != nullptr ? bias[c0 + j] : 0.f;
  }
  const int64_t row_chunks = (rows + kDequantRowsPerCta - 1) / kDequantRowsPerCta;
  for (int64_t rc = blockIdx.y; rc < row_chunks; rc += gridDim.y) {
    const int64_t r_end = min(rows, (rc + 1) * kDequantRowsPerCta);
#pragma unroll 4
    for (int64_t r = rc * kDequantRowsPerCta; r < r_end; ++r) {
      const float rs = row_stats[r];
      int32_t a[W];
      if constexpr (W == 4) {
        const int4 v = __ldg(reinterpret_cast<const int4*>(A + r * N + c0));
        a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
      } else {
        a[0] = A[r * N + c0];
      }
      float y[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        y[j] = mm_dequant_value(a[j], rs, cs[j]);
        if (bias != nullptr) y[j] = add_rn(y[j], bs[j]);
      }
      T* o = out + r * N + c0;
      if constexpr (W == 4) {
        if constexpr (sizeof(T) == 4) {
          *reinterpret_cast<float4*>(o) = make_float4(y[0], y[1], y[2], y[3]);
        } else {
          *reinterpret_cast<uint2*>(o) = make_uint2(pack2<T>(y[0], y[1]), pack2<T>(y[2], y[3]));
        }
      } else {
        *o = Cvt<T>::from_float(y[0]);
      }
    }
  }
}

// ---- int8 x int8 -> int32 for shapes torch._int_mm does not take (M <= 16, K or N not a
// multiple of 8) and int8_small_m.cu's kernel does not either (K % 16 != 0, unaligned rows):
// one warp per output column n and 8 rows, dp4a over 16-byte chunks.
template <bool VEC>
__global__ void __launch_bounds__(kThreads)
igemm_kernel(const int8_t* __restrict__ A, const int8_t* __restrict__ B, int64_t M, int64_t N,
             int64_t K, int32_t* __restrict__ C) {
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t{blockIdx.x} * (kThreads / 32) + (threadIdx.x >> 5);
  if (n >= N) return;
  const int8_t* b = B + n * K;
  for (int64_t m0 = int64_t{blockIdx.y} * 8; m0 < M; m0 += int64_t{gridDim.y} * 8) {
    int acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (VEC) {
      for (int64_t k = int64_t{lane} * 16; k < K; k += 32 * 16) {
        const int4 bv = __ldg(reinterpret_cast<const int4*>(b + k));
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (m0 + i < M) {
            const int4 av = __ldg(reinterpret_cast<const int4*>(A + (m0 + i) * K + k));
            acc[i] = __dp4a(av.x, bv.x, acc[i]);
            acc[i] = __dp4a(av.y, bv.y, acc[i]);
            acc[i] = __dp4a(av.z, bv.z, acc[i]);
            acc[i] = __dp4a(av.w, bv.w, acc[i]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const int bv = b[k];
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (m0 + i < M) acc[i] += static_cast<int>(A[(m0 + i) * K + k]) * bv;
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    }
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (m0 + i < M) C[(m0 + i) * N + n] = acc[i];
    }
  }
}

// =============================================================================================
// int8_linear with outliers (threshold > 0). The number of outlier columns is only known on
// the device (no host synchronisation: the op is captured in CUDA graphs), so the outlier term
//   sum_k A[r, k] * mask[k] * CB[n, k] * (SCB[n] / 127)
// of the reference's dense fp32 matmul is evaluated over the outlier columns only:
//   outlier_compact_kernel  mask (K bools) -> idx (the outlier columns, ascending, int64) and
//                           cnt (their number), one CTA;
//   outlier_gather_kernel   the first nc = min(cnt, kOutCap) of them as fp32:
//                             Aout[r][i] = A[r, idx[i]]                  (rows x kOutCap)
//                             Wout[i][n] = CB[n, idx[i]] * (SCB[n] / 127) (kOutCap x N)
//                           and zeros for i in [nc, round_up(nc, 4)) (groups of 4 below);
//   outlier_tail_kernel     the rest, cnt > kOutCap: CBt[i][n] = CB[n, idx[kOutCap + i]]
//                           (int8, transposed: one weight row a column of the tail);
//   outlier_dequant_kernel  y = mm_dequant(C) + sum_i Aout[r][i] * Wout[i][n], + bias, rounded
//                           once to T. Columns idx[kOutCap .. cnt) follow the others in
//                           chunks of kOutCap, A gathered per tile, weights from CBt with the
//                           same arithmetic (outlier_weight where they are used).
// Per output element the outlier sum is an fp32 FMA chain in ascending column order, fixed
// for a given input (deterministic); it differs from the reference's matmul only in summation
// order (with one outlier column the two agree bit for bit). Non-outlier columns contribute
// exactly 0 to the reference's sum, except that a non-finite SCB[n] makes each of them NaN
// (CB * inf * 0, CB * NaN): output column n is then NaN in every row there, so here too (where
// every column is an outlier its int32 sums are 0 and 0 * inf already gives NaN). A NaN in a
// row of A makes that row's SCA NaN, hence the row NaN in both; an inf in A is always an
// outlier (|inf| >= threshold) and enters the sum as the reference's products do.
// =============================================================================================
// kOutCap (outlier columns held in Aout / Wout), kInv127, fma_rn, outlier_weight and
// finite_bits: int8_matmul.cuh (the small-M kernel of int8_small_m.cu rounds the same way).
constexpr int kCompactThreads = 1024;
constexpr int kCompactPer = 16;           // mask bytes per thread and step (one 16-byte load)

// 4 bytes -> 4 bits, bit i set where byte i is non-zero.
__device__ __forceinline__ uint32_t nonzero_bytes4(uint32_t w) {
  // Byte flags at bits 0, 8, 16, 24; the product moves bit 8 i to bit 24 + i (no carries).
  return (((__vcmpne4(w, 0u) & 0x01010101u) * 0x01020408u) >> 24) & 0xfu;
}
// ---- compaction: one CTA walks the mask in steps of kCompactThreads * kCompactPer bytes;
// thread t holds bytes [16 t, 16 t + 16) of a step as a 16-bit flag word; a block-wide
// exclusive scan of the flag counts gives each thread its first output slot.
__global__ void __launch_bounds__(kCompactThreads)
outlier_compact_kernel(const uint8_t* __restrict__ mask, int64_t K, int64_t* __restrict__ idx,
                       int64_t* __restrict__ cnt) {
  static_assert(kCompactThreads == 1024, "block_exclusive_sum_1024 scans 32 warps");
  __shared__ int s_tot[32];
  const bool vec = (reinterpret_cast<uintptr_t>(mask) & 15u) == 0u;
  int64_t total = 0;  // outlier columns before this step (same in every thread)
  for (int64_t k0 = 0; k0 < K; k0 += int64_t{kCompactThreads} * kCompactPer) {
    const int64_t k = k0 + int64_t{threadIdx.x} * kCompactPer;
    uint32_t f = 0u;
    if (vec && k + kCompactPer <= K) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(mask + k));
      f = nonzero_bytes4(v.x) | (nonzero_bytes4(v.y) << 4) | (nonzero_bytes4(v.z) << 8) |
          (nonzero_bytes4(v.w) << 12);
    } else {
      for (int j = 0; j < kCompactPer; ++j)
        if (k + j < K && mask[k + j] != 0) f |= 1u << j;
    }
    int step = 0;  // outlier columns of this step
    int64_t pos = total + block_exclusive_sum_1024(__popc(f), s_tot, step);
    while (f != 0u) {
      idx[pos++] = k + (__ffs(f) - 1);
      f &= f - 1u;
    }
    total += step;
    __syncthreads();  // s_tot is rewritten by the next step
  }
  if (threadIdx.x == 0) *cnt = total;
}

// ---- gather: Wout (np x N, n fastest: coalesced stores) then Aout (rows x np), np =
// round_up(min(cnt, kOutCap), 4), as one grid-stride index space sized on the device.
template <typename T>
__global__ void __launch_bounds__(kThreads)
outlier_gather_kernel(const T* __restrict__ A, int64_t rows, int64_t K,
                      const int8_t* __restrict__ CB, const float* __restrict__ scb, int64_t N,
                      const int64_t* __restrict__ idx, const int64_t* __restrict__ cnt,
                      float* __restrict__ Aout, float* __restrict__ Wout) {
  const int64_t nc = min(*cnt, int64_t{kOutCap});
  const int64_t np = (nc + 3) & ~int64_t{3};
  const int64_t nw = np * N;
  const int64_t total = nw + rows * np;
  for (int64_t t = int64_t{blockIdx.x} * kThreads + threadIdx.x; t < total;
       t += int64_t{gridDim.x} * kThreads) {
    if (t < nw) {
      const int64_t i = t / N, n = t - i * N;
      Wout[i * N + n] = i < nc ? outlier_weight(CB[n * K + idx[i]], scb[n]) : 0.f;
    } else {
      const int64_t u = t - nw;
      const int64_t r = u / np, i = u - r * np;
      Aout[r * kOutCap + i] = i < nc ? Cvt<T>::to_float(A[r * K + idx[i]]) : 0.f;
    }
  }
}

// ---- tail weights (cnt > kOutCap; a random model's down_proj at 2048 tokens has ~14000 of its
// 14336 columns over threshold 6): CBt[i][n] = CB[n, idx[kOutCap + i]] for i < cnt - kOutCap,
// the weight's own int8 bytes transposed through shared memory in tiles of 64 x 64: reads run
// along idx (contiguous where the outlier columns are), writes along n, so the epilogue reads a
// chunk's weights for 4 columns with one 4-byte load instead of 16 byte loads K apart. The grid
// is sized for cnt = K on the host; CTAs past the device's count return at once.
constexpr int kTailTile = 64;

__global__ void __launch_bounds__(kThreads)
outlier_tail_kernel(const int8_t* __restrict__ CB, int64_t N, int64_t K,
                    const int64_t* __restrict__ idx, const int64_t* __restrict__ cnt,
                    int8_t* __restrict__ CBt) {
  __shared__ int8_t s_t[kTailTile][kTailTile + 4];  // [i][n]; odd word stride: no conflicts
  __shared__ int64_t s_idx[kTailTile];
  const int64_t nt = *cnt - kOutCap;  // tail columns
  const int64_t tiles_n = (N + kTailTile - 1) / kTailTile;
  const int64_t tiles = (nt + kTailTile - 1) / kTailTile * tiles_n;  // <= 0: nothing to do
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t i0 = t / tiles_n * kTailTile, n0 = t % tiles_n * kTailTile;
    if (threadIdx.x < kTailTile)
      s_idx[threadIdx.x] = i0 + threadIdx.x < nt ? idx[kOutCap + i0 + threadIdx.x] : 0;
    __syncthreads();
    for (int e = threadIdx.x; e < kTailTile * kTailTile; e += kThreads) {
      const int nn = e / kTailTile, ii = e % kTailTile;
      s_t[ii][nn] = (n0 + nn < N && i0 + ii < nt) ? CB[(n0 + nn) * K + s_idx[ii]] : int8_t{0};
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kTailTile * kTailTile; e += kThreads) {
      const int ii = e / kTailTile, nn = e % kTailTile;
      if (i0 + ii < nt && n0 + nn < N) CBt[(i0 + ii) * N + n0 + nn] = s_t[ii][nn];
    }
    __syncthreads();  // s_t and s_idx are rewritten by the next tile
  }
}

// ---- epilogue with outliers. A CTA owns a tile of kOeTileRows rows x 256 columns; thread
// (tx, ty) owns columns c0 .. c0 + 3 of the rows ty * 16 .. ty * 16 + 15 of the tile and keeps
// their 64 outlier sums in registers: per group of 4 outlier columns it loads the 4 x 4 weights
// (four 16-byte loads, L1-shared by the 4 row groups of the CTA) and its 16 rows' 4 Aout values
// from shared memory (16 warp-wide broadcasts), for 256 FMAs. The tile's int32 rows are
// prefetched into L2 at the start, so DRAM streams while the FMAs run; then each row is
// dequantized as mm_dequant_kernel does (same roundings), the outlier sum and the bias added,
// and rounded once.
// VEC: N % 4 == 0 and C 16-byte aligned (16-byte loads, 8- or 16-byte stores).
constexpr int kOeCols = 4;                                // columns per thread
constexpr int kOeRows = 16;                               // rows per thread
constexpr int kOeColThreads = 64;                         // 256 columns per CTA
constexpr int kOeGroups = kThreads / kOeColThreads;       // row groups per CTA
constexpr int kOeTileRows = kOeRows * kOeGroups;          // 64 rows per CTA

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads, 2)
outlier_dequant_kernel(const int32_t* __restrict__ C, int64_t rows, int64_t N, int64_t K,
                       const float* __restrict__ row_stats, const float* __restrict__ scb,
                       const float* __restrict__ bias, const float* __restrict__ Aout,
                       const float* __restrict__ Wout, const int64_t* __restrict__ idx,
                       const int64_t* __restrict__ cnt_p, const T* __restrict__ A,
                       const int8_t* __restrict__ CBt, T* __restrict__ out) {
  __shared__ float4 s_a[kOeTileRows][kOutCap / 4];
  const int tx = threadIdx.x % kOeColThreads, ty = threadIdx.x / kOeColThreads;
  const int64_t c0 = (int64_t{blockIdx.x} * kOeColThreads + tx) * kOeCols;
  const int64_t cnt = *cnt_p;
  bool cv[kOeCols];
  float cs[kOeCols], sc[kOeCols], bs[kOeCols];
#pragma unroll
  for (int j = 0; j < kOeCols; ++j) {
    cv[j] = c0 + j < N;
    cs[j] = cv[j] ? scb[c0 + j] : 0.f;
    sc[j] = outlier_scale(cs[j]);
    bs[j] = (bias != nullptr && cv[j]) ? bias[c0 + j] : 0.f;
  }
  const int64_t tiles = (rows + kOeTileRows - 1) / kOeTileRows;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t r0 = tile * kOeTileRows;  // the CTA's first row
    const int64_t rt = r0 + ty * kOeRows;   // this thread's first row
    if (cv[0]) {
#pragma unroll
      for (int r = 0; r < kOeRows; ++r)
        if (rt + r < rows) prefetch_l2(C + (rt + r) * N + c0);
    }
    float acc[kOeRows][kOeCols];
#pragma unroll
    for (int r = 0; r < kOeRows; ++r)
#pragma unroll
      for (int j = 0; j < kOeCols; ++j) acc[r][j] = 0.f;
    // Outlier columns in chunks of kOutCap, ascending: the first from Aout / Wout, any further
    // ones (cnt > kOutCap) with A gathered here and the weights from CBt, same arithmetic.
    for (int64_t base = 0; base < cnt; base += kOutCap) {
      const bool first = base == 0;
      const int nci = static_cast<int>(min(cnt - base, int64_t{kOutCap}));
      const int ng = (nci + 3) / 4;  // groups of 4 (zeros past nci)
      float* sa = reinterpret_cast<float*>(&s_a[0][0]);
      if (first) {
        const float4* a4 = reinterpret_cast<const float4*>(Aout);
        for (int e = threadIdx.x; e < kOeTileRows * ng; e += kThreads) {
          const int rr = e / ng, g = e - rr * ng;
          s_a[rr][g] = r0 + rr < rows ? __ldg(a4 + (r0 + rr) * (kOutCap / 4) + g)
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
        }
      } else {
        const int np = 4 * ng;
        for (int e = threadIdx.x; e < kOeTileRows * np; e += kThreads) {
          const int rr = e / np, i = e - rr * np;
          sa[rr * kOutCap + i] = (r0 + rr < rows && i < nci)
                                     ? Cvt<T>::to_float(A[(r0 + rr) * K + idx[base + i]])
                                     : 0.f;
        }
      }
      __syncthreads();
      const float* wp = Wout + c0;
      for (int g = 0; g < ng; ++g, wp += 4 * N) {
        float w[4][kOeCols];  // [outlier 4 g + q][column c0 + j]
        if (first) {
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            if constexpr (VEC) {
              const float4 v = cv[0] ? __ldg(reinterpret_cast<const float4*>(wp + q * N))
                                     : make_float4(0.f, 0.f, 0.f, 0.f);
              w[q][0] = v.x; w[q][1] = v.y; w[q][2] = v.z; w[q][3] = v.w;
            } else {
#pragma unroll
              for (int j = 0; j < kOeCols; ++j) w[q][j] = cv[j] ? __ldg(wp + q * N + j) : 0.f;
            }
          }
        } else {
          // Columns past N get 0 * scale, +0 (cs = 0 there) and never stored. Weights past nci
          // stay an explicit +0: 0 * scale is -0 for a negative SCB, and fma(+0, -0, -0) keeps
          // a -0 sum (a product that underflows) where fma(+0, +0, -0) gives +0.
          const int8_t* tp = CBt + (base - kOutCap + 4 * g) * N + c0;  // row 4 g of the chunk
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int i = 4 * g + q;
            uint32_t b4 = 0u;  // columns c0 .. c0 + 3, byte j for column c0 + j
            if constexpr (VEC) {  // N % 4 == 0 and CBt 16-byte aligned: 4-byte aligned rows
              if (i < nci && cv[0]) b4 = __ldg(reinterpret_cast<const unsigned int*>(tp + q * N));
            } else {
#pragma unroll
              for (int j = 0; j < kOeCols; ++j)
                if (i < nci && cv[j])
                  b4 |= uint32_t{static_cast<uint8_t>(__ldg(tp + q * N + j))} << (8 * j);
            }
#pragma unroll
            for (int j = 0; j < kOeCols; ++j)
              w[q][j] = i < nci ? mul_rn(s8_byte_as_float(b4, j), sc[j]) : 0.f;
          }
        }
#pragma unroll
        for (int r = 0; r < kOeRows; ++r) {
          const float4 a = s_a[ty * kOeRows + r][g];
#pragma unroll
          for (int j = 0; j < kOeCols; ++j) {
            float s = acc[r][j];
            s = fma_rn(a.x, w[0][j], s);
            s = fma_rn(a.y, w[1][j], s);
            s = fma_rn(a.z, w[2][j], s);
            s = fma_rn(a.w, w[3][j], s);
            acc[r][j] = s;
          }
        }
      }
      __syncthreads();  // s_a is restaged by the next chunk / tile
    }
#pragma unroll
    for (int r = 0; r < kOeRows; ++r) {
      const int64_t row = rt + r;
      if (row < rows && cv[0]) {
        const float rs = __ldg(row_stats + row);
        const int32_t* cp = C + row * N + c0;
        int32_t c[kOeCols];
        if constexpr (VEC) {
          const int4 v = __ldcs(reinterpret_cast<const int4*>(cp));
          c[0] = v.x; c[1] = v.y; c[2] = v.z; c[3] = v.w;
        } else {
#pragma unroll
          for (int j = 0; j < kOeCols; ++j) c[j] = cv[j] ? __ldcs(cp + j) : 0;
        }
        float y[kOeCols];
#pragma unroll
        for (int j = 0; j < kOeCols; ++j) {
          y[j] = mm_dequant_value(c[j], rs, cs[j]);
          // A non-finite SCB makes the reference's whole outlier column NaN (see above).
          y[j] = add_rn(y[j], finite_bits(cs[j]) ? acc[r][j] : __int_as_float(0x7fffffff));
          if (bias != nullptr) y[j] = add_rn(y[j], bs[j]);
        }
        T* o = out + row * N + c0;
        if constexpr (VEC) {
          if constexpr (sizeof(T) == 4) {
            __stcs(reinterpret_cast<float4*>(o), make_float4(y[0], y[1], y[2], y[3]));
          } else {
            __stcs(reinterpret_cast<uint2*>(o),
                   make_uint2(pack2<T>(y[0], y[1]), pack2<T>(y[2], y[3])));
          }
        } else {
#pragma unroll
          for (int j = 0; j < kOeCols; ++j)
            if (cv[j]) o[j] = Cvt<T>::from_float(y[j]);
        }
      }
    }
  }
}

// ---- host helpers ----------------------------------------------------------------------------
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T> const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

// int8_linear's outlier path (threshold > 0; rows, N, K >= 1). C = igemmlt(CA, CB) (rows x N,
// contiguous), a: A as a contiguous (rows, K) matrix of T, mask: its outlier columns (K bools),
// CB (N x K) and scb (N) contiguous, bias fp32 or null; out (rows x N) of T. Scratch from the
// caching allocator, launches on the current stream, no host synchronisation.
template <typename T>
void int8_linear_outliers(const at::Tensor& C, const at::Tensor& a, const at::Tensor& row_stats,
                          const at::Tensor& mask, const at::Tensor& CB, const at::Tensor& scb,
                          const float* bias, int64_t rows, int64_t N, int64_t K, at::Tensor& out) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Scratch: [cnt (16 bytes) | idx (K int64, padded to 16 bytes) | Aout (rows x kOutCap fp32) |
  // Wout (kOutCap x N fp32) | CBt ((K - kOutCap) x N int8, where K > kOutCap: room for every
  // column an outlier, since cnt is only known on the device)]; every part 16-byte aligned,
  // nothing needs zeros.
  const int64_t idx_bytes = ceil_div(8 * K, 16) * 16;
  const int64_t aout_bytes = rows * kOutCap * 4;
  const int64_t wout_bytes = int64_t{kOutCap} * N * 4;
  const int64_t tail_cols = std::max<int64_t>(K - kOutCap, 0);
  at::Tensor scratch = at::empty({16 + idx_bytes + aout_bytes + wout_bytes + tail_cols * N},
                                 a.options().dtype(at::kByte));
  auto* base = static_cast<unsigned char*>(scratch.data_ptr());
  auto* cnt = reinterpret_cast<int64_t*>(base);
  auto* idx = reinterpret_cast<int64_t*>(base + 16);
  auto* aout = reinterpret_cast<float*>(base + 16 + idx_bytes);
  auto* wout = reinterpret_cast<float*>(base + 16 + idx_bytes + aout_bytes);
  auto* cbt = reinterpret_cast<int8_t*>(base + 16 + idx_bytes + aout_bytes + wout_bytes);
  const T* ap = cptr<T>(a);
  const auto* cbp = cptr<int8_t>(CB);
  const float* sp = scb.data_ptr<float>();

  launch_outlier_compact(reinterpret_cast<const uint8_t*>(mask.data_ptr()), K, idx, cnt, stream);
  {
    // Sized for the capacity; the kernel reads the count and strides over what it needs.
    const int64_t work = int64_t{kOutCap} * (N + rows);
    const int64_t grid = std::max<int64_t>(
        1, std::min<int64_t>(ceil_div(work, kThreads), int64_t{sm_count()} * 8));
    outlier_gather_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        ap, rows, K, cbp, sp, N, idx, cnt, aout, wout);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (tail_cols > 0) {
    const int64_t tiles = ceil_div(tail_cols, int64_t{kTailTile}) * ceil_div(N, int64_t{kTailTile});
    const int64_t grid = std::min<int64_t>(tiles, int64_t{sm_count()} * 8);
    outlier_tail_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(cbp, N, K, idx, cnt,
                                                                              cbt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto* cp = C.data_ptr<int32_t>();
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const bool vec = N % 4 == 0 && aligned16(cp) && aligned16(op);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, int64_t{kOeColThreads} * kOeCols)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kOeTileRows), kMaxGridY)));
  const float* rs = row_stats.data_ptr<float>();
  if (vec) {
    outlier_dequant_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        cp, rows, N, K, rs, sp, bias, aout, wout, idx, cnt, ap, cbt, op);
  } else {
    outlier_dequant_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        cp, rows, N, K, rs, sp, bias, aout, wout, idx, cnt, ap, cbt, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_outlier_compact(const uint8_t* mask, int64_t K, int64_t* idx, int64_t* cnt,
                            cudaStream_t stream) {
  outlier_compact_kernel<<<1, kCompactThreads, 0, stream>>>(mask, K, idx, cnt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor igemmlt_cuda(const at::Tensor& A, const at::Tensor& B) {
  check_dtype("A", A.scalar_type(), {at::kChar});
  check_dtype("B", B.scalar_type(), {at::kChar});
  check_min_dim("A", A, 1);
  check_dim("B", B, 2);
  check_same_device("A", A, "B", B);
  TORCH_CHECK(A.size(-1) == B.size(1),
              "A's last dimension (" + fmt(A.size(-1)) + ") must equal B's K (B.shape[1] = " +
                  fmt(B.size(1)) + "); B is (N, K) and the op computes A @ B.T");
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t K = A.size(-1), N = B.size(0);
  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t s : out_shape) M *= s;
  out_shape.push_back(N);
  if (M == 0 || N == 0) return at::empty(out_shape, A.options().dtype(at::kInt));
  if (K == 0) return at::zeros(out_shape, A.options().dtype(at::kInt));
  const at::Tensor a = A.reshape({M, K}).contiguous();
  const at::Tensor b = B.contiguous();
  if (M > 16 && K % 8 == 0 && N % 8 == 0) {
    return at::_int_mm(a, b.t()).reshape(out_shape);
  }
  auto out = at::empty({M, N}, A.options().dtype(at::kInt));
  const bool vec = K % 16 == 0 && aligned16(a.data_ptr()) && aligned16(b.data_ptr());
  if (vec && int8_small_m_applies(M, N, K, b.data_ptr())) {  // M <= 16: tensor cores
    igemm_small_m(a, b, out);
    return out.reshape(out_shape);
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads / 32)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(M, 8), kMaxGridY)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* ap = a.data_ptr<int8_t>();
  const auto* bp = b.data_ptr<int8_t>();
  if (vec) igemm_kernel<true><<<grid, kThreads, 0, stream>>>(ap, bp, M, N, K, out.data_ptr<int32_t>());
  else igemm_kernel<false><<<grid, kThreads, 0, stream>>>(ap, bp, M, N, K, out.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.reshape(out_shape);
}

at::Tensor mm_dequant_cuda(const at::Tensor& A, const at::Tensor& row_stats,
                           const at::Tensor& col_stats, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> dtype) {
  check_dtype("A", A.scalar_type(), {at::kInt});
  check_min_dim("A", A, 1);
  check_dtype("row_stats", row_stats.scalar_type(), {at::kFloat});
  check_dtype("col_stats", col_stats.scalar_type(), {at::kFloat});
  check_same_device("A", A, "row_stats", row_stats);
  check_same_device("A", A, "col_stats", col_stats);
  check_same_device("A", A, "bias", bias);
  const int64_t N = A.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) rows *= A.size(d);
  check_numel("row_stats", row_stats, rows, " (one per row of A)");
  check_numel("col_stats", col_stats, N, " (one per column of A)");
  if (dtype.has_value()) check_float_dtype_arg("dtype", *dtype);
  if (bias.has_value()) {
    check_float_dtype("bias", bias->scalar_type());
    check_numel("bias", *bias, N, " (one per column of A)");
  }
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::ScalarType out_dtype = dtype.value_or(at::kHalf);
  auto out = at::empty(A.sizes(), A.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const at::Tensor a = A.reshape({rows, N}).contiguous();
  const at::Tensor rs = row_stats.contiguous();
  const at::Tensor cs = col_stats.contiguous();
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  const bool vec = N % 4 == 0 && aligned16(a.data_ptr());
  const int W = vec ? 4 : 1;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, int64_t{kThreads} * W)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kDequantRowsPerCta), kMaxGridY)));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int32_t* ap = a.data_ptr<int32_t>();
#define OPSQ_MMD(T, PTR)                                                                       \
  if (vec) mm_dequant_kernel<T, 4><<<grid, kThreads, 0, stream>>>(ap, rows, N, rs.data_ptr<float>(), cs.data_ptr<float>(), bp, PTR); \
  else mm_dequant_kernel<T, 1><<<grid, kThreads, 0, stream>>>(ap, rows, N, rs.data_ptr<float>(), cs.data_ptr<float>(), bp, PTR)
  switch (out_dtype) {
    case at::kFloat: OPSQ_MMD(float, out.data_ptr<float>()); break;
    case at::kHalf: OPSQ_MMD(__half, reinterpret_cast<__half*>(out.data_ptr())); break;
    default: OPSQ_MMD(__nv_bfloat16, reinterpret_cast<__nv_bfloat16*>(out.data_ptr())); break;
  }
#undef OPSQ_MMD
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor int8_linear_cuda(const at::Tensor& A, const at::Tensor& B,
                            const std::optional<at::Tensor>& SCB,
                            const std::optional<at::Tensor>& bias, double threshold) {
  // check_int8_linear of opsq/meta/int8.py
  check_float_dtype("A", A.scalar_type());
  check_min_dim("A", A, 1);
  check_threshold(threshold);
  check_dtype("B", B.scalar_type(), {at::kChar, at::kHalf, at::kBFloat16, at::kFloat});
  check_dim("B", B, 2);
  check_same_device("A", A, "B", B);
  check_same_device("A", A, "SCB", SCB);
  check_same_device("A", A, "bias", bias);
  TORCH_CHECK(A.size(-1) == B.size(1), "A's last dimension (" + fmt(A.size(-1)) +
                                           ") must equal B.shape[1] (in_features = " +
                                           fmt(B.size(1)) + ")");
  const int64_t N = B.size(0), K = A.size(-1);
  if (B.scalar_type() == at::kChar) {
    TORCH_CHECK_VALUE(SCB.has_value(),
                      "SCB (fp32 row scales of the int8 weight B) is required when B is int8");
    check_dtype("SCB", SCB->scalar_type(), {at::kFloat});
    check_numel("SCB", *SCB, N, " (one per row of B)");
  } else {
    TORCH_CHECK_VALUE(!SCB.has_value(),
                      "SCB must be None when B is a floating-point weight (it is quantized per "
                      "call)");
  }
  if (bias.has_value()) {
    check_float_dtype("bias", bias->scalar_type());
    check_dim("bias", *bias, 1);
    check_numel("bias", *bias, N, " (one per output feature)");
  }
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());

  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor CB, scb;
  if (B.scalar_type() != at::kChar) {
    Int8Stats wq = int8_quant(B, 0.0, false);
    CB = wq.CA;
    scb = wq.row_stats;
  } else {
    CB = B.contiguous();
    scb = SCB->reshape({-1}).contiguous();
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) rows *= A.size(d);
  const at::Tensor a2 = A.reshape({rows, K}).contiguous();
  if (B.scalar_type() == at::kChar && int8_small_m_applies(rows, N, K, CB.data_ptr())) {
    // Decode-sized A (<= 16 rows): A's quantization (with the outlier columns: one launch), then
    // one kernel streams CB once (tensor-core int8 products) and runs the same epilogue
    // arithmetic; bytes equal to the path below (int8_small_m.cu).
    at::Tensor out = at::empty({rows, N}, A.options());
    at::Tensor bf;
    if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
    const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
    int8_linear_small_m(a2, CB, scb, bp, threshold, out);
    return out.reshape(out_shape);
  }
  Int8Stats aq = int8_quant(a2, threshold, false);
  const at::Tensor C = igemmlt_cuda(aq.CA, CB).contiguous();  // (rows, N) int32
  if (threshold <= 0.0 || rows == 0 || N == 0 || K == 0) {
    // No outlier term (K == 0: the reference's outlier matmul is all zeros): one epilogue,
    // ((C * SCA) * SCB) * (1/127^2) + bias in fp32, rounded once to A's dtype, exactly the
    // reference's fp32 mm_dequant, + bias.float(), .to(A.dtype).
    return mm_dequant_cuda(C, aq.row_stats, scb, bias, A.scalar_type()).reshape(out_shape);
  }
  at::Tensor out = at::empty({rows, N}, A.options());
  at::Tensor bf;
  if (bias.has_value()) bf = bias->to(at::kFloat).contiguous();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  switch (A.scalar_type()) {
    case at::kFloat:
      int8_linear_outliers<float>(C, a2, aq.row_stats, aq.mask, CB, scb, bp, rows, N, K, out);
      break;
    case at::kHalf:
      int8_linear_outliers<__half>(C, a2, aq.row_stats, aq.mask, CB, scb, bp, rows, N, K, out);
      break;
    default:
      int8_linear_outliers<__nv_bfloat16>(C, a2, aq.row_stats, aq.mask, CB, scb, bp, rows, N, K,
                                          out);
      break;
  }
  return out.reshape(out_shape);
}

}  // namespace opsq
