// CUDA kernels of the 4-bit family (NF4 / FP4): quantize_4bit, dequantize_4bit, and the
// gemv_4bit / linear_4bit product, over a weight in the packed (bitsandbytes') layout or the
// tiled16 one (opsq/_tiled16.py). Semantics are those of opsq/reference/fourbit.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <optional>

#include "checks.h"
#include "absmax.cuh"
#include "common.cuh"
#include "launch.h"
#include "gemv4.cuh"
#include "ops.h"

namespace opsq {
namespace {

constexpr int kThreads = 256;

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

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
// dequantize_4bit of a tiled16 weight (opsq/_tiled16.py): reads the tiled bytes and absmax in
// place and writes the row-major (N, K) output, so nothing is un-packed first. The values are
// those of dequant4_kernel on the packed bytes: the same code table, the same products
// mul_rn(code, absmax) (nested: AbsmaxSmem's decoding) and the same stores (store_unit).
//
// One thread per 8 code bytes of the tiled buffer, 256 threads (2048 bytes) a run (tile b of 16
// rows, step s of 256 columns: run = b S + s, S = K / 256), so a warp reads 256 contiguous bytes
// and thread t takes the same piece of every run: within a run the piece at byte 8 t is chunk
// c = t / 64, lane l = (t / 2) % 32 (g = l / 4, q = l % 4), half h = t % 2, i.e. the 16 codes
// of row 16 b + g + 8 h, columns 256 s + 64 c + 16 q .. + 15 (one block of 64), whose absmax
// sits at run * 64 + 16 c + 2 g + h (block (16 b + g + 8 h) K / 64 + 4 s + c in packed order,
// which nested_absmax keeps). Each thread writes its 16 outputs (32 bytes in fp16/bf16, 64 in
// fp32); the 4 threads of a (g, h) write 64 consecutive columns of one row. They trade code
// words first (2 shuffles a 16-byte store), so that store instruction u of the 4 writes columns
// u 4 E .. u 4 E + 4 E - 1 of the 64, thread q the E at u 4 E + q E: whole 32-byte sectors an
// instruction, where each thread writing its own 16 codes (bytes 32 q + 16 u, 16 bytes 32 bytes
// apart in fp16/bf16) left half sectors for L2 to merge (ncu, session 10: L2 80 % busy at 61 %
// DRAM; 69.5 % of copy bandwidth against the packed kernel's 86 %). kDqTiledRuns runs a CTA
// trip, their loads issued before any store. VEC: the codes are 8-byte aligned (one 8-byte load
// a thread), else 8 byte loads.
// -------------------------------------------------------------------------------------------
// 2: 32 registers at 8 CTAs an SM (full occupancy, no spills; 4 needs 48 or spills), 16 code
// bytes in flight a thread as dequant4_kernel's 4 words of fp16/bf16 units
constexpr int kDqTiledRuns = 2;

template <typename T, bool NESTED, bool VEC>
__global__ void __launch_bounds__(kThreads, 2048 / kThreads)
dequant4_tiled16_kernel(const uint8_t* __restrict__ codes, AbsmaxArgs am, bool nf4,
                        T* __restrict__ out, int64_t K, int runs, int steps) {
  static_assert(kThreads == 256, "one thread per 8 bytes of a 2048-byte run");
  constexpr int E = Unit<T>::kElems;
  constexpr int R = kDqTiledRuns;
  __shared__ float tab[16];
  __shared__ AbsmaxSmem<NESTED> ams;
  if (threadIdx.x < 16) tab[threadIdx.x] = nf4 ? kNF4Code[threadIdx.x] : kFP4Code[threadIdx.x];
  ams.load(am);
  __syncthreads();

  const int t = threadIdx.x;
  const int c = t >> 6, l = (t >> 1) & 31, h = t & 1;
  const int g = l >> 2, q = l & 3;
  const int tile_row = g + 8 * h;         // row within the tile
  const int chunk_col = 64 * c;           // first column of the chunk within the step
  const int lane = t & 31;                // = 8 (g % 4) + 2 q + h
  const int am_in_run = 16 * c + 2 * g + h;
  const int64_t row_blocks = K >> 6;
  for (int r0 = blockIdx.x * R; r0 < runs; r0 += gridDim.x * R) {
    uint32_t lo[R], hi[R];
    float sc[R];
    int64_t o[R];
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int run = r0 + j;
      if (run < runs) {
        const int b = run / steps, s = run - b * steps;
        const int64_t row = int64_t{16} * b + tile_row;
        o[j] = row * K + int64_t{256} * s + chunk_col;
        const uint8_t* p = codes + int64_t{run} * 2048 + 8 * t;
        if constexpr (VEC) {
          const uint2 w = __ldg(reinterpret_cast<const uint2*>(p));
          lo[j] = w.x;
          hi[j] = w.y;
        } else {
          lo[j] = 0;
          hi[j] = 0;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            lo[j] |= static_cast<uint32_t>(p[k]) << (8 * k);
            hi[j] |= static_cast<uint32_t>(p[4 + k]) << (8 * k);
          }
        }
        sc[j] = ams.get_at(am, int64_t{run} * 64 + am_in_run, row * row_blocks + 4 * s + c);
      }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (r0 + j < runs) {  // the same for the whole CTA: every lane takes part in the shuffles
#pragma unroll
        for (int u = 0; u < 16 / E; ++u) {
          // columns u 4 E + q E .. + E - 1 of the chunk: codes of thread src_q of this (g, h),
          // its bytes b0 .. b0 + E / 2 - 1 (byte k of a thread's 8 holds its codes 2 k, in the
          // high nibble, and 2 k + 1); the same block, so the same scale
          const int first = u * 4 * E + q * E;
          const int src_q = first >> 4, b0 = (first & 15) >> 1;
          const int src = (lane & ~6) | (src_q << 1);
          const uint32_t slo = __shfl_sync(0xffffffffu, lo[j], src);
          const uint32_t shi = __shfl_sync(0xffffffffu, hi[j], src);
          float v[E];
#pragma unroll
          for (int k = 0; k < E / 2; ++k) {
            const int byte_index = b0 + k;
            const uint32_t word = byte_index < 4 ? slo : shi;
            const uint32_t byte = (word >> (8 * (byte_index & 3))) & 0xffu;
            v[2 * k] = mul_rn(tab[byte >> 4], sc[j]);
            v[2 * k + 1] = mul_rn(tab[byte & 0xfu], sc[j]);
          }
          store_unit<T>(out + o[j] + first, v);
        }
      }
    }
  }
}

