"""Where the compiled QLoRA step's time goes: torch.profiler over a few steps of the bf16-base
and the NF4 (opsq) models of ``opsq bench --only qlora``; prints the CUDA kernels by total time.
    python scripts/profile_qlora.py [--steps 5] [--trace DIR]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from opsq.bench import build_qlora_step

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=5)
p.add_argument("--trace", default=None, help="write chrome traces to this folder")
args = p.parse_args()
dev = torch.device("cuda")
x = torch.randn(8, 512, 4096, device=dev, dtype=torch.bfloat16)
for quantized in (False, True):
    name = "opsq_nf4" if quantized else "bf16_base"
    step = build_qlora_step(quantized, dev, x)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(f"==== {name}: {args.steps} steps ====")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(f"{args.trace}/qlora_{name}.json")
