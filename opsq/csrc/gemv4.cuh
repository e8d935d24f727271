// gemv_4bit / linear_4bit for few rows: y[M, N] = A[M, K] . dequant(W)[N, K]^T (+ bias),
// M <= 8 a launch, fp16 / bf16, W in bitsandbytes' packed NF4 / FP4 layout (two codes a byte,
// the first in the high nibble; one absmax per block of `blocksize` codes of the flattened
// weight). Torch-free, so that benchmarks/gemv_lab builds it without the extension.
//
// Budget (benchmarks/NOTES.md, "gemv_4bit v4"): at the H200's copy bandwidth the SMs must
// retire ~25 codes per SM-cycle. The integer pipe (PRMT, LOP3, shifts, ISETP, IADD3) does 64
// thread-ops per SM-cycle, so the code look-up may cost at most ~2 of them per code; the FMA
// pipe (FFMA, IMAD) has 128 and the tensor pipe does the multiply-adds.
//
// Design:
//  * The weight is the 16-row A operand of mma.m16n8k16, the (<= 8) activation rows the
//    8-column B operand; fp32 accumulation.
//  * The look-up table holds the 16 code values rounded to T, unscaled: it is the same for
//    every block, so it is built once (host side) and kept in 8 registers as a low-byte and a
//    high-byte plane. A code is looked up with byte permutes: 3 PRMT select a byte of a
//    16-entry plane for 4 codes at once (entries 0-7, entries 8-15, then pick by the code's
//    top bit), twice for the two planes, and 2 PRMT interleave the bytes into the two
//    fragments: 2 PRMT a code. The selectors take 2 LOP3 per 8 codes; the shifts they need run
//    as IMAD.HI on the FMA pipe (multipliers passed at run time, so they are not turned back
//    into shifts).
//  * absmax is applied after the product: the K axis is cut into chunks of C codes (C = 64, or
//    32 where blocksize is 32 or K % 64 != 0), each inside one absmax block; a chunk's four (or
//    two) mma run on a fresh accumulator, which is then added times absmax (4 FFMA per chunk).
//    Lane (g = lane / 4, q = lane % 4) owns rows g and g + 8 and codes q C/4 .. q C/4 + C/4 - 1
//    of every chunk (C/8 contiguous bytes a row); mma j of a chunk takes the lane's codes
//    4j .. 4j + 3 as logical k = 2q, 2q + 1, 2q + 8, 2q + 9 (a dot product is order-free), so
//    the four lanes of a row cover 16 codes of one chunk, and the activations are read the
//    same way.
//  * A CTA of WARPS warps (kGemvWarps; kGemvWideWarps where K >= 2 N) owns 16 output features;
//    the warps split K in steps of 256 codes, DEPTH steps of loads in flight each, and reduce
//    through shared memory.
// Requires K % 32 == 0 and 16-byte aligned A rows and packed codes (the host checks).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "absmax.cuh"
#include "common.cuh"