// -------------------------------------------------------------------------------------------
// quantize_4bit
// G = blocksize / EPT threads share one block (G <= 256); each thread loads EPT consecutive
// elements, the group reduces max|x| (integer max over the IEEE bits: NaN propagates; 16-bit
// types as a packed u16x2 max of the raw words), then each thread encodes its elements and
// writes EPT/2 packed bytes. Elements past n (odd tail,
// storage padding) take the zero code; bytes past the storage size are not written.
// -------------------------------------------------------------------------------------------

constexpr int kQuant4Groups = 2;  // independent block groups a trip (loads in flight)

// BSL2: log2 of the blocksize where the launch fixes it (the group's size and the reduction
// then fold into constants), or 0 (bs_log2 at run time).
template <typename T, bool NF4, int EPT, bool VEC, int BSL2>
__global__ void __launch_bounds__(kThreads)
quant4_kernel(const T* __restrict__ A, int64_t n, int bs_log2_arg, uint8_t* __restrict__ packed,
              int64_t nbytes, float* __restrict__ absmax, int64_t nblocks) {
  using Encoder = Enc<NF4>;
  constexpr int S = kQuant4Groups;
  constexpr bool kHalf = sizeof(T) == 2;
  __shared__ Lut<NF4> lut;
  __shared__ uint32_t red[S][kThreads / 32];
  Encoder::build(lut);
  __syncthreads();

  const int bs_log2 = BSL2 > 0 ? BSL2 : bs_log2_arg;
  const int G = (1 << bs_log2) / EPT;  // threads per block, power of two, <= kThreads
  const int per_cta = kThreads / G;
  const int gi = threadIdx.x & (G - 1);
  const int gb = threadIdx.x / G;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;

  // The 16-byte words of the next trip's groups (VEC and whole in range; other groups load at
  // use): issued before the current trip's reduction and encode, so they are in flight during
  // that work.
  constexpr int kWords = EPT * static_cast<int>(sizeof(T)) / 16;
  constexpr int kPerWord = 16 / static_cast<int>(sizeof(T));
  const int64_t step = int64_t{gridDim.x} * per_cta * S;
  uint4 nxt[S][kWords];
  bool nxt_ok[S];
  const auto issue = [&](int64_t b) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int64_t q = b + s * per_cta + gb;
      const int64_t e = (q << bs_log2) + int64_t{gi} * EPT;
      nxt_ok[s] = VEC && q < nblocks && e + EPT <= n;
      if (nxt_ok[s]) {
#pragma unroll
        for (int i = 0; i < kWords; ++i)
          nxt[s][i] = __ldg(reinterpret_cast<const uint4*>(A + e) + i);
      }
    }
  };
  int64_t b0 = int64_t{blockIdx.x} * per_cta * S;
  if (b0 < nblocks) issue(b0);
  for (; b0 < nblocks; b0 += step) {
    // 16-bit types keep the raw words (elements past n as +0), unpacked at their use; fp32
    // unpacks them here
    float x[S][kHalf ? 1 : EPT];
    uint4 cur[S][kWords];
    int64_t qb[S], e0[S];
    bool active[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      qb[s] = b0 + s * per_cta + gb;
      active[s] = qb[s] < nblocks;
      e0[s] = (qb[s] << bs_log2) + int64_t{gi} * EPT;
      if (nxt_ok[s]) {
#pragma unroll
        for (int i = 0; i < kWords; ++i) {
          if constexpr (kHalf) cur[s][i] = nxt[s][i];
          else unpack16<T>(nxt[s][i], x[s] + i * kPerWord);
        }
      } else if constexpr (kHalf) {
        const uint16_t* a16 = reinterpret_cast<const uint16_t*>(A);
        uint32_t h[EPT];
#pragma unroll
        for (int i = 0; i < EPT; ++i) h[i] = (active[s] && e0[s] + i < n) ? a16[e0[s] + i] : 0u;
#pragma unroll
        for (int i = 0; i < kWords; ++i)
          cur[s][i] = make_uint4(h[8 * i] | h[8 * i + 1] << 16,
                                 h[8 * i + 2] | h[8 * i + 3] << 16,
                                 h[8 * i + 4] | h[8 * i + 5] << 16,
                                 h[8 * i + 6] | h[8 * i + 7] << 16);
      } else {
#pragma unroll
        for (int i = 0; i < EPT; ++i)
          x[s][i] = (active[s] && e0[s] + i < n) ? Cvt<T>::to_float(A[e0[s] + i]) : 0.0f;
      }
    }
    if (b0 + step < nblocks) issue(b0 + step);  // uniform over the CTA
    uint32_t m[S];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      if constexpr (kHalf) {
        m[s] = absmax16_bits<T>(cur[s]);
      } else {
        m[s] = 0;
#pragma unroll
        for (int i = 0; i < EPT; ++i) m[s] = max(m[s], abs_bits(x[s][i]));
      }
    }
