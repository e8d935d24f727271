// Launch arithmetic shared by opsq's CUDA sources: ceil_div (also used by the host-side checks,
// so this part compiles without the CUDA toolkit), and grid sizes from the device's
// multiprocessor count.
#pragma once

#include <algorithm>
#include <cstdint>

namespace opsq {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kMaxGridY = 65535;  // CUDA's limit on gridDim.y

}  // namespace opsq

#ifdef __CUDACC__
#include <ATen/cuda/CUDAContext.h>

namespace opsq {

// Multiprocessors of the current device.
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// A one-dimensional grid of ceil(work_items / per_cta) CTAs, at most 16 per multiprocessor (the
// kernels stride over the rest).
inline int grid_for(int64_t work_items, int64_t per_cta) {
  const int64_t want = ceil_div(std::max<int64_t>(work_items, 1), per_cta);
  return static_cast<int>(std::min<int64_t>(want, int64_t{sm_count()} * 16));
}

}  // namespace opsq
#endif
