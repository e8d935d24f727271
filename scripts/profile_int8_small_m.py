"""Where Linear8bitLt's time goes at decode batch sizes (GPU machine; nsys is not available).

For the bench's int8_linear shapes and input (two outlier columns), threshold 0 and 6: the layer
is called back to back under torch.profiler (CUDA activity), and each kernel's mean duration is
printed with the mean span of one call (first kernel start to last kernel end). The quantizer
and the small-M kernel overlap (programmatic dependent launch), so the span is less than the
sum; span minus the small-M kernel's duration is the prologue's exposed share.

    python scripts/profile_int8_small_m.py [--calls 200]
"""
from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

from opsq.bench import INT8_DECODE_M, INT8_DECODE_SHAPES
from opsq.nn import Linear8bitLt


def kernel_name(name: str) -> str:
    """A profiler kernel name's base: "void opsq::(anonymous namespace)::rowreg_kernel<...>(...)"
    -> "rowreg_kernel" (scripts/profile_decode.py uses it too)."""
    name = re.sub(r"^void |\(anonymous namespace\)::", "", name)
    return name.split("<")[0].split("(")[0].split("::")[-1]


def profile(layer, x, calls: int) -> tuple[dict, float]:
    """Mean duration (us) per kernel name, and the mean span (us) of one call."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    with torch.no_grad():
        for _ in range(20):
            layer(x)
        torch.cuda.synchronize()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            # a spin kernel first, so the host queues every call before the GPU reaches them
            # (the spans then hold no host gaps between a call's two launches)
            torch.cuda._sleep(50_000_000)
            for _ in range(calls):
                layer(x)
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and e.device_time_total > 0 and "spin" not in e.name
                      and "sleep" not in e.name), key=lambda e: e.time_range.start)
    per_name: dict = defaultdict(list)
    for e in kernels:
        per_name[kernel_name(e.name)].append(e.time_range.end - e.time_range.start)
    per_call = max(1, len(kernels) // calls)
    spans = [kernels[i + per_call - 1].time_range.end - kernels[i].time_range.start
             for i in range(0, len(kernels) - per_call + 1, per_call)]
    mean = {name: sum(d) / len(d) for name, d in per_name.items()}
    return mean, sum(spans) / max(1, len(spans))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    torch.manual_seed(0)
    for K, N in INT8_DECODE_SHAPES:
        lin = torch.nn.Linear(K, N, bias=False).to("cuda", torch.float16)
        for M in INT8_DECODE_M:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            x[:, 7] = 8.0  # the bench's two outlier columns
            x[:, K // 2] = -9.0
            for thr in (0.0, 6.0):
                layer = Linear8bitLt.from_float(lin, threshold=thr, has_fp16_weights=False)
                mean, span = profile(layer.to("cuda"), x, args.calls)
                parts = ", ".join(f"{name} {us:.1f}" for name, us in
                                  sorted(mean.items(), key=lambda kv: -kv[1]))
                print(f"{M}x{K}->{N} t={thr:g}: span {span:.1f} us/call; kernels (us): {parts}")


if __name__ == "__main__":
    main()