#pragma unroll
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
      const auto elem = [&](int i) {  // element i of the group as fp32 (i known at compile time)
        if constexpr (kHalf) {
          const uint4& u = cur[s][i / kPerWord];
          const int r = i % kPerWord;
          const uint32_t part = r < 2 ? u.x : r < 4 ? u.y : r < 6 ? u.z : u.w;
          return (r & 1) ? half_hi<T>(part) : half_lo<T>(part);
        } else {
          return x[s][i];
        }
      };
      uint32_t word[EPT / 8];
#pragma unroll
      for (int k = 0; k < EPT / 8; ++k) word[k] = 0;
      // element 2j -> high nibble of byte j; bytes little-endian within the 32-bit word
      auto put = [&](int i, uint32_t c) {
        word[i / 8] |= c << (8 * ((i % 8) / 2) + ((i & 1) ? 0 : 4));
      };
      if (e0[s] + EPT <= n && m[s] < 0x7f800000u && !isinf(scale)) {
        // The common case, decided once for the thread's EPT elements: all in range, a finite
        // absmax (so no element is NaN or infinite: max|x| propagates both) and a finite
        // reciprocal (scale_or_div's multiply), so no per-element test or branch, and |v| <= 1
        // + 2^-20 (Enc::append needs no clamp). Each word is built as word * 16 + code in the
        // order that puts element 8k + 2j in the high nibble of byte j: elements 6, 7, 4, 5, 2,
        // 3, 0, 1.
#pragma unroll
        for (int k = 0; k < EPT / 8; ++k) {
          uint32_t w = 0;
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            const int i = 8 * k + 6 - 2 * (t / 2) + (t & 1);
            w = Encoder::template append<false>(lut, w, mul_rn(elem(i), scale));
          }
          word[k] = w;
        }
      } else {
#pragma unroll
        for (int i = 0; i < EPT; ++i) {
          put(i, (e0[s] + i < n) ? Encoder::encode(lut, scale_or_div(elem(i), scale,
                                                                     __uint_as_float(m[s])))
                                 : static_cast<uint32_t>(Encoder::kZero));
        }
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

// dequant4_tiled16_kernel over a tiled16 weight [N, K] (N % 16 == 0, K % 256 == 0, N K > 0).
template <typename T>
void launch_dequant4_tiled16(const uint8_t* codes, const Absmax& am, bool nf4, T* out, int64_t N,
                             int64_t K, cudaStream_t stream) {
  const int64_t runs = (N / 16) * (K / 256);
  // run indices (and the grid stride past the last) in int32
  TORCH_CHECK(runs <= std::numeric_limits<int>::max() / 2,
              "dequantize_4bit: a tiled16 weight of " + fmt(N) + " x " + fmt(K) +
                  " is too large (N K / 4096 must be < 2^30)");
  const bool vec = reinterpret_cast<uintptr_t>(codes) % 8 == 0;
  const int grid = grid_for(runs, kDqTiledRuns);
  const int r = static_cast<int>(runs), steps = static_cast<int>(K / 256);
#define OPSQ_DQ4T(NESTED, VEC)                                                     \
  dequant4_tiled16_kernel<T, NESTED, VEC><<<grid, kThreads, 0, stream>>>(codes, am.args, nf4, \
                                                                        out, K, r, steps)
  if (am.nested) {
    if (vec) OPSQ_DQ4T(true, true); else OPSQ_DQ4T(true, false);
  } else {
    if (vec) OPSQ_DQ4T(false, true); else OPSQ_DQ4T(false, false);
  }
#undef OPSQ_DQ4T
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Dequantize n codes into a new tensor of `dtype` with `out_shape`; arguments already checked.
// tiled: A and absmax are in the tiled16 layout of the weight out_shape = [N, K] (checked by
// check_tiled16), read in place by dequant4_tiled16_kernel; the values are the same.
at::Tensor dequant4_impl(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                         bool nf4, at::IntArrayRef out_shape, at::ScalarType dtype,
                         const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                         bool tiled = false) {
  auto out = at::empty(out_shape, A.options().dtype(dtype));
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor codes = A.contiguous();
  const Absmax am = prepare_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize);
  const uint8_t* cp = static_cast<const uint8_t*>(codes.data_ptr());
  const int bs_log2 = log2_exact(blocksize);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t N = tiled ? out_shape[0] : 0, K = tiled ? out_shape[1] : 0;
  switch (dtype) {
    case at::kFloat: {
      float* op = out.data_ptr<float>();
      if (tiled) launch_dequant4_tiled16<float>(cp, am, nf4, op, N, K, stream);
      else launch_dequant4<float>(cp, am, bs_log2, nf4, op, n, stream);
      break;
    }
    case at::kHalf: {
      __half* op = reinterpret_cast<__half*>(out.data_ptr<at::Half>());
      if (tiled) launch_dequant4_tiled16<__half>(cp, am, nf4, op, N, K, stream);
      else launch_dequant4<__half>(cp, am, bs_log2, nf4, op, n, stream);
      break;
    }
    default: {
      __nv_bfloat16* op = reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>());
      if (tiled) launch_dequant4_tiled16<__nv_bfloat16>(cp, am, nf4, op, N, K, stream);
      else launch_dequant4<__nv_bfloat16>(cp, am, bs_log2, nf4, op, n, stream);
      break;
    }
  }
  return out;
}

