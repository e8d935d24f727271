// CUDA kernels of the 4-bit family (NF4 / FP4): quantize_4bit, dequantize_4bit, and the
// gemv_4bit / linear_4bit product. Semantics are those of opsq/reference/fourbit.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>

#include "checks.h"
#include "common.cuh"
#include "ops.h"

namespace opsq {
namespace {

constexpr int kThreads = 256;

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// -------------------------------------------------------------------------------------------
// absmax: fp32 per block, or nested (uint8 codes of absmax - offset, 8-bit blockwise with
// nested_absmax per nested block): code2[q] * nested_absmax + offset, as two fp32 roundings.
// -------------------------------------------------------------------------------------------
struct AbsmaxArgs {
  const float* absmax = nullptr;
  const uint8_t* qabsmax = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  const float* offset = nullptr;
  int nested_log2 = 8;
};

template <bool NESTED> struct AbsmaxSmem {
  float ncode[256];
  float offset;
  __device__ void load(const AbsmaxArgs& am) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) ncode[i] = am.nested_code[i];
    if (threadIdx.x == 0) offset = *am.offset;
  }
  __device__ __forceinline__ float get(const AbsmaxArgs& am, int64_t blk) const {
    const float v = mul_rn(ncode[am.qabsmax[blk]], __ldg(am.nested_absmax + (blk >> am.nested_log2)));
    return add_rn(v, offset);
  }
};
template <> struct AbsmaxSmem<false> {
  __device__ void load(const AbsmaxArgs&) {}
  __device__ __forceinline__ float get(const AbsmaxArgs& am, int64_t blk) const {
    return __ldg(am.absmax + blk);
  }
};

// -------------------------------------------------------------------------------------------
// dequantize_4bit
// A unit is 16 output bytes: 8 elements (4 code bytes) for fp16/bf16, 4 (2 bytes) for fp32.
// Blocks hold >= 32 elements and start at multiples of 32, so a unit lies in one block.
// -------------------------------------------------------------------------------------------
template <typename T> struct Unit;
template <> struct Unit<float> {
  static constexpr int kElems = 4;
  using Word = uint16_t;
};
template <> struct Unit<__half> {
  static constexpr int kElems = 8;
  using Word = uint32_t;
};
template <> struct Unit<__nv_bfloat16> {
  static constexpr int kElems = 8;
  using Word = uint32_t;
};

template <typename T>
__device__ __forceinline__ void store_unit(T* out, const float (&v)[Unit<T>::kElems]) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(out) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    uint4 w;
    w.x = pack2<T>(v[0], v[1]);
    w.y = pack2<T>(v[2], v[3]);
    w.z = pack2<T>(v[4], v[5]);
    w.w = pack2<T>(v[6], v[7]);
    *reinterpret_cast<uint4*>(out) = w;
  }
}

template <typename T, bool NESTED, bool VEC>
__global__ void __launch_bounds__(kThreads)
dequant4_kernel(const uint8_t* __restrict__ codes, AbsmaxArgs am, int bs_log2, bool nf4,
                T* __restrict__ out, int64_t n) {
  constexpr int E = Unit<T>::kElems;
  constexpr int UNR = 4;
  using Word = typename Unit<T>::Word;
  __shared__ float tab[16];
  __shared__ AbsmaxSmem<NESTED> ams;
  if (threadIdx.x < 16) tab[threadIdx.x] = nf4 ? kNF4Code[threadIdx.x] : kFP4Code[threadIdx.x];
  ams.load(am);
  __syncthreads();

  const int64_t full = VEC ? n / E : 0;
  const int64_t tile = int64_t{kThreads} * UNR;
  for (int64_t base = int64_t{blockIdx.x} * tile; base < full; base += int64_t{gridDim.x} * tile) {
    Word w[UNR];
    float s[UNR];
#pragma unroll
    for (int j = 0; j < UNR; ++j) {
      const int64_t u = base + j * kThreads + threadIdx.x;
      if (u < full) {
        w[j] = __ldg(reinterpret_cast<const Word*>(codes) + u);
        s[j] = ams.get(am, (u * E) >> bs_log2);
      }
    }
#pragma unroll
    for (int j = 0; j < UNR; ++j) {
      const int64_t u = base + j * kThreads + threadIdx.x;
      if (u < full) {
        float v[E];
#pragma unroll
        for (int b = 0; b < E / 2; ++b) {
          const uint32_t byte = (static_cast<uint32_t>(w[j]) >> (8 * b)) & 0xffu;
          v[2 * b] = mul_rn(tab[byte >> 4], s[j]);
          v[2 * b + 1] = mul_rn(tab[byte & 0xfu], s[j]);
        }
        store_unit<T>(out + u * E, v);
      }
    }
  }
  // Tail (and everything when the codes are not aligned for word loads): one element a thread.
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t e = full * E + int64_t{blockIdx.x} * kThreads + threadIdx.x; e < n; e += stride) {
    const uint32_t byte = codes[e >> 1];
    const uint32_t c = (e & 1) ? (byte & 0xfu) : (byte >> 4);
    out[e] = Cvt<T>::from_float(mul_rn(tab[c], ams.get(am, e >> bs_log2)));
  }
}