namespace opsq {

constexpr int kGemvWarps = 4;
// Where K >= 2 N (few, long rows: e.g. the MLP down-projection) too few CTAs would hold 4 warps
// each; 8 warps a CTA measured 3-15 % faster there on the H200 (benchmarks/gemv_lab.cu:
// 11008->4096 20.0 vs 23.5 us, 28672->8192 76.1 vs 78.2 us) and slower elsewhere.
constexpr int kGemvWideWarps = 8;
constexpr int kGemvDepth = 1;
constexpr int64_t kGemvStepK = 256;
// Rows up to which linear_4bit / gemv_4bit use this kernel instead of dequantize + GEMM.
constexpr int64_t kGemvMaxRows = 16;

// The 16 code values rounded to T: byte b of lo[m] / hi[m] is the low / high byte of entry
// 4 m + b.
struct CodePlanes {
  uint32_t lo[4], hi[4];
};

// Built on the host from the fp32 code table (the bit patterns of T, round to nearest even).
template <typename T> inline CodePlanes make_code_planes(const float* code) {
  CodePlanes p{};
  for (int m = 0; m < 4; ++m) {
    for (int b = 0; b < 4; ++b) {
      T v;
      if constexpr (std::is_same<T, __half>::value) {
        v = __float2half_rn(code[4 * m + b]);
      } else {
        v = __float2bfloat16_rn(code[4 * m + b]);
      }
      uint16_t bits;
      memcpy(&bits, &v, 2);
      p.lo[m] |= uint32_t(bits & 0xffu) << (8 * b);
      p.hi[m] |= uint32_t(bits >> 8) << (8 * b);
    }
  }
  return p;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

// Fragments (element 0, 1) and (element 2, 3) of the 2 code bytes whose low 3 bits and
// top-bit selectors are the low 16 bits of q3 / sx. Nibble order in the 16 bits is elements
// 1, 0, 3, 2 (element 2j is the high nibble of byte j).
__device__ __forceinline__ void plane_lookup(const CodePlanes& t, uint32_t q3, uint32_t sx,
                                             uint32_t& f01, uint32_t& f23) {
  const uint32_t lo = prmt(prmt(t.lo[0], t.lo[1], q3), prmt(t.lo[2], t.lo[3], q3), sx);
  const uint32_t hi = prmt(prmt(t.hi[0], t.hi[1], q3), prmt(t.hi[2], t.hi[3], q3), sx);
  f01 = prmt(lo, hi, 0x4051u);  // element 0 = byte 1 of lo/hi, element 1 = byte 0
  f23 = prmt(lo, hi, 0x6273u);  // element 2 = byte 3, element 3 = byte 2
}

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

// x >> 16 and x >> 1 on the FMA pipe: high word of x * 2^16 / x * 2^31, with the multipliers
// passed in at run time.
struct ShiftMuls {
  uint32_t m16, m31;
};

// Fragments of one 32-bit word (8 codes) of one row: f01[jj], f23[jj] for its two 4-code
// halves jj = 0 (low 16 bits), 1.
__device__ __forceinline__ void word_frags(uint32_t w, const CodePlanes& t, const ShiftMuls& sh,
                                           uint32_t (&f01)[2], uint32_t (&f23)[2]) {
  const uint32_t q3 = w & 0x77777777u;  // low 3 bits of every code
  const uint32_t sx = (__umulhi(w, sh.m31) & 0x44444444u) | 0x32103210u;  // 4 + i where code >= 8
  plane_lookup(t, q3, sx, f01[0], f23[0]);
  plane_lookup(t, __umulhi(q3, sh.m16), __umulhi(sx, sh.m16), f01[1], f23[1]);
}

// C: codes per chunk (64 or 32); BSEQ: blocksize == C (the chunk index is the absmax index).
// TILED (benchmarks/gemv_lab.cu only; measured there, benchmarks/NOTES.md "Third session": 9-14 %
// faster, not adopted; the extension's tiled16 path is gemv4_tiled16_kernel below; C == 64, BSEQ, plain absmax, N % 16 == 0, K % 256 == 0): W and am.absmax in
// a repacked layout made for the loads (gemv_lab's tile16_repack): the codes a CTA's 16 rows have
// in one step form one 2 KB run (the run of CTA b, step s at (b * steps + s) * 2048), in which lane
// l's 16 bytes for chunk c sit at (c * 32 + l) * 16 (its 8 bytes of row g, then of row g + 8), so
// that each warp load reads 512 contiguous bytes; the step's 64 absmax values form one run at (b *
// steps + s) * 64, (row g, row g + 8) of chunk c at c * 16 + 2 g.
// One lane's share of chunk c of run `run` in that layout: its 16 code bytes (.x, .y: row g;
// .z, .w: row g + 8) and the chunk's absmax of (row g, row g + 8). Shared with gemv_lab's v5.
struct Tiled16Lane { uint4 codes; float2 absmax; };
__device__ __forceinline__ uint4 load_tiled16_codes(const uint8_t* __restrict__ W, int64_t run,
                                                    int c, int lane) {
  return __ldg(reinterpret_cast<const uint4*>(W + run * 2048) + c * 32 + lane);
}
__device__ __forceinline__ Tiled16Lane load_tiled16(const uint8_t* __restrict__ W,
                                                    const float* __restrict__ absmax,
                                                    int64_t run, int c, int lane) {
  return {load_tiled16_codes(W, run, c, lane),
          __ldg(reinterpret_cast<const float2*>(absmax + run * 64) + c * 8 + (lane >> 2))};
}

template <typename T, bool NESTED, int C, bool BSEQ, int WARPS = kGemvWarps, int DEPTH = kGemvDepth,
          bool TILED = false>
__global__ void __launch_bounds__(WARPS * 32, 16 / WARPS)  // 16 warps an SM: <= 128 registers
gemv4_kernel(const T* __restrict__ A, int M, int64_t K, const uint8_t* __restrict__ W,
             int64_t N, AbsmaxArgs am, int bs_log2, CodePlanes planes, ShiftMuls sh,
             const T* __restrict__ bias, T* __restrict__ out) {
  constexpr int NC = kGemvStepK / C;  // chunks a step
  constexpr int NW = C / 32;          // 32-bit code words a lane, row and chunk
  static_assert(!TILED || (C == 64 && BSEQ && !NESTED), "the tiled layout: chunks of 64, plain absmax");
  __shared__ AbsmaxSmem<NESTED> ams;
  __shared__ float red[WARPS][16][8];
  ams.load(am);
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  const int64_t row0 = int64_t{blockIdx.x} * 16;
  const int64_t steps = (K + kGemvStepK - 1) / kGemvStepK;
  const CodePlanes t = planes;
  // Rows past N read row N - 1 (in bounds) and are not written.
  const int64_t ra = row0 + g < N ? row0 + g : N - 1;
  const int64_t rb = row0 + g + 8 < N ? row0 + g + 8 : N - 1;
  const int64_t ea = ra * K, eb = rb * K;  // flat index of the rows' first codes
  const uint8_t* wa = W + (ea >> 1) + q * (C / 8);
  const uint8_t* wb = W + (eb >> 1) + q * (C / 8);
  const bool has_x = g < M;
  const T* xr = A + int64_t{has_x ? g : 0} * K + q * (C / 4);

  struct Wt {
    uint32_t a[NC][NW], b[NC][NW];
    float sa[NC], sb[NC];
  };
  auto load_code = [](const uint8_t* p, uint32_t (&w)[NW]) {
    if constexpr (NW == 2) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = v.x;
      w[NW - 1] = v.y;
    } else {
      w[0] = __ldg(reinterpret_cast<const uint32_t*>(p));
    }
  };
  // absmax index of the rows' first chunk (BSEQ: block = chunk, and C divides K)
  constexpr int kLogC = C == 64 ? 6 : 5;
  const int64_t ia = ea >> kLogC, ib = eb >> kLogC;
  // Step s, chunks below `nc` (all but in the last step).
  auto load_chunks = [&](int64_t s, int nc, Wt& w) {
    const int64_t kb = s * kGemvStepK;
    const uint8_t* pa = wa + s * (kGemvStepK / 2);
    const uint8_t* pb = wb + s * (kGemvStepK / 2);
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (TILED && c < nc) {
        const Tiled16Lane t = load_tiled16(W, am.absmax, int64_t{blockIdx.x} * steps + s, c, lane);
        w.a[c][0] = t.codes.x;
        w.a[c][NW - 1] = t.codes.y;
        w.b[c][0] = t.codes.z;
        w.b[c][NW - 1] = t.codes.w;
        w.sa[c] = t.absmax.x;
        w.sb[c] = t.absmax.y;
      } else if (c < nc) {
        load_code(pa + c * (C / 2), w.a[c]);
        load_code(pb + c * (C / 2), w.b[c]);
        if constexpr (BSEQ) {
          w.sa[c] = ams.get(am, ia + s * NC + c);
          w.sb[c] = ams.get(am, ib + s * NC + c);
        } else {
          w.sa[c] = ams.get(am, (ea + kb + c * C) >> bs_log2);
          w.sb[c] = ams.get(am, (eb + kb + c * C) >> bs_log2);
        }
      } else {
#pragma unroll
        for (int i = 0; i < NW; ++i) w.a[c][i] = w.b[c][i] = 0;
        w.sa[c] = w.sb[c] = 0.f;
      }
    }
  };
  auto chunks = [&](int64_t s) -> int {
    const int64_t left = K - s * kGemvStepK;
    return s < steps ? static_cast<int>(left >= kGemvStepK ? NC : left / C) : 0;
  };
  auto load_w = [&](int64_t s, Wt& w) {  // constant trip counts for the full steps
    const int nc = chunks(s);
    if (nc == NC) {
      load_chunks(s, NC, w);
    } else {
      load_chunks(s, nc, w);
    }
  };

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  auto compute = [&](int64_t s, int nc, const Wt& cur) {
    const T* xs = xr + s * kGemvStepK;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (c >= nc) continue;
      uint32_t xw[C / 8];
      if (has_x) {
        const uint4* xp = reinterpret_cast<const uint4*>(xs + c * C);
#pragma unroll
        for (int i = 0; i < C / 32; ++i) {
          const uint4 v = __ldg(xp + i);
          xw[4 * i] = v.x; xw[4 * i + 1] = v.y; xw[4 * i + 2] = v.z; xw[4 * i + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < C / 8; ++i) xw[i] = 0;
      }
      float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < NW; ++i) {
        uint32_t a01[2], a23[2], b01[2], b23[2];
        word_frags(cur.a[c][i], t, sh, a01, a23);
        word_frags(cur.b[c][i], t, sh, b01, b23);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int j = 2 * i + jj;  // mma j of the chunk: the lane's codes 4j .. 4j + 3
          const uint32_t frag[4] = {a01[jj], b01[jj], a23[jj], b23[jj]};
          mma16816<T>(d, frag, xw[2 * j], xw[2 * j + 1]);
        }
      }
      acc[0] = fmaf(cur.sa[c], d[0], acc[0]);
      acc[1] = fmaf(cur.sa[c], d[1], acc[1]);
      acc[2] = fmaf(cur.sb[c], d[2], acc[2]);
      acc[3] = fmaf(cur.sb[c], d[3], acc[3]);
    }
  };

  // this warp's first step and the distance between its steps
  const int64_t first = warp;
  constexpr int64_t kStride = WARPS;
  Wt buf[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    load_w(first + int64_t{d} * kStride, buf[d]);
  }
  for (int64_t s = first; s < steps; s += kStride * DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int64_t sd = s + int64_t{d} * kStride, sn = sd + int64_t{DEPTH} * kStride;
      const Wt cur = buf[d];
      load_w(sn, buf[d]);  // in flight while this step computes
      const int nc = chunks(sd);
      if (nc == NC) {
        compute(sd, NC, cur);
      } else if (nc > 0) {
        compute(sd, nc, cur);
      }
    }
  }

  red[warp][g][2 * q] = acc[0];
  red[warp][g][2 * q + 1] = acc[1];
  red[warp][g + 8][2 * q] = acc[2];
  red[warp][g + 8][2 * q + 1] = acc[3];
  __syncthreads();
  if (threadIdx.x < 128) {  // one thread per (feature, row) of the 16 x 8 tile
    const int r = threadIdx.x >> 3, n = threadIdx.x & 7;
    if (n < M && row0 + r < N) {
      float y = red[0][r][n];
#pragma unroll
      for (int w = 1; w < WARPS; ++w) y += red[w][r][n];
      if (bias != nullptr) y += Cvt<T>::to_float(bias[row0 + r]);
      out[int64_t{n} * N + row0 + r] = Cvt<T>::from_float(y);
    }
  }
}

