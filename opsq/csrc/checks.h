// Host-side argument validation of opsq's CUDA kernels. The messages follow the Python checks
// of opsq/meta (name the argument, show what was expected and what was received) and the
// exception types match: TypeError for a dtype, ValueError for a value or device,
// RuntimeError for a shape or element count.
//
// Messages are assembled as std::string before they reach TORCH_CHECK: numbers are formatted
// with std::to_string / snprintf, never streamed. The device toolchain links libstdc++ into the
// extension statically, and its iostream number formatting (locale facets of that private copy)
// crashed when a check failed; string insertion alone is safe.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <string>

#include "launch.h"

namespace opsq {

inline std::string fmt(int64_t v) { return std::to_string(v); }

inline std::string fmt(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

// [a, b, c] (a Python list)
inline std::string fmt_list(at::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

// (a, b, c) / (a,) (a Python tuple, as tuple(t.shape) prints)
inline std::string fmt_shape(at::IntArrayRef a) {
  std::string s = "(";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + (a.size() == 1 ? ",)" : ")");
}

inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    default: return c10::toString(t);
  }
}

inline std::string dtype_list(std::initializer_list<at::ScalarType> allowed) {
  std::string s = "[";
  bool first = true;
  for (auto t : allowed) {
    s += (first ? "" : ", ");
    s += dtype_name(t);
    first = false;
  }
  return s + "]";
}

// A tensor's dtype (check_dtype of opsq/meta/_common.py).
inline void check_dtype(const char* name, at::ScalarType got,
                        std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (auto t : allowed) ok = ok || (t == got);
  TORCH_CHECK_TYPE(ok, std::string(name) + " must have dtype in " + dtype_list(allowed) +
                           ", got " + dtype_name(got));
}

// A dtype passed as an argument (check_float_dtype / check_quant_storage of opsq/meta/_common.py).
inline void check_dtype_arg(const char* name, at::ScalarType got,
                            std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (auto t : allowed) ok = ok || (t == got);
  TORCH_CHECK_TYPE(ok, std::string(name) + " must be one of " + dtype_list(allowed) + ", got " +
                           dtype_name(got));
}

constexpr std::initializer_list<at::ScalarType> kFloatDtypes = {at::kHalf, at::kBFloat16,
                                                                at::kFloat};

constexpr std::initializer_list<at::ScalarType> kQuantStorageDtypes = {
    at::kByte, at::kChar, at::kShort, at::kInt, at::kLong, at::kHalf, at::kBFloat16, at::kFloat,
    at::kDouble};

// a float tensor (A, bias)
inline void check_float_dtype(const char* name, at::ScalarType got) {
  check_dtype(name, got, kFloatDtypes);
}

// the dtype argument of a dequantizing op
inline void check_float_dtype_arg(const char* name, at::ScalarType got) {
  check_dtype_arg(name, got, kFloatDtypes);
}

// quant_storage: a dtype argument (is_arg) or the dtype of a packed tensor
inline void check_quant_storage(const char* name, at::ScalarType got, bool is_arg) {
  if (is_arg) {
    check_dtype_arg(name, got, kQuantStorageDtypes);
  } else {
    check_dtype(name, got, kQuantStorageDtypes);
  }
}

// Blocksizes: the powers of two from kMinBlocksize to a maximum, BLOCKSIZES (4-bit ops, maximum
// kMaxBlocksize) and BLOCKWISE_BLOCKSIZES (8-bit blockwise ops, kMaxBlockwiseBlocksize) of
// opsq/_constants.py.
constexpr int64_t kMinBlocksize = 32;
constexpr int64_t kMaxBlocksize = 4096;
constexpr int64_t kMaxBlockwiseBlocksize = 16384;

// One of kMinBlocksize, 2 * kMinBlocksize, ..., max_blocksize; the message lists them as the
// Python tuple prints.
inline void check_blocksize(int64_t blocksize, const char* name = "blocksize",
                            int64_t max_blocksize = kMaxBlocksize) {
  bool ok = false;
  for (int64_t b = kMinBlocksize; b <= max_blocksize; b *= 2) ok = ok || (b == blocksize);
  if (ok) return;
  std::string allowed = "(";
  for (int64_t b = kMinBlocksize; b <= max_blocksize; b *= 2)
    allowed += (b == kMinBlocksize ? "" : ", ") + fmt(b);
  TORCH_CHECK_VALUE(false, std::string(name) + " must be one of " + allowed + "), got " +
                               fmt(blocksize));
}

// The blocksize of quantize_blockwise / dequantize_blockwise (check_blockwise_blocksize of
// opsq/meta/_common.py).
inline void check_blockwise_blocksize(int64_t blocksize, const char* name = "blocksize") {
  check_blocksize(blocksize, name, kMaxBlockwiseBlocksize);
}

// Returns true for "nf4", false for "fp4".
inline bool check_quant_type(c10::string_view quant_type) {
  const bool nf4 = quant_type == "nf4";
  TORCH_CHECK_VALUE(nf4 || quant_type == "fp4",
                    "quant_type must be one of ('nf4', 'fp4'), got '" + std::string(quant_type) +
                        "'");
  return nf4;
}

// A 4-bit weight layout (check_layout of opsq/meta/_common.py); true for "tiled16".
inline bool check_layout(c10::string_view layout) {
  const bool tiled = layout == "tiled16";
  TORCH_CHECK_VALUE(tiled || layout == "packed",
                    "layout must be one of ('packed', 'tiled16'), got '" + std::string(layout) +
                        "'");
  return tiled;
}

// What the tiled16 layout needs of a weight [N, K] (check_tiled16 of opsq/_tiled16.py);
// `name` is the shape argument's name in the messages ("shapeB", or dequantize_4bit's "shape").
inline void check_tiled16(int64_t blocksize, int64_t N, int64_t K, const char* name = "shapeB") {
  TORCH_CHECK_VALUE(blocksize == 64,
                    "layout 'tiled16' needs blocksize 64, got " + std::to_string(blocksize));
  TORCH_CHECK_VALUE(N % 16 == 0, "layout 'tiled16' needs " + std::string(name) +
                                     "[0] = N % 16 == 0, got " + std::to_string(N));
  TORCH_CHECK_VALUE(K % 256 == 0, "layout 'tiled16' needs " + std::string(name) +
                                      "[1] = K % 256 == 0, got " + std::to_string(K));
}

inline void check_same_device(const char* main_name, const at::Tensor& main, const char* name,
                              const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == main.device(),
                    std::string(name) + " must be on the same device as " + main_name + " (" +
                        main.device().str() + "), got " + t.device().str());
}
inline void check_same_device(const char* main_name, const at::Tensor& main, const char* name,
                              const std::optional<at::Tensor>& t) {
  if (t.has_value()) check_same_device(main_name, main, name, *t);
}