std::vector<int64_t> shape_vec(c10::SymIntArrayRef shape) {
  std::vector<int64_t> v;
  v.reserve(shape.size());
  for (const auto& s : shape) v.push_back(s.guard_int(__FILE__, __LINE__));
  return v;
}

// A grid of at most the CTAs that fit on the device at once (one_wave_grid: the kernel strides
// over the rest), so every CTA's loop overlaps its next loads with its current work and no
// partial last wave runs its CTAs' whole loops at low occupancy.
template <typename T, bool NF4>
void launch_quant4(const T* A, int64_t n, int64_t blocksize, uint8_t* packed, int64_t nbytes,
                   float* absmax, int64_t nblocks, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(A) % 16 == 0;
  const int bs_log2 = log2_exact(blocksize);
  // blocks a CTA takes a trip: kQuant4Groups groups of kThreads / (blocksize / EPT) blocks
#define OPSQ_Q4(EPT, VEC, BSL2)                                                                 \
  quant4_kernel<T, NF4, EPT, VEC, BSL2>                                                         \
      <<<one_wave_grid<quant4_kernel<T, NF4, EPT, VEC, BSL2>, kThreads>(                        \
             nblocks, kQuant4Groups * kThreads / (blocksize / EPT)),                            \
         kThreads, 0, stream>>>(A, n, bs_log2, packed, nbytes, absmax, nblocks)
  if constexpr (sizeof(T) == 2) {
    // the common case (blocksize 64 in 16 bits): 4 threads a block, the reduction in constants
    if (blocksize == 64) {
      if (vec) OPSQ_Q4(16, true, 6); else OPSQ_Q4(16, false, 6);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  if (blocksize == 4096) {
    if (vec) OPSQ_Q4(16, true, 0); else OPSQ_Q4(16, false, 0);
  } else {
    if (vec) OPSQ_Q4(8, true, 0); else OPSQ_Q4(8, false, 0);
  }
#undef OPSQ_Q4
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The fused kernel (gemv4.cuh) for <= 8 rows of A. Chunks of 64 codes where the blocksize
// and K allow, else 32 (blocksize 32, or K % 64 != 0).
template <typename T, bool NESTED>
void launch_gemv4_nested(const T* A, int M, int64_t K, const uint8_t* W, int64_t N,
                         const Absmax& am, int64_t blocksize, const CodePlanes& planes,
                         const T* bias, T* out, cudaStream_t stream) {
  const int grid = static_cast<int>(ceil_div(N, 16));
  const ShiftMuls sh{1u << 16, 1u << 31};
  const int bs_log2 = log2_exact(blocksize);
#define OPSQ_GEMV4(C, BSEQ)                                                                  \
  if (K >= 2 * N)                                                                            \
    gemv4_kernel<T, NESTED, C, BSEQ, kGemvWideWarps><<<grid, kGemvWideWarps * 32, 0, stream>>>( \
        A, M, K, W, N, am.args, bs_log2, planes, sh, bias, out);                             \
  else                                                                                       \
    gemv4_kernel<T, NESTED, C, BSEQ><<<grid, kGemvWarps * 32, 0, stream>>>(A, M, K, W, N,   \
                                                                          am.args, bs_log2,  \
                                                                          planes, sh, bias, out)
  if (blocksize >= 64 && K % 64 == 0) {
    if (blocksize == 64) OPSQ_GEMV4(64, true); else OPSQ_GEMV4(64, false);
  } else {
    if (blocksize == 32) OPSQ_GEMV4(32, true); else OPSQ_GEMV4(32, false);
  }
#undef OPSQ_GEMV4
}

// The code table of quant_type as T's bit planes, built once per dtype, not per launch (a
// decode step launches the gemv kernels hundreds of times).
template <typename T>
const CodePlanes& code_planes(bool nf4) {
  static const CodePlanes kPlanes[2] = {make_code_planes<T>(kFP4Host),
                                        make_code_planes<T>(kNF4Host)};
  return kPlanes[nf4 ? 1 : 0];
}

template <typename T>
void launch_gemv4(const T* A, int M, int64_t K, const uint8_t* W, int64_t N, const Absmax& am,
                  int64_t blocksize, bool nf4, const T* bias, T* out, cudaStream_t stream) {
  const CodePlanes& planes = code_planes<T>(nf4);
  if (am.nested)
    launch_gemv4_nested<T, true>(A, M, K, W, N, am, blocksize, planes, bias, out, stream);
  else
    launch_gemv4_nested<T, false>(A, M, K, W, N, am, blocksize, planes, bias, out, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- tiled16 --------------------------------------------------------------------------------
// gemv4_tiled16_kernel<T, NESTED> given its kTiled16SmemBytes of dynamic shared memory on the
// current device (cudaFuncSetAttribute, once per device and instantiation); false where the
// device cannot (the op then dequantizes from the tiled16 layout and multiplies with cuBLAS).
template <typename T, bool NESTED, bool MERGED = false>
bool tiled16_opted_in() {
  static std::array<std::atomic<int8_t>, C10_COMPILE_TIME_MAX_GPUS> known{};
  return once_per_device(known, []() -> std::optional<bool> {
    if (cudaFuncSetAttribute(gemv4_tiled16_kernel<T, NESTED, MERGED>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kTiled16SmemBytes) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return true;
  });
}

template <typename T, bool MERGED = false>
bool tiled16_kernel_ready(bool nested) {
  return nested ? tiled16_opted_in<T, true, MERGED>() : tiled16_opted_in<T, false, MERGED>();
}

// Whether gemv4_tiled16_kernel<T, NESTED> may be launched as a programmatic dependent on the
// current device: its sm_90 code runs (a build for older targets, JIT-compiled on a newer GPU,
// has no griddepcontrol.wait). Asked once per device.
template <typename T, bool NESTED, bool MERGED = false>
bool tiled16_pdl_runs() {
  static std::array<std::atomic<int8_t>, C10_COMPILE_TIME_MAX_GPUS> known{};
  return once_per_device(known, [] {
    return sm90_code_runs<gemv4_tiled16_kernel<T, NESTED, MERGED>>();
  });
}

// <= 8 rows of A through gemv4_tiled16_kernel: one set of persistent CTAs (kTiled16CtasPerSm an
// SM, at most one a 16-row tile), as measured in benchmarks/gemv_lab.cu. segs.count weights
// (all plain or all nested statistics) stream in one launch, each over a share of the CTAs
// proportional to its tiles (at least one); segs' CTA ranges are filled here. MERGED: the
// kernel instance of linear_4bit_merged (any segs.count, 1 included: the instance its caller
// made ready), else the single-weight one (segs.count 1).
template <typename T, bool MERGED>
void launch_gemv4_tiled16(const T* A, int M, int64_t K, Tiled16Segments<T> segs, bool nested,
                          bool nf4, cudaStream_t stream) {
  const CodePlanes& planes = code_planes<T>(nf4);
  const int G = segs.count;
  int64_t tiles = 0;
  for (int g = 0; g < G; ++g) tiles += segs.N[g] / 16;
  if (tiles == 0) return;  // (the ops return before: N > 0 for every weight here)
  const int grid = static_cast<int>(std::min<int64_t>(
      std::max<int64_t>(tiles, G), int64_t{sm_count()} * kTiled16CtasPerSm));
  // CTA shares: floor of the proportional share, at least 1 and at most the weight's tiles;
  // a launch past the resident grid (the floors of 1) gives back from the weights with the
  // fewest tiles a CTA, what is left goes to those with the most
  int given = 0;
  int64_t ctas[kTiled16MaxSegments];
  for (int g = 0; g < G; ++g) {
    const int64_t t = segs.N[g] / 16;
    ctas[g] = std::min<int64_t>(t, std::max<int64_t>(1, grid * t / tiles));
    given += static_cast<int>(ctas[g]);
  }
  while (given > grid) {
    int best = -1;
    for (int g = 0; g < G; ++g) {
      const int64_t t = segs.N[g] / 16;
      if (ctas[g] > 1 && (best < 0 || t * ctas[best] < (segs.N[best] / 16) * ctas[g])) best = g;
    }
    if (best < 0) break;
    --ctas[best];
    --given;
  }
  while (given < grid) {
    int best = -1;
    for (int g = 0; g < G; ++g) {
      const int64_t t = segs.N[g] / 16;
      if (ctas[g] < t && (best < 0 || t * ctas[best] > (segs.N[best] / 16) * ctas[g])) best = g;
    }
    if (best < 0) break;
    ++ctas[best];
    ++given;
  }
  segs.cta_begin[0] = 0;
  for (int g = 0; g < G; ++g) segs.cta_begin[g + 1] = segs.cta_begin[g] + static_cast<int>(ctas[g]);
  // A programmatic dependent launch where the kernel's sm_90 code runs (its griddepcontrol.wait
  // then orders every read of memory an earlier kernel writes): its launch, table fill and
  // first L2 prefetches overlap the previous kernel's end.
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(given));
  cfg.blockDim = dim3(kTiled16Warps * 32);
  cfg.dynamicSmemBytes = kTiled16SmemBytes;
  cfg.stream = stream;
  cfg.attrs = &attr;
#define OPSQ_TILED16(NESTED, MERGED)                                                         \
  do {                                                                                       \
    cfg.numAttrs = tiled16_pdl_runs<T, NESTED, MERGED>() ? 1 : 0;                            \
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, gemv4_tiled16_kernel<T, NESTED, MERGED>, A, M, K, \
                                      segs, planes));                                       \
  } while (0)
  if (nested) OPSQ_TILED16(true, MERGED); else OPSQ_TILED16(false, MERGED);
#undef OPSQ_TILED16
}

// One weight of a tiled16 launch, as the ops hold it: codes, statistics, N, bias (contiguous,
// in A's dtype; null without), the (M x N) output.
struct Tiled16Weight {
  const uint8_t* W;
  const Absmax* am;
  int64_t N;
  const at::Tensor* bias;
  at::Tensor* out;
};

// Rows m0 .. m0 + rows - 1 (<= 8) of x (M x K, contiguous, T) through G weights in one launch
// of linear_4bit_merged's kernel instance (see launch_gemv4_tiled16).
template <typename T>
void launch_tiled16_rows(const at::Tensor& x, int64_t m0, int rows, int64_t K,
                         const Tiled16Weight* w, int G, bool nested, bool nf4,
                         cudaStream_t stream) {
  Tiled16Segments<T> segs{};
  segs.count = G;
  for (int g = 0; g < G; ++g) {
    segs.W[g] = w[g].W;
    segs.am[g] = w[g].am->args;
    segs.N[g] = w[g].N;
    segs.bias[g] = w[g].bias ? reinterpret_cast<const T*>(w[g].bias->data_ptr()) : nullptr;
    segs.out[g] = reinterpret_cast<T*>(w[g].out->data_ptr()) + m0 * w[g].N;
  }
  launch_gemv4_tiled16<T, true>(reinterpret_cast<const T*>(x.data_ptr()) + m0 * K, rows, K,
                                segs, nested, nf4, stream);
}

// x (M x K, contiguous, fp16 or bf16) through a few-row gemv kernel, 8 rows a launch:
// launch(A, rows, bias, out) with A, bias (null without) and out typed as x's dtype and offset to
// the launch's rows. Returns the (M x N) output.
template <typename T> struct DtypeTag { using type = T; };
template <typename Launch>
at::Tensor gemv_rows(const at::Tensor& x, int64_t N, const std::optional<at::Tensor>& bias,
                     Launch&& launch) {
  const int64_t M = x.size(0), K = x.size(1);
  auto out = at::empty({M, N}, x.options());
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      launch(reinterpret_cast<const T*>(x.data_ptr()) + m0 * K,
             static_cast<int>(std::min<int64_t>(8, M - m0)),
             bias ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
             reinterpret_cast<T*>(out.data_ptr()) + m0 * N);
    }
  };
  if (x.scalar_type() == at::kHalf) run(DtypeTag<__half>{}); else run(DtypeTag<__nv_bfloat16>{});
  return out;
}

}  // namespace

