// The 8-bit map encoder shared by the blockwise quantizer (blockwise.cu) and the 8-bit optimizer
// updates (optim.cu): nearest entry of a 256-entry fp32 map, a value at the exact midpoint of
// two sorted entries taking the lower one, NaN the highest entry (torch.bucketize over the
// midpoints, as opsq/reference/blockwise.py's nearest_code).
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace opsq {

// sorted = the 256 map entries ascending, order[i] = the index in `code` of sorted[i] (a stable
// rank sort: equal entries keep their order). By the CTA, blockDim.x == 256, every thread;
// ends with __syncthreads().
__device__ __forceinline__ void sort_map(const float* __restrict__ code, float* sorted,
                                         unsigned char* order) {
  const int t = threadIdx.x;
  const float v = code[t];
  sorted[t] = v;  // staging copy of the map
  __syncthreads();
  int rank = 0;
  for (int i = 0; i < 256; ++i) {
    const float c = sorted[i];
    const bool eq = !(c < v) && !(v < c);
    rank += ((c < v) || (eq && i < t)) ? 1 : 0;
  }
  __syncthreads();
  sorted[rank] = v;
  order[rank] = static_cast<unsigned char>(t);
  __syncthreads();
}

// The map sorted in shared memory (sort_map), the fp32 midpoints of neighbours
// ((s[i] + s[i+1]) / 2, as the reference computes them) and the original index of each sorted
// entry. encode() = order[number of midpoints < v]; NaN sorts above everything.
struct Encoder8 {
  float mids[256];
  unsigned char order[256];
  float sorted[256];

  // Call with blockDim.x == 256, every thread; ends with __syncthreads().
  __device__ void build(const float* __restrict__ code) {
    const int t = threadIdx.x;
    sort_map(code, sorted, order);
    mids[t] = t < 255 ? mul_rn(add_rn(sorted[t], sorted[t + 1]), 0.5f) : __int_as_float(0x7f800000);
    __syncthreads();
  }

  __device__ __forceinline__ uint32_t encode(float v) const {
    int lo = 0;
#pragma unroll
    for (int step = 128; step >= 1; step >>= 1)
      if (mids[lo + step - 1] < v) lo += step;
    if (abs_bits(v) > 0x7f800000u) lo = 255;
    return order[lo];
  }
};

}  // namespace opsq
