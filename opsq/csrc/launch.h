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
#include <c10/cuda/CUDAFunctions.h>

#include <array>
#include <atomic>
#include <optional>

namespace opsq {

// Multiprocessors of the current device.
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// A one-dimensional grid of ceil(work_items / per_cta) CTAs, at most 16 per multiprocessor (the
// kernels stride over the rest).
inline int grid_for(int64_t work_items, int64_t per_cta) {
  const int64_t want = ceil_div(std::max<int64_t>(work_items, 1), per_cta);
  return static_cast<int>(std::min<int64_t>(want, int64_t{sm_count()} * 16));
}

// CTAs of kernel Kern, launched with Threads threads and no dynamic shared memory, resident on
// one multiprocessor at once (for one-wave grids); asked once per instantiation (the devices
// of one process are taken as alike: only speed depends on it), 1 where the query fails.
template <auto Kern, int Threads>
int ctas_per_sm() {
  static const int n = [] {
    int b = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kern, Threads, 0) != cudaSuccess ||
        b < 1) {
      (void)cudaGetLastError();
      b = 1;
    }
    return b;
  }();
  return n;
}

// A one-wave grid for Kern: at most as many CTAs as are resident at once (the kernel strides
// over the rest), so that no partial last wave runs its CTAs' whole loops at a fraction of the
// occupancy; and, where the work takes t > 1 trips of a full wave, ceil(want / t) CTAs, so that
// every CTA makes the same number of trips within one: with a full wave the last trip would be
// left to a few CTAs (quantize_4bit of 8192^2 at blocksize 64 on 132 SMs: 16384 CTA trips over
// 528 CTAs, the 32nd trip run by 16 of them; 512 CTAs make 32 each).
template <auto Kern, int Threads>
int one_wave_grid(int64_t work_items, int64_t per_cta) {
  const int64_t want = ceil_div(std::max<int64_t>(work_items, 1), per_cta);
  const int64_t wave = int64_t{sm_count()} * ctas_per_sm<Kern, Threads>();
  return static_cast<int>(ceil_div(want, ceil_div(want, wave)));
}

// Whether kernel Kern runs code compiled for compute capability >= 9.0 on the current device (a
// build for older targets holds none, even where the driver JIT-compiles it for a newer GPU);
// std::nullopt where the attribute query fails (its error cleared).
template <auto Kern>
std::optional<bool> sm90_code_runs() {
  if (at::cuda::getCurrentDeviceProperties()->major < 9) return false;
  cudaFuncAttributes fa;
  if (cudaFuncGetAttributes(&fa, Kern) != cudaSuccess) {
    (void)cudaGetLastError();
    return std::nullopt;
  }
  return fa.ptxVersion >= 90;
}

// A yes/no fact of the current device (a kernel's code, a cluster that fits), asked once per
// device and kept in `slots` (one per device: 0 unknown, 1 no, 2 yes), so a hot path takes no
// lock; two threads asking at once both compute the same answer. `ask` returns the answer, or
// std::nullopt where the query failed without one (asked again next time).
template <typename Ask>
bool once_per_device(std::array<std::atomic<int8_t>, C10_COMPILE_TIME_MAX_GPUS>& slots,
                     Ask ask) {
  std::atomic<int8_t>& slot = slots[c10::cuda::current_device()];
  const int8_t k = slot.load(std::memory_order_relaxed);
  if (k != 0) return k == 2;
  const std::optional<bool> a = ask();
  if (!a.has_value()) return false;
  slot.store(*a ? 2 : 1, std::memory_order_relaxed);
  return *a;
}

}  // namespace opsq
#endif
