// C++ Autograd kernels of the ops a quantized layer calls on every forward (linear_4bit, and
// through its alias gemv_4bit; int8_linear), registered for AutogradCUDA.
//
// Why: the autograd kernel that torch.library.register_autograd installs (opsq/_autograd.py) is
// Python, and the dispatcher enters it on every call, under no_grad too: ~20 us of host time per
// layer call, more than the decode GEMV itself on the GPU. These kernels answer the common case
// (grad mode off, or no input requires grad) in C++: they step below autograd and redispatch
// to the CUDA kernel, the same thing the Python kernel does, without entering Python.
//
// When a gradient is needed they hand the call to Python: opsq/_autograd.py registers, per op,
// the apply() of a torch.autograd.Function built from the very setup_context/backward that
// register_autograd uses on every other device. One formula, one home; the CPU and Meta keys keep
// the Python registration. Registering for AutogradCUDA takes precedence over the Autograd alias
// key for CUDA tensors only.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/library.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "ops.h"

namespace py = pybind11;

namespace opsq {
namespace {

// op name -> Python callable (positional arguments in schema order -> output tensor).
std::mutex g_mutex;
std::unordered_map<std::string, py::object>& callbacks() {
  // Leaked on purpose: destroying py::objects at interpreter exit needs the GIL.
  static auto* m = new std::unordered_map<std::string, py::object>();
  return *m;
}

bool wants(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool wants(const std::optional<at::Tensor>& t) { return t.has_value() && wants(*t); }

py::object opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? py::cast(*t) : py::none();
}

py::list sym_list(c10::SymIntArrayRef shape) {
  py::list out;
  for (const c10::SymInt& s : shape) out.append(py::cast(s));
  return out;
}

// The caller holds the GIL (it built the Python arguments).
template <typename... Args>
at::Tensor call_python(const char* name, Args&&... args) {
  py::object fn;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = callbacks().find(name);
    TORCH_CHECK(it != callbacks().end(), "opsq::", name,
                ": no autograd callback registered (import opsq before calling the op)");
    fn = it->second;
  }
  try {
    return fn(std::forward<Args>(args)...).template cast<at::Tensor>();
  } catch (py::error_already_set& e) {
    // Hand the Python exception (e.g. a ValueError of the op's validation) back to Python as
    // itself: torch's python_error carries the interpreter's error state through C++ frames.
    e.restore();
    throw python_error();
  }
}

// ---- linear_4bit ---------------------------------------------------------------------------
template <const char* kName>
at::Tensor linear_4bit_autograd(c10::DispatchKeySet ks, const at::Tensor& A, const at::Tensor& B,
                                c10::SymIntArrayRef shapeB, const at::Tensor& absmax,
                                int64_t blocksize, c10::string_view quant_type,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code,
                                const std::optional<at::Tensor>& offset,
                                int64_t nested_blocksize, c10::string_view layout) {
  const bool grad = c10::GradMode::is_enabled() &&
                    (wants(A) || wants(absmax) || wants(bias) || wants(nested_absmax) ||
                     wants(nested_code) || wants(offset));
  if (!grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(kName, "")
                               .typed<decltype(linear_4bit_cuda)>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.redispatch(ks & c10::after_autograd_keyset, A, B, shapeB, absmax, blocksize,
                         quant_type, bias, nested_absmax, nested_code, offset, nested_blocksize,
                         layout);
  }
  // The dispatcher runs without the GIL: take it before building any Python object.
  py::gil_scoped_acquire gil;
  return call_python(kName + 6 /* after "opsq::" */, A, B, sym_list(shapeB), absmax, blocksize,
                     std::string(quant_type), opt(bias), opt(nested_absmax), opt(nested_code),
                     opt(offset), nested_blocksize, std::string(layout));
}

constexpr char kLinear4bit[] = "opsq::linear_4bit";

// ---- int8_linear ---------------------------------------------------------------------------
at::Tensor int8_linear_autograd(c10::DispatchKeySet ks, const at::Tensor& A, const at::Tensor& B,
                                const std::optional<at::Tensor>& SCB,
                                const std::optional<at::Tensor>& bias, double threshold) {
  const bool grad = c10::GradMode::is_enabled() &&
                    (wants(A) || wants(B) || wants(SCB) || wants(bias));
  if (!grad) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("opsq::int8_linear", "")
                               .typed<decltype(int8_linear_cuda)>();
    at::AutoDispatchBelowADInplaceOrView below;
    return op.redispatch(ks & c10::after_autograd_keyset, A, B, SCB, bias, threshold);
  }
  py::gil_scoped_acquire gil;  // before building any Python object (see above)
  return call_python("int8_linear", A, B, opt(SCB), opt(bias), threshold);
}

}  // namespace

// Called by opsq/_autograd.py once the extension is loaded.
void set_autograd_callback(const std::string& name, py::object fn) {
  std::lock_guard<std::mutex> lock(g_mutex);
  callbacks()[name] = std::move(fn);
}

bool has_autograd_callback(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return callbacks().count(name) > 0;
}

}  // namespace opsq

TORCH_LIBRARY_IMPL(opsq, AutogradCUDA, m) {
  m.impl("linear_4bit", &opsq::linear_4bit_autograd<opsq::kLinear4bit>);
  m.impl("int8_linear", &opsq::int8_linear_autograd);
}
