// Shared device helpers of opsq's CUDA kernels.
//
// Exactness: every operation whose rounding decides a quantization code or must equal the
// reference kernel bit for bit goes through the helpers below: IEEE round-to-nearest-even
// intrinsics, which keep subnormals and are never contracted into FMAs (nvcc contracts a * b + c
// by default; the extension is built without --use_fast_math).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace opsq {

// ---- IEEE fp32 arithmetic, never contracted ----------------------------------------------
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rcp_rn(float a) { return __frcp_rn(a); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }

// |x| as IEEE bits: for non-negative floats the unsigned order of the bits is the float order,
// and any NaN sorts above +inf, so an integer max over these bits is a NaN-propagating amax
// (as torch.amax) that ignores flush-to-zero.
__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }
__device__ __forceinline__ bool bits_is_nan(uint32_t b) { return (b & 0x7fffffffu) > 0x7f800000u; }

// 1 / absmax where absmax > 0 (and not NaN), else 0: torch.where(absmax > 0, 1 / absmax, 0).
__device__ __forceinline__ float safe_rcp_from_bits(uint32_t absbits) {
  return (absbits != 0u && absbits <= 0x7f800000u) ? rcp_rn(__uint_as_float(absbits)) : 0.0f;
}

// x * (1 / absmax), or x / absmax where absmax is so small (subnormal) that its reciprocal
// overflows: the reference's torch.where(isinf(scale), x / absmax, x * scale).
__device__ __forceinline__ float scale_or_div(float x, float scale, float absmax) {
  return isinf(scale) ? div_rn(x, absmax) : mul_rn(x, scale);
}

// Programmatic dependent launch (sm_90; no-ops on older targets). A kernel launched after this
// one on the same stream with cudaLaunchAttributeProgrammaticStreamSerialization may start once
// every CTA of this one has called pdl_launch_dependents (or exited); before it reads anything
// this one writes it calls pdl_wait, which returns once this grid has completed and its writes
// are visible (CUDA C++ Programming Guide, "Programmatic Dependent Launch").
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// L2 prefetches, neither waited for: the line holding p (prefetch.global.L2, any target) ...
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(p));
}
// ... or `bytes` (a multiple of 16) at p (16-byte aligned) (sm_90 cp.async.bulk.prefetch.L2; a
// no-op on older targets).
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(__cvta_generic_to_global(p)),
               "r"(bytes));
#endif
}

// Inclusive prefix sum of v over the lanes of a full warp (lane = this thread's lane).
__device__ __forceinline__ int warp_inclusive_sum(int v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// Exclusive prefix sum of c over a CTA of exactly 1024 threads (32 full warps): returns the
// sum of c over the threads below this one and sets total to the CTA's sum. s_warp is 32 ints
// of shared memory; it holds the scanned warp totals on return (s_warp[31] == total). Call
// with every thread. It ends with a __syncthreads(), but a caller that writes s_warp again (a
// loop) needs a barrier between its last read of the result and the next call.
__device__ __forceinline__ int block_exclusive_sum_1024(int c, int* s_warp, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int incl = warp_inclusive_sum(c, lane);
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  if (warp == 0) s_warp[lane] = warp_inclusive_sum(s_warp[lane], lane);
  __syncthreads();
  total = s_warp[31];
  return (warp > 0 ? s_warp[warp - 1] : 0) + incl - c;
}

// ---- element conversions -----------------------------------------------------------------
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

// Two floats -> two 16-bit values packed in a uint32 (a in the low half), round to nearest even.
template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Unpack 8 consecutive 16-bit floats held in a uint4 into fp32.
template <typename T> __device__ __forceinline__ float half_lo(uint32_t w);
template <typename T> __device__ __forceinline__ float half_hi(uint32_t w);
template <> __device__ __forceinline__ float half_lo<__nv_bfloat16>(uint32_t w) {
  return __uint_as_float(w << 16);
}
template <> __device__ __forceinline__ float half_hi<__nv_bfloat16>(uint32_t w) {
  return __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ float half_lo<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
}
template <> __device__ __forceinline__ float half_hi<__half>(uint32_t w) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
}

