// Host entry points of opsq's CUDA kernels, registered in register.cpp under
// TORCH_LIBRARY_IMPL(opsq, CUDA, m). Each validates its arguments (messages and exception types
// as opsq/meta), runs under a CUDAGuard on the current stream and allocates through torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/SymInt.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace opsq {

// ---- 4-bit -------------------------------------------------------------------------------
// dequantize_4bit reads a weight in either layout ("packed", or "tiled16" for a 2-D shape).
std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      c10::string_view quant_type,
                                                      at::ScalarType quant_storage);
at::Tensor dequantize_4bit_cuda(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                                c10::string_view quant_type, c10::SymIntArrayRef shape,
                                at::ScalarType dtype,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize, c10::string_view layout);
// linear_4bit (gemv_4bit is its alias; the kernel is chosen by the number of rows and the
// weight's layout, "packed" or "tiled16").
at::Tensor linear_4bit_cuda(const at::Tensor& A, const at::Tensor& B, c10::SymIntArrayRef shapeB,
                            const at::Tensor& absmax, int64_t blocksize,
                            c10::string_view quant_type, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& nested_code,
                            const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                            c10::string_view layout);
// linear_4bit_merged: several weights of one A, one tiled16 launch where the kernel serves them
// all (else each as linear_4bit).
std::vector<at::Tensor> linear_4bit_merged_cuda(
    const at::Tensor& A, at::TensorList B, c10::SymIntArrayRef N, at::TensorList absmax,
    int64_t blocksize, c10::string_view quant_type,
    const c10::List<std::optional<at::Tensor>>& bias,
    const c10::List<std::optional<at::Tensor>>& nested_absmax,
    const c10::List<std::optional<at::Tensor>>& nested_code,
    const c10::List<std::optional<at::Tensor>>& offset, int64_t nested_blocksize,
    c10::string_view layout);
// Whether the tiled16 decode kernel has sm_90 code that runs on CUDA device `device` (what makes
// a weight there eligible for the tiled16 layout; opsq/_tiled16.py, opsq/nn/linear4bit.py).
bool gemv_tiled16_supported(int64_t device);

// ---- 8-bit blockwise ---------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& A,
                                                           const at::Tensor& code,
                                                           int64_t blocksize);
at::Tensor dequantize_blockwise_cuda(const at::Tensor& A, const at::Tensor& absmax,
                                     const at::Tensor& code, int64_t blocksize,
                                     at::ScalarType dtype);

// ---- LLM.int8 ----------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> vectorwise_quant_cuda(const at::Tensor& A,
                                                                     double threshold);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> double_quant_cuda(
    const at::Tensor& A, double threshold);
at::Tensor igemmlt_cuda(const at::Tensor& A, const at::Tensor& B);
at::Tensor mm_dequant_cuda(const at::Tensor& A, const at::Tensor& row_stats,
                           const at::Tensor& col_stats, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> dtype);
at::Tensor int8_linear_cuda(const at::Tensor& A, const at::Tensor& B,
                            const std::optional<at::Tensor>& SCB,
                            const std::optional<at::Tensor>& bias, double threshold);

// ---- optimizer updates (optim.cu): write p and the states in place ---------------------------
void optimizer_update_32bit_cuda(c10::string_view optimizer_name, const at::Tensor& g,
                                 at::Tensor& p, at::Tensor& state1,
                                 const std::optional<at::Tensor>& state2,
                                 const std::optional<at::Tensor>& unorm_vec, double max_unorm,
                                 double param_norm, double beta1, double beta2, double beta3,
                                 double alpha, double eps, double weight_decay, c10::SymInt step,
                                 double lr, double gnorm_scale, bool skip_zeros);
void optimizer_update_8bit_blockwise_cuda(
    c10::string_view optimizer_name, const at::Tensor& g, at::Tensor& p, at::Tensor& state1,
    const std::optional<at::Tensor>& state2, double beta1, double beta2, double beta3,
    double alpha, double eps, c10::SymInt step, double lr, const at::Tensor& qmap1,
    const std::optional<at::Tensor>& qmap2, at::Tensor& absmax1,
    const std::optional<at::Tensor>& absmax2, double weight_decay, double gnorm_scale,
    bool skip_zeros);

// ---- legacy cuBLASLt int8 layouts ----------------------------------------------------------
at::Tensor transform_cuda(const at::Tensor& A, c10::string_view from_order,
                          c10::string_view to_order, c10::SymIntArrayRef shape);

}  // namespace opsq
