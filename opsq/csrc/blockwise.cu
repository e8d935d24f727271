// CUDA kernels of 8-bit blockwise quantization with a 256-entry map (quantize_blockwise,
// dequantize_blockwise). Semantics of opsq/reference/blockwise.py: each block is scaled by
// 1 / max|x| and mapped to the nearest map entry, a value at the exact midpoint of two sorted
// entries taking the lower one.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "common.cuh"
#include "encode8.cuh"
#include "launch.h"
#include "ops.h"

namespace opsq {
namespace {

constexpr int kThreads = 256;

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// EPT elements of A from e0 (zeros past n or for an inactive group); true when all are in range.
template <typename T, int EPT, bool VEC>
__device__ __forceinline__ bool load_chunk(const T* __restrict__ A, int64_t e0, int64_t n,
                                           bool active, float (&x)[EPT]) {
  const bool full = active && e0 + EPT <= n;
  if (VEC && full) {
    load_elems<T, EPT>(A + e0, x);
  } else {
#pragma unroll
    for (int i = 0; i < EPT; ++i)
      x[i] = (active && e0 + i < n) ? Cvt<T>::to_float(A[e0 + i]) : 0.0f;
  }
  return full;
}

// G = blocksize / (EPT * SEG) threads per block (<= 256), as quant4_kernel. A thread holds EPT
// elements in registers; with SEG > 1 (blocksizes above 256 * 32) it covers SEG segments of the
// block, G * EPT elements apart: a first pass takes their max, the second reloads each segment
// (mostly from L1/L2, the last one loaded first) to encode it. Keeping the last segment's
// registers instead of reloading it keeps x live across both loops: 116 registers, not 64-79.
template <typename T, int EPT, int SEG, bool VEC>
__global__ void __launch_bounds__(kThreads)
quant8_kernel(const T* __restrict__ A, const float* __restrict__ code, int64_t n, int bs_log2,
              uint8_t* __restrict__ q, float* __restrict__ absmax, int64_t nblocks) {
  __shared__ Encoder8 enc;
  __shared__ uint32_t red[kThreads / 32];
  enc.build(code);

  const int G = (1 << bs_log2) / (EPT * SEG);
  const int per_cta = kThreads / G;
  const int gi = threadIdx.x & (G - 1);
  const int gb = threadIdx.x / G;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t seg_stride = int64_t{G} * EPT;
  for (int64_t b0 = int64_t{blockIdx.x} * per_cta; b0 < nblocks;
       b0 += int64_t{gridDim.x} * per_cta) {
    const int64_t qb = b0 + gb;
    const bool active = qb < nblocks;
    const int64_t base = (qb << bs_log2) + int64_t{gi} * EPT;
    float x[EPT];
    bool full = false;
    uint32_t m = 0;
#pragma unroll 1
    for (int s = 0; s < SEG; ++s) {
      full = load_chunk<T, EPT, VEC>(A, base + s * seg_stride, n, active, x);
#pragma unroll
      for (int i = 0; i < EPT; ++i) m = max(m, abs_bits(x[i]));
    }
    for (int o = (G < 32 ? G : 32) >> 1; o > 0; o >>= 1)
      m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (G > 32) {
      if (lane == 0) red[warp] = m;
      __syncthreads();
      const int w0 = (gb * G) >> 5;
      for (int k = 0; k < (G >> 5); ++k) m = max(m, red[w0 + k]);
      __syncthreads();
    }
    if (!active) continue;
    if (gi == 0) absmax[qb] = __uint_as_float(m);
    const float scale = safe_rcp_from_bits(m);
#pragma unroll 1
    for (int s = SEG - 1; s >= 0; --s) {
      const int64_t e0 = base + s * seg_stride;
      if constexpr (SEG > 1) full = load_chunk<T, EPT, VEC>(A, e0, n, active, x);
      uint32_t word[EPT / 4];
#pragma unroll
      for (int k = 0; k < EPT / 4; ++k) word[k] = 0;
#pragma unroll
      for (int i = 0; i < EPT; ++i)
        word[i / 4] |= enc.encode(scale_or_div(x[i], scale, __uint_as_float(m))) << (8 * (i % 4));
      if (full) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(q + e0);
#pragma unroll
        for (int k = 0; k < EPT / 4; ++k) dst[k] = word[k];
      } else {
#pragma unroll
        for (int i = 0; i < EPT; ++i)
          if (e0 + i < n) q[e0 + i] = static_cast<uint8_t>(word[i / 4] >> (8 * (i % 4)));
      }
    }
  }
}

// A unit is 16 output bytes: 8 elements for fp16/bf16, 4 for fp32.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
dequant8_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                const float* __restrict__ code, int bs_log2, T* __restrict__ out, int64_t n) {
  constexpr int E = 16 / sizeof(T);
  constexpr int UNR = 4;
  using Word = typename std::conditional<E == 8, uint2, uint32_t>::type;
  __shared__ float tab[256];
  tab[threadIdx.x] = code[threadIdx.x];
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
        w[j] = __ldg(reinterpret_cast<const Word*>(q) + u);
        s[j] = __ldg(absmax + ((u * E) >> bs_log2));
      }
    }
