// Registration of opsq's CUDA kernels. The schemas are defined once, in Python
// (opsq/_schemas.py, imported before this extension); here we only add CUDA implementations.
#include <Python.h>

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(opsq, CUDA, m) {
  m.impl("quantize_4bit", &opsq::quantize_4bit_cuda);
  m.impl("dequantize_4bit", &opsq::dequantize_4bit_cuda);
  m.impl("gemv_4bit", &opsq::linear_4bit_cuda);
  m.impl("linear_4bit", &opsq::linear_4bit_cuda);
  m.impl("quantize_blockwise", &opsq::quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &opsq::dequantize_blockwise_cuda);
  m.impl("vectorwise_quant", &opsq::vectorwise_quant_cuda);
  m.impl("double_quant", &opsq::double_quant_cuda);
  m.impl("igemmlt", &opsq::igemmlt_cuda);
  m.impl("mm_dequant", &opsq::mm_dequant_cuda);
  m.impl("int8_linear", &opsq::int8_linear_cuda);
  m.impl("transform", &opsq::transform_cuda);
}

// `import opsq._C` loads the shared library, which runs the registration above.
static struct PyModuleDef opsq_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "opsq CUDA kernels (registered with TORCH_LIBRARY_IMPL(opsq, CUDA, ...))", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&opsq_c_module); }
