// CUDA kernels of the LLM.int8 quantizers: vectorwise_quant and double_quant (and the row
// quantization int8_linear applies to A and to a float weight). Semantics of
// opsq/reference/int8.py:
//   x = A.float() with outliers (|x| >= threshold, threshold > 0) set to 0,
//   stats = max|x| per row (and per column), q = clamp(round_half_even(x * (127 / stats)), ±127)
//   (scale 0 where stats is 0), columns holding an outlier zeroed in the row-wise output.
//
// Paths (rows of whole aligned 16-byte chunks, K % 8 == 0; anything else takes the two-read
// kernels stats_kernel / quant_kernel / rowquant_kernel):
//   vectorwise_quant: rowreg_kernel reads each row once into registers, writes its statistic and
//     codes (with a threshold: plus outlier_fixup_kernel for the columns found late);
//   double_quant: dq_stats_kernel (row and column maxima, A read once), then dq_quant_kernel
//     (both outputs, A read again in reverse row order to reuse what L2 still holds).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cooperative_groups.h>

#include <algorithm>

#include "checks.h"
#include "common.cuh"
#include "int8_quant.h"
#include "launch.h"
#include "ops.h"

namespace opsq {
namespace {

constexpr int kThreads = 256;

// torch.where(stats > 0, 127.0 / stats, 0). Tensor.__rtruediv__ computes 127.0 / stats as
// stats.reciprocal() * 127.0: two IEEE roundings, reproduced here.
__device__ __forceinline__ float int8_scale(float stats) {
  const uint32_t b = __float_as_uint(stats);
  return (b != 0u && b <= 0x7f800000u) ? mul_rn(rcp_rn(stats), 127.0f) : 0.0f;
}
// round(x * scale) clamped to [-127, 127]; where stats is so small that the scale overflows,
// round((x / stats) * 127) as the reference. A NaN converts to 0 (cvt.rni of NaN), as the
// reference's nan_to_num(0).
__device__ __forceinline__ int quant_int8(float x, float scale, float stats) {
  const float v = isinf(scale) ? mul_rn(div_rn(x, stats), 127.0f) : mul_rn(x, scale);
  const int q = __float2int_rn(v);
  return min(max(q, -127), 127);
}

template <typename T, int W>
__device__ __forceinline__ void load_w(const T* __restrict__ p, float (&x)[W]) {
  if constexpr (W == 1) {
    x[0] = Cvt<T>::to_float(*p);
  } else {
    load_elems<T, W>(p, x);  // 16-byte loads (common.cuh)
  }
}

template <int W>
__device__ __forceinline__ void store_i8(int8_t* __restrict__ p, const int (&q)[W]) {
  if constexpr (W == 1) {
    *p = static_cast<int8_t>(q[0]);
  } else {
    uint32_t w[W / 4];
#pragma unroll
    for (int k = 0; k < W / 4; ++k) {
      w[k] = (static_cast<uint32_t>(q[4 * k] & 0xff)) |
             (static_cast<uint32_t>(q[4 * k + 1] & 0xff) << 8) |
             (static_cast<uint32_t>(q[4 * k + 2] & 0xff) << 16) |
             (static_cast<uint32_t>(q[4 * k + 3] & 0xff) << 24);
    }
    if constexpr (W == 8) *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    else *reinterpret_cast<uint32_t*>(p) = w[0];
  }
}

// ---- vectorwise_quant without outliers: one warp per row, stats then quantize (the second
// read of the row hits L1/L2). W elements per lane access (8, or 1 for unaligned rows).
template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
rowquant_kernel(const T* __restrict__ A, int64_t rows, int64_t K, int8_t* __restrict__ CA,
                float* __restrict__ stats) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t{gridDim.x} * (kThreads / 32);
  for (int64_t r = int64_t{blockIdx.x} * (kThreads / 32) + (threadIdx.x >> 5); r < rows;
       r += warps) {
    const T* a = A + r * K;
    uint32_t m = 0;
#pragma unroll 4
    for (int64_t k = int64_t{lane} * W; k < K; k += 32 * W) {
      float x[W];
      load_w<T, W>(a + k, x);
#pragma unroll
      for (int i = 0; i < W; ++i) m = max(m, abs_bits(x[i]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float st = __uint_as_float(m);
    if (lane == 0) stats[r] = st;
    const float scale = int8_scale(st);
#pragma unroll 4
    for (int64_t k = int64_t{lane} * W; k < K; k += 32 * W) {
      float x[W];
      load_w<T, W>(a + k, x);
      int q[W];
#pragma unroll
      for (int i = 0; i < W; ++i) q[i] = quant_int8(x[i], scale, st);
      store_i8<W>(CA + r * K + k, q);
    }
  }
}

// ---- statistics with outliers: a CTA reduces a tile of 32 rows x (32 * W) columns; row and
// column maxima go to global memory through atomicMax on the IEEE bits (buffers zeroed).
template <typename T, int W, bool COLS, bool THR>
__global__ void __launch_bounds__(kThreads)
stats_kernel(const T* __restrict__ A, int64_t rows, int64_t K, float thr,
             uint32_t* __restrict__ row_bits, uint32_t* __restrict__ col_bits,
             bool* __restrict__ mask) {
  __shared__ uint32_t cm[8][32 * W + 1];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t c0 = int64_t{blockIdx.x} * (32 * W) + int64_t{tx} * W;
  const int64_t row_tiles = (rows + 31) / 32;
  for (int64_t rt = blockIdx.y; rt < row_tiles; rt += gridDim.y) {
    uint32_t colmax[W];
#pragma unroll
    for (int j = 0; j < W; ++j) colmax[j] = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = rt * 32 + ty + 8 * i;
      uint32_t rowmax = 0;
      if (r < rows && c0 < K) {
        float x[W];
        if (c0 + W <= K) {
          load_w<T, W>(A + r * K + c0, x);
        } else {
#pragma unroll
          for (int j = 0; j < W; ++j) x[j] = (c0 + j < K) ? Cvt<T>::to_float(A[r * K + c0 + j]) : 0.f;
        }
#pragma unroll
        for (int j = 0; j < W; ++j) {
          uint32_t a = abs_bits(x[j]);
          if (THR && __uint_as_float(a) >= thr) {
            mask[c0 + j] = true;
            a = 0;
          }
          rowmax = max(rowmax, a);
          colmax[j] = max(colmax[j], a);
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) rowmax = max(rowmax, __shfl_xor_sync(0xffffffffu, rowmax, o));
      if (tx == 0 && r < rows && rowmax != 0u) atomicMax(row_bits + r, rowmax);
    }
    if (COLS) {
#pragma unroll
      for (int j = 0; j < W; ++j) cm[ty][tx * W + j] = colmax[j];
      __syncthreads();
      for (int t = threadIdx.x; t < 32 * W; t += kThreads) {
        uint32_t m = cm[0][t];
#pragma unroll
        for (int y = 1; y < 8; ++y) m = max(m, cm[y][t]);
        const int64_t c = int64_t{blockIdx.x} * (32 * W) + t;
        if (c < K && m != 0u) atomicMax(col_bits + c, m);
      }
      __syncthreads();
    }
  }
}

// ---- quantize with known statistics: row-wise output (columns with an outlier zeroed) and
// optionally the column-wise output. A thread owns W columns and walks kRowsPerCta rows.
constexpr int kRowsPerCta = 16;

template <typename T, int W, bool COLS, bool THR>
__global__ void __launch_bounds__(kThreads)
quant_kernel(const T* __restrict__ A, int64_t rows, int64_t K, float thr,
             const float* __restrict__ row_stats, const float* __restrict__ col_stats,
             const bool* __restrict__ mask, int8_t* __restrict__ out_row,
             int8_t* __restrict__ out_col) {
  const int64_t c0 = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * W;
  if (c0 >= K) return;
  const bool full = c0 + W <= K;
  float cscale[W], cstat[W];
  bool cmask[W];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const bool in = c0 + j < K;
    cstat[j] = (COLS && in) ? col_stats[c0 + j] : 1.f;
    cscale[j] = (COLS && in) ? int8_scale(cstat[j]) : 0.f;
    cmask[j] = (THR && in) ? mask[c0 + j] : false;
  }
  const int64_t row_chunks = (rows + kRowsPerCta - 1) / kRowsPerCta;
  for (int64_t rc = blockIdx.y; rc < row_chunks; rc += gridDim.y) {
    const int64_t r_end = min(rows, (rc + 1) * kRowsPerCta);
#pragma unroll 4
    for (int64_t r = rc * kRowsPerCta; r < r_end; ++r) {
      const float rstat = row_stats[r];
      const float rscale = int8_scale(rstat);
      float x[W];
      if (full) {
        load_w<T, W>(A + r * K + c0, x);
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) x[j] = (c0 + j < K) ? Cvt<T>::to_float(A[r * K + c0 + j]) : 0.f;
      }
      int qr[W], qc[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float v = x[j];
        if (THR && __uint_as_float(abs_bits(v)) >= thr) v = 0.f;
        qr[j] = cmask[j] ? 0 : quant_int8(v, rscale, rstat);
        qc[j] = COLS ? quant_int8(v, cscale[j], cstat[j]) : 0;
      }
      if (full) {
        store_i8<W>(out_row + r * K + c0, qr);
        if (COLS) store_i8<W>(out_col + r * K + c0, qc);
      } else {
#pragma unroll
        for (int j = 0; j < W; ++j) {
          if (c0 + j < K) {
            out_row[r * K + c0 + j] = static_cast<int8_t>(qr[j]);
            if (COLS) out_col[r * K + c0 + j] = static_cast<int8_t>(qc[j]);
          }
        }
      }
    }
  }
}

// =============================================================================================
// Bandwidth-oriented paths (rows of whole 16-byte chunks: K % 8 == 0, A 16-byte aligned).
//
// Fast code path. Where a scale s is finite and non-zero, every value it multiplies satisfies
// |x| <= stats (stats is the max over exactly these x), so |RN(x * s)| <= 127 * (1 + 2^-22)^3
// < 127.5: round-half-even then needs no clamp and no cvt (a quarter-rate conversion): the sum
// RN(v + 1.5 * 2^23) is 1.5 * 2^23 + round_half_even(v), and the low byte of its bits is the
// int8 code (the bits are 0x4b400000 + code). Bit-identical to quant_int8 in that case.
// Where s is 0 (stats 0, inf or NaN) every code is 0; where s is inf (stats subnormal) the
// generic quant_int8 runs.
// =============================================================================================
constexpr float kRoundAdd = 12582912.0f;  // 1.5 * 2^23

// Bits of RN(RN(x * s) + 1.5 * 2^23): low byte = the int8 code of x (fast path).
__device__ __forceinline__ uint32_t code_bits(float x, float s) {
  return __float_as_uint(add_rn(mul_rn(x, s), kRoundAdd));
}
// Low bytes of four words -> one word (a in byte 0).
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}
__device__ __forceinline__ uint32_t pack_codes(int a, int b, int c, int d) {
  return pack_low_bytes(static_cast<uint32_t>(a), static_cast<uint32_t>(b),
                        static_cast<uint32_t>(c), static_cast<uint32_t>(d));
}
// 4 flag bits -> a word whose byte i is 0xff where bit i is set.
__device__ __forceinline__ uint32_t byte_mask4(uint32_t b4) {
  return ((b4 * 0x00204081u) & 0x01010101u) * 0xffu;
}
__device__ __forceinline__ bool fast_scale(float s) {
  return !isinf(s) && __float_as_uint(s) != 0u;
}
// The int8 codes of one 16-byte chunk's E values x with row scale s and statistic st, E / 4
// words (element 4k + i in byte i of word k): the fast path where fast (= fast_scale(s), hoisted
// by the caller), quant_int8 elsewhere. rowreg_kernel and small_outliers_kernel.
template <int E>
__device__ __forceinline__ void chunk_codes(const float (&x)[E], float s, float st, bool fast,
                                            uint32_t (&w)[E / 4]) {
  if (fast) {
#pragma unroll
    for (int k = 0; k < E / 4; ++k)
      w[k] = pack_low_bytes(code_bits(x[4 * k], s), code_bits(x[4 * k + 1], s),
                            code_bits(x[4 * k + 2], s), code_bits(x[4 * k + 3], s));
  } else {
#pragma unroll
    for (int k = 0; k < E / 4; ++k)
      w[k] = pack_codes(quant_int8(x[4 * k], s, st), quant_int8(x[4 * k + 1], s, st),
                        quant_int8(x[4 * k + 2], s, st), quant_int8(x[4 * k + 3], s, st));
  }
}

// Strong (relaxed, gpu-scope) loads: they bypass L1 and take part in the fence.sc ordering of
// the outlier protocol below.
__device__ __forceinline__ unsigned long long ld_relaxed(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
// Four words (16-byte aligned).
__device__ __forceinline__ uint4 ld_relaxed_v4(const uint4* p) {
  uint4 v;
  asm volatile("ld.relaxed.gpu.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}

// Outliers (|x| >= thr, the comparison of stats_kernel / quant_kernel) set to 0.
template <int N>
__device__ __forceinline__ void zero_outliers(float* x, float thr) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    if (__uint_as_float(abs_bits(x[i])) >= thr) x[i] = 0.f;
}

// ---- vectorwise_quant, single pass: each row is read once from DRAM into registers ----------
// A CTA of 8 warps works on tiles of RPT = 8 / GW rows; a group of GW warps (GT threads) owns
// one row of the tile, and thread `tig` of the group holds the row's 16-byte chunks
// tig, tig + GT, ..., tig + (NC - 1) * GT (coalesced: each step of k reads GT consecutive
// chunks). The group reduces max|x| (warp shuffles, then shared memory when GW > 1), and every
// thread quantizes its chunks from registers and writes their int8 codes (8 or 4 bytes).
// Tiles are assigned statically (tile = blockIdx.x + i * gridDim.x).
//
// THR (threshold > 0): row statistics only need the row (outlier elements count as 0), but a
// column holding an outlier anywhere must be 0 in every row of CA. Columns found so far are a
// global bitset; each tile reads a snapshot of it and writes 0 in those columns, and
// outlier_fixup_kernel later zeroes the rows that were written before a column was known:
//   tile:   t = atomicAdd(wticket, 1); fence.sc; snapshot = bits (relaxed loads)
//   setter: old = atomicOr(bits[c / 32], bit); if it set the bit first: fence.sc;
//           done[c] = wticket (relaxed load)
// By the fence.sc store-buffering rule, a tile whose ticket t >= done[c] (its atomicAdd came
// after the setter read wticket) sees the bit in its snapshot. So only tiles with t < done[c]
// can hold a non-zero code in column c; k2tile[t] records which tile took ticket t, and the
// fix-up zeroes column c in those tiles: the tiles started before the column was first seen
// (about one wave of CTAs when a column's outliers are frequent). With no outliers it only
// writes the mask.
struct OutlierScratch {
  unsigned long long* wticket;  // snapshot tickets taken      } zeroed
  unsigned long long* maxk;     // max of done[] (fix-up bound) }
  uint32_t* bits;               // outlier columns             }
  unsigned long long* done;     // per column (written by the column's first setter)
  long long* k2tile;            // ticket -> tile
};

template <typename T, int GW, int NC, bool THR>
__global__ void __launch_bounds__(kThreads, NC <= 4 ? 4 : 2)
rowreg_kernel(const T* __restrict__ A, int64_t rows, int K, float thr, int8_t* __restrict__ CA,
              float* __restrict__ stats, bool* __restrict__ mask_out, OutlierScratch sc) {
  pdl_launch_dependents();  // int8_small_m_kernel's weight prefetch may start (int8_small_m.cu)
  constexpr int E = 16 / static_cast<int>(sizeof(T));  // elements per chunk
  constexpr int GT = GW * 32;                           // threads per row
  constexpr int RPT = 8 / GW;                           // rows per tile
  constexpr int kVec = GT * NC * E / 128;               // 16-byte bitset words of the widest row
  constexpr int kVecPerLane = (kVec + 31) / 32;
  __shared__ uint32_t s_red[2][8];                      // per-warp maxima, double-buffered
  __shared__ uint4 s_bits4[2][THR ? kVec : 1];          // outlier snapshot, double-buffered
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int grp = warp / GW;
  const int tig = threadIdx.x % GT;
  const int chunks = K / E;
  const int64_t ntiles = (rows + RPT - 1) / RPT;

  if (!THR && blockIdx.x == 0) {
    for (int c = threadIdx.x; c < K; c += kThreads) mask_out[c] = false;
  }
  int it = 0;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x, ++it) {
    const int buf = it & 1;
    const int64_t r = tile * RPT + grp;
    const bool rv = r < rows;
    const uint4* a = reinterpret_cast<const uint4*>(A + (rv ? r : 0) * K);
    uint4 v[NC];
#pragma unroll
    for (int k = 0; k < NC; ++k) {
      const int j = tig + k * GT;
      v[k] = (rv && j < chunks) ? __ldcs(a + j) : make_uint4(0u, 0u, 0u, 0u);
    }
    const uint32_t* s_bits = reinterpret_cast<const uint32_t*>(s_bits4[buf]);
    if constexpr (THR) {
      // Warp 0 takes the tile's ticket and, after the fence, the snapshot (16-byte loads, all
      // in flight at once; published to the CTA by the __syncthreads below). Its fence also
      // waits for its own row loads, which are in flight already.
      if (warp == 0) {
        if (lane == 0) sc.k2tile[atomicAdd(sc.wticket, 1ull)] = tile;
        __syncwarp();
        __threadfence();
        const int nv = (K + 127) >> 7;
        const uint4* g = reinterpret_cast<const uint4*>(sc.bits);
        uint4 sb[kVecPerLane];
#pragma unroll
        for (int i = 0; i < kVecPerLane; ++i) {
          const int q = lane + 32 * i;
          sb[i] = q < nv ? ld_relaxed_v4(g + q) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int i = 0; i < kVecPerLane; ++i) {
          const int q = lane + 32 * i;
          if (q < nv) s_bits4[buf][q] = sb[i];
        }
      }
    }
    // max |x| of the row (zero-filled chunks past the row add nothing).
    uint32_t m = 0;
    constexpr int kOmWords = (NC * E + 31) / 32;
    uint32_t om[kOmWords];  // THR: this thread's outlier elements, bit k * E + e
#pragma unroll
    for (int i = 0; i < kOmWords; ++i) om[i] = 0u;
    if constexpr (!THR && sizeof(T) == 2) {
      m = absmax16_bits<T>(v);
    } else {
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        float x[E];
        unpack16<T>(v[k], x);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          uint32_t b = abs_bits(x[e]);
          if (THR && __uint_as_float(b) >= thr) {
            b = 0u;
            om[(k * E + e) >> 5] |= 1u << ((k * E + e) & 31);
          }
          m = max(m, b);
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if constexpr (GW > 1 || THR) {
      // One barrier per tile: s_red / s_bits are double-buffered, so the next tile's writes
      // (after this tile's reads, which precede the next barrier) cannot race with them.
      if (lane == 0) s_red[buf][warp] = m;
      __syncthreads();
      if constexpr (GW > 1) {
#pragma unroll
        for (int w = 0; w < GW; ++w) m = max(m, s_red[buf][grp * GW + w]);
      }
    }
    if (rv) {
      const float st = __uint_as_float(m);
      if (tig == 0) stats[r] = st;
      const float s = int8_scale(st);
      const bool fast = fast_scale(s);
      int8_t* o = CA + r * K;
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int j = tig + k * GT;
        if (j < chunks) {
          float x[E];
          unpack16<T>(v[k], x);
          // (Outlier elements are quantized as they are; their codes are masked to 0 below.)
          uint32_t w[E / 4];
          chunk_codes<E>(x, s, st, fast, w);
          if constexpr (THR) {
            // Code 0 for the chunk's outlier elements (as quantizing them as 0) and for the
            // columns of the snapshot.
            const uint32_t c0 = static_cast<uint32_t>(j) * E;
            const uint32_t fb = (s_bits[c0 >> 5] >> (c0 & 31u)) |
                                (om[(k * E) >> 5] >> ((k * E) & 31));
#pragma unroll
            for (int q = 0; q < E / 4; ++q) w[q] &= ~byte_mask4((fb >> (4 * q)) & 0xfu);
          }
          if constexpr (E == 8) {
            __stcs(reinterpret_cast<uint2*>(o + static_cast<int64_t>(j) * 8),
                   make_uint2(w[0], w[1]));
          } else {
            __stcs(reinterpret_cast<unsigned int*>(o + static_cast<int64_t>(j) * 4), w[0]);
          }
        }
      }
      if constexpr (THR) {
        // Record this row's outlier columns that the snapshot did not hold (rare per thread).
#pragma unroll
        for (int wi = 0; wi < kOmWords; ++wi) {
          uint32_t left = om[wi];
          while (left != 0u) {
            const int i = wi * 32 + __ffs(left) - 1;
            left &= left - 1u;
            const int j = tig + (i / E) * GT;
            if (j >= chunks) continue;
            const int c = j * E + i % E;
            const uint32_t bit = 1u << (c & 31);
            if ((s_bits[c >> 5] & bit) != 0u) continue;
            const uint32_t old = atomicOr(sc.bits + (c >> 5), bit);
            if ((old & bit) == 0u) {  // first to see column c
              __threadfence();
              const unsigned long long n = ld_relaxed(sc.wticket);
              sc.done[c] = n;
              atomicMax(sc.maxk, n);
            }
          }
        }
      }
    }
  }
}

// ---- fix-up of rowreg_kernel<THR>: zero outlier columns in the tiles that were written before
// the column was known, and write the bool mask. A thread owns 16 columns; blockIdx.y strides
// over the snapshot tickets below maxk.
__global__ void __launch_bounds__(kThreads)
outlier_fixup_kernel(int8_t* __restrict__ CA, int64_t rows, int64_t K, int rpt,
                     OutlierScratch sc, bool* __restrict__ mask_out) {
  const int64_t c0 = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * 16;
  if (c0 >= K) return;
  const uint32_t word = (sc.bits[c0 >> 5] >> (c0 & 31)) & 0xffffu;
  const int nc = static_cast<int>(min(int64_t{16}, K - c0));
  if (blockIdx.y == 0) {
    for (int i = 0; i < nc; ++i) mask_out[c0 + i] = ((word >> i) & 1u) != 0u;
  }
  if (word == 0u) return;
  unsigned long long d[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) d[i] = ((word >> i) & 1u) ? sc.done[c0 + i] : 0ull;
  const unsigned long long kend = *sc.maxk;
  const bool v16 = (K & 15) == 0;
  for (unsigned long long k = blockIdx.y; k < kend; k += gridDim.y) {
    uint32_t need = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) need |= (k < d[i] ? 1u : 0u) << i;
    if (need == 0u) continue;
    const int64_t tile = sc.k2tile[k];
    for (int rr = 0; rr < rpt; ++rr) {
      const int64_t r = tile * rpt + rr;
      if (r >= rows) break;
      int8_t* p = CA + r * K + c0;
      if (need == 0xffffu && v16) {
        *reinterpret_cast<uint4*>(p) = make_uint4(0u, 0u, 0u, 0u);
      } else {
        for (int i = 0; i < 16; ++i)
          if ((need >> i) & 1u) p[i] = 0;
      }
    }
  }
}

// ---- vectorwise_quant of a decode-sized A with a threshold, plus its outlier columns -----------
// int8_linear's small-M path (int8_small_m.cu) at threshold > 0 (int8_quant_small_outliers: rows
// <= kSmallMRows, K % 16 == 0, K <= kSmallMaxK, A 16-byte aligned, sm_90: small_outliers_runs).
// One launch does what rowreg_kernel, outlier_fixup_kernel and outlier_compact_kernel do in
// three (plus a memset): with <= 16 rows every row's outliers are seen before any code is
// written, so nothing needs a fix-up. A cluster of kSmallCluster CTAs (sm_90 thread-block
// clusters) splits K into strips of whole 32-column bitset words; CTA q owns strip q for every
// row:
//   pass 1: each item (row r, 16-byte chunk j of the strip) adds its max |x| over the elements
//           below the threshold to the row's maximum (shared atomicMax on the IEEE bits, NaN
//           above inf, as rowreg_kernel's max) and its outlier elements (|x| >= thr) to the
//           strip's bitset of columns (shared memory);
//   the CTAs' row maxima are combined through distributed shared memory (cluster.sync);
//   pass 2: every chunk quantized again from A (an L1 hit: a strip of <= 16 rows) with
//           rowreg_kernel's arithmetic, the bitset's columns written as 0;
//   pass 3: the strip's outlier columns, ascending, as int64 idx (a block scan of per-thread
//           counts, offset by the lower strips' totals) and their number *cnt, as
//           outlier_compact_kernel writes them.
// Same bytes as the three-launch route (tests/test_cuda_ops.py compares int8_linear's small-M
// output with the two-kernel path).
constexpr int kSmallThreads = 1024;
constexpr int kSmallCluster = 8;  // CTAs a cluster (the portable maximum)

template <typename T>
__global__ void __launch_bounds__(kSmallThreads)
small_outliers_kernel(const T* __restrict__ A, int rows, int K, float thr,
                      int8_t* __restrict__ CA, float* __restrict__ stats,
                      int64_t* __restrict__ idx, int64_t* __restrict__ cnt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  pdl_launch_dependents();  // int8_small_m_kernel's weight prefetch may start (int8_small_m.cu)
  namespace cg = cooperative_groups;
  constexpr int E = 16 / static_cast<int>(sizeof(T));  // elements per chunk (divides 32)
  constexpr int kWordChunks = 32 / E;                   // chunks per bitset word
  __shared__ uint32_t s_bits[kSmallMaxK / 32 / kSmallCluster + 1];  // this strip's words
  __shared__ uint32_t s_max[kSmallMRows];  // this strip's row maxima (read by the cluster)
  __shared__ uint32_t s_row[kSmallMRows];  // the rows' maxima
  static_assert(kSmallThreads == 1024, "block_exclusive_sum_1024 scans 32 warps");
  __shared__ int s_warp[32];  // pass 3's scan; s_warp[31] is read by the cluster
  const cg::cluster_group cluster = cg::this_cluster();
  const int q = static_cast<int>(cluster.block_rank());
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunks = K / E;
  const int words = (K + 31) >> 5;
  // Strip q: chunks [c0, c0 + cq), bitset words [w0, w0 + wq) (whole words).
  const int wps = (words + kSmallCluster - 1) / kSmallCluster;
  const int w0 = min(q * wps, words), wq = min(w0 + wps, words) - w0;
  const int c0 = w0 * kWordChunks, cq = max(0, min(chunks, (w0 + wq) * kWordChunks) - c0);
  for (int w = tid; w < wq; w += kSmallThreads) s_bits[w] = 0u;
  if (tid < rows) s_max[tid] = 0u;
  __syncthreads();
  const int items = rows * cq;
  const auto chunk_of = [&](int r, int jj) {
    return __ldg(reinterpret_cast<const uint4*>(A + static_cast<int64_t>(r) * K) + c0 + jj);
  };
  // Whole warps iterate together (the shuffles below): item base + lane, base warp-aligned.
  for (int base = warp * 32; base < items; base += kSmallThreads) {
    const int i = base + lane;
    const bool valid = i < items;
    const int r = valid ? i / cq : 0;
    const int jj = i - r * cq;
    uint32_t m = 0u, f = 0u;
    if (valid) {
      float x[E];
      unpack16<T>(chunk_of(r, jj), x);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        uint32_t bt = abs_bits(x[e]);
        if (__uint_as_float(bt) >= thr) {
          bt = 0u;
          f |= 1u << e;
        }
        m = max(m, bt);
      }
      if (f != 0u) atomicOr(&s_bits[(jj * E) >> 5], f << ((jj * E) & 31));
    }
    const int r0 = __shfl_sync(0xffffffffu, r, 0);
    if (__all_sync(0xffffffffu, !valid || r == r0)) {
      m = __reduce_max_sync(0xffffffffu, m);
      if (lane == 0 && m != 0u) atomicMax(&s_max[r0], m);
    } else if (valid && m != 0u) {
      atomicMax(&s_max[r], m);
    }
  }
  cluster.sync();  // every strip's row maxima written
  if (tid < rows) {
    uint32_t m = 0u;
    for (int p = 0; p < kSmallCluster; ++p) m = max(m, cluster.map_shared_rank(s_max, p)[tid]);
    s_row[tid] = m;
    if (q == 0) stats[tid] = __uint_as_float(m);
  }
  __syncthreads();
  for (int i = tid; i < items; i += kSmallThreads) {
    const int r = i / cq, jj = i - r * cq;
    const float st = __uint_as_float(s_row[r]);
    const float sc = int8_scale(st);
    float x[E];
    unpack16<T>(chunk_of(r, jj), x);
    uint32_t w[E / 4];
    chunk_codes<E>(x, sc, st, fast_scale(sc), w);
    const uint32_t fb = s_bits[(jj * E) >> 5] >> ((jj * E) & 31);
#pragma unroll
    for (int k = 0; k < E / 4; ++k) w[k] &= ~byte_mask4((fb >> (4 * k)) & 0xfu);
    int8_t* o = CA + static_cast<int64_t>(r) * K + static_cast<int64_t>(c0 + jj) * E;
    if constexpr (E == 8) {
      *reinterpret_cast<uint2*>(o) = make_uint2(w[0], w[1]);
    } else {
      *reinterpret_cast<uint32_t*>(o) = w[0];
    }
  }
  // Pass 3: thread t owns the strip's words [t * per, (t + 1) * per).
  const int per = (wq + kSmallThreads - 1) / kSmallThreads;
  const int v0 = min(tid * per, wq), v1 = min(v0 + per, wq);
  int c = 0;
  for (int w = v0; w < v1; ++w) c += __popc(s_bits[w]);
  int strip = 0;  // outlier columns of this strip (s_warp[31], read by the cluster)
  const int mine = block_exclusive_sum_1024(c, s_warp, strip);
  cluster.sync();  // every strip's total written
  int below = 0;   // outlier columns of the lower strips
  for (int p = 0; p < q; ++p) below += *cluster.map_shared_rank(&s_warp[31], p);
  int pos = below + mine;
  for (int w = v0; w < v1; ++w) {
    uint32_t left = s_bits[w];
    while (left != 0u) {
      idx[pos++] = static_cast<int64_t>(w0 + w) * 32 + __ffs(left) - 1;
      left &= left - 1u;
    }
  }
  if (q == kSmallCluster - 1 && tid == 0) *cnt = below + strip;
  cluster.sync();  // no CTA leaves while another may still read its shared memory
#else
  __trap();  // never launched: small_outliers_runs checks the compiled version
#endif
}

