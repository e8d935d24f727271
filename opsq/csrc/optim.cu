// CUDA kernels of the in-place optimizer updates (optimizer_update_32bit,
// optimizer_update_8bit_blockwise). Semantics of opsq/reference/optim.py, whose docstring gives
// the formulas (bitsandbytes 0.50's optimizers; Dettmers et al., "8-bit Optimizers via
// Block-wise Quantization", ICLR 2022). Every fp32 operation of the reference is one rounded
// operation here, in the reference's order (mul_rn / add_rn: no contraction into FMAs); the
// scalars the reference computes in Python (bias corrections, 1 - beta, lr * wd, ...) are
// computed on the host in double and rounded once to fp32, as torch rounds a Python scalar
// operand of an fp32 tensor op.
//
// 32-bit: one elementwise pass (4 elements a thread, grid-stride). With max_unorm > 0 a first
// pass computes the squared norms of the update (and of p when param_norm <= 0) as per-CTA
// partial sums over a fixed grid, added in a fixed order by a one-CTA kernel (deterministic),
// which the update pass then reads: no host synchronisation (CUDA-graph safe).
// 8-bit blockwise: 64 threads own a block of 256 elements (4 each); the states are decoded
// (map[code] * absmax), updated in registers, the parameter written, then the block's new
// max |state| is reduced (warp shuffles + one shared word) and the states re-encoded with the
// map sorted in shared memory (encode8.cuh). A CTA (256 threads) holds 4 blocks at a time and
// strides over the rest, so the two encoders are built once per CTA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>
#include <utility>
#include <vector>

#include "checks.h"
#include "common.cuh"
#include "launch.h"
#include "optim.cuh"
#include "ops.h"