// -------------------------------------------------------------------------------------------
// quantize_4bit
// G = blocksize / EPT threads share one block (G <= 256); each thread loads EPT consecutive
// elements, the group reduces max|x| (integer max over the IEEE bits: NaN propagates), then
// each thread encodes its elements and writes EPT/2 packed bytes. Elements past n (odd tail,
// storage padding) take the zero code; bytes past the storage size are not written.
// -------------------------------------------------------------------------------------------

template <typename T, bool NF4, int EPT, bool VEC>
__global__ void __launch_bounds__(kThreads)
quant4_kernel(const T* __restrict__ A, int64_t n, int bs_log2, uint8_t* __restrict__ packed,
              int64_t nbytes, float* __restrict__ absmax, int64_t nblocks) {
  using Encoder = Enc<NF4>;
  constexpr int S = 2;  // independent block groups per trip (loads in flight)
  __shared__ Lut<NF4> lut;
  __shared__ uint32_t red[S][kThreads / 32];
  Encoder::build(lut);
  __syncthreads();

  const int G = (1 << bs_log2) / EPT;  // threads per block, power of two, <= kThreads
  const int per_cta = kThreads / G;
  const int gi = threadIdx.x & (G - 1);
  const int gb = threadIdx.x / G;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  for (int64_t b0 = int64_t{blockIdx.x} * per_cta * S; b0 < nblocks;
       b0 += int64_t{gridDim.x} * per_cta * S) {
    float x[S][EPT];
    int64_t qb[S], e0[S];
    bool active[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      qb[s] = b0 + s * per_cta + gb;
      active[s] = qb[s] < nblocks;
      e0[s] = (qb[s] << bs_log2) + int64_t{gi} * EPT;
      if (VEC && active[s] && e0[s] + EPT <= n) {
        load_elems<T, EPT>(A + e0[s], x[s]);
      } else {
#pragma unroll
        for (int i = 0; i < EPT; ++i)
          x[s][i] = (active[s] && e0[s] + i < n) ? Cvt<T>::to_float(A[e0[s] + i]) : 0.0f;
      }
    }
    uint32_t m[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      m[s] = 0;
#pragma unroll
      for (int i = 0; i < EPT; ++i) m[s] = max(m[s], abs_bits(x[s][i]));
    }
    for (int o = (G < 32 ? G : 32) >> 1; o > 0; o >>= 1) {
#pragma unroll
      for (int s = 0; s < S; ++s) m[s] = max(m[s], __shfl_xor_sync(0xffffffffu, m[s], o));
    }
    if (G > 32) {  // uniform over the CTA
      if (lane == 0) {
#pragma unroll
        for (int s = 0; s < S; ++s) red[s][warp] = m[s];
      }
      __syncthreads();
      const int w0 = (gb * G) >> 5;
#pragma unroll
      for (int s = 0; s < S; ++s)
        for (int k = 0; k < (G >> 5); ++k) m[s] = max(m[s], red[s][w0 + k]);
      __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if (!active[s]) continue;
      if (gi == 0) absmax[qb[s]] = __uint_as_float(m[s]);
      const float scale = safe_rcp_from_bits(m[s]);
      uint32_t word[EPT / 8];
#pragma unroll
      for (int k = 0; k < EPT / 8; ++k) word[k] = 0;
#pragma unroll
      for (int i = 0; i < EPT; ++i) {
        const uint32_t c = (e0[s] + i < n)
                               ? Encoder::encode(lut, scale_or_div(x[s][i], scale,
                                                                   __uint_as_float(m[s])))
                                           : static_cast<uint32_t>(Encoder::kZero);
        // element 2j -> high nibble of byte j; bytes little-endian within the 32-bit word
        word[i / 8] |= c << (8 * ((i % 8) / 2) + ((i & 1) ? 0 : 4));
      }
      const int64_t bo = e0[s] >> 1;
      if (bo + EPT / 2 <= nbytes) {
        if constexpr (EPT == 8) {
          *reinterpret_cast<uint32_t*>(packed + bo) = word[0];
        } else {
          *reinterpret_cast<uint2*>(packed + bo) = make_uint2(word[0], word[1]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < EPT / 2; ++k)
          if (bo + k < nbytes) packed[bo + k] = static_cast<uint8_t>(word[k / 4] >> (8 * (k % 4)));
      }
    }
  }
}

// -------------------------------------------------------------------------------------------
// gemv_4bit: y[M, N] = A[M, K] . dequant(W)[N, K]^T (+ bias), M <= 8 a launch, fp16 / bf16.
// Tensor-core mma.m16n8k16 with the weight as the 16-row operand and the (<= 8) activation rows
// as the 8-column operand; fp32 accumulation. The weight is dequantized in registers to A.dtype
// (round(code * absmax)), exactly the values dequantize_4bit produces. A CTA of kGemvWarps
// warps owns 16 output features; the warps split K in steps of 256 and reduce through shared
// memory. Lane (g = lane / 4, q = lane % 4) owns rows g and g + 8; in a step it owns
// k = 64 q .. 64 q + 63 (32 bytes of each row, so a row's 4 lanes read one 128-byte line) and
// the same activations of row g, in two halves of 32 codes (one absmax each: blocks hold >= 32
// codes at multiples of 32). The mma's k index is a permutation of the physical k (a dot
// product is order-free): logical k = 2q, 2q+1, 2q+8, 2q+9 of mma j map to physical
// k = kq + 4j + 0..3, for the weight and the activations alike, since both fragments place
// logical k by q. Requires K % 32 == 0 and 16-byte aligned A rows and packed codes.
//
// Dequantizing a code is the kernel's cost (the mma is nearly free at M <= 8). Three ways,
// chosen per row of the lane's pair (template MODE; kGemvDefaultMode is the one built and
// launched, the others are kept for comparison in benchmarks/NOTES.md):
//  * smem: value = round(code_table[c] * absmax): a shared-memory load, a multiply and half a
//    convert per code. Bound by the shared-memory pipe (ncu: L1 pipe 73 %, DRAM 35 %).
//  * prmt: per absmax, the lane computes the 16 products round(code_table[c] * absmax) once
//    and keeps them as two 16-byte planes (low and high bytes) in 8 registers; a code is then
//    looked up with byte permutes (prmt): 3 prmt select a byte of a 16-entry plane for 4 codes
//    at once (entries 0-7, entries 8-15, then pick by the code's top bit), twice for the two
//    planes, and 2 more interleave the bytes into the two bf16x2 / half2 fragments. About 2.6
//    integer ops a code and no shared memory; the table costs 16 multiplies per absmax.
//  * hybrid: row g by prmt, row g + 8 by smem, so the integer and shared-memory pipes share
//    the work.
// Both give bit-identical weights; only the instruction mix differs.
// -------------------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                                              uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4],
                                                                   const uint32_t (&a)[4],
                                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                            uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// prmt.b32 in its generic mode: byte n of the result is byte c[4n+2:4n] of {b, a} (c[4n+3]
// must be 0: it would replicate the sign bit instead).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

constexpr int kGemvWarps = 8;
constexpr int64_t kGemvStepK = 256;
// Rows up to which linear_4bit / gemv_4bit use the fused kernel instead of dequantize + GEMM.
constexpr int64_t kGemvMaxRows = 16;
enum GemvMode : int { kGemvSmem = 0, kGemvPrmt = 1, kGemvHybrid = 2 };
constexpr int kGemvDefaultMode = kGemvPrmt;

// The 16 code values, passed by value (kernel parameter space): the table multiplies read them
// as constant-bank operands.
struct CodeTab {
  float v[16];
};

// Value of the code whose index * 4 is byte `b` of `idx4` (byte offsets into the table).
__device__ __forceinline__ float tab_at(const float* tab, uint32_t idx4, int b) {
  const uint32_t off = __byte_perm(idx4, 0u, 0x4440u | static_cast<uint32_t>(b));
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(tab) + off);
}