// max|x| of 16-bit data, two elements a word: |a| and |b| bitwise per half (max.u16x2); for
// non-negative 16-bit floats the unsigned order of the bits is the value order, NaN above inf,
// as abs_bits for fp32.
__device__ __forceinline__ uint32_t absmax16x2(uint32_t m, uint32_t w) {
  return __vmaxu2(m, w & 0x7fff7fffu);
}
// The larger half of a u16x2 max as fp32 abs bits.
template <typename T>
__device__ __forceinline__ uint32_t absmax16_to_bits(uint32_t m2) {
  return abs_bits(half_lo<T>(max(m2 & 0xffffu, m2 >> 16)));
}
// max|x| of the 16-bit elements of W 16-byte words, as fp32 abs bits.
template <typename T, int W>
__device__ __forceinline__ uint32_t absmax16_bits(const uint4 (&w)[W]) {
  uint32_t m2 = 0;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    m2 = absmax16x2(m2, w[i].x);
    m2 = absmax16x2(m2, w[i].y);
    m2 = absmax16x2(m2, w[i].z);
    m2 = absmax16x2(m2, w[i].w);
  }
  return absmax16_to_bits<T>(m2);
}

// The 16 / sizeof(T) elements of one 16-byte word as floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& v, float* x) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (sizeof(T) == 4) {
      x[i] = __uint_as_float(w[i]);
    } else {
      x[2 * i] = half_lo<T>(w[i]);
      x[2 * i + 1] = half_hi<T>(w[i]);
    }
  }
}

// EPT consecutive elements of p (16-byte aligned) as floats, with 16-byte loads.
template <typename T, int EPT>
__device__ __forceinline__ void load_elems(const T* __restrict__ p, float (&x)[EPT]) {
  constexpr int kPerWord = 16 / static_cast<int>(sizeof(T));
  static_assert(EPT % kPerWord == 0, "whole 16-byte words");
#pragma unroll
  for (int i = 0; i < EPT / kPerWord; ++i)
    unpack16<T>(__ldg(reinterpret_cast<const uint4*>(p) + i), x + i * kPerWord);
}

// ---- 4-bit code books (fp32 bits of opsq._constants) -------------------------------------
// NF4_CODE rounded to fp32 (code_table("nf4")).
#define OPSQ_NF4_VALUES \
    -0x1.0000000000000p+0f, -0x1.6473620000000p-1f, -0x1.0cd6600000000p-1f, \
    -0x1.9465400000000p-2f, -0x1.23449a0000000p-2f, -0x1.7a6a7e0000000p-3f, \
    -0x1.74f0e20000000p-4f, 0x0.0p+0f,              0x1.45f5fe0000000p-4f, \
    0x1.4995c60000000p-3f,  0x1.f809ba0000000p-3f,  0x1.5a06740000000p-2f, \
    0x1.c349700000000p-2f,  0x1.200f560000000p-1f,  0x1.7227660000000p-1f, \
    0x1.0000000000000p+0f
// FP4_CODE rounded to fp32 (code_table("fp4")); sign in bit 3.
#define OPSQ_FP4_VALUES \
    0x0.0p+0f,              0x1.5555560000000p-8f,  0x1.5555560000000p-1f, \
    0x1.0000000000000p+0f,  0x1.5555560000000p-2f,  0x1.0000000000000p-1f, \
    0x1.5555560000000p-3f,  0x1.0000000000000p-2f,  -0x0.0p+0f, \
    -0x1.5555560000000p-8f, -0x1.5555560000000p-1f, -0x1.0000000000000p+0f, \
    -0x1.5555560000000p-2f, -0x1.0000000000000p-1f, -0x1.5555560000000p-3f, \
    -0x1.0000000000000p-2f
__device__ __constant__ float kNF4Code[16] = {OPSQ_NF4_VALUES};
__device__ __constant__ float kFP4Code[16] = {OPSQ_FP4_VALUES};
// Host copies (kernel arguments).
constexpr float kNF4Host[16] = {OPSQ_NF4_VALUES};
constexpr float kFP4Host[16] = {OPSQ_FP4_VALUES};
// Midpoints of consecutive NF4 codes, computed in float64 from NF4_CODE and rounded once to
// fp32 (the reference's decision boundaries; a value equal to a midpoint takes the lower code).
__device__ __constant__ float kNF4Mid[15] = {
    -0x1.b239b00000000p-1f, -0x1.38a4e00000000p-1f, -0x1.d709000000000p-2f,
    -0x1.5bd4ec0000000p-2f, -0x1.e079d80000000p-3f, -0x1.1a71780000000p-3f,
    -0x1.74f0e20000000p-5f, 0x1.45f5fe0000000p-5f,  0x1.ec90c40000000p-4f,
    0x1.a0cfc00000000p-3f,  0x1.2b05a80000000p-2f,  0x1.8ea7f20000000p-2f,
    0x1.00da080000000p-1f,  0x1.491b5e0000000p-1f,  0x1.b913b40000000p-1f};
