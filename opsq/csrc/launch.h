// Launch arithmetic shared by opsq's CUDA sources: ceil_div (also used by the host-side checks,
// so this part compiles without the CUDA toolkit), and grid sizes from the device's
// multiprocessor count.
#pragma once

#include <algorithm>
#include <cstdint>

namespace opsq {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CTAs for `want` units of work when at most `cap` run at once and each strides over the rest
// (want or cap < 1 counts as 1): min(want, cap), except that where the work takes t =
// ceil(want / cap) > 1 trips, ceil(want / t) CTAs make every CTA's trip count equal within one,
// so the last trip is not left to a few CTAs (16384 units over cap 528: 512 CTAs x 32 trips, not
// 528 x 31 and a 32nd by 16). That grid is taken only while it keeps >= 7/8 of cap (always for
// t >= 8): with fewer CTAs than that, each trip has fewer bytes in flight, which can cost more
// than the partial trip saves (529 units over 528 would become 265 CTAs x 2 trips).
inline int64_t balanced_ctas(int64_t want, int64_t cap) {
  want = std::max<int64_t>(want, 1);
  cap = std::max<int64_t>(cap, 1);
  const int64_t even = ceil_div(want, ceil_div(want, cap));
  return 8 * even >= 7 * cap ? even : std::min(want, cap);
}

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
// occupancy, and balanced_ctas of that (quantize_4bit of 8192^2 at blocksize 64 on 132 SMs x 4
// CTAs: 512 CTAs x 32 trips).
template <auto Kern, int Threads>
int one_wave_grid(int64_t work_items, int64_t per_cta) {
  const int64_t want = ceil_div(std::max<int64_t>(work_items, 1), per_cta);
  return static_cast<int>(
      balanced_ctas(want, int64_t{sm_count()} * ctas_per_sm<Kern, Threads>()));
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