// ---- the tiled16 decode kernel (production form of gemv_lab's persistent v5) -----------------
// benchmarks/NOTES.md, "gemv_4bit v5", "The gemv repack" and "Twelfth session": 74-75 % of copy
// bandwidth at 8192->28672 and 28672->8192 (H100, bf16, M = 1) against 57-58 % for gemv4_kernel
// on the packed layout. Three changes from gemv4_kernel:
//  * The look-up: a byte of packed codes is two consecutive codes, exactly one 32-bit register
//    of an mma A fragment. A 256-entry table maps the byte to that register, (code[b >> 4],
//    code[b & 15]) rounded to T, unscaled (absmax is applied after the mma as in gemv4_kernel).
//    It lives in 64 KB of dynamic shared memory with one copy per lane (word b * 64 + lane), so
//    the 32 lanes of a look-up hit 32 banks whatever the codes; the byte address
//    b * 256 + lane * 4 is one PRMT of the code word with a register holding lane * 4. One PRMT
//    and one LDS a byte (gemv4_kernel: ~2.6 integer instructions a code).
//  * Persistent CTAs (kTiled16CtasPerSm an SM): each fills the table once and walks row tiles
//    blockIdx.x, + gridDim.x, ...; a warp's (tile, step) items form one stream, so the next
//    tile's first loads are in flight while the current tile's last step computes.
//  * The next item's codes and statistics travel by cp.async (L2 to shared memory, 16 bytes a
//    lane) into one of the warp's two slots while the current item computes from the other: no
//    registers hold bytes in flight. A slot's 2 KB of codes sit in the unused upper 128 bytes of
//    16 of the table's 256-byte rows; its 256 bytes of statistics after the table. 5-17 % faster
//    than the same stream loaded into registers at every lab shape (1.2 us of 11.9 at 4096^2);
//    deeper rings (3-6 slots a warp) were no faster (NOTES).
// The weight is in the tiled16 layout (opsq/_tiled16.py; Tiled16Lane above): blocksize 64,
// N % 16 == 0, K % 256 == 0; each warp load reads 512 contiguous bytes. NESTED: absmax holds the
// uint8 codes in the same tiled order, decoded as AbsmaxSmem<true>::get does (mul_rn of the
// nested code and nested_absmax, add_rn of the offset) once a warp and item, each lane one code
// pair, shuffled to the quads that use it (before, the 4 lanes of a quad each decoded all 8 of
// their rows' codes; the time is about the same, NOTES "Thirteenth session"). M <= 8 rows of A
// a launch; fp16 or bf16. Codes and statistics 16-byte aligned (tiled16_aligned).
constexpr int kLutBytes = 256 * 256;
constexpr int kTiled16Warps = 8;      // lab: 8 warps x 2 CTAs beat 4 x 3 at every shape
constexpr int kTiled16CtasPerSm = 2;
constexpr int kTiled16Slots = 2;      // a warp's ring: the item computing and the next
static_assert(kTiled16Warps * kTiled16Slots * 16 <= 256, "the code slots fill the table's holes");
// the table, then each slot's statistics (256 bytes plain, 64 nested)
constexpr int kTiled16SmemBytes = kLutBytes + kTiled16Warps * kTiled16Slots * 256;
// What the kernel's 16-byte copies need of a codes or statistics pointer.
inline bool tiled16_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst),
               "l"(__cvta_generic_to_global(src))
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;" ::: "memory");
}