// ---- double_quant pass 1: row and column statistics (and the outlier mask), A read once. ---
// A CTA owns a strip of 256 columns: lane l of every warp holds columns strip * 256 + 8 l ...
// + 7 (one 16-byte chunk, two for fp32). Row blocks of 32 rows are taken in ascending order
// (grid-stride over blockIdx.y), warp w holding rows 4 w .. 4 w + 3 of the block, all loads in
// flight at once. Row maxima: warp shuffle, one atomicMax per row and strip. Column maxima stay
// in registers for the CTA's whole life and are merged once (shared memory, one atomicMax per
// column and CTA). Buffers are zeroed beforehand; the atomics act on the IEEE bits (NaN-
// propagating max). The grid is one wave, so at the end L2 holds the last rows of A; pass 2
// walks the rows in descending order to hit them.
constexpr int kDqWarpRows = 4;
constexpr int kDqBlockRows = 8 * kDqWarpRows;

template <typename T, bool THR>
__global__ void __launch_bounds__(kThreads)
dq_stats_kernel(const T* __restrict__ A, int64_t rows, int64_t K, float thr,
                uint32_t* __restrict__ row_bits, uint32_t* __restrict__ col_bits,
                uint8_t* __restrict__ mask_bytes) {
  constexpr int CH = sizeof(T) == 4 ? 2 : 1;  // 16-byte chunks per lane and row
  constexpr bool kPacked = !THR && sizeof(T) == 2;
  __shared__ uint32_t s_col[8][kThreads];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = (int64_t{blockIdx.x} * 32 + lane) * 8;
  const bool cv = c < K;
  const int64_t nblk = (rows + kDqBlockRows - 1) / kDqBlockRows;
  uint32_t cm[8];  // column |x| maxima (kPacked: cm[0..3] as u16x2 pairs)
#pragma unroll
  for (int j = 0; j < 8; ++j) cm[j] = 0u;
  for (int64_t b = blockIdx.y; b < nblk; b += gridDim.y) {
    const int64_t r0 = b * kDqBlockRows + warp * kDqWarpRows;
    uint4 raw[kDqWarpRows][CH];
#pragma unroll
    for (int u = 0; u < kDqWarpRows; ++u) {
      const bool ok = cv && r0 + u < rows;
      const uint4* p = reinterpret_cast<const uint4*>(A + (ok ? (r0 + u) * K + c : 0));
#pragma unroll
      for (int h = 0; h < CH; ++h) raw[u][h] = ok ? __ldg(p + h) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kDqWarpRows; ++u) {
      const int64_t r = r0 + u;
      uint32_t m = 0;
      if constexpr (kPacked) {
        const uint32_t w[4] = {raw[u][0].x, raw[u][0].y, raw[u][0].z, raw[u][0].w};
        uint32_t m2 = 0;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          cm[q] = absmax16x2(cm[q], w[q]);
          m2 = absmax16x2(m2, w[q]);
        }
        m = absmax16_to_bits<T>(m2);
      } else {
        float x[8];
#pragma unroll
        for (int h = 0; h < CH; ++h) unpack16<T>(raw[u][h], x + h * (16 / sizeof(T)));
        const bool ok = cv && r < rows;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          uint32_t a = abs_bits(x[j]);
          if (THR && __uint_as_float(a) >= thr) {
            a = 0u;
            if (ok) mask_bytes[c + j] = 1;
          }
          m = max(m, a);
          cm[j] = max(cm[j], a);
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
      if (lane == 0 && m != 0u && r < rows) atomicMax(row_bits + r, m);
    }
  }
  if constexpr (kPacked) {
#pragma unroll
    for (int q = 3; q >= 0; --q) {  // unpack in place, high pairs first
      const uint32_t p = cm[q];
      cm[2 * q] = abs_bits(half_lo<T>(p));
      cm[2 * q + 1] = abs_bits(half_hi<T>(p));
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) s_col[warp][lane * 8 + j] = cm[j];
  __syncthreads();
  uint32_t mm = s_col[0][threadIdx.x];
#pragma unroll
  for (int w = 1; w < 8; ++w) mm = max(mm, s_col[w][threadIdx.x]);
  const int64_t col = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (col < K && mm != 0u) atomicMax(col_bits + col, mm);
}

// ---- double_quant pass 2: both int8 outputs, A read again (descending rows, see pass 1). ----
// A thread owns 8 columns (one 16-byte chunk, two for fp32) for the whole kernel: their
// statistics, scales, zero masks (column scale 0; outlier columns in the row-wise output) stay
// in registers. It loads RB rows at once, then per row: row scale, both codes, two 8-byte
// stores. blockIdx.y == 0 writes col_stats / outlier_cols, blockIdx.x == 0 row_stats.
template <typename T>
constexpr int dq_rows_per_block() { return sizeof(T) == 4 ? 2 : 4; }  // 64 bytes per thread

template <typename T, bool THR>
__global__ void __launch_bounds__(kThreads, 3)
dq_quant_kernel(const T* __restrict__ A, int64_t rows, int64_t K, float thr,
                const uint32_t* __restrict__ row_bits, const uint32_t* __restrict__ col_bits,
                const uint8_t* __restrict__ mask_bytes, int8_t* __restrict__ out_row,
                int8_t* __restrict__ out_col, float* __restrict__ row_stats,
                float* __restrict__ col_stats, bool* __restrict__ mask_out) {
  constexpr int CH = sizeof(T) == 4 ? 2 : 1;
  constexpr int RB = dq_rows_per_block<T>();
  const int64_t c0 = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * 8;
  if (c0 >= K) return;  // no barrier in this kernel
  float csc[8];  // column scales (the statistics themselves are re-read on the slow path)
  uint32_t ckeep[2] = {~0u, ~0u}, rkeep[2] = {~0u, ~0u};
  bool cfast = true;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float cst = __uint_as_float(col_bits[c0 + j]);
    csc[j] = int8_scale(cst);
    if (isinf(csc[j])) cfast = false;
    if (__float_as_uint(csc[j]) == 0u) ckeep[j >> 2] &= ~(0xffu << (8 * (j & 3)));
    const bool mk = THR && mask_bytes[c0 + j] != 0;
    if (mk) rkeep[j >> 2] &= ~(0xffu << (8 * (j & 3)));
    if (blockIdx.y == 0) {
      col_stats[c0 + j] = cst;
      mask_out[c0 + j] = mk;
    }
  }
  const int64_t nblk = (rows + RB - 1) / RB;
  for (int64_t i = blockIdx.y; i < nblk; i += gridDim.y) {
    const int64_t b = nblk - 1 - i;
    uint4 raw[RB][CH];
    uint32_t rb[RB];
#pragma unroll
    for (int u = 0; u < RB; ++u) {
      const int64_t r = b * RB + u;
      const bool ok = r < rows;
      const uint4* p = reinterpret_cast<const uint4*>(A + (ok ? r * K + c0 : 0));
#pragma unroll
      for (int h = 0; h < CH; ++h) raw[u][h] = ok ? __ldcs(p + h) : make_uint4(0u, 0u, 0u, 0u);
      rb[u] = ok ? __ldg(row_bits + r) : 0u;
    }
#pragma unroll
    for (int u = 0; u < RB; ++u) {
      const int64_t r = b * RB + u;
      if (r >= rows) break;
      const float rst = __uint_as_float(rb[u]);
      if (blockIdx.x == 0 && threadIdx.x == 0) row_stats[r] = rst;
      const float rsc = int8_scale(rst);
      float x[8];
#pragma unroll
      for (int h = 0; h < CH; ++h) unpack16<T>(raw[u][h], x + h * (16 / sizeof(T)));
      if constexpr (THR) zero_outliers<8>(x, thr);
      uint32_t wr[2], wc[2];
      if (fast_scale(rsc)) {
#pragma unroll
        for (int q = 0; q < 2; ++q)
          wr[q] = pack_low_bytes(code_bits(x[4 * q], rsc), code_bits(x[4 * q + 1], rsc),
                                 code_bits(x[4 * q + 2], rsc), code_bits(x[4 * q + 3], rsc));
      } else {
#pragma unroll
        for (int q = 0; q < 2; ++q)
          wr[q] = pack_codes(quant_int8(x[4 * q], rsc, rst),
                             quant_int8(x[4 * q + 1], rsc, rst),
                             quant_int8(x[4 * q + 2], rsc, rst),
                             quant_int8(x[4 * q + 3], rsc, rst));
      }
      if (cfast) {
#pragma unroll
        for (int q = 0; q < 2; ++q)
          wc[q] = pack_low_bytes(code_bits(x[4 * q], csc[4 * q]),
                                 code_bits(x[4 * q + 1], csc[4 * q + 1]),
                                 code_bits(x[4 * q + 2], csc[4 * q + 2]),
                                 code_bits(x[4 * q + 3], csc[4 * q + 3])) & ckeep[q];
      } else {  // a column with subnormal statistics: the generic rounding, every column
        int qc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j)
          qc[j] = quant_int8(x[j], csc[j], __uint_as_float(col_bits[c0 + j]));
        wc[0] = pack_codes(qc[0], qc[1], qc[2], qc[3]);
        wc[1] = pack_codes(qc[4], qc[5], qc[6], qc[7]);
      }
      if constexpr (THR) {
        wr[0] &= rkeep[0];
        wr[1] &= rkeep[1];
      }
      __stcs(reinterpret_cast<uint2*>(out_row + r * K + c0), make_uint2(wr[0], wr[1]));
      __stcs(reinterpret_cast<uint2*>(out_col + r * K + c0), make_uint2(wc[0], wc[1]));
    }
  }
}