namespace opsq {
namespace {

constexpr int kNormCtas = 512;          // fixed grid of the norm pass (its partial sums)

// Python's repr of a float (the f-string of the Python checks): shortest round-trip digits,
// ".0" appended to an integral value.
std::string fmt_py(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  if (v == std::floor(v) && std::fabs(v) < 1e16) {
    std::snprintf(buf, sizeof(buf), "%.1f", v);
    return buf;
  }
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

Opt parse_optimizer(c10::string_view name) {
  if (name == "adam") return kAdam;
  if (name == "ademamix") return kAdEMAMix;
  if (name == "lion") return kLion;
  if (name == "momentum") return kMomentum;
  if (name == "rmsprop") return kRMSprop;
  TORCH_CHECK_VALUE(false, "optimizer_name must be one of ('adam', 'ademamix', 'lion', "
                           "'momentum', 'rmsprop'), got '" + std::string(name) + "'");
  return kAdam;
}

bool two_state(Opt o) { return o == kAdam || o == kAdEMAMix; }

// _check_common of opsq/meta/optim.py
Opt check_common(c10::string_view optimizer_name, const at::Tensor& g, const at::Tensor& p,
                 const std::optional<at::Tensor>& state2, double max_unorm, double beta1,
                 double beta2, double beta3, double alpha, double eps, double weight_decay,
                 int64_t step, double lr, double gnorm_scale) {
  const Opt o = parse_optimizer(optimizer_name);
  check_float_dtype("p", p.scalar_type());
  check_float_dtype("g", g.scalar_type());
  TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(),
                   std::string("g must have the dtype of p (") + dtype_name(p.scalar_type()) +
                       "), got " + dtype_name(g.scalar_type()));
  TORCH_CHECK(g.sizes() == p.sizes(), "g must have the shape of p " + fmt_shape(p.sizes()) +
                                          ", got " + fmt_shape(g.sizes()));
  const std::string quoted = "'" + std::string(optimizer_name) + "'";
  if (two_state(o)) {
    TORCH_CHECK_VALUE(state2.has_value(), "state2 is required for optimizer_name=" + quoted);
  } else {
    TORCH_CHECK_VALUE(!state2.has_value(),
                      "state2 must be None for optimizer_name=" + quoted + " (one state)");
  }
  const double betas[3] = {beta1, beta2, beta3};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK_VALUE(betas[i] >= 0.0 && betas[i] < 1.0,
                      "beta" + std::to_string(i + 1) + " must be in [0, 1), got " + fmt_py(betas[i]));
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got " + fmt_py(eps));
  TORCH_CHECK_VALUE(lr >= 0.0, "lr must be >= 0, got " + fmt_py(lr));
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got " + fmt_py(weight_decay));
  TORCH_CHECK_VALUE(max_unorm >= 0.0, "max_unorm must be >= 0, got " + fmt_py(max_unorm));
  TORCH_CHECK_VALUE(gnorm_scale >= 0.0, "gnorm_scale must be >= 0, got " + fmt_py(gnorm_scale));
  TORCH_CHECK_VALUE(alpha >= 0.0, "alpha must be >= 0, got " + fmt_py(alpha));
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (1 on the first update), got " + fmt(step));
  return o;
}

// ---- 32-bit ---------------------------------------------------------------------------------
struct States32 {
  float* s1;   // (n) or AdEMAMix (2, n): m1 then m2
  float* s2;   // (n) or null
};

// norms[0] += sum u^2, norms[1] += sum p'^2 (p after decoupled weight decay), per CTA partials.
template <typename T, Opt O>
__global__ void __launch_bounds__(kThreads)
norm_pass_kernel(const T* __restrict__ g, const T* __restrict__ p, States32 st, int64_t n,
                 bool vec, Hyper h, float* __restrict__ partial) {
  float su = 0.0f, sp = 0.0f;
  const int64_t stride = int64_t{gridDim.x} * kThreads * 4;
  for (int64_t e = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * 4; e < n; e += stride) {
    float gv[4], pv[4], a[4], b[4] = {0, 0, 0, 0};
    load4<T>(g, e, n, vec, gv);
    load4<T>(p, e, n, vec, pv);
    load4<float>(st.s1, e, n, vec, a);
    if (st.s2) load4<float>(st.s2, e, n, vec, b);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (e + j >= n) continue;
      float pp = pv[j], s1 = a[j], s1b = 0.0f, s2 = b[j], dir, u2;
      update_one<O>(h, mul_rn(gv[j], h.gnorm_scale), pp, s1, s1b, s2, dir, u2);
      su += u2;
      sp += mul_rn(pp, pp);
    }
  }
  __shared__ float red[2][kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    su += __shfl_xor_sync(0xffffffffu, su, o);
    sp += __shfl_xor_sync(0xffffffffu, sp, o);
  }
  if ((threadIdx.x & 31) == 0) {
    red[0][threadIdx.x >> 5] = su;
    red[1][threadIdx.x >> 5] = sp;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.0f, b = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) { a += red[0][w]; b += red[1][w]; }
    partial[blockIdx.x] = a;
    partial[kNormCtas + blockIdx.x] = b;
  }
}

// norms = the partial sums added in CTA order; unorm_vec (if any) = ||u||^2.
__global__ void __launch_bounds__(32)
norm_finish_kernel(const float* __restrict__ partial, float* __restrict__ norms,
                   float* __restrict__ unorm_vec) {
  if (threadIdx.x != 0) return;
  float a = 0.0f, b = 0.0f;
  for (int i = 0; i < kNormCtas; ++i) { a += partial[i]; b += partial[kNormCtas + i]; }
  norms[0] = a;
  norms[1] = b;
  if (unorm_vec) unorm_vec[0] = a;
}

