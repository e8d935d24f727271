// The row (and column) quantization of int8_quant.cu, for the matmul family of int8_matmul.cu
// (int8_linear quantizes A, and a float weight, the way vectorwise_quant does).
#pragma once

#include <ATen/ATen.h>

#include "int8_matmul.cuh"

namespace opsq {

struct Int8Stats {
  at::Tensor CA, CA_col, row_stats, col_stats, mask;
};

// vectorwise_quant (cols = false: CA, row_stats, mask) or double_quant (cols = true: also
// CA_col, col_stats) of A on its device, arguments already checked.
Int8Stats int8_quant(const at::Tensor& A, double threshold, bool cols);

// Widest row (in elements) of int8_quant_small_outliers: its column bitset lives in shared memory.
constexpr int64_t kSmallMaxK = 65536;

// vectorwise_quant of a (rows x K, contiguous) at threshold > 0 (r.CA, r.row_stats; no mask)
// and its outlier columns (any |a| >= threshold) compacted as launch_outlier_compact writes
// them: idx (ascending, int64, room for K) and *cnt. One launch on the current stream, no host
// synchronisation; bytes equal int8_quant's + the compaction. Returns false, launching nothing,
// where it does not apply: rows outside 1..kSmallMRows (int8_linear's small-M rows), K outside
// 16..kSmallMaxK or K % 16 != 0, a not 16-byte aligned, or a device that cannot run the 8-CTA
// cluster (compute capability < 9.0, a build without sm_90 code, no room for the cluster).
bool int8_quant_small_outliers(const at::Tensor& a, double threshold, int64_t* idx,
                               int64_t* cnt, Int8Stats& r);

}  // namespace opsq
