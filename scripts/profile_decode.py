"""Where an NF4 decode token's GPU time goes (GPU machine; nsys is not available).

1. The gemv of each Llama-3-8B linear shape as the decode step runs it: a CUDA graph of ``L``
   back-to-back batch-1 calls, each over a different weight (``L`` weights hold >= 4x the L2
   cache, so nothing is re-read from L2), replayed and timed with CUDA events. No L2 flush and
   no launch gaps between calls, and programmatic dependent launch (gemv4_tiled16_kernel) acts
   as in the decode step's graph. Variants: NF4 in the tiled16 layout (what a ``Linear4bit`` on
   an sm_90 GPU holds), NF4 in bitsandbytes' packed layout, and bf16 ``F.linear``. Bytes: codes
   + fp32 absmax (NF4) or the bf16 weight; % of the copy bandwidth measured in the same run.
2. The decode step of the benchmark's Llama model (``--layers`` layers, bf16 and NF4):
   ``opsq.decoding.StaticGreedyDecoder``'s CUDA-graph step replayed under torch.profiler, each
   kernel's device time per token grouped by kernel name, with the step's wall time from CUDA
   events: the kernel sum against the wall time shows the gaps between kernels.

    python scripts/profile_decode.py [--layers 8] [--steps 20] [--only chain,step]
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

# Llama-3-8B's linears per layer: (N, K) and how many a layer has
LLAMA_SHAPES = (("q/o 4096->4096", 4096, 4096, 2), ("k/v 4096->1024", 1024, 4096, 2),
                ("gate/up 4096->14336", 14336, 4096, 2), ("down 14336->4096", 4096, 14336, 1))


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy (read + write), timed as ``opsq bench`` times its copy row
    (random bytes, L2 flushed, median)."""
    from opsq.bench import _timer
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / (_timer()(lambda: dst.copy_(src)) * 1e-3)


def graph_ms(fn, reps: int = 50) -> float:
    """Median ms of one replay of a CUDA graph of ``fn()`` (captured after 3 eager warm-ups)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = sorted(event_ms(g.replay) for _ in range(reps))
    return times[len(times) // 2]


def event_ms(fn) -> float:
    """Milliseconds of one ``fn()`` between two CUDA events (synchronised on the second)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def chain(copy_bw: float) -> None:
    print("## gemv chains: one CUDA graph of L back-to-back 1xK calls over L different weights "
          f"(copy bandwidth {copy_bw / 1e9:.0f} GB/s)")
    print(f"{'shape':22s} {'L':>3s} {'variant':14s} {'us/call':>8s} {'GB/s':>7s} {'%copy':>6s} "
          f"{'floor us':>8s}")
    for label, N, K, _ in LLAMA_SHAPES:
        chain_shape(label, N, K, copy_bw)
        torch.cuda.empty_cache()


def chain_shape(label: str, N: int, K: int, copy_bw: float) -> None:
    """One shape's rows of :func:`chain` (its weights freed on return)."""
    import opsq.functional as Fq
    from opsq import _tiled16
    nf4_bytes = N * K // 2 + N * K // 64 * 4
    L = max(8, -(-4 * 64 * 2**20 // nf4_bytes))  # >= 256 MB of NF4 weights
    n_dense = min(L, max(8, -(-4 * 64 * 2**20 // (N * K * 2))))  # cycled: >= 256 MB
    torch.manual_seed(0)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    packed, tiled, dense = [], [], []
    for i in range(L):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        B, st = Fq.quantize_4bit(w, blocksize=64, quant_type="nf4")
        packed.append((B, st))
        tB, tabs = _tiled16.repack(B, st.absmax, st.shape)
        tst = Fq.QuantState(absmax=tabs, shape=st.shape, code=st.code, blocksize=64,
                            quant_type="nf4", dtype=st.dtype, layout="tiled16")
        tiled.append((tB, tst))
        if i < n_dense:
            dense.append(w)
        del w
    outs = [None] * L
    variants = {
        "nf4 tiled16": (lambda: [outs.__setitem__(i, Fq.gemv_4bit(x, tiled[i][0],
                                                                   state=tiled[i][1]))
                                 for i in range(L)], nf4_bytes, L),
        "nf4 packed": (lambda: [outs.__setitem__(i, Fq.gemv_4bit(x, packed[i][0],
                                                                  state=packed[i][1]))
                                for i in range(L)], nf4_bytes, L),
        "bf16 F.linear": (lambda: [outs.__setitem__(i, torch.nn.functional.linear(
            x, dense[i % n_dense])) for i in range(L)], N * K * 2, L),
    }
    for name, (fn, nbytes, calls) in variants.items():
        us = graph_ms(fn) * 1e3 / calls
        gbps = nbytes / (us * 1e-6)
        print(f"{label:22s} {calls:3d} {name:14s} {us:8.2f} {gbps / 1e9:7.0f} "
              f"{100 * gbps / copy_bw:5.1f}% {nbytes / copy_bw * 1e6:8.2f}", flush=True)


def short_name(name: str) -> str:
    """A kernel's base name (profile_int8_small_m.kernel_name), or its first 60 characters
    where the base is 3 characters or fewer."""
    from profile_int8_small_m import kernel_name  # (scripts/ is sys.path[0] when run)
    base = kernel_name(name)
    return base if len(base) > 3 else name[:60]


def step_profile(layers: int, steps: int) -> None:
    from opsq.bench_llm import build_llm
    from opsq.decoding import StaticGreedyDecoder
    from torch.profiler import ProfilerActivity, profile
    dev = torch.device("cuda")
    for variant in ("bf16", "nf4"):
        model = build_llm(variant, dev, layers=layers)
        prompt = torch.randint(3, model.config.vocab_size, (1, 32), device=dev,
                               generator=torch.Generator(device=dev).manual_seed(1))
        # the bench's cache length (prompt + 128 + 8): a 68-entry cache (32 + steps + 16) hit an
        # index-out-of-bounds assert in a compiled kernel of the bf16 model (session 10, H100)
        dec = StaticGreedyDecoder(model, 32 + 128 + 8)
        dec.prefill(prompt)
        for _ in range(3):  # compile, record, replay
            dec.seek(32)
            dec.decode_step()
        torch.cuda.synchronize()
        walls = []
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            for _ in range(steps):
                dec.seek(32)
                walls.append(event_ms(dec.decode_step))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    dec.seek(32)
                    dec.decode_step()
                torch.cuda.synchronize()
        walls.sort()
        per: dict = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
                k = per[short_name(e.name)]
                k[0] += e.device_time_total
                k[1] += 1
        total = sum(v[0] for v in per.values()) / steps / 1e3
        wall = walls[len(walls) // 2]
        print(f"## decode step, {variant}, {layers} layers: wall {wall:.3f} ms (CUDA events, "
              f"median of {steps}), kernels {total:.3f} ms, gaps {wall - total:.3f} ms")
        print(f"{'kernel':48s} {'ms/token':>9s} {'share':>6s} {'calls':>6s} {'us/call':>8s}")
        for name, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:14]:
            ms = t / steps / 1e3
            print(f"{name[:48]:48s} {ms:9.3f} {100 * ms / total:5.1f}% {n // steps:6d} "
                  f"{t / n:8.2f}")
        del dec, model
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", default="chain,step")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    only = args.only.split(",")
    for part, run in (("chain", lambda: chain(copy_bandwidth())),
                      ("step", lambda: step_profile(args.layers, args.steps))):
        if part in only:
            try:
                run()
            except Exception as e:  # report, and still run the other part
                print(f"## {part}: ERROR {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
