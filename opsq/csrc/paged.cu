// Paged optimizer states (bitsandbytes' paged optimizers): tensors in CUDA unified memory
// (cudaMallocManaged), owned by the tensor (freed by its deleter), and an asynchronous prefetch
// to the GPU before an update. Under GPU memory pressure the driver evicts their pages to host
// memory instead of failing the allocation; they are outside torch's caching allocator, so
// torch.cuda.set_per_process_memory_fraction does not limit them.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"

namespace opsq {

// A zero tensor of `sizes` with the dtype and (CUDA) device of `like`.
at::Tensor paged_zeros(std::vector<int64_t> sizes, const at::Tensor& like) {
  check_cuda("like", like);
  const at::ScalarType dtype = like.scalar_type();
  const c10::DeviceIndex device = like.device().index();
  const c10::cuda::CUDAGuard guard(device);
  int64_t numel = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK_VALUE(s >= 0, "sizes must be non-negative, got " + fmt_list(sizes));
    numel *= s;
  }
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, bytes > 0 ? bytes : 1, cudaMemAttachGlobal));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = cudaMemsetAsync(ptr, 0, bytes, stream);
  if (err != cudaSuccess) {
    cudaFree(ptr);
    C10_CUDA_CHECK(err);
  }
  return at::from_blob(
      ptr, sizes, [](void* p) { cudaFree(p); },
      at::TensorOptions().dtype(dtype).device(at::kCUDA, device));
}

// Migrate t's pages to GPU `device` (or to the host for device < 0) on the current stream.
void prefetch(const at::Tensor& t, int64_t device) {
  if (t.nbytes() == 0) return;
  cudaMemLocation loc{};
  loc.type = device < 0 ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  loc.id = device < 0 ? 0 : static_cast<int>(device);
  C10_CUDA_CHECK(cudaMemPrefetchAsync(t.data_ptr(), t.nbytes(), loc, 0,
                                      at::cuda::getCurrentCUDAStream()));
}

// Whether ptr is CUDA managed (unified) memory.
bool is_managed(const at::Tensor& t) {
  if (t.data_ptr() == nullptr) return false;
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, t.data_ptr()) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeManaged;
}

}  // namespace opsq
