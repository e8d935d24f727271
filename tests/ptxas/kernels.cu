// The kernel instantiations whose ptxas resources tests/test_ptxas_budget.py checks: the 8-bit
// optimizer update (optim.cu launches update8_kernel<T, O> for every T and O) and the decode
// gemv in the tiled16 layout (fourbit.cu launches gemv4_tiled16_kernel<T, NESTED, MERGED>).
// Compiled for sm_90 without torch; nothing here runs.
#include "opsq/csrc/gemv4.cuh"
#include "opsq/csrc/optim.cuh"

namespace opsq {
namespace {

template <typename T>
struct Update8 {
  void* k[5] = {reinterpret_cast<void*>(&update8_kernel<T, kAdam>),
                reinterpret_cast<void*>(&update8_kernel<T, kAdEMAMix>),
                reinterpret_cast<void*>(&update8_kernel<T, kLion>),
                reinterpret_cast<void*>(&update8_kernel<T, kMomentum>),
                reinterpret_cast<void*>(&update8_kernel<T, kRMSprop>)};
};

template <typename T>
struct Tiled16 {
  void* k[4] = {reinterpret_cast<void*>(&gemv4_tiled16_kernel<T, false, false>),
                reinterpret_cast<void*>(&gemv4_tiled16_kernel<T, true, false>),
                reinterpret_cast<void*>(&gemv4_tiled16_kernel<T, false, true>),
                reinterpret_cast<void*>(&gemv4_tiled16_kernel<T, true, true>)};
};

}  // namespace

void* ptxas_budget_kernels[] = {Update8<float>().k[0], Update8<__half>().k[0],
                                Update8<__nv_bfloat16>().k[0], Tiled16<__half>().k[0],
                                Tiled16<__nv_bfloat16>().k[0]};

}  // namespace opsq