bool gemv_tiled16_supported(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  static std::array<std::atomic<int8_t>, C10_COMPILE_TIME_MAX_GPUS> known{};
  return once_per_device(known, []() -> std::optional<bool> {
    const std::optional<bool> code = sm90_code_runs<gemv4_tiled16_kernel<__nv_bfloat16, false>>();
    if (!code.has_value()) return std::nullopt;  // asked again next time
    return *code && tiled16_opted_in<__nv_bfloat16, false>();
  });
}

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
                                int64_t nested_blocksize, c10::string_view layout) {
  // check_dequantize_4bit of opsq/meta/fourbit.py
  check_blocksize(blocksize);
  const bool nf4 = check_quant_type(quant_type);
  check_float_dtype_arg("dtype", dtype);
  const std::vector<int64_t> out_shape = shape_vec(shape);
  TORCH_CHECK_VALUE(!out_shape.empty(), "shape must not be empty, got []");
  int64_t n = 1;
  for (int64_t s : out_shape) {
    TORCH_CHECK(s >= 0, "shape must have non-negative sizes, got " + fmt_list(out_shape));
    n *= s;
  }
  const bool tiled = check_layout(layout);
  if (tiled) {
    TORCH_CHECK_VALUE(out_shape.size() == 2, "layout 'tiled16' needs shape = [N, K], got " +
                                                 fmt_list(out_shape));
    check_tiled16(blocksize, out_shape[0], out_shape[1], "shape");
  }
  check_packed("A", A, n);
  check_absmax(A, absmax, n, blocksize, nested_absmax, nested_code, offset, nested_blocksize);
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  return dequant4_impl(A, absmax, blocksize, nf4, out_shape, dtype, nested_absmax, nested_code,
                       offset, nested_blocksize, tiled);
}

