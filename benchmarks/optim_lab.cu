// optim lab: times the 8-bit blockwise AdamW update (update8_kernel of opsq/csrc/optim.cuh, bf16
// parameters, 128 M elements) without torch, in its production form and with alternatives, and
// a loads-only kernel with the same traffic (10 bytes an element: read g, p, two codes; write
// p and the codes):
//   v0  production: Encoder8 (a breadth-first search over the midpoints), maps read through L1,
//       a group of 64 threads (two warps) a block of 256, 4 CTAs an SM
//   v1  maps decoded from a shared-memory copy
//   v2  v0 on a grid of every resident CTA (5 an SM on the H100)
//   v3  EncoderBucket (below: a bucket table and three compares instead of the 8-level search)
//   v4  v3 + v1
// (Measured and removed since, NOTES.md: the binary-search encoder, 10 % slower; a warp a
// block with no barrier in the loop, 6 % slower.)
// Every variant computes the same function: its p, codes and absmax must equal v0's bit for bit
// (printed). The maps are opsq's 8-bit dynamic maps, written by Python:
//   python3 -c "from opsq._constants import create_dynamic_map as m; import torch; \
//     torch.cat([m(signed=True), m(signed=False)]).numpy().tofile('/tmp/opsq_maps.bin')"
//   nvcc -O3 -arch=sm_90 -std=c++17 -o /tmp/optim_lab benchmarks/optim_lab.cu
//   /tmp/optim_lab /tmp/opsq_maps.bin               # the timings (GPU)
//   /tmp/optim_lab /tmp/opsq_maps.bin --host-check  # both encoders == binary search, no GPU
// (scripts/gpu_all.sh phase `lab`; results in benchmarks/NOTES.md).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../opsq/csrc/optim.cuh"
#include "lab_common.cuh"
using namespace opsq;

__host__ __device__ inline bool is_nan_bits(float v) {
  uint32_t b;
  memcpy(&b, &v, 4);
  return (b & 0x7fffffffu) > 0x7f800000u;
}

// The same midpoints breadth-first, as Encoder8 (encode8.cuh) stores and searches them.
struct HostEytz {
  float tree[256];
  unsigned char order[256];
  uint32_t encode(float v) const {
    int i = 1;
    for (int l = 0; l < 8; ++l) i = 2 * i + (tree[i] < v ? 1 : 0);
    return order[is_nan_bits(v) ? 255 : i - 256];
  }
};

// EncoderBucket: Encoder8's rule without a search. The monotone integer key of a float (its bits,
// negatives reversed) cut to its top kT bits picks one of 2^kT buckets; lo[b] is the number of
// midpoints below the bucket's smallest float, so a value's rank is lo[b] plus the midpoints of its
// own bucket below it: three compares against mids[lo], mids[lo + 1], mids[lo + 2] when every
// bucket holds at most three (`fits`; 2 for the signed dynamic map, 3 for the unsigned one at
// kT = 14), else the binary search. -0 is made +0 (v + 0) in the midpoints and in the value, so
// that key order and float order agree. Shared loads an encode: 5 (table, 3 midpoints, order)
// instead of 9. 18.7 KB of shared memory a map.
struct EncoderBucket {
  static constexpr int kT = 14;
  unsigned char lo[1 << kT];
  float mids[259];  // sorted midpoints (+0 for -0), then +inf x 4
  unsigned char order[256];
  float sorted[256];
  int fits;

