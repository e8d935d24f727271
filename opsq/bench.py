"""``opsq bench``: time every opsq op on the GPU against the physical limit measured in the same
run (device-to-device copy bandwidth), torch's bf16 path, and bitsandbytes when importable.

Method: each op's *minimum bytes* (each input read once, each output written once) over its
median time is its achieved bandwidth; efficiency = achieved / copy bandwidth. Timing uses
``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, median) when Triton is
installed, else CUDA events around each call with a 256 MiB L2-flush write before it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from typing import Callable, Optional

import torch
from torch import nn

GEMV_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672),
               (28672, 8192)]  # (K, N): x is 1 x K, W is N x K
MATRIX_SHAPES = [(8192, 8192), (28672, 8192)]
IGEMMLT_M = [64, 256, 2048, 8192]


def _timer() -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn()`` with L2 flushed before each run."""
    try:
        from triton.testing import do_bench

        def run(fn):
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return run
    except Exception:  # pragma: no cover - triton missing
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")

        def run(fn, iters=50):
            for _ in range(5):
                fn()
            times = []
            for _ in range(iters):
                flush.zero_()
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            times.sort()
            return times[len(times) // 2]
        return run


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _bnb():
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional as bF
        return bF
    except Exception:
        return None


def qlora_step_times(timer, dev, layers: int = 4, dim: int = 4096, rank: int = 16,
                     batch: int = 8, seq: int = 512) -> dict:
    """Median ms of one compiled QLoRA training step (forward, backward, AdamW on the adapters)
    through ``layers`` Linear4bit (NF4, bf16 compute) + rank-``rank`` LoRA blocks, against the
    same step with a frozen bf16 ``nn.Linear`` base (issue 5's comparison)."""
    from opsq.lora import LoRALinear
    from opsq.nn import Linear4bit

    def build(quantized: bool):
        torch.manual_seed(0)
        blocks = []
        for _ in range(layers):
            lin = nn.Linear(dim, dim, bias=False, device=dev, dtype=torch.bfloat16)
            base = Linear4bit.from_float(lin, quant_type="nf4", compress_statistics=True) \
                if quantized else lin
            base.requires_grad_(False)
            blocks += [LoRALinear(base, r=rank, alpha=2 * rank, dtype=torch.bfloat16).to(dev),
                       nn.GELU()]
        model = nn.Sequential(*blocks)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        compiled = torch.compile(model, fullgraph=True)  # forward and (AOT) backward

        def step():
            compiled(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    x = torch.randn(batch, seq, dim, device=dev, dtype=torch.bfloat16)
    out = {}
    for name, quantized in (("bf16_base_ms", False), ("opsq_nf4_ms", True)):
        step = build(quantized)
        for _ in range(3):
            step()
        out[name] = timer(step)
    out["ratio"] = out["opsq_nf4_ms"] / out["bf16_base_ms"]
    return out


def run(quick: bool = False, with_bnb: bool = True, only: Optional[str] = None) -> dict:
    """Run all benchmarks; returns the results dict (see ``--json``).

    Raises:
        RuntimeError: no CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("opsq bench needs a CUDA device")
    import opsq
    from opsq import functional as F
    ops = torch.ops.opsq
    dev = torch.device("cuda")
    timer = _timer()
    bF = _bnb() if with_bnb else None
    rows: list[dict] = []

    # ---- the ceiling: device-to-device copy --------------------------------------------------
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() / (ms * 1e-3)
    del src, dst
    rows.append(dict(family="copy", op="copy_", shape="1 GiB", ms=ms, gbps=copy_bw / 1e9,
                     efficiency=1.0))

    def add(family, op, shape, fn, nbytes, bf16_fn=None, bnb_fn=None, dtype="bf16"):
        t = timer(fn)
        row = dict(family=family, op=op, shape=shape, dtype=dtype, ms=t,
                   gbps=nbytes / (t * 1e-3) / 1e9, efficiency=nbytes / (t * 1e-3) / copy_bw,
                   backend=opsq.backends()[op.split(" ")[0]]["cuda"] if op.split(" ")[0]
                   in opsq.backends() else "")
        if bf16_fn is not None:
            tb = timer(bf16_fn)
            row["bf16_ms"] = tb
            row["speedup_vs_bf16"] = tb / t
        if bnb_fn is not None:
            try:
                tq = timer(bnb_fn)
                row["bnb_ms"] = tq
                row["speedup_vs_bnb"] = tq / t
            except Exception as e:  # bitsandbytes API drift: record, keep going
                row["bnb_error"] = str(e)[:120]
        rows.append(row)
        print(f"  {family:10s} {op:28s} {shape:18s} {t:9.4f} ms  {row['gbps']:8.1f} GB/s "
              f"{100 * row['efficiency']:5.1f}%", file=sys.stderr, flush=True)

    gen = torch.Generator(device=dev).manual_seed(0)

    if only in (None, "qlora"):
        q = qlora_step_times(timer, dev)
        rows.append(dict(family="qlora", op="qlora step (4x4096^2 nf4 + r16 LoRA)",
                         shape="8x512 bf16", ms=q["opsq_nf4_ms"], bf16_ms=q["bf16_base_ms"],
                         ratio_vs_bf16_base=q["ratio"]))
        print(f"  qlora step: opsq {q['opsq_nf4_ms']:.3f} ms, bf16 base {q['bf16_base_ms']:.3f} "
              f"ms ({q['ratio']:.3f}x)", file=sys.stderr, flush=True)
    if only == "qlora":
        return _result(rows, copy_bw)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    # ---- gemv_4bit ---------------------------------------------------------------------------
    gemv_shapes = GEMV_SHAPES[:2] if quick else GEMV_SHAPES
    for nested in (False, True):
        for dt in ((torch.bfloat16, torch.float16) if not nested else (torch.bfloat16,)):
            for K, N in gemv_shapes:
                W = randn(N, K, dtype=dt)
                packed, st = F.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                             compress_statistics=nested)
                x = randn(1, K, dtype=dt)
                args = (x, packed, [N, K], st.absmax, 64, "nf4", None, *st.nested_args())
                nb = _nbytes(packed, st.absmax, x) + N * x.element_size()
                if nested:
                    nb += _nbytes(st.state2.absmax, st.state2.code)
                bnb_fn = None
                if bF is not None:
                    qW, qs = bF.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                              compress_statistics=nested)
                    bnb_fn = (lambda x=x, qW=qW, qs=qs: bF.gemv_4bit(x, qW.t(), state=qs))
                add("gemv_4bit", "gemv_4bit" + (" nested" if nested else ""), f"1x{K}->{N}",
                    lambda a=args: ops.gemv_4bit(*a), nb,
                    bf16_fn=lambda x=x, W=W: torch.nn.functional.linear(x, W), bnb_fn=bnb_fn,
                    dtype=str(dt).split(".")[-1])
                del W

    # ---- dequantize / quantize 4-bit --------------------------------------------------------
    for N, K in (MATRIX_SHAPES[:1] if quick else MATRIX_SHAPES):
        A = randn(N, K)
        packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
        out_b = N * K * 2
        bnb_dq = None
        if bF is not None:
            qA, qs = bF.quantize_4bit(A, blocksize=64, quant_type="nf4")
            bnb_dq = (lambda qA=qA, qs=qs: bF.dequantize_4bit(qA, qs))
        add("4bit", "dequantize_4bit", f"{N}x{K}",
            lambda: ops.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], torch.bfloat16),
            _nbytes(packed, absmax) + out_b, bnb_fn=bnb_dq)
        add("4bit", "quantize_4bit", f"{N}x{K}",
            lambda: ops.quantize_4bit(A, 64, "nf4", torch.uint8), _nbytes(A, packed, absmax),
            bnb_fn=(lambda: bF.quantize_4bit(A, blocksize=64, quant_type="nf4"))
            if bF is not None else None)
        del A, packed, absmax

    # ---- int8 family -------------------------------------------------------------------------
    M = K = 8192
    for dt in (torch.float16, torch.bfloat16):
        A = randn(M, K, dtype=dt) * 2
        for thr in (0.0, 6.0):
            add("int8", f"vectorwise_quant t={thr:g}", f"{M}x{K}",
                lambda A=A, thr=thr: ops.vectorwise_quant(A, thr),
                _nbytes(A) + M * K + 4 * M + K, dtype=str(dt).split(".")[-1])
            add("int8", f"double_quant t={thr:g}", f"{M}x{K}",
                lambda A=A, thr=thr: ops.double_quant(A, thr),
                _nbytes(A) + 2 * M * K + 4 * (M + K) + K, dtype=str(dt).split(".")[-1])
        del A
    C = torch.randint(-2**20, 2**20, (M, K), device=dev, dtype=torch.int32)
    rs, cs = randn(M, dtype=torch.float32).abs(), randn(K, dtype=torch.float32).abs()
    add("int8", "mm_dequant", f"{M}x{K}", lambda: ops.mm_dequant(C, rs, cs, None,
                                                                 torch.float16),
        _nbytes(C, rs, cs) + M * K * 2, dtype="i32>f16")
    del C
    I8 = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8)
    for order in ("col32", "col_turing", "col_ampere"):
        add("transform", f"transform row->{order}", f"{M}x{K}",
            lambda o=order: ops.transform(I8, "row", o, [M, K]), 2 * M * K, dtype="int8")
    for Ms in (IGEMMLT_M[:2] if quick else IGEMMLT_M):
        for N in ((8192,) if quick else (8192, 28672)):
            a = torch.randint(-127, 128, (Ms, 8192), device=dev, dtype=torch.int8)
            b = torch.randint(-127, 128, (N, 8192), device=dev, dtype=torch.int8)
            t_op = timer(lambda: ops.igemmlt(a, b))
            t_ref = timer(lambda: torch._int_mm(a, b.t()))
            rows.append(dict(family="igemmlt", op="igemmlt", shape=f"{Ms}x8192x{N}", ms=t_op,
                             int_mm_ms=t_ref, speedup_vs_int_mm=t_ref / t_op,
                             tops=2 * Ms * 8192 * N / (t_op * 1e-3) / 1e12))
            print(f"  igemmlt {Ms}x8192x{N}: {t_op:.4f} ms vs _int_mm {t_ref:.4f} ms",
                  file=sys.stderr, flush=True)

    return _result(rows, copy_bw)


def _result(rows: list, copy_bw: float) -> dict:
    import opsq
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), opsq=opsq.__version__,
        bitsandbytes=getattr(sys.modules.get("bitsandbytes"), "__version__", None),
        copy_bandwidth_gbps=copy_bw / 1e9, rows=rows)


def format_table(res: dict) -> str:
    lines = [f"opsq bench on {res['gpu']} (torch {res['torch']}, CUDA {res['cuda']}); copy "
             f"bandwidth {res['copy_bandwidth_gbps']:.0f} GB/s",
             f"{'op':30s} {'shape':18s} {'dtype':6s} {'ms':>9s} {'GB/s':>8s} {'eff%':>6s} "
             f"{'vs bf16':>8s} {'vs bnb':>7s}"]
    for r in res["rows"]:
        if r["family"] == "qlora":
            lines.append(f"{r['op']:30s} {r['shape']:18s} {'bf16':6s} {r['ms']:9.4f} "
                         f"{'':8s} {'':6s} {'/bf16':>8s} {r['ratio_vs_bf16_base']:7.3f}  "
                         f"(bf16-base step {r['bf16_ms']:.4f} ms)")
            continue
        if r["family"] == "igemmlt":
            lines.append(f"{'igemmlt':30s} {r['shape']:18s} {'int8':6s} {r['ms']:9.4f} "
                         f"{r['tops']:7.0f}T {'':6s} {'x_int_mm':>8s} "
                         f"{r['speedup_vs_int_mm']:7.2f}")
            continue
        vs_bf16 = f"{r['speedup_vs_bf16']:.2f}" if "speedup_vs_bf16" in r else "-"
        vs_bnb = f"{r['speedup_vs_bnb']:.2f}" if "speedup_vs_bnb" in r else "-"
        lines.append(f"{r['op']:30s} {r['shape']:18s} {r.get('dtype', ''):6s} {r['ms']:9.4f} "
                     f"{r['gbps']:8.0f} {100 * r['efficiency']:6.1f} {vs_bf16:>8s} {vs_bnb:>7s}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    """Console entry (``opsq bench``). Returns the exit code."""
    p = argparse.ArgumentParser(prog="opsq bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if importable")
    p.add_argument("--only", choices=["qlora"], help="run only this benchmark")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("opsq bench: no CUDA device (the benchmark times GPU kernels)", file=sys.stderr)
        return 2
    res = run(quick=args.quick, with_bnb=not args.no_bnb, only=args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(format_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
