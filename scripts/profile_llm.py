"""Where a decode token's host time goes (GPU machine).

1. Host cost of one quantized-layer call in eager (grad on, no_grad, inference_mode):
   ``Linear4bit`` / ``Linear8bitLt`` against ``nn.Linear``, 1 x 4096 -> 4096 bf16, measured as
   the CPU time of many back-to-back calls with the GPU never the bottleneck (a tiny layer).
2. Compiled ``generate`` (static cache, ``CompileConfig(fullgraph=True)``) of the benchmark's
   Llama model in bf16 and NF4: torch.profiler (CPU + CUDA) over the decode tokens, the top
   host functions by self CPU time per token, CUDA-graph launches / memcpys per token,
   ``cudagraph_skips``, recompiles; and the same for ``opsq.decoding.StaticGreedyDecoder``.

    python scripts/profile_llm.py --layers 8 --tokens 32
"""
from __future__ import annotations

import argparse
import time

import torch


def host_cost(n: int = 2000) -> None:
    from opsq.nn import Linear4bit, Linear8bitLt
    dev = "cuda"
    torch.manual_seed(0)
    # small enough that the GPU never limits the loop: the CPU time per call is the host cost
    lin = torch.nn.Linear(512, 512, bias=False, device=dev, dtype=torch.bfloat16)
    lin.requires_grad_(False)
    layers = {
        "nn.Linear bf16": lin,
        "Linear4bit nf4": Linear4bit.from_float(lin, quant_type="nf4",
                                                compute_dtype=torch.bfloat16),
        "Linear4bit nf4 nested": Linear4bit.from_float(lin, quant_type="nf4",
                                                       compress_statistics=True,
                                                       compute_dtype=torch.bfloat16),
        "Linear8bitLt t=6": Linear8bitLt.from_float(lin, threshold=6.0),
        "Linear8bitLt t=0": Linear8bitLt.from_float(lin, threshold=0.0),
    }
    x = torch.randn(1, 512, device=dev, dtype=torch.bfloat16)
    print("## host cost of one layer call (us, CPU time per call; 1x512->512 bf16)")
    print(f"{'layer':24s} {'grad on':>9s} {'no_grad':>9s} {'inference':>10s} {'gpu us':>8s}")
    for name, layer in layers.items():
        res = []
        for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with ctx():
                for _ in range(50):
                    layer(x)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n):
                    layer(x)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
            res.append((t1 - t0) / n * 1e6)
        from triton.testing import do_bench
        with torch.no_grad():
            g = do_bench(lambda: layer(x), return_mode="median") * 1e3
        print(f"{name:24s} {res[0]:9.1f} {res[1]:9.1f} {res[2]:10.1f} {g:8.1f}")


def profile_generate(variant: str, layers: int, tokens: int) -> None:
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile
    from transformers import CompileConfig

    from opsq.bench_llm import build_llm
    from opsq.decoding import StaticGreedyDecoder
    dev = torch.device("cuda")
    model = build_llm(variant, dev, layers)
    prompt = torch.randint(3, 32000, (1, 32), device=dev)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=tokens,
              min_new_tokens=tokens, cache_implementation="static",
              compile_config=CompileConfig(fullgraph=True))
    skips0 = counters["inductor"]["cudagraph_skips"]
    t0 = time.time()
    model.generate(prompt, **kw)
    print(f"\n## {variant}, {layers} layers: first compiled generate {time.time() - t0:.1f} s")
    model.generate(prompt, **kw)
    graphs0 = counters["stats"]["unique_graphs"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(prompt, **kw)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(prompt, **kw)
        torch.cuda.synchronize()
    print(f"wall {wall / tokens:.3f} ms/token (incl. prefill); cudagraph_skips "
          f"{counters['inductor']['cudagraph_skips'] - skips0}; graphs compiled while timed "
          f"{counters['stats']['unique_graphs'] - graphs0}; recompiles "
          f"{dict(counters['recompiles']) if 'recompiles' in counters else {}}")
    _report(prof, tokens)
    if hasattr(model, "_compiled_call"):
        del model._compiled_call
    torch._dynamo.reset()
    dec = StaticGreedyDecoder(model, 32 + tokens + 8)
    dec.generate(prompt, tokens)
    dec.generate(prompt, tokens)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    dec.generate(prompt, tokens)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        dec.generate(prompt, tokens)
        torch.cuda.synchronize()
    print(f"\n## {variant} StaticGreedyDecoder: wall {wall / tokens:.3f} ms/token (incl. "
          "prefill)")
    _report(prof, tokens)
    del dec, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def _report(prof, tokens: int) -> None:
    ka = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ka) / 1e3 / tokens
    print(f"GPU busy {gpu:.3f} ms/token (incl. prefill share)")
    rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:28]
    print(f"{'host function (top self CPU)':70s} {'calls/tok':>9s} {'self CPU us/tok':>15s}")
    for e in rows:
        print(f"{e.key[:70]:70s} {e.count / tokens:9.1f} {e.self_cpu_time_total / tokens:15.1f}")
    cu = sorted([e for e in ka if e.self_device_time_total > 0],
                key=lambda e: e.self_device_time_total, reverse=True)[:10]
    print(f"{'GPU kernel (top device time)':70s} {'calls/tok':>9s} {'us/tok':>15s}")
    for e in cu:
        print(f"{e.key[:70]:70s} {e.count / tokens:9.1f} "
              f"{e.self_device_time_total / tokens:15.1f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--variants", default="bf16,nf4")
    p.add_argument("--skip-host", action="store_true")
    a = p.parse_args()
    import opsq  # noqa: F401
    if not a.skip_host:
        host_cost()
    for v in a.variants.split(","):
        try:
            profile_generate(v, a.layers, a.tokens)
        except Exception as e:
            import traceback
            traceback.print_exc()
            print(f"## {v}: ERROR {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
