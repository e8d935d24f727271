// Absmax of the 4-bit and blockwise formats as the kernels read it (torch-free, shared by
// fourbit.cu and gemv4.cuh).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace opsq {

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
  // The absmax of block `blk` (bitsandbytes' order) whose stored entry (its uint8 code) is at
  // index `at`: at == blk in the packed layout; the tiled16 layout stores the entries in its own
  // order while nested_absmax stays in block order.
  __device__ __forceinline__ float get_at(const AbsmaxArgs& am, int64_t at, int64_t blk) const {
    const float v = mul_rn(ncode[am.qabsmax[at]], __ldg(am.nested_absmax + (blk >> am.nested_log2)));
    return add_rn(v, offset);
  }
  __device__ __forceinline__ float get(const AbsmaxArgs& am, int64_t blk) const {
    return get_at(am, blk, blk);
  }
};
template <> struct AbsmaxSmem<false> {
  __device__ void load(const AbsmaxArgs&) {}
  __device__ __forceinline__ float get_at(const AbsmaxArgs& am, int64_t at, int64_t) const {
    return __ldg(am.absmax + at);
  }
  __device__ __forceinline__ float get(const AbsmaxArgs& am, int64_t blk) const {
    return __ldg(am.absmax + blk);
  }
};

}  // namespace opsq
