// Shared by the torch-free kernel labs (gemv_lab.cu, optim_lab.cu): error check, median timing
// with CUDA events and a 256 MiB L2-flush write before each run, and the device-to-device copy
// bandwidth that the labs' percentages are relative to (the same method as `opsq bench`).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)

static char* g_flush = nullptr;
static const size_t kFlush = 256u << 20;

// Median microseconds of f() over `reps` runs (3 warm-up runs dropped), L2 flushed before each.
template <typename F> float time_med(F f, int reps = 30) {
  if (g_flush == nullptr) CK(cudaMalloc(&g_flush, kFlush));
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  std::vector<float> t;
  for (int r = 0; r < reps + 3; ++r) {
    CK(cudaMemsetAsync(g_flush, r & 0xff, kFlush));
    cudaEventRecord(a); f(); cudaEventRecord(b); CK(cudaEventSynchronize(b));
    float ms; cudaEventElapsedTime(&ms, a, b); if (r >= 3) t.push_back(ms * 1000.f);
  }
  cudaEventDestroy(a); cudaEventDestroy(b);
  std::sort(t.begin(), t.end()); return t[t.size() / 2];
}

// Device-to-device copy bandwidth in bytes/s (512 MiB read + 512 MiB written), printed.
inline double copy_bandwidth() {
  char *c0, *c1; const size_t cb = 512u << 20; CK(cudaMalloc(&c0, cb)); CK(cudaMalloc(&c1, cb));
  const float us = time_med([&] { cudaMemcpyAsync(c1, c0, cb, cudaMemcpyDeviceToDevice); }, 10);
  CK(cudaFree(c0)); CK(cudaFree(c1));
  const double B = 2.0 * cb / (us * 1e-6);
  printf("copy bandwidth %.2f TB/s\n", B / 1e12);
  return B;
}
