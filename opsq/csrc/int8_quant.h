// The row (and column) quantization of int8_quant.cu, for the matmul family of int8_matmul.cu
// (int8_linear quantizes A, and a float weight, the way vectorwise_quant does).
#pragma once

#include <ATen/ATen.h>

namespace opsq {

struct Int8Stats {
  at::Tensor CA, CA_col, row_stats, col_stats, mask;
};

// vectorwise_quant (cols = false: CA, row_stats, mask) or double_quant (cols = true: also
// CA_col, col_stats) of A on its device, arguments already checked.
Int8Stats int8_quant(const at::Tensor& A, double threshold, bool cols);

}  // namespace opsq