// round(code[c] * s) for c = 0..15 as byte planes: byte b of lo[m] / hi[m] is the low / high
// byte of entry 4 m + b.
struct ProdTab {
  uint32_t lo[4], hi[4];
};

template <typename T>
__device__ __forceinline__ ProdTab make_prod(const CodeTab& ct, float s) {
  ProdTab t;
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    const uint32_t p0 = pack2<T>(mul_rn(ct.v[4 * m], s), mul_rn(ct.v[4 * m + 1], s));
    const uint32_t p1 = pack2<T>(mul_rn(ct.v[4 * m + 2], s), mul_rn(ct.v[4 * m + 3], s));
    t.lo[m] = prmt(p0, p1, 0x6420u);
    t.hi[m] = prmt(p0, p1, 0x7531u);
  }
  return t;
}

// Fragments (element 0, 1) and (element 2, 3) of the 2 code bytes whose nibbles, low 3 bits
// and top-bit selectors are the low 16 bits of q3 / sx (see gemv4_kernel). Nibble order in the
// 16 bits is elements 1, 0, 3, 2 (element 2j is the high nibble of byte j).
__device__ __forceinline__ void prod_lookup(const ProdTab& t, uint32_t q3, uint32_t sx,
                                            uint32_t& f01, uint32_t& f23) {
  const uint32_t lo = prmt(prmt(t.lo[0], t.lo[1], q3), prmt(t.lo[2], t.lo[3], q3), sx);
  const uint32_t hi = prmt(prmt(t.hi[0], t.hi[1], q3), prmt(t.hi[2], t.hi[3], q3), sx);
  f01 = prmt(lo, hi, 0x4051u);  // element 0 = byte 1 of lo/hi, element 1 = byte 0
  f23 = prmt(lo, hi, 0x6273u);  // element 2 = byte 3, element 3 = byte 2
}