// FP4_THRESHOLDS rounded to fp32: |x| > t selects the next larger magnitude.
__device__ __constant__ float kFP4Thr[7] = {
    0x1.5555720000000p-9f, 0x1.6000000000000p-4f, 0x1.aaaaaa0000000p-3f,
    0x1.2aaaaa0000000p-2f, 0x1.aaaaac0000000p-2f, 0x1.2aaaa00000000p-1f,
    0x1.aaaaaa0000000p-1f};
// FP4_CODES_ASCENDING: code of each magnitude in ascending order.
__device__ __constant__ unsigned char kFP4Asc[8] = {0, 1, 6, 7, 4, 5, 2, 3};

constexpr int kZeroCodeNF4 = 7;
constexpr int kZeroCodeFP4 = 0;

// ---- 4-bit encoder: bucket look-up tables -------------------------------------------------
// The normalised value v is cut into buckets of width 1/64 (NF4: v in [-1, 1], 128 buckets;
// FP4: |v| in [0, 1], 64 buckets). Decision boundaries are >= 0.08 apart, so the bucket widened
// by half a bucket on each side holds at most one boundary. With lo = the number of boundaries
// below the widened bucket, the code is lo or the next one up, decided by one comparison with
// that boundary (torch.bucketize(v, boundaries, right=False) for every float v, whatever
// rounding put v into a neighbouring bucket; verified exhaustively around every boundary).
// Each table holds one pad entry below bucket 0 and one above the last bucket (kPad), so that
// the quantizer's fast path needs no clamp: there v = x * rn(1 / absmax) with |x| <= absmax, so
// |v| <= 1 + 2^-20 (1 + 2^-23 unless the reciprocal is subnormal), whose bucket is -1 (NF4) or
// kBuckets at most; both pads lie beyond every boundary (NF4: codes 0 and 15, no threshold).
//
// NF4: lo as one byte per bucket and the boundary above code c as mid[c] (mid[15] = +inf), so
// code = lo + (v > mid[lo]). The 130 bytes span all 32 banks once, so a warp's byte loads hit
// distinct banks or the same word, and the 16 boundaries sit in 16 banks: neither look-up has a
// bank conflict (an earlier table of 4-byte entries per bucket had up to 4-way conflicts where
// data concentrates in the middle buckets, and bound the quantizer's throughput on the H200).
// FP4: per bucket the boundary (+inf where none) and lo | hi << 8 (codes in FP4's order).
template <bool NF4> struct Lut;
template <> struct Lut<true> {
  static constexpr int kBuckets = 128;
  static constexpr int kPad = 1;  // entry kPad + b holds bucket b, b in [-1, kBuckets]
  uint8_t lo[kBuckets + 2 * kPad + 2];  // (+2: a whole number of words)
  float mid[16];
};
template <> struct Lut<false> {
  static constexpr int kBuckets = 64;
  static constexpr int kPad = 1;
  float thr[kBuckets + 2 * kPad];
  uint32_t codes[kBuckets + 2 * kPad];
};