  __host__ __device__ static float plus_zero(float v) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(v, 0.0f);
#else
    return v + 0.0f;
#endif
  }
  __host__ __device__ static uint32_t key(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return (b >> 31) ? ~b : (b | 0x80000000u);
  }
  // the smallest float (by key) of bucket b
  __host__ __device__ static float bucket_min(int b) {
    const uint32_t k = static_cast<uint32_t>(b) << (32 - kT);
    const uint32_t bits = (k >> 31) ? (k & 0x7fffffffu) : ~k;
    float f;
    memcpy(&f, &bits, 4);
    return f;
  }
  // number of midpoints < f (the binary search of the rule)
  __host__ __device__ int count_below(float f) const {
    int r = 0;
    for (int step = 128; step >= 1; step >>= 1)
      if (mids[r + step - 1] < f) r += step;
    return r;
  }
  // midpoints in bucket b; 0 for the buckets of NaNs (encode() never reads their lo)
  __host__ __device__ int bucket_count(int b) const {
    if (is_nan_bits(bucket_min(b))) return 0;
    return (b + 1 < (1 << kT) ? lo[b + 1] : 255) - lo[b];
  }

  // By the CTA (blockDim.x == 256), as Encoder8::build; ends with __syncthreads().
  __device__ void build(const float* __restrict__ code) {
    const int t = threadIdx.x;
    sort_map(code, sorted, order);
    mids[t] = t < 255 ? plus_zero(__fmul_rn(__fadd_rn(sorted[t], sorted[t + 1]), 0.5f)) : INFINITY;
    if (t < 3) mids[256 + t] = INFINITY;
    __syncthreads();
    for (int b = t; b < (1 << kT); b += 256) lo[b] = static_cast<unsigned char>(count_below(bucket_min(b)));
    __syncthreads();
    int ok = 1;
    for (int b = t; b < (1 << kT); b += 256) ok &= bucket_count(b) <= 3;
    ok = __syncthreads_and(ok);
    if (t == 0) fits = ok;
    __syncthreads();
  }

  __host__ __device__ uint32_t encode(float v) const {
    const float c = plus_zero(v);
    int r;
    if (fits) {
      r = lo[key(c) >> (32 - kT)];
      r += (mids[r] < c ? 1 : 0) + (mids[r + 1] < c ? 1 : 0) + (mids[r + 2] < c ? 1 : 0);
    } else {
      r = count_below(c);
    }
    return order[is_nan_bits(v) ? 255 : r];
  }
};

// Host versions of the two builds: sorted map, midpoints, order (Encoder8::build's arithmetic).
struct HostMaps { float mids[256]; unsigned char order[256]; HostEytz eytz; EncoderBucket bucket; };
static HostMaps host_build(const float* code) {
  static HostMaps h;  // 19 KB: static, not on the stack
  h = HostMaps{};
  float sorted[256];
  for (int t = 0; t < 256; ++t) {
    int rank = 0;
    for (int i = 0; i < 256; ++i)
      rank += ((code[i] < code[t]) || (!(code[i] < code[t]) && !(code[t] < code[i]) && i < t)) ? 1 : 0;
    sorted[rank] = code[t];
    h.order[rank] = static_cast<unsigned char>(t);
  }
  for (int t = 0; t < 256; ++t) {
    h.mids[t] = t < 255 ? (sorted[t] + sorted[t + 1]) * 0.5f : INFINITY;
    h.eytz.order[t] = h.order[t];
    if (t >= 1) { const int r = eytz_rank(t); h.eytz.tree[t] = (sorted[r] + sorted[r + 1]) * 0.5f; }
    h.bucket.order[t] = h.order[t];
    h.bucket.mids[t] = t < 255 ? EncoderBucket::plus_zero((sorted[t] + sorted[t + 1]) * 0.5f) : INFINITY;
  }
  for (int t = 256; t < 259; ++t) h.bucket.mids[t] = INFINITY;
  h.bucket.fits = 1;
  for (int b = 0; b < (1 << EncoderBucket::kT); ++b)
    h.bucket.lo[b] = static_cast<unsigned char>(h.bucket.count_below(EncoderBucket::bucket_min(b)));
  for (int b = 0; b < (1 << EncoderBucket::kT); ++b) h.bucket.fits &= h.bucket.bucket_count(b) <= 3;
  return h;
}
// The rule as a binary search over the sorted midpoints (the encoder before 2026-12-05).
static uint32_t host_encode8(const HostMaps& h, float v) {
  int lo = 0;
  for (int step = 128; step >= 1; step >>= 1)
    if (h.mids[lo + step - 1] < v) lo += step;
  if (is_nan_bits(v)) lo = 255;
  return h.order[lo];
}

static int host_check(const float* maps) {
  long long bad = 0, bad_bucket = 0, n = 0;
  for (int m = 0; m < 2; ++m) {
    const HostMaps& h = host_build(maps + 256 * m);
    // every float whose bits are a multiple of 3 (all signs, exponents, most mantissas), and
    // every midpoint and its two neighbours exactly
    for (uint64_t bits = 0; bits <= 0xffffffffull; bits += 3) {
      const uint32_t b = static_cast<uint32_t>(bits);
      float v; memcpy(&v, &b, 4);
      ++n;
      const uint32_t want = host_encode8(h, v);
      bad += want != h.eytz.encode(v);
      bad_bucket += want != h.bucket.encode(v);
    }
    for (int t = 0; t < 255; ++t)
      for (float v : {h.mids[t], nextafterf(h.mids[t], -INFINITY), nextafterf(h.mids[t], INFINITY), 0.0f, -0.0f}) {
        ++n;
        const uint32_t want = host_encode8(h, v);
        bad += want != h.eytz.encode(v);
        bad_bucket += want != h.bucket.encode(v);
      }
    printf("map %d: EncoderBucket fits (<= 3 midpoints a bucket): %d\n", m, h.bucket.fits);
  }
  printf("host check: Encoder8's breadth-first search vs a binary search on %lld values of the two maps: %lld differ\n",
         n, bad);
  printf("host check: EncoderBucket vs the binary search on the same values: %lld differ\n", bad_bucket);
  return bad != 0 || bad_bucket != 0;
}