// The same two fragments through the shared fp32 code table: bytes 2 jj and 2 jj + 1 of a word
// whose high / low nibbles, times 4, are the bytes of hidx / lidx.
template <typename T>
__device__ __forceinline__ void smem_lookup(const float* tab, uint32_t hidx, uint32_t lidx,
                                            int jj, float s, uint32_t& f01, uint32_t& f23) {
  const int b0 = 2 * jj, b1 = 2 * jj + 1;
  f01 = pack2<T>(mul_rn(tab_at(tab, hidx, b0), s), mul_rn(tab_at(tab, lidx, b0), s));
  f23 = pack2<T>(mul_rn(tab_at(tab, hidx, b1), s), mul_rn(tab_at(tab, lidx, b1), s));
}

// Fragments of one 32-bit word (8 codes) of one row: f01[jj], f23[jj] for jj = 0, 1.
template <typename T, bool PRMT>
__device__ __forceinline__ void word_frags(uint32_t w, const ProdTab& pt, const float* tab,
                                           float s, uint32_t (&f01)[2], uint32_t (&f23)[2]) {
  if constexpr (PRMT) {
    const uint32_t q3 = w & 0x77777777u;                      // low 3 bits of every code
    const uint32_t sx = ((w >> 1) & 0x44444444u) | 0x32103210u;  // 4 + i where code >= 8
    prod_lookup(pt, q3, sx, f01[0], f23[0]);
    prod_lookup(pt, q3 >> 16, sx >> 16, f01[1], f23[1]);
  } else {
    const uint32_t h = (w >> 2) & 0x3c3c3c3cu, l = (w << 2) & 0x3c3c3c3cu;
    smem_lookup<T>(tab, h, l, 0, s, f01[0], f23[0]);
    smem_lookup<T>(tab, h, l, 1, s, f01[1], f23[1]);
  }
}