// ---- host helpers ----------------------------------------------------------------------------
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T> const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

// Rows per tile of rowreg_kernel for a row of K elements of T (K % 8 == 0), 0 where the row does
// not fit the registers of a CTA (then the two-read kernels run).
template <typename T>
int rowreg_rows_per_tile(int64_t K) {
  const int64_t chunks = K / (16 / static_cast<int64_t>(sizeof(T)));
  if (chunks <= 32 * 8) return 8;        // a warp per row, up to 8 chunks per lane
  if (chunks <= kThreads * 8) return 1;  // a CTA per row, up to 8 chunks per thread
  return 0;
}

template <typename T, int GW, int NC, bool THR>
void launch_rowreg(const T* a, int64_t rows, int64_t K, float thr, int8_t* ca, float* stats,
                   bool* mask, const OutlierScratch& sc, cudaStream_t stream) {
  constexpr int RPT = 8 / GW;
  const int grid = one_wave_grid<rowreg_kernel<T, GW, NC, THR>, kThreads>(rows, RPT);
  rowreg_kernel<T, GW, NC, THR><<<grid, kThreads, 0, stream>>>(
      a, rows, static_cast<int>(K), thr, ca, stats, mask, sc);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool THR>
void dispatch_rowreg(const T* a, int64_t rows, int64_t K, float thr, int8_t* ca, float* stats,
                     bool* mask, const OutlierScratch& sc, cudaStream_t stream) {
  const int64_t chunks = K / (16 / static_cast<int64_t>(sizeof(T)));
  if (chunks <= 32 * 8) {
    launch_rowreg<T, 1, 8, THR>(a, rows, K, thr, ca, stats, mask, sc, stream);
  } else if (chunks <= kThreads * 4) {
    launch_rowreg<T, 8, 4, THR>(a, rows, K, thr, ca, stats, mask, sc, stream);
  } else {
    launch_rowreg<T, 8, 8, THR>(a, rows, K, thr, ca, stats, mask, sc, stream);
  }
}

// vectorwise_quant on the register-resident path (rows >= 1, K >= 1, rpt != 0).
template <typename T>
void vectorwise_rowreg(const at::Tensor& x, const T* a, int64_t rows, int64_t K, double threshold,
                       int rpt, Int8Stats& r, cudaStream_t stream) {
  r.row_stats = at::empty({rows}, x.options().dtype(at::kFloat));
  r.mask = at::empty({K}, x.options().dtype(at::kBool));
  int8_t* ca = r.CA.data_ptr<int8_t>();
  float* st = r.row_stats.data_ptr<float>();
  bool* mk = r.mask.data_ptr<bool>();
  if (threshold <= 0.0) {
    dispatch_rowreg<T, false>(a, rows, K, 0.f, ca, st, mk, OutlierScratch{}, stream);
    return;
  }
  // Scratch: [wticket, maxk | bits (ceil(K/32) words, padded to 16 bytes) | done (K) |
  // k2tile (tiles)]; only the first two parts need zeros.
  const int64_t ntiles = ceil_div(rows, rpt);
  const int64_t bits_bytes = ceil_div(K, 32) * 4;
  const int64_t zero_bytes = 16 + ceil_div(bits_bytes, 16) * 16;  // whole 16-byte words
  at::Tensor scratch =
      at::empty({zero_bytes + 8 * K + 8 * ntiles}, x.options().dtype(at::kByte));
  auto* base = static_cast<unsigned char*>(scratch.data_ptr());
  C10_CUDA_CHECK(cudaMemsetAsync(base, 0, static_cast<size_t>(zero_bytes), stream));
  OutlierScratch sc;
  sc.wticket = reinterpret_cast<unsigned long long*>(base);
  sc.maxk = reinterpret_cast<unsigned long long*>(base + 8);
  sc.bits = reinterpret_cast<uint32_t*>(base + 16);
  sc.done = reinterpret_cast<unsigned long long*>(base + zero_bytes);
  sc.k2tile = reinterpret_cast<long long*>(base + zero_bytes + 8 * K);
  dispatch_rowreg<T, true>(a, rows, K, static_cast<float>(threshold), ca, st, mk, sc, stream);
  const int64_t gx = ceil_div(K, int64_t{kThreads} * 16);
  const int64_t gy = std::max<int64_t>(
      1, std::min<int64_t>({ntiles, int64_t{sm_count()} * 2 / gx, kMaxGridY}));
  outlier_fixup_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0,
                         stream>>>(ca, rows, K, rpt, sc, mk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// small_outliers_kernel's launch: one cluster of kSmallCluster CTAs on `stream`. `attr` holds
// the cluster attribute the returned configuration points to.
inline cudaLaunchConfig_t small_outliers_config(cudaStream_t stream, cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(kSmallCluster);
  cfg.blockDim = dim3(kSmallThreads);
  cfg.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = kSmallCluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether small_outliers_kernel<T> runs on the current device: its code was compiled for
// compute capability >= 9.0 (a build for older GPUs holds only the __trap body, even where the
// driver JIT-compiles it for a newer one) and a cluster of kSmallCluster CTAs of kSmallThreads
// fits (it may not on a MIG slice or under MPS limits). Asked once per device
// (once_per_device); a failed query is a "no" (a MIG slice's cluster query fails for good).
template <typename T>
bool small_outliers_runs() {
  static std::array<std::atomic<int8_t>, C10_COMPILE_TIME_MAX_GPUS> known{};
  return once_per_device(known, []() -> std::optional<bool> {
    bool ok = sm90_code_runs<small_outliers_kernel<T>>().value_or(false);
    if (ok) {
      cudaLaunchAttribute attr;
      const cudaLaunchConfig_t cfg = small_outliers_config(nullptr, attr);
      int clusters = 0;
      ok = cudaOccupancyMaxActiveClusters(&clusters, small_outliers_kernel<T>, &cfg) ==
               cudaSuccess && clusters >= 1;
    }
    (void)cudaGetLastError();  // a failed query is an answer, not an error for the next launch
    return ok;
  });
}

// vectorwise_quant of a decode-sized A (checked by int8_quant_small_outliers) with a threshold,
// and its outlier columns compacted, in one launch (small_outliers_kernel); see int8_quant.h.
// Returns false, allocating and launching nothing, where the kernel does not run on this device.
template <typename T>
bool small_outliers(const at::Tensor& a, int64_t rows, int64_t K, float thr, int64_t* idx,
                    int64_t* cnt, Int8Stats& r) {
  if (!small_outliers_runs<T>()) return false;
  r.CA = at::empty({rows, K}, a.options().dtype(at::kChar));
  r.row_stats = at::empty({rows}, a.options().dtype(at::kFloat));
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = small_outliers_config(at::cuda::getCurrentCUDAStream(), attr);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, small_outliers_kernel<T>, cptr<T>(a),
                                    static_cast<int>(rows), static_cast<int>(K), thr,
                                    r.CA.data_ptr<int8_t>(), r.row_stats.data_ptr<float>(), idx,
                                    cnt));
  return true;
}

// double_quant on the vector path (rows >= 1, K >= 1): statistics pass, then both outputs.
template <typename T>
void double_quant_2pass(const at::Tensor& x, const T* a, int64_t rows, int64_t K,
                        double threshold, Int8Stats& r, cudaStream_t stream) {
  const bool thr = threshold > 0.0;
  const float thr_f = static_cast<float>(threshold);
  // Scratch: row maxima (rows), column maxima (K) as IEEE bits, outlier flags (K bytes).
  at::Tensor scratch = at::zeros({rows + K + ceil_div(K, 4)}, x.options().dtype(at::kInt));
  auto* rb = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  uint32_t* cb = rb + rows;
  auto* mb = reinterpret_cast<uint8_t*>(cb + K);
  r.row_stats = at::empty({rows}, x.options().dtype(at::kFloat));
  r.col_stats = at::empty({K}, x.options().dtype(at::kFloat));
  r.mask = at::empty({K}, x.options().dtype(at::kBool));
  const int64_t sms = sm_count();
  {
    const int64_t strips = ceil_div(K, 256);
    const int occ = thr ? ctas_per_sm<dq_stats_kernel<T, true>, kThreads>()
                        : ctas_per_sm<dq_stats_kernel<T, false>, kThreads>();
    const int64_t gy = std::min<int64_t>(
        balanced_ctas(ceil_div(rows, kDqBlockRows), sms * occ / strips), kMaxGridY);
    const dim3 grid(static_cast<unsigned>(strips), static_cast<unsigned>(gy));
    if (thr) dq_stats_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, rows, K, thr_f, rb, cb, mb);
    else dq_stats_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, rows, K, thr_f, rb, cb, mb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  {
    constexpr int RB = dq_rows_per_block<T>();
    const int64_t gx = ceil_div(K, int64_t{kThreads} * 8);
    const int occ = thr ? ctas_per_sm<dq_quant_kernel<T, true>, kThreads>()
                        : ctas_per_sm<dq_quant_kernel<T, false>, kThreads>();
    const int64_t gy =
        std::min<int64_t>(balanced_ctas(ceil_div(rows, RB), sms * occ / gx), kMaxGridY);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
    int8_t* orow = r.CA.data_ptr<int8_t>();
    int8_t* ocol = r.CA_col.data_ptr<int8_t>();
    float* rs = r.row_stats.data_ptr<float>();
    float* cs = r.col_stats.data_ptr<float>();
    bool* mk = r.mask.data_ptr<bool>();
    if (thr) {
      dq_quant_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, rows, K, thr_f, rb, cb, mb, orow,
                                                              ocol, rs, cs, mk);
    } else {
      dq_quant_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, rows, K, thr_f, rb, cb, mb, orow,
                                                               ocol, rs, cs, mk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Two-read body of vectorwise_quant / double_quant on a contiguous (rows, K) view: rows not of
// whole aligned 16-byte chunks, rows too long for rowreg_kernel, and the empty cases.
template <typename T>
void int8_quant_two_read(const at::Tensor& x, int64_t rows, int64_t K, double threshold, bool cols,
                       Int8Stats& r) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* a = cptr<T>(x);
  // Vector access: rows of whole 16-byte chunks (8 elements; fp32 loads two chunks).
  const bool vec = aligned16(a) && K % 8 == 0;
  const bool thr = threshold > 0.0;
  const float thr_f = static_cast<float>(threshold);
  if (!cols && !thr) {
    r.row_stats = at::empty({rows}, x.options().dtype(at::kFloat));
    r.mask = at::zeros({K}, x.options().dtype(at::kBool));
    if (rows == 0) return;
    if (K == 0) {
      r.row_stats.zero_();
      return;
    }
    const int grid = static_cast<int>(std::min<int64_t>(ceil_div(rows, kThreads / 32),
                                                        int64_t{sm_count()} * 32));
    int8_t* ca = r.CA.data_ptr<int8_t>();
    if (vec) rowquant_kernel<T, 8><<<grid, kThreads, 0, stream>>>(a, rows, K, ca, r.row_stats.data_ptr<float>());
    else rowquant_kernel<T, 1><<<grid, kThreads, 0, stream>>>(a, rows, K, ca, r.row_stats.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // Pass 1: statistics (and the outlier mask) into zeroed buffers.
  at::Tensor row_bits = at::zeros({rows}, x.options().dtype(at::kInt));
  at::Tensor col_bits = at::zeros({cols ? K : 0}, x.options().dtype(at::kInt));
  r.mask = at::zeros({K}, x.options().dtype(at::kBool));
  r.row_stats = row_bits.view(at::kFloat);
  if (cols) r.col_stats = col_bits.view(at::kFloat);
  if (rows == 0 || K == 0) return;
  auto* rb = reinterpret_cast<uint32_t*>(row_bits.data_ptr<int32_t>());
  auto* cb = cols ? reinterpret_cast<uint32_t*>(col_bits.data_ptr<int32_t>()) : nullptr;
  bool* mk = r.mask.data_ptr<bool>();
  {
    const int W = vec ? 8 : 1;
    const dim3 grid(static_cast<unsigned>(ceil_div(K, 32 * W)),
                    static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, 32), kMaxGridY)));
#define OPSQ_STATS(WW, C, TH) stats_kernel<T, WW, C, TH><<<grid, kThreads, 0, stream>>>(a, rows, K, thr_f, rb, cb, mk)
    if (vec) {
      if (cols) { if (thr) OPSQ_STATS(8, true, true); else OPSQ_STATS(8, true, false); }
      else OPSQ_STATS(8, false, true);
    } else {
      if (cols) { if (thr) OPSQ_STATS(1, true, true); else OPSQ_STATS(1, true, false); }
      else OPSQ_STATS(1, false, true);
    }
#undef OPSQ_STATS
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Pass 2: quantize.
  {
    const int W = vec ? 8 : 1;
    const int64_t row_chunks = ceil_div(rows, kRowsPerCta);
    const dim3 grid(static_cast<unsigned>(ceil_div(K, int64_t{kThreads} * W)),
                    static_cast<unsigned>(std::min<int64_t>(row_chunks, kMaxGridY)));
    const float* rs = r.row_stats.data_ptr<float>();
    const float* cs = cols ? r.col_stats.data_ptr<float>() : nullptr;
    int8_t* orow = r.CA.data_ptr<int8_t>();
    int8_t* ocol = cols ? r.CA_col.data_ptr<int8_t>() : nullptr;
#define OPSQ_Q(WW, C, TH) quant_kernel<T, WW, C, TH><<<grid, kThreads, 0, stream>>>(a, rows, K, thr_f, rs, cs, mk, orow, ocol)
    if (vec) {
      if (cols) { if (thr) OPSQ_Q(8, true, true); else OPSQ_Q(8, true, false); }
      else OPSQ_Q(8, false, true);
    } else {
      if (cols) { if (thr) OPSQ_Q(1, true, true); else OPSQ_Q(1, true, false); }
      else OPSQ_Q(1, false, true);
    }
#undef OPSQ_Q
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Shared body of vectorwise_quant / double_quant on a contiguous (rows, K) view.
template <typename T>
void int8_quant_impl(const at::Tensor& x, int64_t rows, int64_t K, double threshold, bool cols,
                     Int8Stats& r) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* a = cptr<T>(x);
  if (rows > 0 && K > 0 && aligned16(a) && K % 8 == 0) {
    if (cols) {
      double_quant_2pass<T>(x, a, rows, K, threshold, r, stream);
      return;
    }
    const int rpt = rowreg_rows_per_tile<T>(K);
    if (rpt > 0) {
      vectorwise_rowreg<T>(x, a, rows, K, threshold, rpt, r, stream);
      return;
    }
  }
  int8_quant_two_read<T>(x, rows, K, threshold, cols, r);
}

void check_vectorwise(const at::Tensor& A, double threshold) {
  check_float_dtype("A", A.scalar_type());
  check_min_dim("A", A, 1);
  check_threshold(threshold);
}

}  // namespace

Int8Stats int8_quant(const at::Tensor& A, double threshold, bool cols) {
  const int64_t K = A.size(-1);
  const int64_t rows = K == 0 ? [&] {
    int64_t p = 1;
    for (int64_t d = 0; d + 1 < A.dim(); ++d) p *= A.size(d);
    return p;
  }() : A.numel() / K;
  const at::Tensor x = A.reshape({rows, K}).contiguous();
  Int8Stats r;
  r.CA = at::empty(A.sizes(), A.options().dtype(at::kChar));
  if (cols) r.CA_col = at::empty(A.sizes(), A.options().dtype(at::kChar));
  switch (x.scalar_type()) {
    case at::kFloat: int8_quant_impl<float>(x, rows, K, threshold, cols, r); break;
    case at::kHalf: int8_quant_impl<__half>(x, rows, K, threshold, cols, r); break;
    default: int8_quant_impl<__nv_bfloat16>(x, rows, K, threshold, cols, r); break;
  }
  return r;
}

bool int8_quant_small_outliers(const at::Tensor& a, double threshold, int64_t* idx,
                               int64_t* cnt, Int8Stats& r) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && a.is_contiguous() && threshold > 0.0);
  const int64_t rows = a.size(0), K = a.size(1);
  if (rows < 1 || rows > kSmallMRows || K < 16 || K > kSmallMaxK || K % 16 != 0 ||
      !aligned16(a.data_ptr())) {
    return false;
  }
  const float thr = static_cast<float>(threshold);
  switch (a.scalar_type()) {
    case at::kFloat: return small_outliers<float>(a, rows, K, thr, idx, cnt, r);
    case at::kHalf: return small_outliers<__half>(a, rows, K, thr, idx, cnt, r);
    default: return small_outliers<__nv_bfloat16>(a, rows, K, thr, idx, cnt, r);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vectorwise_quant_cuda(const at::Tensor& A,
                                                                     double threshold) {
  check_vectorwise(A, threshold);
  const c10::cuda::CUDAGuard guard(A.device());
  Int8Stats r = int8_quant(A, threshold, false);
  return {r.CA, r.row_stats, r.mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> double_quant_cuda(
    const at::Tensor& A, double threshold) {
  check_vectorwise(A, threshold);
  const c10::cuda::CUDAGuard guard(A.device());
  Int8Stats r = int8_quant(A, threshold, true);
  return {r.CA, r.CA_col, r.row_stats, r.col_stats, r.mask};
}

}  // namespace opsq
