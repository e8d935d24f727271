// CUDA kernels of the LLM.int8 family: vectorwise_quant, double_quant, mm_dequant, igemmlt and
// the int8_linear composition. Semantics of opsq/reference/int8.py:
//   x = A.float() with outliers (|x| >= threshold, threshold > 0) set to 0,
//   stats = max|x| per row (and per column), q = clamp(round_half_even(x * (127 / stats)), ±127)
//   (scale 0 where stats is 0), columns holding an outlier zeroed in the row-wise output.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "common.cuh"
#include "ops.h"

namespace opsq {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

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

// ---- mm_dequant: out = ((A * row) * col) * (1/127^2) (+ bias), each product rounded in fp32.
template <typename T, int W>
__global__ void __launch_bounds__(kThreads)
mm_dequant_kernel(const int32_t* __restrict__ A, int64_t rows, int64_t N,
                  const float* __restrict__ row_stats, const float* __restrict__ col_stats,
                  const float* __restrict__ bias, T* __restrict__ out) {
  constexpr float kScale = static_cast<float>(1.0 / (127.0 * 127.0));
  const int64_t c0 = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * W;
  if (c0 >= N) return;
  float cs[W], bs[W];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    cs[j] = col_stats[c0 + j];
    bs[j] = bias != nullptr ? bias[c0 + j] : 0.f;
  }
  const int64_t row_chunks = (rows + kRowsPerCta - 1) / kRowsPerCta;
  for (int64_t rc = blockIdx.y; rc < row_chunks; rc += gridDim.y) {
    const int64_t r_end = min(rows, (rc + 1) * kRowsPerCta);
#pragma unroll 4
    for (int64_t r = rc * kRowsPerCta; r < r_end; ++r) {
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
        y[j] = mul_rn(mul_rn(mul_rn(__int2float_rn(a[j]), rs), cs[j]), kScale);
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
// multiple of 8): one warp per output column n and 8 rows, dp4a over 16-byte chunks.
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

// ---- host helpers ----------------------------------------------------------------------------
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T> const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

struct Int8Stats {
  at::Tensor CA, CA_col, row_stats, col_stats, mask;
};

// Shared body of vectorwise_quant / double_quant on a contiguous (rows, K) view.
template <typename T>
void int8_quant_impl(const at::Tensor& x, int64_t rows, int64_t K, double threshold, bool cols,
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

void check_vectorwise(const at::Tensor& A, double threshold) {
  check_float_dtype("A", A.scalar_type());
  check_min_dim("A", A, 1);
  check_threshold(threshold);
  check_cuda("A", A);
}

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

}  // namespace

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
  if (dtype.has_value()) check_float_dtype("dtype", *dtype);
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
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kRowsPerCta), kMaxGridY)));
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
  at::Tensor CB = B, scb;
  if (B.scalar_type() != at::kChar) {
    Int8Stats wq = int8_quant(B, 0.0, false);
    CB = wq.CA;
    scb = wq.row_stats;
  } else {
    scb = *SCB;
  }
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < A.dim(); ++d) rows *= A.size(d);
  const at::Tensor a2 = A.reshape({rows, K});
  Int8Stats aq = int8_quant(a2, threshold, false);
  at::Tensor out = mm_dequant_cuda(igemmlt_cuda(aq.CA, CB), aq.row_stats, scb, std::nullopt,
                                   at::kFloat);
  if (threshold > 0.0) {
    const at::Tensor m = aq.mask;
    const at::Tensor a = a2.to(at::kFloat) * m;
    const at::Tensor w = CB.to(at::kFloat) * (scb.reshape({-1, 1}) / 127.0) * m;
    out = out + at::matmul(a, w.t());
  }
  if (bias.has_value()) out = out + bias->to(at::kFloat);
  return out.to(A.scalar_type()).reshape(out_shape);
}

}  // namespace opsq
