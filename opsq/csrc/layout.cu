// transform: int8 matrices between row-major and the legacy cuBLASLt tile orders
// (cublasLtOrder_t): col32 (COL32), col_turing (COL4_4R2_8C), col_ampere (COL32_2R_4R4).
// The index formulas are those of opsq/_layouts.py (checked byte for byte against
// cublasLtMatrixTransform's own output in shared/fixtures/cublaslt). One thread per element of
// the logical rows x cols matrix reads it from the source order and writes it to the target
// order; padding bytes of a tiled output are zero (the output is zero-initialised).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "ops.h"

namespace opsq {
namespace {

enum Order : int { kRow = 0, kCol32 = 1, kTuring = 2, kAmpere = 3 };

int parse_order(c10::string_view s, const char* name) {
  if (s == "row") return kRow;
  if (s == "col32") return kCol32;
  if (s == "col_turing") return kTuring;
  if (s == "col_ampere") return kAmpere;
  TORCH_CHECK_VALUE(false, std::string(name) +
                               " must be one of ('row', 'col32', 'col_turing', 'col_ampere'), "
                               "got '" + std::string(s) + "'");
  return kRow;
}

int64_t tiled_numel(int order, int64_t rows, int64_t cols) {
  const int64_t cols32 = ceil_div(cols, 32) * 32;
  switch (order) {
    case kRow: return rows * cols;
    case kCol32: return rows * cols32;
    case kTuring: return ceil_div(rows, 8) * 8 * cols32;
    default: return ceil_div(rows, 32) * 32 * cols32;
  }
}

__device__ __forceinline__ int64_t offset_of(int order, int64_t r, int64_t c, int64_t rows,
                                             int64_t cols) {
  if (order == kRow) return r * cols + c;
  const int64_t panel = c >> 5;
  const int64_t j = c & 31;
  if (order == kCol32) return panel * 32 * rows + r * 32 + j;
  if (order == kTuring) {
    const int64_t rows8 = (rows + 7) / 8 * 8;
    const int64_t i = r & 7;
    return panel * 32 * rows8 + (r >> 3) * 256 + (i & 1) * 128 + (j >> 2) * 16 + (i >> 1) * 4 +
           (j & 3);
  }
  const int64_t rows32 = (rows + 31) / 32 * 32;
  const int64_t i = r & 31;
  const int64_t slot = (((i & 7) >> 1) * 4 + (i >> 3)) * 2 + (i & 1);
  return panel * 32 * rows32 + (r >> 5) * 1024 + slot * 32 + j;
}

__global__ void transform_kernel(const int8_t* __restrict__ in, int8_t* __restrict__ out,
                                 int64_t rows, int64_t cols, int from, int to) {
  const int64_t n = rows * cols;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < n;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = idx / cols;
    const int64_t c = idx - r * cols;
    out[offset_of(to, r, c, rows, cols)] = in[offset_of(from, r, c, rows, cols)];
  }
}

}  // namespace

at::Tensor transform_cuda(const at::Tensor& A, c10::string_view from_order,
                          c10::string_view to_order, c10::SymIntArrayRef shape) {
  check_dtype("A", A.scalar_type(), {at::kChar});
  check_cuda("A", A);
  const int from = parse_order(from_order, "from_order");
  const int to = parse_order(to_order, "to_order");
  TORCH_CHECK_VALUE(shape.size() == 2,
                    "shape must be [rows, cols], got " + fmt(int64_t(shape.size())) + " sizes");
  const int64_t rows = shape[0].expect_int();
  const int64_t cols = shape[1].expect_int();
  TORCH_CHECK(rows >= 0 && cols >= 0, "shape must have non-negative sizes, got [" + fmt(rows) +
                                          ", " + fmt(cols) + "]");
  if (from == kRow) {
    check_dim("A", A, 2);
    TORCH_CHECK(A.size(0) == rows && A.size(1) == cols,
                "A (row-major) must have shape [" + fmt(rows) + ", " + fmt(cols) + "], got " +
                    fmt_shape(A.sizes()));
  } else {
    check_numel("A", A, tiled_numel(from, rows, cols),
                " (" + std::string(from_order) + " layout of a " + fmt(rows) + "x" + fmt(cols) +
                    " matrix, padding included)");
  }
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor src = A.contiguous();
  at::Tensor out = to == kRow ? at::empty({rows, cols}, A.options())
                              : at::zeros({tiled_numel(to, rows, cols)}, A.options());
  const int64_t n = rows * cols;
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), 65535LL * 16);
  transform_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      src.data_ptr<int8_t>(), out.data_ptr<int8_t>(), rows, cols, from, to);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace opsq