template <typename T, Opt O>
__global__ void __launch_bounds__(kThreads)
update32_kernel(const T* __restrict__ g, T* __restrict__ p, States32 st, int64_t n, bool vec,
                Hyper h, const float* __restrict__ norms) {
  const float scale = norms ? clip_scale(O, h, norms) : 1.0f;
  const float step = mul_rn(scale, h.step_size);
  const int64_t stride = int64_t{gridDim.x} * kThreads * 4;
  for (int64_t e = (int64_t{blockIdx.x} * kThreads + threadIdx.x) * 4; e < n; e += stride) {
    float gv[4], pv[4], a[4], ab[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
    load4<T>(g, e, n, vec, gv);
    load4<T>(p, e, n, vec, pv);
    load4<float>(st.s1, e, n, vec, a);
    if (O == kAdEMAMix) load4<float>(st.s1 + n, e, n, vec, ab);
    if (st.s2) load4<float>(st.s2, e, n, vec, b);
    float np[4], na[4], nab[4], nb[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float gf = mul_rn(gv[j], h.gnorm_scale);
      float pp = pv[j], s1 = a[j], s1b = ab[j], s2 = b[j], dir, u2;
      update_one<O>(h, gf, pp, s1, s1b, s2, dir, u2);
      pp = add_rn(pp, -mul_rn(step, dir));
      const bool keep = h.skip_zeros && gf == 0.0f;
      np[j] = keep ? pv[j] : pp;
      na[j] = keep ? a[j] : s1;
      nab[j] = keep ? ab[j] : s1b;
      nb[j] = keep ? b[j] : s2;
    }
    store4<T>(p, e, n, vec, np);
    store4<float>(st.s1, e, n, vec, na);
    if (O == kAdEMAMix) store4<float>(st.s1 + n, e, n, vec, nab);
    if (st.s2) store4<float>(st.s2, e, n, vec, nb);
  }
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Contiguous stand-ins for the tensors an update writes: operator() returns t itself when it is
// contiguous (or undefined), else a contiguous copy that write_back() copies into t.
class Written {
 public:
  at::Tensor operator()(const at::Tensor& t) {
    if (!t.defined() || t.is_contiguous()) return t;
    at::Tensor c = t.contiguous();
    pending_.emplace_back(t, c);
    return c;
  }
  void write_back() {
    for (auto& [dst, src] : pending_) dst.copy_(src);
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;
};

template <typename T, Opt O>
void launch32(const at::Tensor& g, at::Tensor& p, at::Tensor& s1, std::optional<at::Tensor>& s2,
              std::optional<at::Tensor>& unorm_vec, const Hyper& h) {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = p.numel();
  const T* gp = reinterpret_cast<const T*>(g.data_ptr());
  T* pp = reinterpret_cast<T*>(p.data_ptr());
  States32 st{s1.data_ptr<float>(), s2.has_value() ? s2->data_ptr<float>() : nullptr};
  const int vb = 4 * static_cast<int>(sizeof(T));
  const bool vec = n % 4 == 0 && aligned(gp, vb) && aligned(pp, vb) && aligned(st.s1, 16) &&
                   (st.s2 == nullptr || aligned(st.s2, 16));
  const float* norms = nullptr;
  at::Tensor scratch;
  if (h.max_unorm > 0.0f) {
    scratch = at::empty({2 * kNormCtas + 2}, p.options().dtype(at::kFloat));
    float* partial = scratch.data_ptr<float>();
    norm_pass_kernel<T, O><<<kNormCtas, kThreads, 0, stream>>>(gp, pp, st, n, vec, h, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    norm_finish_kernel<<<1, 32, 0, stream>>>(partial, partial + 2 * kNormCtas,
                                             unorm_vec.has_value() ? unorm_vec->data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    norms = partial + 2 * kNormCtas;
  }
  const int grid = grid_for(ceil_div(n, 4), kThreads);
  update32_kernel<T, O><<<grid, kThreads, 0, stream>>>(gp, pp, st, n, vec, h, norms);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Opt O>
void dispatch32_dtype(const at::Tensor& g, at::Tensor& p, at::Tensor& s1,
                      std::optional<at::Tensor>& s2, std::optional<at::Tensor>& unorm_vec,
                      const Hyper& h) {
  switch (p.scalar_type()) {
    case at::kFloat: launch32<float, O>(g, p, s1, s2, unorm_vec, h); break;
    case at::kHalf: launch32<__half, O>(g, p, s1, s2, unorm_vec, h); break;
    default: launch32<__nv_bfloat16, O>(g, p, s1, s2, unorm_vec, h); break;
  }
}

template <typename T, Opt O>
void launch8(const at::Tensor& g, at::Tensor& p, const States8& st, const Hyper& h) {
  const int64_t n = p.numel();
  const int64_t nblocks = ceil_div(n, kOptBlock);
  const T* gp = reinterpret_cast<const T*>(g.data_ptr());
  T* pp = reinterpret_cast<T*>(p.data_ptr());
  const int vb = 4 * static_cast<int>(sizeof(T));
  const bool vec = n % 4 == 0 && aligned(gp, vb) && aligned(pp, vb) && aligned(st.c1, 4) &&
                   (st.c2 == nullptr || aligned(st.c2, 4));
  // persistent CTAs: each builds the encoders once
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(nblocks, kThreads / kGroup),
                                                      int64_t{sm_count()} * 4));
  update8_kernel<T, O><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      gp, pp, st, n, nblocks, vec, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Opt O>
void dispatch8_dtype(const at::Tensor& g, at::Tensor& p, const States8& st, const Hyper& h) {
  switch (p.scalar_type()) {
    case at::kFloat: launch8<float, O>(g, p, st, h); break;
    case at::kHalf: launch8<__half, O>(g, p, st, h); break;
    default: launch8<__nv_bfloat16, O>(g, p, st, h); break;
  }
}

// fn<O>() for the runtime optimizer o
template <template <Opt> class F, typename... Args>
void by_optimizer(Opt o, Args&&... args) {
  switch (o) {
    case kAdam: F<kAdam>::run(std::forward<Args>(args)...); break;
    case kAdEMAMix: F<kAdEMAMix>::run(std::forward<Args>(args)...); break;
    case kLion: F<kLion>::run(std::forward<Args>(args)...); break;
    case kMomentum: F<kMomentum>::run(std::forward<Args>(args)...); break;
    default: F<kRMSprop>::run(std::forward<Args>(args)...); break;
  }
}

template <Opt O> struct Run32 {
  template <typename... A> static void run(A&&... a) { dispatch32_dtype<O>(std::forward<A>(a)...); }
};
template <Opt O> struct Run8 {
  template <typename... A> static void run(A&&... a) { dispatch8_dtype<O>(std::forward<A>(a)...); }
};

}  // namespace

void optimizer_update_32bit_cuda(c10::string_view optimizer_name, const at::Tensor& g,
                                 at::Tensor& p, at::Tensor& state1,
                                 const std::optional<at::Tensor>& state2,
                                 const std::optional<at::Tensor>& unorm_vec, double max_unorm,
                                 double param_norm, double beta1, double beta2, double beta3,
                                 double alpha, double eps, double weight_decay, c10::SymInt step,
                                 double lr, double gnorm_scale, bool skip_zeros) {
  // check_optimizer_update_32bit of opsq/meta/optim.py
  const int64_t t = step.expect_int();
  const Opt o = check_common(optimizer_name, g, p, state2, max_unorm, beta1, beta2, beta3, alpha,
                             eps, weight_decay, t, lr, gnorm_scale);
  const int64_t n = p.numel();
  check_dtype("state1", state1.scalar_type(), {at::kFloat});
  check_numel("state1", state1, o == kAdEMAMix ? 2 * n : n,
              o == kAdEMAMix ? " (2 x p.numel())" : " (p.numel())");
  if (state2.has_value()) {
    check_dtype("state2", state2->scalar_type(), {at::kFloat});
    check_numel("state2", *state2, n, " (p.numel())");
  }
  if (max_unorm > 0.0) {
    TORCH_CHECK_VALUE(o != kAdEMAMix, "max_unorm > 0 is not supported for optimizer_name="
                                      "'ademamix' (bitsandbytes ignores it there); pass 0.0");
    TORCH_CHECK_VALUE(unorm_vec.has_value(),
                      "unorm_vec is required when max_unorm > 0 (got " + fmt_py(max_unorm) + ")");
  }
  if (unorm_vec.has_value()) {
    check_dtype("unorm_vec", unorm_vec->scalar_type(), {at::kFloat});
    check_numel("unorm_vec", *unorm_vec, 1);
  }
  check_same_device("p", p, "g", g);
  check_same_device("p", p, "state1", state1);
  check_same_device("p", p, "state2", state2);
  check_same_device("p", p, "unorm_vec", unorm_vec);
  check_cuda("p", p);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(p.device());
  const Hyper h = make_hyper(o, beta1, beta2, beta3, alpha, eps, weight_decay, t, lr, gnorm_scale,
                             max_unorm, param_norm, skip_zeros);
  const at::Tensor gc = g.contiguous();
  Written written;
  at::Tensor pc = written(p), s1c = written(state1);
  std::optional<at::Tensor> s2c, uv = unorm_vec;
  if (state2.has_value()) s2c = written(*state2);
  by_optimizer<Run32>(o, gc, pc, s1c, s2c, uv, h);
  written.write_back();
}

void optimizer_update_8bit_blockwise_cuda(
    c10::string_view optimizer_name, const at::Tensor& g, at::Tensor& p, at::Tensor& state1,
    const std::optional<at::Tensor>& state2, double beta1, double beta2, double beta3,
    double alpha, double eps, c10::SymInt step, double lr, const at::Tensor& qmap1,
    const std::optional<at::Tensor>& qmap2, at::Tensor& absmax1,
    const std::optional<at::Tensor>& absmax2, double weight_decay, double gnorm_scale,
    bool skip_zeros) {
  // check_optimizer_update_8bit_blockwise of opsq/meta/optim.py
  const int64_t t = step.expect_int();
  const Opt o = check_common(optimizer_name, g, p, state2, 0.0, beta1, beta2, beta3, alpha, eps,
                             weight_decay, t, lr, gnorm_scale);
  const int64_t n = p.numel();
  const int64_t blocks = ceil_div(n, kOptBlock);
  const bool two = o == kAdEMAMix;
  check_dtype("state1", state1.scalar_type(), {at::kByte});
  check_numel("state1", state1, two ? 2 * n : n, two ? " (2 x p.numel())" : " (p.numel())");
  check_dtype("qmap1", qmap1.scalar_type(), {at::kFloat});
  check_numel("qmap1", qmap1, 256);
  check_dtype("absmax1", absmax1.scalar_type(), {at::kFloat});
  check_numel("absmax1", absmax1, two ? 2 * blocks : blocks,
              std::string(" (") + (two ? "2 x " : "") + "one per block of 256 of " + fmt(n) +
                  " elements)");
  if (state2.has_value()) {
    check_dtype("state2", state2->scalar_type(), {at::kByte});
    check_numel("state2", *state2, n, " (p.numel())");
    TORCH_CHECK_VALUE(qmap2.has_value(), "qmap2 is required with state2");
    TORCH_CHECK_VALUE(absmax2.has_value(), "absmax2 is required with state2");
    check_dtype("qmap2", qmap2->scalar_type(), {at::kFloat});
    check_numel("qmap2", *qmap2, 256);
    check_dtype("absmax2", absmax2->scalar_type(), {at::kFloat});
    check_numel("absmax2", *absmax2, blocks,
                " (one per block of 256 of " + fmt(n) + " elements)");
  }
  check_same_device("p", p, "g", g);
  check_same_device("p", p, "state1", state1);
  check_same_device("p", p, "state2", state2);
  check_same_device("p", p, "qmap1", qmap1);
  check_same_device("p", p, "qmap2", qmap2);
  check_same_device("p", p, "absmax1", absmax1);
  check_same_device("p", p, "absmax2", absmax2);
  check_cuda("p", p);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(p.device());
  const Hyper h = make_hyper(o, beta1, beta2, beta3, alpha, eps, weight_decay, t, lr, gnorm_scale,
                             0.0, 0.0, skip_zeros);
  const at::Tensor gc = g.contiguous();
  const at::Tensor m1 = qmap1.contiguous();
  const at::Tensor m2 = qmap2.has_value() ? qmap2->contiguous() : at::Tensor();
  Written written;
  at::Tensor pc = written(p), s1c = written(state1), a1c = written(absmax1);
  const at::Tensor s2c = written(state2.value_or(at::Tensor()));
  const at::Tensor a2c = written(absmax2.value_or(at::Tensor()));
  const States8 st{s1c.data_ptr<uint8_t>(), s2c.defined() ? s2c.data_ptr<uint8_t>() : nullptr,
                   a1c.data_ptr<float>(), a2c.defined() ? a2c.data_ptr<float>() : nullptr,
                   m1.data_ptr<float>(), m2.defined() ? m2.data_ptr<float>() : nullptr};
  by_optimizer<Run8>(o, gc, pc, st, h);
  written.write_back();
}

}  // namespace opsq