// The memory side alone: update8_kernel's loads and stores (4 elements a thread, blocks of 256,
// the absmax of each block) with the arithmetic replaced by adds.
__global__ void __launch_bounds__(kThreads)
drain8_kernel(const __nv_bfloat16* __restrict__ g, __nv_bfloat16* __restrict__ p, States8 st,
              int64_t n, int64_t nblocks) {
  const int64_t stride = int64_t{gridDim.x} * kThreads * 4;
  for (int64_t e = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * 4; e < n; e += stride) {
    const uint2 gv = *reinterpret_cast<const uint2*>(g + e);
    uint2 pv = *reinterpret_cast<const uint2*>(p + e);
    uint32_t c1 = *reinterpret_cast<const uint32_t*>(st.c1 + e);
    uint32_t c2 = *reinterpret_cast<const uint32_t*>(st.c2 + e);
    const float a1 = st.a1[e >> 8], a2 = st.a2[e >> 8];
    pv.x += gv.x; pv.y += gv.y; c1 += gv.x ^ __float_as_uint(a1); c2 += gv.y ^ __float_as_uint(a2);
    *reinterpret_cast<uint2*>(p + e) = pv;
    *reinterpret_cast<uint32_t*>(st.c1 + e) = c1;
    *reinterpret_cast<uint32_t*>(st.c2 + e) = c2;
    if ((e & 255) == 0) { st.a1[e >> 8] = a1; st.a2[e >> 8] = a2; }
  }
}

// x[i] = scale * (an approximately standard normal value from a hash of (i, seed)): the sum of
// four uniform [0, 1) values, centred and scaled to unit variance.
__global__ void fill_kernel(__nv_bfloat16* x, int64_t n, float scale, int seed) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b9u ^ (static_cast<uint32_t>(seed) * 0x85ebca6bu + 0x165667b1u);
    float s = 0.0f;
    for (int k = 0; k < 4; ++k) {
      h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
      s += static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
    }
    x[i] = __float2bfloat16(scale * (s - 2.0f) * 1.7320508f);
  }
}

struct Buf {  // one copy of everything an update reads and writes
  __nv_bfloat16 *g, *p; uint8_t *c1, *c2; float *a1, *a2;
};

