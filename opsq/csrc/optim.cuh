// Device code of the optimizer updates (optim.cu): the fp32 arithmetic of one element's
// update (the reference's _step), the 4-element loads and stores, and the 8-bit blockwise update
// kernel. ATen-free, so benchmarks/optim_lab.cu times the same kernel without torch. Included by
// one translation unit of the extension (its definitions are internal to it).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "encode8.cuh"

namespace opsq {
namespace {

constexpr int kThreads = 256;
constexpr int kOptBlock = 256;          // OPTIMIZER_BLOCKSIZE of opsq/meta/optim.py
constexpr int kPerThread = 4;           // elements a thread
constexpr int kGroup = kOptBlock / kPerThread;  // threads a block of 256 elements

enum Opt : int { kAdam = 0, kAdEMAMix = 1, kLion = 2, kMomentum = 3, kRMSprop = 4 };

// The fp32 scalars of one update (see the reference's _step).
struct Hyper {
  float b1, b2, b3, omb1, omb2, omb3;  // betas and fp32(1 - beta)
  float alpha, eps, wd;
  float decay;      // fp32(1 - lr * wd): adam, ademamix, lion
  float step_size;  // adam: fp32(lr * c2 / c1); the others fp32(lr)
  float eps_c2;     // adam: fp32(eps * c2)
  float c1, c2, c2sq;  // fp32 of 1 - b1^t, sqrt(1 - b2^t), c2 * c2
  float gnorm_scale;
  float max_unorm;  // 0: no clipping
  float param_norm; // > 0: given; else ||p|| from the norm pass
  int first;        // momentum: step == 1
  int skip_zeros;
};

inline Hyper make_hyper(Opt o, double beta1, double beta2, double beta3, double alpha, double eps,
                 double wd, int64_t step, double lr, double gnorm_scale, double max_unorm,
                 double param_norm, bool skip_zeros) {
  Hyper h{};
  h.b1 = static_cast<float>(beta1);
  h.b2 = static_cast<float>(beta2);
  h.b3 = static_cast<float>(beta3);
  h.omb1 = static_cast<float>(1.0 - beta1);
  h.omb2 = static_cast<float>(1.0 - beta2);
  h.omb3 = static_cast<float>(1.0 - beta3);
  h.alpha = static_cast<float>(alpha);
  h.eps = static_cast<float>(eps);
  h.wd = static_cast<float>(wd);
  h.decay = static_cast<float>(1.0 - lr * wd);
  const double c1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double c2 = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  h.c1 = static_cast<float>(c1);
  h.c2 = static_cast<float>(c2);
  h.c2sq = static_cast<float>(c2 * c2);
  h.step_size = static_cast<float>(o == kAdam ? lr * c2 / c1 : lr);
  h.eps_c2 = static_cast<float>(eps * c2);
  h.gnorm_scale = static_cast<float>(gnorm_scale);
  h.max_unorm = static_cast<float>(max_unorm);
  h.param_norm = static_cast<float>(param_norm);
  h.first = step == 1;
  h.skip_zeros = skip_zeros;
  return h;
}

// One element's update in fp32 (the reference's _step, elementwise part). s1b: AdEMAMix's slow
// EMA (m2). Returns the new parameter before the clipping scale; *dir the update direction and
// *u2 the element's contribution to ||u||^2 (adam: the bias-corrected m̂ / (sqrt(v̂) + eps)).
template <Opt O>
__device__ __forceinline__ void update_one(const Hyper& h, float g, float& p, float& s1, float& s1b,
                                           float& s2, float& dir, float& u2) {
  if (O == kMomentum || O == kRMSprop) {
    if (h.wd > 0.0f) g = add_rn(g, mul_rn(h.wd, p));
  } else {
    if (h.wd > 0.0f) p = mul_rn(p, h.decay);
  }
  if (O == kAdam) {
    s1 = add_rn(mul_rn(s1, h.b1), mul_rn(h.omb1, g));
    s2 = add_rn(mul_rn(s2, h.b2), mul_rn(h.omb2, mul_rn(g, g)));
    dir = div_rn(s1, add_rn(sqrtf(s2), h.eps_c2));
    const float u = div_rn(div_rn(s1, h.c1), add_rn(sqrtf(div_rn(s2, h.c2sq)), h.eps));
    u2 = mul_rn(u, u);
  } else if (O == kAdEMAMix) {
    s1 = add_rn(mul_rn(s1, h.b1), mul_rn(h.omb1, g));
    s1b = add_rn(mul_rn(s1b, h.b3), mul_rn(h.omb3, g));
    s2 = add_rn(mul_rn(s2, h.b2), mul_rn(h.omb2, mul_rn(g, g)));
    dir = div_rn(add_rn(div_rn(s1, h.c1), mul_rn(h.alpha, s1b)),
                 add_rn(div_rn(sqrtf(s2), h.c2), h.eps));
    u2 = mul_rn(dir, dir);
  } else if (O == kLion) {
    const float c = add_rn(mul_rn(s1, h.b1), mul_rn(h.omb1, g));
    dir = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c);  // torch.sign: 0 -> 0, NaN -> NaN
    s1 = add_rn(mul_rn(s1, h.b2), mul_rn(h.omb2, g));
    u2 = mul_rn(dir, dir);
  } else if (O == kMomentum) {
    s1 = h.first ? g : add_rn(mul_rn(s1, h.b1), g);
    dir = s1;
    u2 = mul_rn(dir, dir);
  } else {  // rmsprop
    s1 = add_rn(mul_rn(s1, h.b1), mul_rn(h.omb1, mul_rn(g, g)));
    dir = div_rn(g, add_rn(sqrtf(s1), h.eps));
    u2 = mul_rn(dir, dir);
  }
}

// The clipping scale of the reference: min(1, limit / ||u||) from the norm pass's sums.
__device__ __forceinline__ float clip_scale(Opt o, const Hyper& h, const float* norms) {
  if (h.max_unorm <= 0.0f) return 1.0f;
  const float pnorm = h.param_norm > 0.0f ? h.param_norm : sqrtf(norms[1]);
  const float limit = add_rn(mul_rn(h.max_unorm, pnorm), o == kAdam ? 0.0f : h.eps);
  const float current = sqrtf(norms[0]);
  return current > limit ? div_rn(limit, current) : 1.0f;
}

template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ src, int64_t e, int64_t n, bool vec,
                                      float (&x)[4]) {
  if (vec && e + 4 <= n) {
    if constexpr (sizeof(T) == 4) {
      const float4 v = *reinterpret_cast<const float4*>(src + e);
      x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(src + e);
      x[0] = half_lo<T>(v.x); x[1] = half_hi<T>(v.x);
      x[2] = half_lo<T>(v.y); x[3] = half_hi<T>(v.y);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = e + j < n ? Cvt<T>::to_float(src[e + j]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* __restrict__ dst, int64_t e, int64_t n, bool vec,
                                       const float (&x)[4]) {
  if (vec && e + 4 <= n) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(dst + e) = make_float4(x[0], x[1], x[2], x[3]);
    } else {
      *reinterpret_cast<uint2*>(dst + e) = make_uint2(pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (e + j < n) dst[e + j] = Cvt<T>::from_float(x[j]);
  }
}

// ---- 8-bit blockwise ------------------------------------------------------------------------
struct States8 {
  uint8_t* c1;        // state1 codes: (n) or AdEMAMix (2, n)
  uint8_t* c2;        // state2 codes or null
  float* a1;          // absmax1: (nblocks) or (2, nblocks)
  float* a2;          // absmax2 or null
  const float* map1;
  const float* map2;  // or null
};

__device__ __forceinline__ void load_codes(const uint8_t* __restrict__ src, int64_t e, int64_t n,
                                           bool vec, uint32_t (&c)[4]) {
  if (vec && e + 4 <= n) {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(src + e);
#pragma unroll
    for (int j = 0; j < 4; ++j) c[j] = (w >> (8 * j)) & 0xffu;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) c[j] = e + j < n ? src[e + j] : 0u;
  }
}

__device__ __forceinline__ void store_codes(uint8_t* __restrict__ dst, int64_t e, int64_t n,
                                            bool vec, const uint32_t (&c)[4]) {
  if (vec && e + 4 <= n) {
    *reinterpret_cast<uint32_t*>(dst + e) = c[0] | (c[1] << 8) | (c[2] << 16) | (c[3] << 24);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (e + j < n) dst[e + j] = static_cast<uint8_t>(c[j]);
  }
}

// max |x| (as IEEE bits, NaN-propagating) over the 64 threads of a group: 2 warps, combined
// through shared memory (slot per warp).
__device__ __forceinline__ uint32_t group_max(uint32_t m, uint32_t* slots) {
  for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) slots[warp] = m;
  __syncthreads();
  m = max(slots[warp & ~1], slots[warp | 1]);
  __syncthreads();
  return m;
}

// Codes of 4 new state values of one block: scaled by 1 / absmax as quantize_blockwise.
template <typename Enc>
__device__ __forceinline__ void encode4(const Enc& enc, const float (&x)[4], uint32_t absbits,
                                        uint32_t (&c)[4]) {
  const float scale = safe_rcp_from_bits(absbits);
  const float am = __uint_as_float(absbits);
#pragma unroll
  for (int j = 0; j < 4; ++j) c[j] = enc.encode(scale_or_div(x[j], scale, am));
}

// Enc: the map encoder (build(code) by the whole CTA, then encode(v)); SMEM_MAPS: decode from
// a shared-memory copy of the maps instead of L1 gathers. The extension runs the defaults;
// benchmarks/optim_lab.cu times alternatives with the same code around them.
template <typename T, Opt O, typename Enc = Encoder8, bool SMEM_MAPS = false>
__global__ void __launch_bounds__(kThreads)
update8_kernel(const T* __restrict__ g, T* __restrict__ p, States8 st, int64_t n,
               int64_t nblocks, bool vec, Hyper h) {
  constexpr bool kTwo = O == kAdam || O == kAdEMAMix;
  __shared__ Enc enc1;
  __shared__ Enc enc2;
  __shared__ uint32_t slots[3][kThreads / 32];
  __shared__ float smaps[SMEM_MAPS ? 2 * 256 : 1];
  if (SMEM_MAPS) {  // made visible by the __syncthreads() that ends build()
    smaps[threadIdx.x] = st.map1[threadIdx.x];
    if (kTwo) smaps[256 + threadIdx.x] = st.map2[threadIdx.x];
  }
  auto decode = [&](int which, uint32_t code) {
    return SMEM_MAPS ? smaps[which * 256 + code] : __ldg((which ? st.map2 : st.map1) + code);
  };
  enc1.build(st.map1);
  if (kTwo) enc2.build(st.map2);
  const int gi = threadIdx.x % kGroup;
  const int gb = threadIdx.x / kGroup;
  constexpr int kPerCta = kThreads / kGroup;
  for (int64_t b0 = int64_t{blockIdx.x} * kPerCta; b0 < nblocks;
       b0 += int64_t{gridDim.x} * kPerCta) {
    const int64_t blk = b0 + gb;
    const bool active = blk < nblocks;
    const int64_t e = blk * kOptBlock + gi * kPerThread;
    const int64_t lim = active ? n : 0;  // an inactive group loads and stores nothing
    float gv[4], pv[4], s1[4], s1b[4] = {0, 0, 0, 0}, s2[4] = {0, 0, 0, 0};
    load4<T>(g, e, lim, vec, gv);
    load4<T>(p, e, lim, vec, pv);
    uint32_t c[4];
    {
      load_codes(st.c1, e, lim, vec, c);
      const float a = active ? st.a1[blk] : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) s1[j] = mul_rn(decode(0, c[j]), a);
    }
    if (O == kAdEMAMix) {
      load_codes(st.c1 + n, e, lim, vec, c);
      const float a = active ? st.a1[nblocks + blk] : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) s1b[j] = mul_rn(decode(0, c[j]), a);
    }
    if (kTwo) {
      load_codes(st.c2, e, lim, vec, c);
      const float a = active ? st.a2[blk] : 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) s2[j] = mul_rn(decode(1, c[j]), a);
    }
    float np[4], n1[4], n1b[4], n2[4];
    uint32_t m1 = 0, m1b = 0, m2 = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float gf = mul_rn(gv[j], h.gnorm_scale);
      // two-state (adam, ademamix): a non-finite gradient leaves its parameter and zeroes its
      // states (bitsandbytes' 8-bit blockwise kernel), so one inf cannot poison a block's absmax.
      // The update runs on a zero gradient and zero states there, whose new states are +0
      // exactly (beta x +0 plus (1 - beta) x +0, beta in [0, 1)): the same bytes as zeroing
      // the states after the update, which ptxas compiled to 68 registers instead of 48 (the
      // AdamW8bit step 10.9 -> 17.7 ms on the H100; NOTES, fourteenth session).
      const bool bad = kTwo && !isfinite(gf);
      float pp = pv[j], dir, u2;
      float a = bad ? 0.0f : s1[j], ab = bad ? 0.0f : s1b[j], b = bad ? 0.0f : s2[j];
      update_one<O>(h, bad ? 0.0f : gf, pp, a, ab, b, dir, u2);
      pp = add_rn(pp, -mul_rn(h.step_size, dir));
      const bool keep = h.skip_zeros && gf == 0.0f;  // (never with bad: gf is not 0)
      const bool real = e + j < lim;  // padding elements count as 0 in the block's max
      np[j] = keep || bad ? pv[j] : pp;
      n1[j] = real ? (keep ? s1[j] : a) : 0.0f;
      n1b[j] = real ? (keep ? s1b[j] : ab) : 0.0f;
      n2[j] = real ? (keep ? s2[j] : b) : 0.0f;
      m1 = max(m1, abs_bits(n1[j]));
      m1b = max(m1b, abs_bits(n1b[j]));
      m2 = max(m2, abs_bits(n2[j]));
    }
    store4<T>(p, e, lim, vec, np);
    m1 = group_max(m1, slots[0]);
    if (O == kAdEMAMix) m1b = group_max(m1b, slots[1]);
    if (kTwo) m2 = group_max(m2, slots[2]);
    if (!active) continue;
    encode4(enc1, n1, m1, c);
    store_codes(st.c1, e, n, vec, c);
    if (gi == 0) st.a1[blk] = __uint_as_float(m1);
    if (O == kAdEMAMix) {
      encode4(enc1, n1b, m1b, c);
      store_codes(st.c1 + n, e, n, vec, c);
      if (gi == 0) st.a1[nblocks + blk] = __uint_as_float(m1b);
    }
    if (kTwo) {
      encode4(enc2, n2, m2, c);
      store_codes(st.c2, e, n, vec, c);
      if (gi == 0) st.a2[blk] = __uint_as_float(m2);
    }
  }
}

}  // namespace
}  // namespace opsq