// The table entry for byte b: low half code[b >> 4], high half code[b & 15] (bits of T).
__device__ __forceinline__ uint32_t lut_entry(const CodePlanes& t, int b) {
  // byte c of a plane by byte permutes (no run-time index into the planes' registers)
  auto byte_of = [](const uint32_t (&p)[4], int c) {
    const uint32_t sel = static_cast<uint32_t>(c & 7);
    return (c < 8 ? prmt(p[0], p[1], sel) : prmt(p[2], p[3], sel)) & 0xffu;
  };
  auto bits = [&](int c) { return byte_of(t.lo, c) | (byte_of(t.hi, c) << 8); };
  return bits(b >> 4) | (bits(b & 15) << 16);
}

// Fills the table (every thread of the CTA takes part; the caller synchronises).
template <int THREADS>
__device__ __forceinline__ void lut_build(uint32_t* lut, const CodePlanes& t) {
  // one warp store writes four entries' 128 bytes (lane / 8: entry, lane % 8: 16-byte piece)
  for (int i = threadIdx.x; i < 256 * 8; i += THREADS) {
    const int b = i >> 3, piece = i & 7;
    const uint32_t v = lut_entry(t, b);
    reinterpret_cast<uint4*>(lut + b * 64)[piece] = make_uint4(v, v, v, v);
  }
}

