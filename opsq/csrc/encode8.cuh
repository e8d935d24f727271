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

// In-order rank (0..254) of node i (1..255) of the complete 8-level binary tree stored
// breadth-first (node i's children are 2i and 2i + 1).
__host__ __device__ constexpr int eytz_rank(int i) {
  int d = 0;
  while ((2 << d) <= i) ++d;
  return ((2 * (i - (1 << d)) + 1) << (7 - d)) - 1;
}

// The map sorted in shared memory (sort_map), the fp32 midpoints of neighbours
// ((s[r] + s[r+1]) / 2, as the reference computes them) and the original index of each sorted
// entry. encode(v) = order[number of midpoints < v]; NaN takes order[255] (it sorts above
// everything). The midpoints are stored breadth-first (tree[1..255], Eytzinger order), so the 8
// probes of a search read level by level from consecutive words: the sorted order put every
// probe of the first levels in one shared-memory bank (benchmarks/NOTES.md: 10 % of the 8-bit
// optimizer step). benchmarks/optim_lab.cu --host-check compares the rule with a plain binary
// search over the sorted midpoints on 2.86e9 float bit patterns.
struct Encoder8 {
  float tree[256];
  unsigned char order[256];
  float sorted[256];

  // Call with blockDim.x == 256, every thread; ends with __syncthreads().
  __device__ void build(const float* __restrict__ code) {
    const int t = threadIdx.x;
    sort_map(code, sorted, order);
    if (t >= 1) {
      const int r = eytz_rank(t);
      tree[t] = mul_rn(add_rn(sorted[r], sorted[r + 1]), 0.5f);
    }
    __syncthreads();
  }

  __device__ __forceinline__ uint32_t encode(float v) const {
    int i = 1;
#pragma unroll
    for (int l = 0; l < 8; ++l) i = 2 * i + (tree[i] < v ? 1 : 0);
    return order[abs_bits(v) > 0x7f800000u ? 255 : i - 256];
  }
};

}  // namespace opsq