namespace {
// check_linear_4bit of opsq/meta/fourbit.py: the same checks and messages. Returns N.
int64_t check_linear_4bit_args(const at::Tensor& A, const at::Tensor& B,
                               const std::vector<int64_t>& sb, const at::Tensor& absmax,
                               int64_t blocksize, c10::string_view quant_type,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                               c10::string_view layout) {
  check_float_dtype("A", A.scalar_type());
  check_min_dim("A", A, 1);
  check_blocksize(blocksize);
  check_quant_type(quant_type);
  TORCH_CHECK_VALUE(sb.size() == 2,
                    "shapeB must be [N, K] (out_features, in_features), got " + fmt_list(sb));
  TORCH_CHECK(sb[0] >= 0 && sb[1] >= 0, "shapeB must have non-negative sizes, got " + fmt_list(sb));
  const int64_t N = sb[0], K = sb[1];
  if (check_layout(layout)) check_tiled16(blocksize, N, K);
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
  return N;
}
}  // namespace

// at::linear in the op's own dtype: the caller's autocast must not recast it (this kernel runs
// below the Autocast keys, but the ops it calls would re-enter them), so that the eager result
// is the fake kernel's and the compiled graph's, as the reference kernels' (opsq/reference).
static at::Tensor linear_in_dtype(const at::Tensor& x, const at::Tensor& W,
                                  const std::optional<at::Tensor>& b) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::linear(x, W, b);
}