// The fragment register of byte `byte` (0-3) of w: one PRMT for the address, one LDS.
template <int BYTE>
__device__ __forceinline__ uint32_t lut_get(uint32_t lut, uint32_t w, uint32_t lane4) {
  // result byte 0: lane4's byte 0; byte 1: w's byte BYTE; bytes 2, 3: lane4's byte 1 (zero)
  const uint32_t off = prmt(w, lane4, 0x5504u | (BYTE << 4));
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(lut + off));
  return v;
}

// The weights one launch streams (all of K columns, read by the same rows of A): weight g's
// codes W[g], statistics am[g], bias[g] (or null), output out[g] (M x N[g]), streamed by the
// CTAs cta_begin[g] .. cta_begin[g + 1] - 1. One weight for linear_4bit; up to
// kTiled16MaxSegments for linear_4bit_merged (q/k/v, gate/up: one launch instead of several).
constexpr int kTiled16MaxSegments = 4;
template <typename T> struct Tiled16Segments {
  const uint8_t* W[kTiled16MaxSegments];
  AbsmaxArgs am[kTiled16MaxSegments];
  const T* bias[kTiled16MaxSegments];
  T* out[kTiled16MaxSegments];
  int64_t N[kTiled16MaxSegments];
  int cta_begin[kTiled16MaxSegments + 1];
  int count;
};