// BS32: blocksize 32, so the two halves of a lane's 64 codes have their own absmax (else they
// share one, and the product tables are built once a step).
template <typename T, bool NESTED, int MODE, bool BS32>
__global__ void __launch_bounds__(kGemvWarps * 32, 2)
gemv4_kernel(const T* __restrict__ A, int M, int64_t K, const uint8_t* __restrict__ W,
             int64_t N, AbsmaxArgs am, int bs_log2, CodeTab ct, const T* __restrict__ bias,
             T* __restrict__ out) {
  constexpr bool kPrmtA = MODE != kGemvSmem;
  constexpr bool kPrmtB = MODE == kGemvPrmt;
  __shared__ float tab[16];
  __shared__ AbsmaxSmem<NESTED> ams;
  __shared__ float red[kGemvWarps][16][8];
  if (threadIdx.x == 0) {  // constant indices: a parameter indexed at run time goes to the stack
#pragma unroll
    for (int i = 0; i < 16; ++i) tab[i] = ct.v[i];
  }
  ams.load(am);
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  const int64_t row0 = int64_t{blockIdx.x} * 16;
  const int64_t ra = row0 + g, rb = row0 + g + 8;
  const bool oka = ra < N, okb = rb < N;
  const bool has_x = g < M;
  const int64_t steps = (K + kGemvStepK - 1) / kGemvStepK;

  struct Wt {
    uint4 a[2], b[2];
    float sa[2], sb[2];
  };
  auto load_w = [&](int64_t s, Wt& w) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t kq = s * kGemvStepK + 64 * q + 32 * h;
      w.a[h] = make_uint4(0, 0, 0, 0); w.b[h] = make_uint4(0, 0, 0, 0);
      w.sa[h] = 0.f; w.sb[h] = 0.f;
      if (s < steps && kq < K) {
        if (oka) {
          const int64_t e = ra * K + kq;
          w.a[h] = ld_stream16(W + (e >> 1));
          w.sa[h] = ams.get(am, e >> bs_log2);
        }
        if (okb) {
          const int64_t e = rb * K + kq;
          w.b[h] = ld_stream16(W + (e >> 1));
          w.sb[h] = ams.get(am, e >> bs_log2);
        }
      }
    }
  };

  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  Wt cur;
  load_w(warp, cur);
  for (int64_t s = warp; s < steps; s += kGemvWarps) {
    Wt nxt;
    load_w(s + kGemvWarps, nxt);  // in flight while this step computes
    ProdTab pa{}, pb{};
    if (!BS32) {
      if (kPrmtA) pa = make_prod<T>(ct, cur.sa[0]);
      if (kPrmtB) pb = make_prod<T>(ct, cur.sb[0]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t kq = s * kGemvStepK + 64 * q + 32 * h;
      if (BS32) {
        if (kPrmtA) pa = make_prod<T>(ct, cur.sa[h]);
        if (kPrmtB) pb = make_prod<T>(ct, cur.sb[h]);
      }
      uint32_t xw[16];
      if (kq < K && has_x) {
        const uint4* xp = reinterpret_cast<const uint4*>(A + g * K + kq);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 v = __ldg(xp + i);
          xw[4 * i] = v.x; xw[4 * i + 1] = v.y; xw[4 * i + 2] = v.z; xw[4 * i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) xw[i] = 0;
      }
      const uint32_t wav[4] = {cur.a[h].x, cur.a[h].y, cur.a[h].z, cur.a[h].w};
      const uint32_t wbv[4] = {cur.b[h].x, cur.b[h].y, cur.b[h].z, cur.b[h].w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t a01[2], a23[2], b01[2], b23[2];
        word_frags<T, kPrmtA>(wav[i], pa, tab, cur.sa[h], a01, a23);
        word_frags<T, kPrmtB>(wbv[i], pb, tab, cur.sb[h], b01, b23);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * i + jj;  // mma j: elements 4j .. 4j + 3 of the 32-code half
          const uint32_t frag[4] = {a01[jj], b01[jj], a23[jj], b23[jj]};
          mma16816<T>(acc[jj], frag, xw[2 * j], xw[2 * j + 1]);
        }
      }
    }
    cur = nxt;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[0][k] += acc[1][k];
  red[warp][g][2 * q] = acc[0][0];
  red[warp][g][2 * q + 1] = acc[0][1];
  red[warp][g + 8][2 * q] = acc[0][2];
  red[warp][g + 8][2 * q + 1] = acc[0][3];
  __syncthreads();
  if (threadIdx.x < 128) {  // one thread per (feature, row) of the 16 x 8 tile
    const int r = threadIdx.x >> 3, n = threadIdx.x & 7;
    if (n < M && row0 + r < N) {
      float y = red[0][r][n];
#pragma unroll
      for (int w = 1; w < kGemvWarps; ++w) y += red[w][r][n];
      if (bias != nullptr) y += Cvt<T>::to_float(bias[row0 + r]);
      out[int64_t{n} * N + row0 + r] = Cvt<T>::from_float(y);
    }
  }
}

// ---- host helpers ---------------------------------------------------------------------------
struct Absmax {
  AbsmaxArgs args;
  bool nested = false;
  // keep contiguous copies alive for the launch
  at::Tensor a, na, nc, off;
};

Absmax prepare_absmax(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                      const std::optional<at::Tensor>& nested_code,
                      const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  Absmax r;
  r.a = absmax.contiguous();
  if (absmax.scalar_type() == at::kByte) {
    r.nested = true;
    r.na = nested_absmax->contiguous();
    r.nc = nested_code->contiguous();
    r.off = offset->contiguous();
    r.args.qabsmax = r.a.data_ptr<uint8_t>();
    r.args.nested_absmax = r.na.data_ptr<float>();
    r.args.nested_code = r.nc.data_ptr<float>();
    r.args.offset = r.off.data_ptr<float>();
    r.args.nested_log2 = log2_exact(nested_blocksize);
  } else {
    r.args.absmax = r.a.data_ptr<float>();
  }
  return r;
}