at::Tensor linear_4bit_cuda(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                            const at::Tensor& absmax, int64_t blocksize,
                            c10::string_view quant_type, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code,
                            const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                            c10::string_view layout) {
  const std::vector<int64_t> sb = shape_vec(shapeB);
  const int64_t N = check_linear_4bit_args(A, B, sb, absmax, blocksize, quant_type, bias,
                                           nested_absmax, nested_code, offset, nested_blocksize,
                                           layout);
  const int64_t K = sb[1];
  const bool nf4 = quant_type == "nf4", tiled = layout == "tiled16";
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
  const auto xp = reinterpret_cast<uintptr_t>(x.data_ptr());
  if (tiled) {
    // Few rows: the tiled16 kernel, 8 rows a launch. Otherwise (fp32, many rows, unaligned
    // pointers, a device that cannot give a CTA kTiled16SmemBytes) the weight is dequantized
    // straight from the tiled16 layout (dequant4_tiled16_kernel: the same values as from the
    // packed bytes) and multiplied by cuBLAS, as the packed path below does.
    const bool nested = absmax.scalar_type() == at::kByte;
    const at::Tensor am_c = absmax.contiguous();
    const bool kernel = M <= kGemvMaxRows && xp % 16 == 0 && tiled16_aligned(codes.data_ptr()) &&
                        tiled16_aligned(am_c.data_ptr()) &&
                        ((dt == at::kHalf && tiled16_kernel_ready<__half>(nested)) ||
                         (dt == at::kBFloat16 && tiled16_kernel_ready<__nv_bfloat16>(nested)));
    if (!kernel) {
      const at::Tensor W = dequant4_impl(codes, am_c, blocksize, nf4, {N, K}, dt, nested_absmax,
                                         nested_code, offset, nested_blocksize, /*tiled=*/true);
      return linear_in_dtype(x, W, b).reshape(out_shape);
    }
    const Absmax am = prepare_absmax(am_c, nested_absmax, nested_code, offset, nested_blocksize);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const auto* w = static_cast<const uint8_t*>(codes.data_ptr());
    return gemv_rows(x, N, b, [&](const auto* a, int rows, const auto* bp, auto* o) {
             using T = std::remove_pointer_t<decltype(o)>;
             Tiled16Segments<T> segs{};  // one weight: the single-weight kernel instance
             segs.W[0] = w;
             segs.am[0] = am.args;
             segs.bias[0] = bp;
             segs.out[0] = o;
             segs.N[0] = N;
             segs.count = 1;
             launch_gemv4_tiled16<T, false>(a, rows, K, segs, am.nested, nf4, stream);
           }).reshape(out_shape);
  }
  const auto cp = reinterpret_cast<uintptr_t>(codes.data_ptr());
  // Few rows: the fused kernel, 8 rows a launch (each launch streams the packed weight once).
  const bool gemv = (dt == at::kHalf || dt == at::kBFloat16) && M <= kGemvMaxRows && K > 0 &&
                    K % 32 == 0 && cp % 16 == 0 && xp % 16 == 0;
  if (gemv) {
    const Absmax am = prepare_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const auto* w = static_cast<const uint8_t*>(codes.data_ptr());
    return gemv_rows(x, N, b, [&](const auto* a, int rows, const auto* bp, auto* o) {
             launch_gemv4(a, rows, K, w, N, am, blocksize, nf4, bp, o, stream);
           }).reshape(out_shape);
  }
  // Many rows (or fp32 / unaligned): dequantize the weight to A.dtype, then a cuBLAS product.
  const at::Tensor W = dequant4_impl(codes, absmax, blocksize, nf4, {N, K}, dt, nested_absmax,
                                     nested_code, offset, nested_blocksize);
  return linear_in_dtype(x, W, b).reshape(out_shape);
}


namespace {
// The checks of one weight of linear_4bit_merged, their errors (of the same type) prefixed
// "weight g: " as check_linear_4bit_merged of opsq/meta/fourbit.py does.
template <typename F>
void for_weight(size_t g, F&& f) {
  const std::string prefix = "weight " + std::to_string(g) + ": ";
  try {
    f();
  } catch (const c10::ValueError& e) {
    TORCH_CHECK_VALUE(false, prefix + e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    TORCH_CHECK_TYPE(false, prefix + e.what_without_backtrace());
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, prefix + e.what_without_backtrace());
  }
}
}  // namespace

