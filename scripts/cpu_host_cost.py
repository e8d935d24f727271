"""Host cost of small opsq calls on the CPU (reference kernels): microseconds a call, median of
``--repeats`` loops of ``--calls`` calls, at 1 x 64 -> 64 so the Python (layer, validation,
dispatch) dominates the arithmetic. Used for the CPU rows of benchmarks/NOTES.md.

    python3 scripts/cpu_host_cost.py [--calls 3000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from opsq import functional as F
from opsq.nn import Linear4bit, Linear8bitLt


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over ``repeats`` loops of the wall time of one call (us)."""
    loops = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        loops.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(loops)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    q4 = Linear4bit.from_float(nn.Linear(64, 64).to(torch.bfloat16), quant_type="nf4",
                               compress_statistics=True).to("cpu")
    q8 = Linear8bitLt.from_float(nn.Linear(64, 64).half(), threshold=6.0,
                                 has_fp16_weights=False).to("cpu")
    lin = nn.Linear(64, 64).to(torch.bfloat16)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    W = torch.randn(64, 64, dtype=torch.bfloat16)
    rows = [("nn.Linear bf16 1x64->64", lambda: lin(x), a.calls),
            ("Linear4bit nf4 nested 1x64->64", lambda: q4(x), a.calls),
            ("Linear8bitLt t=6 1x64->64", lambda: q8(x.half()), a.calls),
            ("F.quantize_4bit nf4 nested 64x64",
             lambda: F.quantize_4bit(W, quant_type="nf4", compress_statistics=True),
             max(1, a.calls // 3))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; us a call "
          f"(median of {a.repeats} loops)")
    with torch.no_grad():
        for name, fn, n in rows:
            fn()
            print(f"{name:36s} {per_call_us(fn, n, a.repeats):8.1f}")


if __name__ == "__main__":
    main()
