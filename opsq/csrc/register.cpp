// Registration of opsq's CUDA kernels. The schemas are defined once, in Python
// (opsq/_schemas.py, imported before this extension); here we only add CUDA implementations.
#include <torch/extension.h>

#include <torch/library.h>

#include <string>

#include "ops.h"

TORCH_LIBRARY_IMPL(opsq, CUDA, m) {
  m.impl("quantize_4bit", &opsq::quantize_4bit_cuda);
  m.impl("dequantize_4bit", &opsq::dequantize_4bit_cuda);
  m.impl("linear_4bit", &opsq::linear_4bit_cuda);
  m.impl("linear_4bit_merged", &opsq::linear_4bit_merged_cuda);
  m.impl("quantize_blockwise", &opsq::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &opsq::dequantize_blockwise_cuda);
  m.impl("vectorwise_quant", &opsq::vectorwise_quant_cuda);
  m.impl("double_quant", &opsq::double_quant_cuda);
  m.impl("igemmlt", &opsq::igemmlt_cuda);
  m.impl("mm_dequant", &opsq::mm_dequant_cuda);
  m.impl("int8_linear", &opsq::int8_linear_cuda);
  m.impl("transform", &opsq::transform_cuda);
  m.impl("optimizer_update_32bit", &opsq::optimizer_update_32bit_cuda);
  m.impl("optimizer_update_8bit_blockwise", &opsq::optimizer_update_8bit_blockwise_cuda);
}

namespace opsq {
// autograd.cpp: the Python half of the C++ Autograd kernels (the gradient path).
void set_autograd_callback(const std::string& name, pybind11::object fn);
bool has_autograd_callback(const std::string& name);
// paged.cu: paged optimizer states
at::Tensor paged_zeros(std::vector<int64_t> sizes, const at::Tensor& like);
void prefetch(const at::Tensor& t, int64_t device);
bool is_managed(const at::Tensor& t);
}  // namespace opsq

// `import opsq._C` loads the shared library, which runs the registrations above.
PYBIND11_MODULE(_C, m) {
  m.doc() = "opsq CUDA kernels (registered with TORCH_LIBRARY_IMPL(opsq, CUDA, ...)) and the "
            "C++ Autograd kernels of the layer ops (TORCH_LIBRARY_IMPL(opsq, AutogradCUDA, ...))";
  m.def("set_autograd_callback", &opsq::set_autograd_callback,
        "Register the Python callable that computes op `name` when a gradient is needed");
  m.def("has_autograd_callback", &opsq::has_autograd_callback);
  m.def("paged_zeros", &opsq::paged_zeros,
        "A zero tensor in CUDA unified memory (paged optimizer states) with the dtype and device of "
        "`like`, freed with the tensor");
  m.def("prefetch", &opsq::prefetch,
        "Migrate a unified-memory tensor to GPU `device` (host for device < 0), asynchronously");
  m.def("is_managed", &opsq::is_managed, "Whether the tensor's memory is CUDA unified memory");
  m.def("gemv_tiled16_supported", &opsq::gemv_tiled16_supported,
        "Whether the tiled16 decode kernel has sm_90 code that runs on CUDA device `device` "
        "(a weight there may take the tiled16 layout)");
}