#pragma unroll
    for (int j = 0; j < UNR; ++j) {
      const int64_t u = base + j * kThreads + threadIdx.x;
      if (u < full) {
        float v[E];
        if constexpr (E == 8) {
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            v[i] = mul_rn(tab[(w[j].x >> (8 * i)) & 0xffu], s[j]);
            v[4 + i] = mul_rn(tab[(w[j].y >> (8 * i)) & 0xffu], s[j]);
          }
          uint4 o;
          o.x = pack2<T>(v[0], v[1]);
          o.y = pack2<T>(v[2], v[3]);
          o.z = pack2<T>(v[4], v[5]);
          o.w = pack2<T>(v[6], v[7]);
          *reinterpret_cast<uint4*>(out + u * E) = o;
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i) v[i] = mul_rn(tab[(w[j] >> (8 * i)) & 0xffu], s[j]);
          *reinterpret_cast<float4*>(out + u * E) = make_float4(v[0], v[1], v[2], v[3]);
        }
      }
    }
  }
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  for (int64_t e = full * E + int64_t{blockIdx.x} * kThreads + threadIdx.x; e < n; e += stride)
    out[e] = Cvt<T>::from_float(mul_rn(tab[q[e]], __ldg(absmax + (e >> bs_log2))));
}

template <typename T>
void launch_quant8(const T* A, const float* code, int64_t n, int64_t blocksize, uint8_t* q,
                   float* absmax, int64_t nblocks, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(A) % 16 == 0;
  const int bs_log2 = log2_exact(blocksize);
  // 4096 and above: one quantization block per CTA, 256 threads of 16 elements (4096) or 32
  // (8192; 16384 in two segments: 64 in registers would take 127 registers and cut the
  // resident CTAs per SM to 2). Below 4096, 8 elements a thread. One wave (one_wave_grid):
  // each CTA builds the encoder once and strides over its blocks.
#define OPSQ_Q8(EPT, SEG, VEC)                                                                  \
  quant8_kernel<T, EPT, SEG, VEC>                                                               \
      <<<one_wave_grid<quant8_kernel<T, EPT, SEG, VEC>, kThreads>(                              \
             nblocks, std::max<int64_t>(1, kThreads / (blocksize / (EPT * SEG)))),              \
         kThreads, 0, stream>>>(A, code, n, bs_log2, q, absmax, nblocks)
  if (blocksize == 16384) {
    if (vec) OPSQ_Q8(32, 2, true); else OPSQ_Q8(32, 2, false);
  } else if (blocksize == 8192) {
    if (vec) OPSQ_Q8(32, 1, true); else OPSQ_Q8(32, 1, false);
  } else if (blocksize >= 4096) {
    if (vec) OPSQ_Q8(16, 1, true); else OPSQ_Q8(16, 1, false);
  } else {
    if (vec) OPSQ_Q8(8, 1, true); else OPSQ_Q8(8, 1, false);
  }
#undef OPSQ_Q8
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_dequant8(const uint8_t* q, const float* absmax, const float* code, int bs_log2, T* out,
                     int64_t n, cudaStream_t stream) {
  constexpr int E = 16 / sizeof(T);
  const bool vec = reinterpret_cast<uintptr_t>(q) % (E == 8 ? 8 : 4) == 0;
  const int64_t units = vec ? n / E : 0;
  const int64_t work = std::max<int64_t>(units, ceil_div(n - units * E, 4));
  const int grid = grid_for(work, kThreads * 4);
  if (vec) dequant8_kernel<T, true><<<grid, kThreads, 0, stream>>>(q, absmax, code, bs_log2, out, n);
  else dequant8_kernel<T, false><<<grid, kThreads, 0, stream>>>(q, absmax, code, bs_log2, out, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_code(const at::Tensor& A, const at::Tensor& code) {
  check_dtype("code", code.scalar_type(), {at::kFloat});
  check_numel("code", code, 256);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A,
                                                           const at::Tensor& code,
                                                           int64_t blocksize) {
  check_float_dtype("A", A.scalar_type());
  check_code(A, code);
  check_blockwise_blocksize(blocksize);
  check_same_device("A", A, "code", code);
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  auto q = at::empty(A.sizes(), A.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, A.options().dtype(at::kFloat));
  if (n == 0) return {q, absmax};
  const at::Tensor x = A.contiguous();
  const at::Tensor c = code.contiguous();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_quant8<float>(x.data_ptr<float>(), cp, n, blocksize, qp, ap, nblocks, stream);
      break;
    case at::kHalf:
      launch_quant8<__half>(reinterpret_cast<const __half*>(x.data_ptr()), cp, n, blocksize, qp,
                            ap, nblocks, stream);
      break;
    default:
      launch_quant8<__nv_bfloat16>(reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), cp, n,
                                   blocksize, qp, ap, nblocks, stream);
      break;
  }
  return {q, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     at::ScalarType dtype) {
  check_dtype("A", A.scalar_type(), {at::kByte});
  check_dtype("absmax", absmax.scalar_type(), {at::kFloat});
  check_code(A, code);
  check_blockwise_blocksize(blocksize);
  check_float_dtype_arg("dtype", dtype);
  check_numel("absmax", absmax, ceil_div(A.numel(), blocksize),
              " (one per block of " + std::to_string(blocksize) + " of " +
                  std::to_string(A.numel()) + " elements)");
  check_same_device("A", A, "absmax", absmax);
  check_same_device("A", A, "code", code);
  check_cuda("A", A);
  const c10::cuda::CUDAGuard guard(A.device());
  auto out = at::empty(A.sizes(), A.options().dtype(dtype));
  const int64_t n = A.numel();
  if (n == 0) return out;
  const at::Tensor q = A.contiguous();
  const at::Tensor am = absmax.contiguous();
  const at::Tensor c = code.contiguous();
  const int bs_log2 = log2_exact(blocksize);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  switch (dtype) {
    case at::kFloat:
      launch_dequant8<float>(qp, am.data_ptr<float>(), c.data_ptr<float>(), bs_log2,
                             out.data_ptr<float>(), n, stream);
      break;
    case at::kHalf:
      launch_dequant8<__half>(qp, am.data_ptr<float>(), c.data_ptr<float>(), bs_log2,
                              reinterpret_cast<__half*>(out.data_ptr()), n, stream);
      break;
    default:
      launch_dequant8<__nv_bfloat16>(qp, am.data_ptr<float>(), c.data_ptr<float>(), bs_log2,
                                     reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), n, stream);
      break;
  }
  return out;
}

}  // namespace opsq