inline void check_cuda(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(),
                    std::string(name) + " must be a CUDA tensor, got device " + t.device().str());
}

inline void check_numel(const char* name, const at::Tensor& t, int64_t expected,
                        const std::string& what = "") {
  TORCH_CHECK(t.numel() == expected, std::string(name) + " must have " + fmt(expected) +
                                         " elements" + what + ", got " + fmt(t.numel()) +
                                         " (shape " + fmt_shape(t.sizes()) + ")");
}

inline void check_min_dim(const char* name, const at::Tensor& t, int64_t ndim) {
  TORCH_CHECK(t.dim() >= ndim, std::string(name) + " must have at least " + fmt(ndim) +
                                   " dimension(s), got shape " + fmt_shape(t.sizes()));
}

inline void check_dim(const char* name, const at::Tensor& t, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, std::string(name) + " must be " + fmt(ndim) + "-D, got shape " +
                                   fmt_shape(t.sizes()));
}

inline void check_threshold(double threshold) {
  // the rule of check_threshold in opsq/meta/_common.py: finite and >= 0 (inf is rejected)
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0,
                    "threshold must be a finite number >= 0 (0 disables outliers), got " +
                        fmt(threshold));
}

// Elements of a quant_storage tensor (itemsize bytes each) holding n 4-bit codes.
inline int64_t packed_numel(int64_t n, int64_t itemsize) {
  return ceil_div(ceil_div(n, 2), itemsize);
}

}  // namespace opsq