// check_absmax of opsq/meta/fourbit.py
void check_absmax(const at::Tensor& A, const at::Tensor& absmax, int64_t n, int64_t blocksize,
                  const std::optional<at::Tensor>& nested_absmax,
                  const std::optional<at::Tensor>& nested_code,
                  const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const int64_t blocks = ceil_div(n, blocksize);
  check_dtype("absmax", absmax.scalar_type(), {at::kFloat, at::kByte});
  check_numel("absmax", absmax, blocks,
              " (one per block of " + std::to_string(blocksize) + " of " + std::to_string(n) +
                  " elements)");
  check_same_device("A", A, "absmax", absmax);
  check_same_device("A", A, "nested_absmax", nested_absmax);
  check_same_device("A", A, "nested_code", nested_code);
  check_same_device("A", A, "offset", offset);
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK_VALUE(nested_absmax.has_value() && nested_code.has_value() && offset.has_value(),
                      "absmax is uint8 (nested statistics): nested_absmax, nested_code and "
                      "offset are required");
    check_blocksize(nested_blocksize, "nested_blocksize");
    check_dtype("nested_absmax", nested_absmax->scalar_type(), {at::kFloat});
    check_numel("nested_absmax", *nested_absmax, ceil_div(blocks, nested_blocksize),
                " (one per " + std::to_string(nested_blocksize) + " absmax codes)");
    check_dtype("nested_code", nested_code->scalar_type(), {at::kFloat});
    check_numel("nested_code", *nested_code, 256);
    check_dtype("offset", offset->scalar_type(), {at::kFloat});
    check_numel("offset", *offset, 1);
  } else {
    TORCH_CHECK_VALUE(!nested_absmax.has_value() && !nested_code.has_value() &&
                          !offset.has_value(),
                      "nested_absmax/nested_code/offset given but absmax is float32; nested "
                      "statistics need absmax as uint8 codes");
  }
}

void check_packed(const char* name, const at::Tensor& B, int64_t n) {
  check_quant_storage(name, B.scalar_type(), /*is_arg=*/false);
  check_numel(name, B, packed_numel(n, B.element_size()),
              " (" + std::to_string(n) + " 4-bit codes in " + dtype_name(B.scalar_type()) +
                  " storage)");
}

int grid_for(int64_t work_items, int64_t per_cta) {
  const int64_t want = ceil_div(std::max<int64_t>(work_items, 1), per_cta);
  return static_cast<int>(std::min<int64_t>(want, int64_t{sm_count()} * 16));
}

template <typename T>
void launch_dequant4(const uint8_t* codes, const Absmax& am, int bs_log2, bool nf4, T* out,
                     int64_t n, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(codes) % 4 == 0;
  const int64_t units = vec ? n / Unit<T>::kElems : 0;
  const int64_t work = std::max<int64_t>(units, ceil_div(n - units * Unit<T>::kElems, 4));
  const int grid = grid_for(work, kThreads * 4);
#define OPSQ_DQ4(NESTED, VEC)                                                               \
  dequant4_kernel<T, NESTED, VEC><<<grid, kThreads, 0, stream>>>(codes, am.args, bs_log2, nf4, \
                                                                 out, n)
  if (am.nested) {
    if (vec) OPSQ_DQ4(true, true); else OPSQ_DQ4(true, false);
  } else {
    if (vec) OPSQ_DQ4(false, true); else OPSQ_DQ4(false, false);
  }
#undef OPSQ_DQ4
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Dequantize n codes into a new tensor of `dtype` with `out_shape`; arguments already checked.
at::Tensor dequant4_impl(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                         bool nf4, at::IntArrayRef out_shape, at::ScalarType dtype,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  auto out = at::empty(out_shape, A.options().dtype(dtype));
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor codes = A.contiguous();
  const Absmax am = prepare_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const int bs_log2 = log2_exact(blocksize);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat:
      launch_dequant4<float>(cp, am, bs_log2, nf4, out.data_ptr<float>(), n, stream);
      break;
    case at::kHalf:
      launch_dequant4<__half>(cp, am, bs_log2, nf4,
                              reinterpret_cast<__half*>(out.data_ptr<at::Half>()), n, stream);
      break;
    default:
      launch_dequant4<__nv_bfloat16>(
          cp, am, bs_log2, nf4, reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()),
          n, stream);
      break;
  }
  return out;
}

std::vector<int64_t> shape_vec(c10::SymIntArrayRef shape) {
  std::vector<int64_t> v;
  v.reserve(shape.size());
  for (const auto& s : shape) v.push_back(s.guard_int(__FILE__, __LINE__));
  return v;
}

