// Shared parts of int8_linear's CUDA paths: the epilogue arithmetic (int8_matmul.cu's
// mm_dequant_kernel / outlier_dequant_kernel and int8_small_m.cu's fused kernel must round
// identically, so both use these helpers), the outlier-column compaction launch (defined in
// int8_matmul.cu) and the small-M entry point (defined in int8_small_m.cu).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace opsq {

// ---- epilogue arithmetic ---------------------------------------------------------------------
// mm_dequant: ((C * row) * col) * (1/127^2), each product rounded in fp32, never contracted.
constexpr float kMmDequantScale = static_cast<float>(1.0 / (127.0 * 127.0));
__device__ __forceinline__ float mm_dequant_value(int32_t c, float row, float col) {
  return mul_rn(mul_rn(mul_rn(__int2float_rn(c), row), col), kMmDequantScale);
}

// fl(1 / 127): the reference's `SCB / 127.0` on a CUDA tensor is SCB * fl(1 / 127) (torch
// divides by a CPU scalar as a multiplication by its fp32 reciprocal), one rounding each.
constexpr float kInv127 = 0x1.020408p-7f;

// IEEE fused multiply-add, one rounding.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
// Weight value of the reference's outlier matmul: CB * (SCB / 127), each product rounded;
// outlier_scale(SCB) is its second factor, for kernels that hold it per column.
__device__ __forceinline__ float outlier_scale(float scb) { return mul_rn(scb, kInv127); }
__device__ __forceinline__ float outlier_weight(int8_t cb, float scb) {
  return mul_rn(static_cast<float>(cb), outlier_scale(scb));
}
// Byte j (0..3) of `word` as a signed int8, converted to float exactly without a conversion
// instruction (those issue at a quarter of the FP32 rate on sm_90): the byte with its sign bit
// flipped is u = b + 128 in [0, 255]; placed under the exponent bits of 2^23 it is the float
// 2^23 + u, and subtracting 2^23 + 128 leaves b (integers below 2^24: exact).
__device__ __forceinline__ float s8_byte_as_float(uint32_t word, int j) {
  const uint32_t bits = __byte_perm(word ^ 0x80808080u, 0x4B000000u, 0x7440u + j);
  return __fsub_rn(__uint_as_float(bits), 8388736.0f);
}
__device__ __forceinline__ bool finite_bits(float x) {
  return (__float_as_uint(x) & 0x7fffffffu) < 0x7f800000u;
}

// Outlier columns held per chunk by int8_linear's outlier epilogues. The outlier sum of an
// output is an fp32 FMA chain over the outlier columns in ascending order; the chunked kernel of
// int8_matmul.cu pads the last chunk to a multiple of 4 columns with (0, 0) terms, which is one
// fma(0, 0, s) (it turns a -0 sum into +0) where cnt % 4 != 0: the small-M kernel reproduces it.
constexpr int kOutCap = 64;

// ---- host entry points -----------------------------------------------------------------------
// Compaction of the outlier mask (K bool bytes) into idx (the outlier columns, ascending, int64;
// room for K) and *cnt (their number), on `stream`; one CTA, no host synchronisation.
void launch_outlier_compact(const uint8_t* mask, int64_t K, int64_t* idx, int64_t* cnt,
                            cudaStream_t stream);

// Rows of A that the small-M path of int8_linear takes (one tile of 16 mma rows).
constexpr int64_t kSmallMRows = 16;

// Whether int8_linear's small-M kernel covers this call: 1 <= rows <= 16, N >= 1, K a positive
// multiple of 16, and an int8 weight CB (N x K, contiguous) whose rows start 16-byte aligned.
inline bool int8_small_m_applies(int64_t rows, int64_t N, int64_t K, const void* cb) {
  return rows >= 1 && rows <= kSmallMRows && N >= 1 && K >= 16 && K % 16 == 0 &&
         reinterpret_cast<uintptr_t>(cb) % 16 == 0;
}

// int8_linear for int8_small_m_applies shapes, on the current stream, no host synchronisation:
// a (rows x K, contiguous, A's dtype) is row-quantized here (threshold > 0: A's quantization and
// the outlier compaction in one launch, int8_quant_small_outliers), CB (N x K int8) and scb (N
// fp32), both contiguous, bias fp32 (N) or null; out (rows x N, contiguous, A's dtype). Output
// bytes equal those of igemmlt + mm_dequant_kernel (threshold 0) or + the outlier epilogue.
void int8_linear_small_m(const at::Tensor& a, const at::Tensor& CB, const at::Tensor& scb,
                         const float* bias, double threshold, at::Tensor& out);

// igemmlt for int8_small_m_applies shapes (a: rows x K int8, contiguous, 16-byte aligned; b: N x
// K int8): out (rows x N int32, contiguous) = a @ b.T on tensor cores, in int8_linear's small-M
// kernel without its epilogue (int8_small_m.cu); exact, so equal to any other int8 GEMM.
void igemm_small_m(const at::Tensor& a, const at::Tensor& b, at::Tensor& out);

}  // namespace opsq