template <bool NF4> struct Enc {
  static constexpr int kBuckets = Lut<NF4>::kBuckets;
  static constexpr int kPad = Lut<NF4>::kPad;
  static constexpr int kZero = NF4 ? kZeroCodeNF4 : kZeroCodeFP4;
  static constexpr int kNaNCode = NF4 ? 15 : 3;  // bucketize sorts NaN above every boundary

  // Fill the table (shared memory); call with all threads, then __syncthreads().
  static __device__ void build(Lut<NF4>& lut) {
    constexpr int kN = NF4 ? 15 : 7;
    const float* bounds = NF4 ? kNF4Mid : kFP4Thr;
    for (int e = threadIdx.x; e < kBuckets + 2 * kPad; e += blockDim.x) {
      const int j = e - kPad;  // the bucket
      const float lo = (NF4 ? -1.0f : 0.0f) + static_cast<float>(j) * (1.0f / 64.0f);
      const float lo_m = lo - (1.0f / 128.0f);
      const float hi_m = lo + (1.0f / 64.0f) + (1.0f / 128.0f);
      int below = 0;
      float thr = __int_as_float(0x7f800000);  // +inf: no boundary near this bucket
      for (int i = 0; i < kN; ++i) {
        const float b = bounds[i];
        if (b < lo_m) ++below;
        else if (b <= hi_m) thr = b;
      }
      if constexpr (NF4) {
        lut.lo[e] = static_cast<uint8_t>(below);
      } else {
        const uint32_t c_lo = kFP4Asc[below], c_hi = kFP4Asc[below + 1 > kN ? kN : below + 1];
        lut.thr[e] = thr;
        lut.codes[e] = c_lo | (c_hi << 8);
      }
    }
    if constexpr (NF4) {
      if (threadIdx.x < 16)
        lut.mid[threadIdx.x] = threadIdx.x < 15 ? kNF4Mid[threadIdx.x] : __int_as_float(0x7f800000);
    }
  }

  // NF4: the table index (bucket + kPad) of v, floor(64 (v + 1)) + kPad: the multiply-add
  // (rounding down) lands on the grid of subnormal floats, whose step 2^-149 is the unit of
  // the bits, so the bits are the index (operands 64 * 2^-149 and (64 + kPad) * 2^-149 given
  // as bits: subnormal constants). v must lie in [-1 - 1/64, 1 + 1/64) (CLAMP: clamped to
  // [-1, 1) first; fmaxf drops a NaN).
  template <bool CLAMP>
  static __device__ __forceinline__ uint32_t nf4_index(float v) {
    const float kc = CLAMP ? fminf(fmaxf(v, -1.0f), 0x1.fffffep-1f) : v;
    return __float_as_uint(__fmaf_rd(kc, __uint_as_float(64u), __uint_as_float(64u + kPad)));
  }
  // FP4: byte offset (bucket * 4, signed) of key = |v|'s bucket from the table's bucket 0:
  // the multiply-add rounds 2 + (bucket + fraction) * 2^-22 down onto the float grid of [2, 4),
  // whose step is 2^-22, so the float's bits are 0x40000000 + bucket; times 4 (mod 2^32) that
  // is the offset. (Powers of two scale exactly, so the floor is the same as of key * 64.)
  // key must lie in [0, 1 + 1/64) (CLAMP: clamped to [0, 1) first).
  template <bool CLAMP>
  static __device__ __forceinline__ int32_t fp4_offset(float key) {
    const float kc = CLAMP ? fminf(fmaxf(key, 0.0f), 0x1.fffffep-1f) : key;
    const float f = __fmaf_rd(kc, 0x1p-16f, 2.0f);
    return static_cast<int32_t>(__float_as_uint(f) * 4u);
  }
  template <typename U>
  static __device__ __forceinline__ U at(const U* a, int32_t off) {
    return *reinterpret_cast<const U*>(reinterpret_cast<const char*>(a + kPad) + off);
  }

  // word * 16 + the code of v, for v not NaN (CLAMP: v anywhere; else v in [-1 - 1/64,
  // 1 + 1/64], as in the quantizer's fast path). For NF4 the upper code is the lower + 1, a
  // predicated add instead of a select.
  template <bool CLAMP>
  static __device__ __forceinline__ uint32_t append(const Lut<NF4>& lut, uint32_t word,
                                                    float v) {
    if constexpr (NF4) {
      const uint32_t lo = lut.lo[nf4_index<CLAMP>(v)];
      uint32_t out = word * 16u + lo;
      // (PTX: the compiler's own `if` became an add and a predicated move, two instructions)
      asm("{\n\t.reg .pred p;\n\tsetp.gt.f32 p, %1, %2;\n\t@p add.u32 %0, %0, 1;\n\t}"
          : "+r"(out)
          : "f"(v), "f"(lut.mid[lo]));
      return out;
    } else {
      const uint32_t bits = __float_as_uint(v);
      const uint32_t mag = bits & 0x7fffffffu;
      const float key = __uint_as_float(mag);
      const int32_t off = fp4_offset<CLAMP>(key);
      const uint32_t codes = at(lut.codes, off);
      const bool above = key > at(lut.thr, off);
      // normed < 0 (strictly: not -0.0), read from the bits so it holds for subnormals.
      return word * 16u + ((above ? (codes >> 8) : (codes & 0xffu)) |
                           (((bits >> 31) & (mag != 0u ? 1u : 0u)) << 3));
    }
  }

  // Code (0..15) of one normalised value.
  static __device__ __forceinline__ uint32_t encode(const Lut<NF4>& lut, float v) {
    const uint32_t mag = __float_as_uint(v) & 0x7fffffffu;
    return mag > 0x7f800000u ? static_cast<uint32_t>(kNaNCode) : append<true>(lut, 0u, v);
  }
};

}  // namespace opsq