// A grid of at most the CTAs that fit on the device at once (the kernel strides over the rest),
// so every CTA's loop overlaps its next loads with its current work.
template <typename T, bool NF4>
void launch_quant4(const T* A, int64_t n, int64_t blocksize, uint8_t* packed, int64_t nbytes,
                   float* absmax, int64_t nblocks, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(A) % 16 == 0;
  const int bs_log2 = log2_exact(blocksize);
  if (blocksize == 4096) {
    const int grid = grid_for(nblocks, 2);
    if (vec) quant4_kernel<T, NF4, 16, true><<<grid, kThreads, 0, stream>>>(A, n, bs_log2, packed, nbytes, absmax, nblocks);
    else quant4_kernel<T, NF4, 16, false><<<grid, kThreads, 0, stream>>>(A, n, bs_log2, packed, nbytes, absmax, nblocks);
  } else {
    const int grid = grid_for(nblocks, 2 * kThreads / (blocksize / 8));
    if (vec) quant4_kernel<T, NF4, 8, true><<<grid, kThreads, 0, stream>>>(A, n, bs_log2, packed, nbytes, absmax, nblocks);
    else quant4_kernel<T, NF4, 8, false><<<grid, kThreads, 0, stream>>>(A, n, bs_log2, packed, nbytes, absmax, nblocks);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool NESTED, int MODE>
void launch_gemv4_mode(const T* A, int M, int64_t K, const uint8_t* W, int64_t N,
                       const Absmax& am, int bs_log2, const CodeTab& ct, const T* bias, T* out,
                       cudaStream_t stream) {
  const int grid = static_cast<int>(ceil_div(N, 16));
  if (bs_log2 == 5)
    gemv4_kernel<T, NESTED, MODE, true><<<grid, kGemvWarps * 32, 0, stream>>>(
        A, M, K, W, N, am.args, bs_log2, ct, bias, out);
  else
    gemv4_kernel<T, NESTED, MODE, false><<<grid, kGemvWarps * 32, 0, stream>>>(
        A, M, K, W, N, am.args, bs_log2, ct, bias, out);
}

template <typename T>
void launch_gemv4(const T* A, int M, int64_t K, const uint8_t* W, int64_t N, const Absmax& am,
                  int bs_log2, bool nf4, const T* bias, T* out, cudaStream_t stream) {
  CodeTab ct;
  const float* src = nf4 ? kNF4Host : kFP4Host;
  for (int i = 0; i < 16; ++i) ct.v[i] = src[i];
  // One production mode (no runtime switch: a kernel must not depend on the environment at
  // CUDA-graph capture); the other modes' measurements are in benchmarks/NOTES.md.
  if (am.nested)
    launch_gemv4_mode<T, true, kGemvDefaultMode>(A, M, K, W, N, am, bs_log2, ct, bias, out, stream);
  else
    launch_gemv4_mode<T, false, kGemvDefaultMode>(A, M, K, W, N, am, bs_log2, ct, bias, out, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// ============================================================================================
// ops
// ============================================================================================
std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type,
                                                      at::ScalarType quant_storage) {
  check_float_dtype("A", A.scalar_type());
  check_blocksize(blocksize);
  const bool nf4 = check_quant_type(quant_type);
  check_quant_storage("quant_storage", quant_storage, /*is_arg=*/true);
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel();
  const int64_t itemsize = c10::elementSize(quant_storage);
  const int64_t pn = packed_numel(n, itemsize);
  const int64_t nblocks = ceil_div(n, blocksize);
  auto packed = at::empty({pn, 1}, A.options().dtype(quant_storage));
  auto absmax = at::empty({nblocks}, A.options().dtype(at::kFloat));
  if (n == 0) return {packed, absmax};
  const at::Tensor x = A.contiguous();
  uint8_t* pp = static_cast<uint8_t*>(packed.data_ptr());
  const int64_t nbytes = pn * itemsize;
  float* ap = absmax.data_ptr<float>();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
#define OPSQ_Q4(T, PTR)                                                                  \
  if (nf4) launch_quant4<T, true>(PTR, n, blocksize, pp, nbytes, ap, nblocks, stream);   \
  else launch_quant4<T, false>(PTR, n, blocksize, pp, nbytes, ap, nblocks, stream)
  switch (x.scalar_type()) {
    case at::kFloat: OPSQ_Q4(float, x.data_ptr<float>()); break;
    case at::kHalf: OPSQ_Q4(__half, reinterpret_cast<const __half*>(x.data_ptr<at::Half>())); break;
    default:
      OPSQ_Q4(__nv_bfloat16, reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>()));
      break;
  }
#undef OPSQ_Q4
  return {packed, absmax};
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, c10::SymIntArrayRef shape,
                                at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize) {
  check_blocksize(blocksize);
  const bool nf4 = check_quant_type(quant_type);
  check_float_dtype("dtype", dtype);
  const std::vector<int64_t> out_shape = shape_vec(shape);
  TORCH_CHECK_VALUE(!out_shape.empty(), "shape must not be empty, got []");
  int64_t n = 1;
  for (int64_t s : out_shape) {
    TORCH_CHECK(s >= 0, "shape must have non-negative sizes, got " + fmt_list(out_shape));
    n *= s;
  }
  check_packed("A", A, n);
  check_absmax(A, absmax, n, blocksize, nested_absmax, nested_code, offset, nested_blocksize);
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  return dequant4_impl(A, absmax, blocksize, nf4, out_shape, dtype, nested_absmax, nested_code,
                       offset, nested_blocksize);
}

at::Tensor linear_4bit_cuda(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                            const at::Tensor& absmax, int64_t blocksize,
                            c10::string_view quant_type, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code,
                            const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  // check_linear_4bit of opsq/meta/fourbit.py
  check_float_dtype("A", A.scalar_type());
  check_min_dim("A", A, 1);
  check_blocksize(blocksize);
  const bool nf4 = check_quant_type(quant_type);
  const std::vector<int64_t> sb = shape_vec(shapeB);
  TORCH_CHECK_VALUE(sb.size() == 2,
                    "shapeB must be [N, K] (out_features, in_features), got " + fmt_list(sb));
  TORCH_CHECK(sb[0] >= 0 && sb[1] >= 0, "shapeB must have non-negative sizes, got " + fmt_list(sb));
  const int64_t N = sb[0], K = sb[1];
  TORCH_CHECK(A.size(-1) == K, "A's last dimension (" + fmt(A.size(-1)) +
                                   ") must equal shapeB[1] = K (" + fmt(K) + ")");
  check_same_device("A", A, "B", B);
  check_same_device("A", A, "bias", bias);
  check_packed("B", B, N * K);
  check_absmax(A, absmax, N * K, blocksize, nested_absmax, nested_code, offset, nested_blocksize);
  if (bias.has_value()) {
    check_float_dtype("bias", bias->scalar_type());
    check_dim("bias", *bias, 1);
    check_numel("bias", *bias, N, " (shapeB[0] = N)");
  }
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());

  std::vector<int64_t> out_shape(A.sizes().begin(), A.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t s : out_shape) M *= s;
  out_shape.push_back(N);
  const auto dt = A.scalar_type();
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(dt).contiguous();
  if (M == 0 || N == 0) return at::empty(out_shape, A.options());

  const at::Tensor codes = B.contiguous();
  const at::Tensor x = A.reshape({M, K}).contiguous();
  const auto cp = reinterpret_cast<uintptr_t>(codes.data_ptr());
  const auto xp = reinterpret_cast<uintptr_t>(x.data_ptr());
  // Few rows: the fused kernel, 8 rows a launch (each launch streams the packed weight once).
  const bool gemv = (dt == at::kHalf || dt == at::kBFloat16) && M <= kGemvMaxRows && K > 0 &&
                    K % 32 == 0 && cp % 16 == 0 && xp % 16 == 0;
  if (gemv) {
    auto out = at::empty({M, N}, A.options());
    const Absmax am = prepare_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const auto* w = static_cast<const uint8_t*>(codes.data_ptr());
    const int bs_log2 = log2_exact(blocksize);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int rows = static_cast<int>(std::min<int64_t>(8, M - m0));
      if (dt == at::kHalf) {
        launch_gemv4<__half>(reinterpret_cast<const __half*>(x.data_ptr()) + m0 * K, rows, K, w,
                             N, am, bs_log2, nf4,
                             b ? reinterpret_cast<const __half*>(b->data_ptr()) : nullptr,
                             reinterpret_cast<__half*>(out.data_ptr()) + m0 * N, stream);
      } else {
        launch_gemv4<__nv_bfloat16>(
            reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()) + m0 * K, rows, K, w, N, am,
            bs_log2, nf4, b ? reinterpret_cast<const __nv_bfloat16*>(b->data_ptr()) : nullptr,
            reinterpret_cast<__nv_bfloat16*>(out.data_ptr()) + m0 * N, stream);
      }
    }
    return out.reshape(out_shape);
  }
  // Many rows (or fp32 / unaligned): dequantize the weight to A.dtype, then a cuBLAS product.
  const at::Tensor W = dequant4_impl(codes, absmax, blocksize, nf4, {N, K}, dt, nested_absmax,
                                     nested_code, offset, nested_blocksize);
  return at::linear(x, W, b).reshape(out_shape);
}

}  // namespace opsq