std::vector<at::Tensor> linear_4bit_merged_cuda(
    const at::Tensor& A, at::TensorList B, c10::SymIntArrayRef N, at::TensorList absmax,
    int64_t blocksize, c10::string_view quant_type,
    const c10::List<std::optional<at::Tensor>>& bias,
    const c10::List<std::optional<at::Tensor>>& nested_absmax,
    const c10::List<std::optional<at::Tensor>>& nested_code,
    const c10::List<std::optional<at::Tensor>>& offset, int64_t nested_blocksize,
    c10::string_view layout) {
  // check_linear_4bit_merged of opsq/meta/fourbit.py
  const size_t G = B.size();
  TORCH_CHECK_VALUE(G >= 1, "B must hold at least one weight, got an empty list");
  const std::vector<int64_t> Ns = shape_vec(N);
  auto same_length = [&](const char* name, size_t n) {
    TORCH_CHECK_VALUE(n == G, std::string(name) + " must hold one entry a weight (" +
                                  std::to_string(G) + "), got " + std::to_string(n));
  };
  same_length("N", Ns.size());
  same_length("absmax", absmax.size());
  same_length("bias", bias.size());
  same_length("nested_absmax", nested_absmax.size());
  same_length("nested_code", nested_code.size());
  same_length("offset", offset.size());
  check_min_dim("A", A, 1);
  const int64_t K = A.size(-1);
  for (size_t g = 0; g < G; ++g) {
    for_weight(g, [&] {
      check_linear_4bit_args(A, B[g], {Ns[g], K}, absmax[g], blocksize, quant_type,
                                    bias.get(g), nested_absmax.get(g), nested_code.get(g),
                                    offset.get(g), nested_blocksize, layout);
    });
  }
  auto single = [&](size_t g) {
    return linear_4bit_cuda(A, B[g], c10::fromIntArrayRefSlow({Ns[g], K}), absmax[g], blocksize,
                            quant_type, bias.get(g), nested_absmax.get(g), nested_code.get(g),
                            offset.get(g), nested_blocksize, layout);
  };
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  std::vector<int64_t> lead(A.sizes().begin(), A.sizes().end() - 1);
  int64_t M = 1;
  for (int64_t v : lead) M *= v;
  const auto dt = A.scalar_type();
  const bool nested = nested_absmax.get(0).has_value();
  // One launch for all the weights where the tiled16 kernel serves each of them (the same
  // conditions as linear_4bit's tiled16 kernel path, and one kind of statistics); otherwise
  // each weight as linear_4bit computes it.
  bool merged = layout == "tiled16" && G > 1 && M >= 1 && M <= kGemvMaxRows &&
                (dt == at::kHalf || dt == at::kBFloat16);
  const at::Tensor x = A.reshape({M, K}).contiguous();
  merged = merged && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  std::vector<at::Tensor> codes, stats, biases;
  std::vector<Absmax> ams;
  for (size_t g = 0; merged && g < G; ++g) {
    merged = nested_absmax.get(g).has_value() == nested && Ns[g] > 0;
    if (!merged) break;
    codes.push_back(B[g].contiguous());
    stats.push_back(absmax[g].contiguous());
    merged = tiled16_aligned(codes.back().data_ptr()) && tiled16_aligned(stats.back().data_ptr());
  }
  merged = merged && ((dt == at::kHalf && tiled16_kernel_ready<__half, true>(nested)) ||
                      (dt == at::kBFloat16 && tiled16_kernel_ready<__nv_bfloat16, true>(nested)));
  std::vector<at::Tensor> outs;
  if (!merged) {
    for (size_t g = 0; g < G; ++g) outs.push_back(single(g));
    return outs;
  }
  const bool nf4 = quant_type == "nf4";
  for (size_t g = 0; g < G; ++g) {
    ams.push_back(prepare_absmax(stats[g], nested_absmax.get(g), nested_code.get(g),
                                 offset.get(g), nested_blocksize));
    const std::optional<at::Tensor> b = bias.get(g);
    biases.push_back(b.has_value() ? b->to(dt).contiguous() : at::Tensor());
    outs.push_back(at::empty({M, Ns[g]}, A.options()));
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (size_t g0 = 0; g0 < G; g0 += kTiled16MaxSegments) {
    const int n = static_cast<int>(std::min<size_t>(kTiled16MaxSegments, G - g0));
    Tiled16Weight w[kTiled16MaxSegments];
    for (int i = 0; i < n; ++i) {
      const size_t g = g0 + i;
      w[i] = {static_cast<const uint8_t*>(codes[g].data_ptr()), &ams[g], Ns[g],
              biases[g].defined() ? &biases[g] : nullptr, &outs[g]};
    }
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int rows = static_cast<int>(std::min<int64_t>(8, M - m0));
      if (dt == at::kHalf) {
        launch_tiled16_rows<__half>(x, m0, rows, K, w, n, nested, nf4, stream);
      } else {
        launch_tiled16_rows<__nv_bfloat16>(x, m0, rows, K, w, n, nested, nf4, stream);
      }
    }
  }
  for (size_t g = 0; g < G; ++g) {
    std::vector<int64_t> shape = lead;
    shape.push_back(Ns[g]);
    outs[g] = outs[g].reshape(shape);
  }
  return outs;
}

}  // namespace opsq