int main(int argc, char** argv) {
  if (argc < 2) { printf("usage: %s MAPS.bin [--host-check]\n", argv[0]); return 2; }
  std::vector<float> maps(512);
  FILE* f = fopen(argv[1], "rb");
  if (!f || fread(maps.data(), 4, 512, f) != 512) { printf("cannot read 512 floats from %s\n", argv[1]); return 2; }
  fclose(f);
  if (argc > 2 && !strcmp(argv[2], "--host-check")) return host_check(maps.data());

  const double B = copy_bandwidth();
  const int64_t n = int64_t{1} << 27, nblocks = n / kOptBlock;
  int sms = 0; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int grid = static_cast<int>(std::min<int64_t>(nblocks / (kThreads / kGroup), int64_t{sms} * 4));
  float* dmaps; CK(cudaMalloc(&dmaps, 2048)); CK(cudaMemcpy(dmaps, maps.data(), 2048, cudaMemcpyHostToDevice));
  auto alloc = [&]() {
    Buf b;
    CK(cudaMalloc(&b.g, n * 2)); CK(cudaMalloc(&b.p, n * 2)); CK(cudaMalloc(&b.c1, n)); CK(cudaMalloc(&b.c2, n));
    CK(cudaMalloc(&b.a1, nblocks * 4)); CK(cudaMalloc(&b.a2, nblocks * 4));
    return b;
  };
  auto states = [&](const Buf& b) { return States8{b.c1, b.c2, b.a1, b.a2, dmaps, dmaps + 256}; };
  auto copy = [&](const Buf& d, const Buf& s) {
    CK(cudaMemcpy(d.g, s.g, n * 2, cudaMemcpyDeviceToDevice)); CK(cudaMemcpy(d.p, s.p, n * 2, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(d.c1, s.c1, n, cudaMemcpyDeviceToDevice)); CK(cudaMemcpy(d.c2, s.c2, n, cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(d.a1, s.a1, nblocks * 4, cudaMemcpyDeviceToDevice)); CK(cudaMemcpy(d.a2, s.a2, nblocks * 4, cudaMemcpyDeviceToDevice));
  };
  // the starting point: random parameters and states from 3 production steps of random gradients
  Buf base = alloc(), work = alloc();
  {
    fill_kernel<<<1024, 256>>>(base.p, n, 1.0f, 0);
    CK(cudaMemset(base.c1, 0, n)); CK(cudaMemset(base.c2, 0, n));
    CK(cudaMemset(base.a1, 0, nblocks * 4)); CK(cudaMemset(base.a2, 0, nblocks * 4));
    for (int step = 1; step <= 4; ++step) {
      fill_kernel<<<1024, 256>>>(base.g, n, 1e-3f, step);
      if (step == 4) break;  // the timed steps use this gradient
      const Hyper hy = make_hyper(kAdam, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.01, step, 1e-4, 1.0, 0.0, 0.0, false);
      update8_kernel<__nv_bfloat16, kAdam><<<grid, kThreads>>>(base.g, base.p, states(base), n, nblocks, true, hy);
    }
    CK(cudaDeviceSynchronize());
  }
  const Hyper hy = make_hyper(kAdam, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.01, 4, 1e-4, 1.0, 0.0, 0.0, false);
  // v0's result, the reference of the others
  Buf ref = alloc();
  copy(ref, base);
  update8_kernel<__nv_bfloat16, kAdam><<<grid, kThreads>>>(ref.g, ref.p, states(ref), n, nblocks, true, hy);
  CK(cudaDeviceSynchronize());
  std::vector<uint8_t> want(n), got(n);
  const double bytes = 10.0 * n + 16.0 * nblocks;
  auto run = [&](const char* name, auto launch) {
    copy(work, base);
    launch(work);
    CK(cudaDeviceSynchronize());
    long long diff = 0;
    for (int k = 0; k < 3; ++k) {
      const size_t len = k == 0 ? n * 2 : n;
      const void* a = k == 0 ? (const void*)ref.p : (k == 1 ? (const void*)ref.c1 : (const void*)ref.c2);
      const void* b = k == 0 ? (const void*)work.p : (k == 1 ? (const void*)work.c1 : (const void*)work.c2);
      want.resize(len); got.resize(len);
      CK(cudaMemcpy(want.data(), a, len, cudaMemcpyDeviceToHost)); CK(cudaMemcpy(got.data(), b, len, cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < len; ++i) diff += want[i] != got[i];
    }
    const float us = time_med([&] { launch(work); }, 20);
    printf("%-34s %9.1f us %5.1f %% of copy   bytes differing from v0: %lld\n", name, us,
           100.0 * bytes / (us * 1e-6) / B, diff);
  };
  printf("AdamW 8-bit blockwise update, %lld bf16 parameters, grid %d x %d\n", (long long)n, grid, kThreads);
  run("v0 production (Encoder8, L1 maps)", [&](const Buf& b) {
    update8_kernel<__nv_bfloat16, kAdam, Encoder8, false><<<grid, kThreads>>>(b.g, b.p, states(b), n, nblocks, true, hy); });
  run("v1 shared-memory maps", [&](const Buf& b) {
    update8_kernel<__nv_bfloat16, kAdam, Encoder8, true><<<grid, kThreads>>>(b.g, b.p, states(b), n, nblocks, true, hy); });
  int resident1 = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident1, update8_kernel<__nv_bfloat16, kAdam, Encoder8, false>, kThreads, 0));
  const int grid4 = static_cast<int>(std::min<int64_t>(nblocks / (kThreads / kGroup), int64_t{sms} * resident1));
  printf("v2: %d CTAs resident an SM\n", resident1);
  run("v2 v0 on a grid of every resident CTA", [&](const Buf& b) {
    update8_kernel<__nv_bfloat16, kAdam, Encoder8, false><<<grid4, kThreads>>>(b.g, b.p, states(b), n, nblocks, true, hy); });
  run("v3 EncoderBucket", [&](const Buf& b) {
    update8_kernel<__nv_bfloat16, kAdam, EncoderBucket, false><<<grid, kThreads>>>(b.g, b.p, states(b), n, nblocks, true, hy); });
  run("v4 EncoderBucket + shared maps", [&](const Buf& b) {
    update8_kernel<__nv_bfloat16, kAdam, EncoderBucket, true><<<grid, kThreads>>>(b.g, b.p, states(b), n, nblocks, true, hy); });
  run("loads only (drain; differs)", [&](const Buf& b) {
    drain8_kernel<<<grid, kThreads>>>(b.g, b.p, states(b), n, nblocks); });
  return 0;
}