// MERGED: several weights (each CTA finds its own once, then runs as for one weight over its
// share of CTAs); otherwise segment 0 is read straight from the kernel parameters.
template <typename T, bool NESTED, bool MERGED = false>
__global__ void __launch_bounds__(kTiled16Warps * 32, kTiled16CtasPerSm)
gemv4_tiled16_kernel(const T* __restrict__ A, int M, int64_t K, Tiled16Segments<T> segs,
                     CodePlanes planes) {
  const uint8_t* __restrict__ W = segs.W[0];
  AbsmaxArgs am = segs.am[0];
  const T* __restrict__ bias = segs.bias[0];
  T* __restrict__ out = segs.out[0];
  int64_t N = segs.N[0];
  int cta0 = 0, ctas = static_cast<int>(gridDim.x);
  if constexpr (MERGED) {  // predicated parameter reads: no local copy of the arrays
    const int b = static_cast<int>(blockIdx.x);
#pragma unroll
    for (int i = 1; i < kTiled16MaxSegments; ++i) {
      if (i < segs.count && b >= segs.cta_begin[i]) {
        W = segs.W[i];
        am = segs.am[i];
        bias = segs.bias[i];
        out = segs.out[i];
        N = segs.N[i];
        cta0 = segs.cta_begin[i];
      }
    }
    int end = static_cast<int>(gridDim.x);
#pragma unroll
    for (int i = kTiled16MaxSegments - 1; i >= 1; --i) {
      if (i < segs.count && b < segs.cta_begin[i]) end = segs.cta_begin[i];
    }
    ctas = end - cta0;
  }
  constexpr int NC = kGemvStepK / 64;  // chunks a step
  constexpr int WARPS = kTiled16Warps;
  extern __shared__ __align__(16) uint32_t lut_words[];  // kTiled16SmemBytes
  __shared__ AbsmaxSmem<NESTED> ams;
  __shared__ float red[WARPS][16][8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const int64_t steps = K / kGemvStepK, ntiles = N / 16;
  const bool has_x = g < M;
  const T* xr = A + int64_t{has_x ? g : 0} * K + q * 16;
  const uint32_t lut = static_cast<uint32_t>(__cvta_generic_to_shared(lut_words));
  const uint32_t lane4 = static_cast<uint32_t>(lane) * 4u;
  // slot j of this warp: codes of chunk c at code_slot(j) + c * 1024 (table rows
  // (warp * kTiled16Slots + j) * 16 + c * 4 + lane / 8, upper halves), statistics at scale_slot(j)
  auto code_slot = [&](int j) -> uint32_t {
    return lut + ((warp * kTiled16Slots + j) * 16 + (lane >> 3)) * 256 + 128 + (lane & 7) * 16;
  };
  auto scale_slot = [&](int j) -> uint32_t {
    return lut + kLutBytes + (warp * kTiled16Slots + j) * 256;
  };
  // nested: the nested_absmax of the item in flight, rows tile * 16 + (lane & 7) and + 8: the
  // rows whose chunk lane / 8 this lane decodes (plain: unused)
  float nna = 0.f, nnb = 0.f;
  auto issue = [&](int64_t tile, int64_t s, int j) {  // item (tile, s) into slot j
    const int64_t run = tile * steps + s;
    const uint32_t dst = code_slot(j);
    const uint8_t* src = W + run * 2048 + lane * 16;
#pragma unroll
    for (int c = 0; c < NC; ++c) cp_async16(dst + c * 1024, src + c * 512);
    if constexpr (NESTED) {
      if (lane < 4) cp_async16(scale_slot(j) + lane * 16, am.qabsmax + run * 64 + lane * 16);
      // the block index of chunk lane / 8 of step s, row tile * 16 + (lane & 7)
      const int64_t blk = (tile * 16 + (lane & 7)) * (K / 64) + s * NC + (lane >> 3);
      nna = __ldg(am.nested_absmax + (blk >> am.nested_log2));
      nnb = __ldg(am.nested_absmax + ((blk + 8 * (K / 64)) >> am.nested_log2));
    } else {
      if (lane < 16) cp_async16(scale_slot(j) + lane * 16, am.absmax + run * 64 + lane * 4);
    }
    cp_async_commit();
  };
  int64_t tile = static_cast<int64_t>(blockIdx.x) - cta0, s = warp;
  // Launched as a programmatic dependent (fourbit.cu): until pdl_wait the kernel before this one
  // on the stream may still be running, so this prologue touches nothing it could write: the
  // table (from the kernel arguments) and L2 prefetches of each warp's first run (L2 is where
  // writes land, so a prefetch cannot make a read stale). Copies into shared memory come after.
  if (tile < ntiles && s < steps) {
    const int64_t run = tile * steps + s;
    if (lane < 16) prefetch_l2(W + run * 2048 + lane * 128);  // the run's 2 KB of codes
    else if (lane < 18) prefetch_l2(NESTED ? static_cast<const void*>(am.qabsmax + run * 64)
                                           : static_cast<const void*>(am.absmax + run * 64 +
                                                                      (lane - 16) * 32));
  }
  lut_build<WARPS * 32>(lut_words, planes);  // (rows' lower halves; the copies fill the upper)
  pdl_wait();  // W, absmax and A are visible from here
  int slot = 0;
  if (tile < ntiles && s < steps) issue(tile, s, slot);
  ams.load(am);
  __syncthreads();
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  while (tile < ntiles) {
    int64_t nt = tile, ns = s + WARPS;
    const bool last = ns >= steps;  // this warp's last item of the tile
    if (last) {
      nt += ctas;
      ns = warp;
    }
    if (s < steps) {
      cp_async_wait_all();  // this item's copies have landed ...
      __syncwarp();         // ... the other lanes' too; and every lane is done with the other slot
      uint32_t ca[NC][2], cb[NC][2];
      float sa[NC], sb[NC];  // the chunks' absmax of rows g and g + 8
      const uint32_t cs = code_slot(slot), ss = scale_slot(slot);
      if constexpr (NESTED) {
        // Each code of the slot's 64 is decoded once a warp: lane l takes codes 2 l, 2 l + 1
        // (chunk l / 8, rows l & 7 and + 8) and the quads take their rows' values by shuffles
        // (the 4 lanes of a quad would otherwise each decode all 8 of their rows' codes).
        // Shuffles, not a shared-memory round trip: nothing orders the item's look-ups behind it.
        uint32_t v;
        asm volatile("ld.shared.u16 %0, [%1];" : "=r"(v) : "r"(ss + 2 * lane));
        const float da = add_rn(mul_rn(ams.ncode[v & 0xffu], nna), ams.offset);
        const float db = add_rn(mul_rn(ams.ncode[v >> 8], nnb), ams.offset);
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          sa[c] = __shfl_sync(0xffffffffu, da, c * 8 + g);
          sb[c] = __shfl_sync(0xffffffffu, db, c * 8 + g);
        }
      }
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        asm volatile("ld.shared.v4.b32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(ca[c][0]), "=r"(ca[c][1]), "=r"(cb[c][0]), "=r"(cb[c][1])
                     : "r"(cs + c * 1024));
        if constexpr (!NESTED) {
          asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];"
                       : "=f"(sa[c]), "=f"(sb[c])
                       : "r"(ss + (c * 8 + g) * 8));
        }
      }
      slot ^= 1;
      if (nt < ntiles && ns < steps) issue(nt, ns, slot);  // in flight while this item computes
      const T* xs = xr + s * kGemvStepK;
      uint32_t xw[NC][8];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        if (has_x) {
          const uint4* xp = reinterpret_cast<const uint4*>(xs + c * 64);
          const uint4 v0 = __ldg(xp), v1 = __ldg(xp + 1);
          xw[c][0] = v0.x; xw[c][1] = v0.y; xw[c][2] = v0.z; xw[c][3] = v0.w;
          xw[c][4] = v1.x; xw[c][5] = v1.y; xw[c][6] = v1.z; xw[c][7] = v1.w;
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) xw[c][i] = 0;
        }
      }
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const uint32_t f0[4] = {lut_get<0>(lut, ca[c][i], lane4),
                                  lut_get<0>(lut, cb[c][i], lane4),
                                  lut_get<1>(lut, ca[c][i], lane4),
                                  lut_get<1>(lut, cb[c][i], lane4)};
          mma16816<T>(d, f0, xw[c][4 * i], xw[c][4 * i + 1]);
          const uint32_t f1[4] = {lut_get<2>(lut, ca[c][i], lane4),
                                  lut_get<2>(lut, cb[c][i], lane4),
                                  lut_get<3>(lut, ca[c][i], lane4),
                                  lut_get<3>(lut, cb[c][i], lane4)};
          mma16816<T>(d, f1, xw[c][4 * i + 2], xw[c][4 * i + 3]);
        }
        acc[0] = fmaf(sa[c], d[0], acc[0]);
        acc[1] = fmaf(sa[c], d[1], acc[1]);
        acc[2] = fmaf(sb[c], d[2], acc[2]);
        acc[3] = fmaf(sb[c], d[3], acc[3]);
      }
    }
    if (last) {  // every warp reaches its last item of the tile once: reduce the tile
      red[warp][g][2 * q] = acc[0];
      red[warp][g][2 * q + 1] = acc[1];
      red[warp][g + 8][2 * q] = acc[2];
      red[warp][g + 8][2 * q + 1] = acc[3];
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
      __syncthreads();
      if (threadIdx.x < 128) {  // one thread per (feature, row) of the 16 x 8 tile
        const int r = threadIdx.x >> 3, n = threadIdx.x & 7;
        if (n < M) {
          float y = red[0][r][n];
#pragma unroll
          for (int w = 1; w < WARPS; ++w) y += red[w][r][n];
          if (bias != nullptr) y += Cvt<T>::to_float(bias[tile * 16 + r]);
          out[int64_t{n} * N + tile * 16 + r] = Cvt<T>::from_float(y);
        }
      }
      __syncthreads();
    }
    tile = nt;
    s = ns;
  }
}

}  // namespace opsq
