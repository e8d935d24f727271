"""``opsq bench``: time every opsq op on the GPU against the physical limit measured in the same
run (device-to-device copy bandwidth), torch's bf16 path, and bitsandbytes when importable.

Method: each op's *minimum bytes* (each input read once, each output written once) over its
median time is its achieved bandwidth; efficiency = achieved / copy bandwidth. Timing uses
``triton.testing.do_bench`` (CUDA events, L2 flushed before every run by a 256 MiB write,
median) when Triton is installed, else CUDA events around each call with the same write before
it. ``--flush read`` flushes with a 256 MiB read instead: do_bench's write leaves the L2 full
of dirty lines, and a kernel that reads less than a few L2 sizes (a decode gemv) then also pays
for writing them back, which the 2 GiB copy behind the efficiency scale hardly does
(:func:`_timer`).

Families (``--only``, comma-separated; default all):

* ``gemv``: ``gemv_4bit`` (NF4, blocksize 64, plain and nested absmax, bf16 and fp16), on the
  packed weight and, where the device takes it, the same weight in the tiled16 layout
  (rows "gemv_4bit tiled16", what a ``Linear4bit`` on that device runs).
* ``4bit``: ``dequantize_4bit`` / ``quantize_4bit`` on whole matrices, and the wall-clock time
  to quantize every linear of a Llama-3-8B-shaped model at load (nested statistics, as
  ``functional.quantize_4bit`` runs it: kernels and host work).
* ``int8``: ``vectorwise_quant``, ``double_quant`` (t=0 and t=6, on an N(0, 1) input with 16
  outlier columns scaled by 20), ``mm_dequant``.
* ``int8_linear``: ``Linear8bitLt`` at M in {1, 4, 16} rows, 4096 -> 14336 and 8192 -> 8192,
  threshold 0 and 6 (two outlier columns), against fp16 ``F.linear`` (target speed-up >= 1.5x)
  and bitsandbytes' ``Linear8bitLt``.
* ``transform``: int8 row-major to the cuBLASLt tile layouts.
* ``igemmlt``: int8 x int8 -> int32 against ``torch._int_mm`` (which takes M > 16 only; the
  M = 16 rows have no such column) and bitsandbytes' ``int8_linear_matmul``.
* ``decode``: a 4-layer Linear4bit MLP at batch 1 under ``torch.compile(mode="reduce-overhead")``
  against the same bf16 model (target speed-up >= 3x).
* ``prefill``: Linear4bit and Linear8bitLt at 2048 tokens x 8192 -> 28672 against 16-bit
  ``F.linear``, the LLM.int8 outlier path against threshold 0, and Linear8bitLt threshold 6
  at 2048 x 4096 -> 4096 against fp16 ``F.linear`` (target: no slower).
* ``qlora``: one compiled QLoRA training step against a bf16 base.
* ``optim``: ``opsq.optim.AdamW8bit`` / ``PagedAdamW8bit`` / ``AdamW`` (32-bit states) steps
  over a 1.07 B-parameter bf16 model against bitsandbytes' ``AdamW8bit`` and
  ``torch.optim.AdamW(fused=True)`` with fp32 parameters and states; minimum bytes of the 8-bit
  update: 10 per parameter (read g, p, two uint8 states; write p and the states).
* ``llm``: the real workload, a Llama-3-8B-shaped transformers model at batch 1 in bf16, opsq
  NF4 / NF4 nested / FP4 / int8 (t=6, t=0) and bitsandbytes NF4 / int8 (``opsq.bench_llm``;
  ``--llm-layers``, ``--llm-variants``; needs transformers, the ``[bench]`` extra).

The table (:func:`format_table`) and the figure (:func:`plot_results`) only read the results
dict, so ``opsq bench --from-json bench.json [--plot bench.png]`` works without a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

GEMV_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672),
               (28672, 8192)]  # (K, N): x is 1 x K, W is N x K
MATRIX_SHAPES = [(8192, 8192), (28672, 8192)]
IGEMMLT_M = [16, 64, 256, 2048, 8192]  # 16: below torch._int_mm's M > 16
#: (out, in) of one Llama-3-8B decoder layer's linears: q, k, v, o, gate, up, down
LLAMA3_8B_LINEARS = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096),
                     (14336, 4096), (4096, 14336)]

#: Benchmark families, in the order they run and print.
FAMILIES = ("gemv", "4bit", "int8", "int8_linear", "transform", "igemmlt", "decode", "prefill",
            "qlora", "optim", "llm")
#: One-line description printed in each family's table header.
FAMILY_TITLES = {
    "gemv": "gemv_4bit, x 1xK @ NF4 W(NxK)^T, blocksize 64 (vs bf16 = torch F.linear on the "
            "16-bit weight, row's dtype)",
    "4bit": "blockwise NF4 quantize / dequantize, blocksize 64",
    "int8": "LLM.int8 quantization and int32 -> fp16 dequantization",
    "int8_linear": "Linear8bitLt (has_fp16_weights=False) at decode batch sizes, fp16, eager "
                   "layer call vs fp16 F.linear",
    "transform": "int8 row-major -> cuBLASLt tiled layouts",
    "igemmlt": "int8 GEMM (K=8192) vs torch._int_mm (M > 16) and bitsandbytes",
    "decode": "4-layer MLP 4096->11008->4096 (SiLU), batch 1, bf16, "
              "torch.compile(mode='reduce-overhead', fullgraph=True)",
    "prefill": "2048 tokens, 8192 -> 28672 (and int8 t=6 at 4096 -> 4096), eager layer call "
               "vs 16-bit F.linear",
    "qlora": "compiled QLoRA training step (forward, backward, AdamW on the adapters)",
    "optim": "one optimizer.step() over 8 bf16 parameters of 8192x16384 (1.07 B), grads set",
    "llm": "Llama-3-8B-shaped transformers model (random weights), batch 1, bf16 compute: "
           "generate (compiled static cache / eager / opsq decoder), decode step, prefill",
}
_FAMILY_ALIASES = {"gemv_4bit": "gemv"}  # row family names written by older versions

#: Targets of the performance issue.
DECODE_MIN_SPEEDUP = 3.0          # NF4 decode MLP vs bf16 (speed-up, higher is better)
PREFILL_4BIT_MAX_RATIO = 1.10     # Linear4bit / bf16 F.linear time (lower is better)
PREFILL_INT8_MIN_SPEEDUP = 1.3    # fp16 F.linear / Linear8bitLt (t=0) time
PREFILL_OUTLIER_MAX_RATIO = 1.15  # Linear8bitLt t=6 / t=0 time, same outlier input
PREFILL_OUTLIER_VS_FP16_MAX_RATIO = 1.0  # Linear8bitLt t=6 / fp16 F.linear (both rows below)
PREFILL_SMALL_SHAPE = (2048, 4096, 4096)  # (M, K, N) of that row
# Linear8bitLt t=6 with every input column an outlier (a random Llama's down_proj at 2048 tokens
# has ~14000 of 14336): (M, K, N), held to the same fp16-time target.
PREFILL_DENSE_OUTLIER_SHAPE = (2048, 14336, 4096)
EFFICIENCY_TARGETS = (0.80, 0.85)  # fraction of copy bandwidth (drawn on the plot)
INT8_DECODE_MIN_SPEEDUP = 1.5     # fp16 F.linear / Linear8bitLt time at M <= 16
OPTIM_MIN_EFFICIENCY = 0.80       # AdamW8bit update: fraction of copy bandwidth
INT8_DECODE_SHAPES = [(4096, 14336), (8192, 8192)]  # (K, N)
INT8_DECODE_M = (1, 4, 16)
OPTIM_SHAPES = [(8192, 16384)] * 8


def parse_only(text: Union[str, Iterable[str], None]) -> tuple:
    """The families named by ``--only`` in run order.

    Args:
        text: comma-separated family names (``"gemv,decode"``), an iterable of names, ``"all"``
            or None (both meaning every family).
    Returns:
        A tuple of names from :data:`FAMILIES`, in :data:`FAMILIES` order, without duplicates.
    Raises:
        argparse.ArgumentTypeError: an unknown or empty name (argparse turns it into exit 2).
    """
    if text is None:
        return FAMILIES
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip().lower() for n in names]
    if names == ["all"]:
        return FAMILIES
    bad = [n for n in names if n not in FAMILIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark famil{'ies' if len(bad) > 1 else 'y'} "
            f"{', '.join(repr(b) for b in bad) or repr(text)}; choose from {', '.join(FAMILIES)}"
            " (comma-separated) or 'all'")
    return tuple(f for f in FAMILIES if f in names)


#: Bytes written before each timed run to flush the L2 (the H200's is 50 MB).
_L2_FLUSH_BYTES = 256 * 1024 * 1024


def _median(times: list) -> float:
    """The upper middle of ``times`` (the median of an odd count), as every timer here reports."""
    return sorted(times)[len(times) // 2]


FLUSHES = ("write", "read")


def _check_flush(flush: str) -> None:
    """Raises ValueError naming ``flush`` unless it is one of :data:`FLUSHES`."""
    if flush not in FLUSHES:
        raise ValueError(f"flush must be one of {FLUSHES}, got {flush!r}")


def _l2_flush(flush: str = "write") -> Callable[[], object]:
    """A callable that flushes the L2 cache before a timed run: ``"write"`` zeroes a 256 MiB
    buffer (as ``triton.testing.do_bench`` does: the L2 is left full of dirty lines),
    ``"read"`` reduces over one (the L2 is left cold and clean). See :func:`_timer`.

    Raises:
        ValueError: ``flush`` not in :data:`FLUSHES`.
    """
    _check_flush(flush)
    if flush == "write":
        return torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda").zero_
    return torch.ones(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda").amax


def _timer(flush: str = "write") -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn()`` with L2 flushed before each run.

    ``flush="write"`` (the default): ``triton.testing.do_bench``, whose flush writes 256 MiB, so
    each run starts with the L2 (50 MB on H100/H200) full of dirty lines that the timed work
    writes back to DRAM as it evicts them: a kernel that reads ``b`` bytes pays for up to
    min(b, L2) bytes of extra DRAM writes, a large share of a decode gemv's bytes and almost
    none of the 2 GiB copy that sets the efficiency scale. ``flush="read"``: CUDA events around
    each run after a 256 MiB *read* (:func:`_l2_flush`), which leaves the L2 cold and clean, as
    a decode step leaves it (the weights before were read, not written), 25 warm-up runs and
    the median of 100 (do_bench: as many as fit 25 ms and 100 ms). Either way the flush's
    ~85 us on the stream lets the host enqueue ``fn`` before the start event fires.

    Raises:
        ValueError: ``flush`` not in :data:`FLUSHES`.
    """
    _check_flush(flush)
    if flush == "write":
        try:
            from triton.testing import do_bench

            def run(fn):
                return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            return run
        except Exception:  # pragma: no cover - triton missing: the same flush, timed below
            pass
    clear = _l2_flush(flush)

    def run(fn, warmup=25, reps=100):
        for _ in range(warmup):
            fn()
        return _event_ms(fn, clear, reps)
    return run


def _event_ms(fn: Callable[[], object], clear: Callable[[], object], reps: int,
              pad_cycles: int = 0) -> float:
    """Median milliseconds of ``reps`` runs of ``fn()`` between two CUDA events, each after
    ``clear()`` (an L2 flush) and, with ``pad_cycles``, ``torch.cuda._sleep(pad_cycles)``; one
    synchronisation after the last run."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        clear()
        if pad_cycles:
            torch.cuda._sleep(pad_cycles)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return _median([start.elapsed_time(end) for start, end in events])


def _replay_ms(fn: Callable[[], object], reps: int = 100, pad_cycles: int = 2_000_000,
               flush: str = "write") -> float:
    """Median milliseconds of the GPU work of ``fn()`` when ``fn`` is host-heavy before its
    launch (a compiled CUDA-graph call: Dynamo's guards, the graph tree's bookkeeping): before
    each run the L2 is flushed (``flush``, as :func:`_timer`) and the stream kept busy for
    ``pad_cycles`` GPU clock cycles (``torch.cuda._sleep``; ~1 ms at 2 GHz), so the host has
    launched the work before the start event fires and its Python time never lands between the
    two events (do_bench does not synchronise between runs: a slow host there read as GPU
    time)."""
    clear = _l2_flush(flush)
    for _ in range(3):
        fn()
    return _event_ms(fn, clear, reps, pad_cycles)


def _wall_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Median wall-clock milliseconds of ``fn()`` from a synchronised start to its synchronised
    end (host work included: for calls made of several kernels and Python, where an L2-flushed
    event timing hides host time behind the flush)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return _median(times)


def _nbytes(*ts) -> int:
    """Total bytes of the given tensors (None skipped)."""
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _module_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` (the weights a forward must read)."""
    return _nbytes(*module.parameters(), *module.buffers())


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32 (a sanity check that a timed path computes the op)."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _bnb():
    """``bitsandbytes.functional`` or None when bitsandbytes is not importable."""
    try:
        import bitsandbytes.functional as bF  # imports bitsandbytes (its version is recorded)
        return bF
    except Exception:
        return None


def compare_row(family: str, op: str, shape: str, dtype: str, ms: float, baseline: str,
                baseline_ms: float, metric: str, target: float, **extra) -> dict:
    """A row timing opsq (``ms``) against a baseline (``baseline_ms``), with its target.

    Args:
        metric: ``"speedup"`` (baseline_ms / ms, must be >= ``target``) or ``"ratio"``
            (ms / baseline_ms, must be <= ``target``).
        extra: further JSON-serialisable fields (e.g. ``gbps``, ``efficiency``, ``rel_err``).
    Returns:
        The row: family, op, shape, dtype, ms, baseline, baseline_ms, speedup, ratio,
        target_metric, target_cmp (">=" / "<="), target, ok (bool), and ``extra``.
    """
    if metric not in ("speedup", "ratio"):
        raise ValueError(f"metric must be 'speedup' or 'ratio', got {metric!r}")
    speedup, ratio = baseline_ms / ms, ms / baseline_ms
    ok = speedup >= target if metric == "speedup" else ratio <= target
    return dict(family=family, op=op, shape=shape, dtype=dtype, ms=ms, baseline=baseline,
                baseline_ms=baseline_ms, speedup=speedup, ratio=ratio, target_metric=metric,
                target_cmp=">=" if metric == "speedup" else "<=", target=target, ok=bool(ok),
                **extra)


def build_qlora_step(quantized: bool, dev, x: torch.Tensor, layers: int = 4, dim: int = 4096,
                     rank: int = 16, mode: Optional[str] = None) -> Callable[[], None]:
    """One compiled QLoRA training step as a closure: ``layers`` blocks of (frozen base 4-bit
    NF4 ``Linear4bit`` with nested statistics, bf16 compute, or a frozen bf16 ``nn.Linear`` when
    ``quantized`` is False) + rank-``rank`` LoRA, then GELU; forward + backward of
    ``mean(y.float()**2)`` on ``x`` (bf16, ``(..., dim)``) and AdamW on the adapters.
    ``mode`` is ``torch.compile``'s (None: default; ``"reduce-overhead"``: the forward and
    backward graphs replay as CUDA graphs, so host-side launch cost leaves the step)."""
    from opsq.lora import LoRALinear
    from opsq.nn import Linear4bit

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
    compiled = torch.compile(model, fullgraph=True, mode=mode)  # forward and (AOT) backward
    graphs = mode == "reduce-overhead"

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        compiled(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def qlora_step_times(timer, dev, layers: int = 4, dim: int = 4096, rank: int = 16,
                     batch: int = 8, seq: int = 512) -> dict:
    """Median ms of one compiled QLoRA training step (:func:`build_qlora_step`: forward,
    backward, AdamW on the adapters) through ``layers`` Linear4bit (NF4, bf16 compute) +
    rank-``rank`` LoRA blocks, against the same step with a frozen bf16 ``nn.Linear`` base
    (issue 5's comparison). Input: ``batch`` x ``seq`` x ``dim`` bf16."""
    x = torch.randn(batch, seq, dim, device=dev, dtype=torch.bfloat16)
    out = {}
    for suffix, mode in (("", None), ("_cudagraphs", "reduce-overhead")):
        for name, quantized in (("bf16_base_ms", False), ("opsq_nf4_ms", True)):
            torch._dynamo.reset()
            step = build_qlora_step(quantized, dev, x, layers, dim, rank, mode=mode)
            for _ in range(3):
                step()
            out[name + suffix] = timer(step)
        out["ratio" + suffix] = out["opsq_nf4_ms" + suffix] / out["bf16_base_ms" + suffix]
    return out


def build_decode_mlp(kind: str, dev, layers: int = 4, dim: int = 4096,
                     hidden: int = 11008) -> nn.Sequential:
    """The decode benchmark's model: ``layers`` x [Linear(dim, hidden), SiLU,
    Linear(hidden, dim)], no bias, bf16, in eval mode with no parameter requiring grad.

    Args:
        kind: ``"bf16"`` (plain ``nn.Linear``), ``"nf4"`` (``Linear4bit`` NF4, blocksize 64,
            fp32 absmax) or ``"nf4_nested"`` (the same with nested 8-bit absmax).
        dev: device the weights are created and quantized on.
    Returns:
        ``nn.Sequential`` mapping ``(B, dim)`` bf16 to ``(B, dim)`` bf16. Every kind uses the
        same seed, so the quantized models approximate the bf16 one.
    """
    from opsq.nn import Linear4bit
    if kind not in ("bf16", "nf4", "nf4_nested"):
        raise ValueError(f"kind must be 'bf16', 'nf4' or 'nf4_nested', got {kind!r}")
    torch.manual_seed(0)
    mods: list = []
    for _ in range(layers):
        for k, n in ((dim, hidden), (hidden, dim)):
            lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
            if kind != "bf16":
                lin = Linear4bit.from_float(lin, quant_type="nf4", blocksize=64,
                                            compress_statistics=kind == "nf4_nested",
                                            compute_dtype=torch.bfloat16).to(dev)
            mods.append(lin)
            if k == dim:
                mods.append(nn.SiLU())
    return nn.Sequential(*mods).eval().requires_grad_(False)


def decode_mlp_times(dev, kinds: Iterable[str] = ("bf16", "nf4", "nf4_nested"),
                     layers: int = 4, dim: int = 4096, hidden: int = 11008,
                     warmup: int = 5, flush: str = "write") -> dict:
    """Median ms of one batch-1 forward of :func:`build_decode_mlp` per kind, each compiled with
    ``torch.compile(model, mode="reduce-overhead", fullgraph=True)`` (CUDA graphs), timed by
    :func:`_replay_ms` (the host's guard and graph-tree time before each replay kept out; the
    L2 flushed as ``flush`` says, see :func:`_timer`).

    The input is one static ``(1, dim)`` bf16 tensor reused by every call (CUDA-graph replay
    reads it from a fixed address); ``warmup`` calls (>= 3: compile, record, replay) run before
    timing; everything runs under ``torch.no_grad()``.

    Returns:
        ``{kind: {"ms", "bytes" (weights read per forward), "rel_err" (output vs the first
        kind's), "cudagraph_skips" (Inductor's count while compiling it; 0 means the CUDA
        graph was used), "timed_recompiles" (graphs compiled while timing; should be 0)}}``.
    """
    from torch._dynamo.utils import counters
    kinds = list(kinds)
    x = torch.randn(1, dim, device=dev, dtype=torch.bfloat16,
                    generator=torch.Generator(device=dev).manual_seed(1))
    out: dict = {}
    ref = None
    with torch.no_grad():
        for kind in kinds:
            torch._dynamo.reset()  # a fresh compile per model (no recompile-limit surprises)
            model = build_decode_mlp(kind, dev, layers, dim, hidden)
            skips0 = counters["inductor"]["cudagraph_skips"]
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)

            def call(compiled=compiled):
                torch.compiler.cudagraph_mark_step_begin()  # each call is a new iteration
                return compiled(x)

            for _ in range(max(3, warmup)):
                y = call()
            y = y.clone()  # the graph's output buffer is overwritten by the next replay
            torch.cuda.synchronize()
            graphs0 = counters["stats"]["unique_graphs"]
            ms = _replay_ms(call, flush=flush)
            ref = y if ref is None else ref
            out[kind] = dict(ms=ms, bytes=_module_bytes(model), rel_err=_rel_err(y, ref),
                             cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]
                                                 - skips0),
                             timed_recompiles=int(counters["stats"]["unique_graphs"] - graphs0))
            del model, compiled, y
            torch.cuda.empty_cache()
    torch._dynamo.reset()
    return out


def _with_outlier_columns(x: torch.Tensor, n: int, scale: float):
    """``(copy of x with n columns (fixed seed) scaled by scale, those columns' indices on x's
    device)``: LLM.int8's few outlier features on an N(0, 1) input (|x| >= 6 in ~75 % of those
    columns' rows for a scale of 20, and practically nowhere else)."""
    cols = torch.randperm(x.shape[-1], generator=torch.Generator().manual_seed(0))[:n]
    cols = cols.to(x.device)
    xo = x.clone()
    xo[:, cols] *= scale
    return xo, cols


def _interleaved(timer, fns: dict, rounds: int = 3) -> dict:
    """``{name: median over rounds of timer(fn)}``, the functions timed in turn each round: a
    drift of the GPU's clocks or power over the run falls on every side of a ratio alike (timed
    once each, one after the other, the same code read 1.10x and 1.22x in two runs)."""
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn))
    return {name: _median(t) for name, t in times.items()}


def prefill_times(timer, dev, M: int = 2048, K: int = 8192, N: int = 28672,
                  outlier_cols: int = 16, outlier_scale: float = 20.0,
                  nf4: bool = True) -> dict:
    """Median ms of the prefill comparisons (eager layer calls under ``torch.no_grad()``; each
    side of a comparison timed in turn over three rounds, :func:`_interleaved`).

    * ``nf4_ms`` / ``bf16_ms`` (only with ``nf4``): ``Linear4bit`` (NF4, blocksize 64, bf16
      compute) on an ``(M, K)`` bf16 input vs ``F.linear`` with the bf16 ``(N, K)`` weight.
    * ``int8_ms`` / ``fp16_ms``: ``Linear8bitLt`` (``has_fp16_weights=False``, threshold 0) on an
      ``(M, K)`` fp16 N(0, 1) input vs ``F.linear`` with the fp16 weight.
    * ``int8_t6_ms`` / ``int8_t0_outlier_ms``: ``Linear8bitLt`` threshold 6.0 vs threshold 0 on
      the same fp16 input with ``outlier_cols`` columns (fixed seed) scaled by
      ``outlier_scale`` (so |x| >= 6 in ~75 % of their rows for a scale of 20), and
      ``fp16_outlier_ms``: ``F.linear`` on that input.

    Returns:
        The times (ms), ``*_rel_err`` (output vs the 16-bit ``F.linear``), ``outlier_cols`` (input
        columns holding a value >= 6 in magnitude) and ``outlier_row_frac`` (fraction of the
        scaled columns' entries >= 6 in magnitude).
    """
    from torch.nn import functional as tF

    from opsq.nn import Linear4bit, Linear8bitLt
    out: dict = {}
    gen = torch.Generator(device=dev).manual_seed(2)
    with torch.no_grad():
        if nf4:
            torch.manual_seed(0)
            lin = nn.Linear(K, N, bias=False, device=dev,
                            dtype=torch.bfloat16).requires_grad_(False)
            q4 = Linear4bit.from_float(lin, quant_type="nf4", blocksize=64,
                                       compress_statistics=False,
                                       compute_dtype=torch.bfloat16).to(dev)
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=gen)
            w = lin.weight
            out.update(_interleaved(timer, {"nf4_ms": lambda q4=q4, x=x: q4(x),
                                            "bf16_ms": lambda x=x, w=w: tF.linear(x, w)}))
            out["nf4_rel_err"] = _rel_err(q4(x), tF.linear(x, w))
            del q4, lin, w, x
            torch.cuda.empty_cache()

        torch.manual_seed(0)
        lin = nn.Linear(K, N, bias=False, device=dev, dtype=torch.float16).requires_grad_(False)
        w = lin.weight
        l8 = {thr: Linear8bitLt.from_float(lin, threshold=thr, has_fp16_weights=False).to(dev)
              for thr in (0.0, 6.0)}
        x = torch.randn(M, K, device=dev, dtype=torch.float16, generator=gen)
        xo, cols = _with_outlier_columns(x, outlier_cols, outlier_scale)
        out.update(_interleaved(timer, {
            "int8_ms": lambda f=l8[0.0], x=x: f(x),
            "fp16_ms": lambda x=x, w=w: tF.linear(x, w),
            "int8_t0_outlier_ms": lambda f=l8[0.0], xo=xo: f(xo),
            "int8_t6_ms": lambda f=l8[6.0], xo=xo: f(xo),
            "fp16_outlier_ms": lambda xo=xo, w=w: tF.linear(xo, w)}))
        out["int8_rel_err"] = _rel_err(l8[0.0](x), tF.linear(x, w))
        ref = tF.linear(xo, w)
        out["int8_t0_outlier_rel_err"] = _rel_err(l8[0.0](xo), ref)
        out["int8_t6_rel_err"] = _rel_err(l8[6.0](xo), ref)
        out["outlier_cols"] = int((xo.abs() >= 6.0).any(dim=0).sum())
        out["outlier_row_frac"] = float((xo[:, cols].abs() >= 6.0).float().mean())
        del l8, lin, w, x, xo, ref
        torch.cuda.empty_cache()
    return out


def run(quick: bool = False, with_bnb: bool = True,
        only: Union[str, Iterable[str], None] = None,
        on_progress: Optional[Callable[[dict], None]] = None, llm_layers: int = 32,
        llm_variants: Optional[Iterable[str]] = None, llm_new_tokens: int = 128,
        flush: str = "write") -> dict:
    """Run the benchmarks; returns the results dict (see ``--json`` and :func:`_result`).

    Args:
        quick: fewer shapes (and no nested decode model).
        with_bnb: also time bitsandbytes where importable.
        only: families to run (see :func:`parse_only`); None runs all.
        on_progress: called with the partial results dict after each family (``--json``
            writes it, so a run killed by a timeout still leaves the finished families).
        llm_layers, llm_variants, llm_new_tokens: the ``llm`` family's decoder layers (32:
            Llama-3-8B), variants (default ``opsq.bench_llm.LLM_DEFAULT_VARIANTS``) and new
            tokens per timed ``generate``.
        flush: how the L2 is flushed before each timed run, ``"write"`` (do_bench's, the
            default) or ``"read"`` (cold and clean); see :func:`_timer`. Recorded in the results.
    Returns:
        ``_result`` dict; a family that raised leaves a row with ``error`` and the run goes on.
    Raises:
        RuntimeError: no CUDA device. argparse.ArgumentTypeError: bad ``only``.
        ValueError: ``flush`` not in :data:`FLUSHES`.
    """
    families = parse_only(only)
    _check_flush(flush)
    if not torch.cuda.is_available():
        raise RuntimeError("opsq bench needs a CUDA device")
    import opsq
    from opsq import _tiled16
    from opsq import functional as F
    ops = torch.ops.opsq
    dev = torch.device("cuda")
    timer = _timer(flush)
    bF = _bnb() if with_bnb else None
    rows: list[dict] = []
    meta = dict(families=list(families), quick=bool(quick), with_bnb=bF is not None,
                flush=flush)

    # ---- the ceiling: device-to-device copy --------------------------------------------------
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda d=dst, s=src: d.copy_(s))
    copy_bw = 2 * src.numel() / (ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    rows.append(dict(family="copy", op="copy_", shape="1 GiB", ms=ms, gbps=copy_bw / 1e9,
                     efficiency=1.0))
    backends = opsq.backends()

    def time_bnb(row, bnb_fn, ms):
        """Time bitsandbytes' ``bnb_fn`` into ``row`` (bnb_ms, speedup_vs_bnb against ``ms``),
        or record its error (bitsandbytes API drift: keep going)."""
        try:
            tq = timer(bnb_fn)
            row["bnb_ms"] = tq
            row["speedup_vs_bnb"] = tq / ms
        except Exception as e:
            row["bnb_error"] = str(e)[:120]

    def add(family, op, shape, fn, nbytes, bf16_fn=None, bnb_fn=None, dtype="bf16"):
        """Time ``fn`` (moves ``nbytes`` at minimum) and append a bandwidth row."""
        t = timer(fn)
        name = op.split(" ")[0]
        row = dict(family=family, op=op, shape=shape, dtype=dtype, ms=t,
                   gbps=nbytes / (t * 1e-3) / 1e9, efficiency=nbytes / (t * 1e-3) / copy_bw,
                   backend=backends[name]["cuda"] if name in backends else "")
        if bf16_fn is not None:
            tb = timer(bf16_fn)
            row["bf16_ms"] = tb
            row["speedup_vs_bf16"] = tb / t
        if bnb_fn is not None:
            time_bnb(row, bnb_fn, t)
        rows.append(row)
        print(f"  {family:10s} {op:28s} {shape:18s} {dtype:5s} {t:9.4f} ms "
              f"{row['gbps']:8.1f} GB/s {100 * row['efficiency']:5.1f}%",
              file=sys.stderr, flush=True)

    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)

    def dtname(dt: torch.dtype) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float32: "fp32"}.get(dt, str(dt).split(".")[-1])

    # ---- gemv_4bit ---------------------------------------------------------------------------
    def bench_gemv():
        for nested in (False, True):
            for dt in (torch.bfloat16, torch.float16):
                for K, N in (GEMV_SHAPES[:2] if quick else GEMV_SHAPES):
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
                    add("gemv", "gemv_4bit" + (" nested" if nested else ""), f"1x{K}->{N}",
                        lambda a=args: ops.gemv_4bit(*a), nb,
                        bf16_fn=lambda x=x, W=W: torch.nn.functional.linear(x, W),
                        bnb_fn=bnb_fn, dtype=dtname(dt))
                    if _tiled16.tiled16_eligible([N, K], 64, dev):
                        # the same weight in the layout a Linear4bit takes on this device
                        tB, tA = _tiled16.repack(packed, st.absmax, [N, K])
                        targs = (x, tB, [N, K], tA, 64, "nf4", None, *st.nested_args(),
                                 "tiled16")
                        add("gemv", "gemv_4bit" + (" nested" if nested else "") + " tiled16",
                            f"1x{K}->{N}", lambda a=targs: ops.gemv_4bit(*a), nb,
                            bf16_fn=lambda x=x, W=W: torch.nn.functional.linear(x, W),
                            bnb_fn=bnb_fn, dtype=dtname(dt))
                    del W

    # ---- dequantize / quantize 4-bit --------------------------------------------------------
    def bench_4bit():
        for N, K in (MATRIX_SHAPES[:1] if quick else MATRIX_SHAPES):
            A = randn(N, K)
            packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
            out_b = N * K * 2
            bnb_dq = None
            if bF is not None:
                qA, qs = bF.quantize_4bit(A, blocksize=64, quant_type="nf4")
                bnb_dq = (lambda qA=qA, qs=qs: bF.dequantize_4bit(qA, qs))
            add("4bit", "dequantize_4bit", f"{N}x{K}",
                lambda p=packed, a=absmax: ops.dequantize_4bit(p, a, 64, "nf4", [N, K],
                                                               torch.bfloat16),
                _nbytes(packed, absmax) + out_b, bnb_fn=bnb_dq)
            if _tiled16.tiled16_eligible([N, K], 64, dev):
                # read in place from the layout a Linear4bit takes here (its prefill path)
                tB, tA = _tiled16.repack(packed, absmax, [N, K])
                add("4bit", "dequantize_4bit tiled16", f"{N}x{K}",
                    lambda p=tB, a=tA: ops.dequantize_4bit(p, a, 64, "nf4", [N, K],
                                                           torch.bfloat16, layout="tiled16"),
                    _nbytes(tB, tA) + out_b, bnb_fn=bnb_dq)
                del tB, tA
            add("4bit", "quantize_4bit", f"{N}x{K}",
                lambda A=A: ops.quantize_4bit(A, 64, "nf4", torch.uint8),
                _nbytes(A, packed, absmax),
                bnb_fn=(lambda A=A: bF.quantize_4bit(A, blocksize=64, quant_type="nf4"))
                if bF is not None else None)
            del A, packed, absmax
        # quantize-on-load of a Llama-3-8B-shaped model: each linear's shape timed once, x32;
        # wall-clock (_wall_ms): the functional call is several kernels and host work a linear
        total = {"opsq": 0.0, "bnb": 0.0}
        nb = 0
        for N, K in LLAMA3_8B_LINEARS:
            W = randn(N, K)
            total["opsq"] += _wall_ms(lambda W=W: F.quantize_4bit(
                W, blocksize=64, quant_type="nf4", compress_statistics=True))
            if bF is not None:
                total["bnb"] += _wall_ms(lambda W=W: bF.quantize_4bit(
                    W, blocksize=64, quant_type="nf4", compress_statistics=True))
            # read bf16; write the codes, the absmax codes and the nested absmax (fp32 per 256)
            nb += N * K * 2 + N * K // 2 + N * K // 64 + N * K // 64 // 256 * 4
            del W
        layers = 32
        row = dict(family="4bit", op="quantize_4bit nested (load)",
                   shape=f"Llama-3-8B linears x{layers}", dtype="bf16", ms=layers * total["opsq"],
                   gbps=nb / (total["opsq"] * 1e-3) / 1e9,
                   efficiency=nb / (total["opsq"] * 1e-3) / copy_bw, backend="cuda-native")
        if bF is not None:
            row["bnb_ms"] = layers * total["bnb"]
            row["speedup_vs_bnb"] = total["bnb"] / total["opsq"]
        rows.append(row)
        print(f"  4bit quantize at load (32 layers): opsq {row['ms']:.2f} ms"
              + (f", bnb {row['bnb_ms']:.2f} ms" if "bnb_ms" in row else ""),
              file=sys.stderr, flush=True)

    # ---- int8 family -------------------------------------------------------------------------
    M = K = 8192

    def bench_int8():
        for dt in (torch.float16, torch.bfloat16):
            # N(0, 1) with 16 outlier columns: threshold 6 finds LLM.int8's few outlier features
            # (a 2 N(0, 1) input made every one of the 8192 columns an outlier column)
            A, _ = _with_outlier_columns(randn(M, K, dtype=dt), 16, 20.0)
            for thr in (0.0, 6.0):
                add("int8", f"vectorwise_quant t={thr:g}", f"{M}x{K}",
                    lambda A=A, thr=thr: ops.vectorwise_quant(A, thr),
                    _nbytes(A) + M * K + 4 * M + K, dtype=dtname(dt),
                    bnb_fn=(lambda A=A, thr=thr: bF.int8_vectorwise_quant(A, threshold=thr))
                    if bF is not None else None)
                add("int8", f"double_quant t={thr:g}", f"{M}x{K}",
                    lambda A=A, thr=thr: ops.double_quant(A, thr),
                    _nbytes(A) + 2 * M * K + 4 * (M + K) + K, dtype=dtname(dt),
                    bnb_fn=(lambda A=A, thr=thr: bF.int8_double_quant(A, threshold=thr))
                    if bF is not None else None)
            del A
        C = torch.randint(-2**20, 2**20, (M, K), device=dev, dtype=torch.int32)
        rs, cs = randn(M, dtype=torch.float32).abs(), randn(K, dtype=torch.float32).abs()
        add("int8", "mm_dequant", f"{M}x{K}",
            lambda: ops.mm_dequant(C, rs, cs, None, torch.float16),
            _nbytes(C, rs, cs) + M * K * 2, dtype="i32>f16",
            bnb_fn=(lambda: bF.int8_mm_dequant(C, rs, cs)) if bF is not None else None)

    def bench_transform():
        I8 = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8)
        for order in ("col32", "col_turing", "col_ampere"):
            add("transform", f"transform row->{order}", f"{M}x{K}",
                lambda o=order: ops.transform(I8, "row", o, [M, K]), 2 * M * K, dtype="int8")

    def bench_igemmlt():
        for Ms in (IGEMMLT_M[:2] if quick else IGEMMLT_M):
            for N in ((8192,) if quick else (8192, 28672)):
                a = torch.randint(-127, 128, (Ms, 8192), device=dev, dtype=torch.int8)
                b = torch.randint(-127, 128, (N, 8192), device=dev, dtype=torch.int8)
                t_op = timer(lambda: ops.igemmlt(a, b))
                row = dict(family="igemmlt", op="igemmlt", shape=f"{Ms}x8192x{N}",
                           dtype="int8", ms=t_op, tops=2 * Ms * 8192 * N / (t_op * 1e-3) / 1e12)
                if Ms > 16:  # torch._int_mm takes M > 16 only
                    row["int_mm_ms"] = timer(lambda: torch._int_mm(a, b.t()))
                    row["speedup_vs_int_mm"] = row["int_mm_ms"] / t_op
                if bF is not None:  # bitsandbytes' int8 GEMM: out = A @ B.T, int32
                    time_bnb(row, lambda: bF.int8_linear_matmul(a, b), t_op)
                rows.append(row)
                print(f"  igemmlt {Ms}x8192x{N}: {t_op:.4f} ms vs _int_mm "
                      f"{_fmt(row.get('int_mm_ms'), '.4f')} ms", file=sys.stderr, flush=True)

    # ---- Linear8bitLt at decode batch sizes ----------------------------------------------------
    def bench_int8_linear():
        from .nn import Linear8bitLt
        bnn = None
        if bF is not None:
            import bitsandbytes.nn as bnn
        for K, N in INT8_DECODE_SHAPES:
            lin = nn.Linear(K, N, bias=False).to(dev, torch.float16)
            layers = {thr: Linear8bitLt.from_float(lin, threshold=thr, has_fp16_weights=False)
                      .to(dev) for thr in (0.0, 6.0)}
            theirs = {}
            if bnn is not None:
                for thr in (0.0, 6.0):
                    b = bnn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=thr)
                    b.weight = bnn.Int8Params(lin.weight.detach().cpu().clone(),
                                              requires_grad=False, has_fp16_weights=False)
                    theirs[thr] = b.to(dev)
            nb = N * K + 4 * N  # the int8 weight and its row scales
            for Ms in INT8_DECODE_M:
                x = randn(Ms, K, dtype=torch.float16)
                x[:, 7] = 8.0  # two outlier columns (|x| >= 6)
                x[:, K // 2] = -9.0
                with torch.no_grad():
                    fp16_ms = timer(lambda x=x: torch.nn.functional.linear(x, lin.weight))
                    want = torch.nn.functional.linear(x.float(), lin.weight.float())
                    for thr, layer in layers.items():
                        ms = timer(lambda x=x, layer=layer: layer(x))
                        row = compare_row(
                            "int8_linear", f"Linear8bitLt t={thr:g}", f"{Ms}x{K}->{N}", "fp16",
                            ms, "fp16 F.linear", fp16_ms, "speedup", INT8_DECODE_MIN_SPEEDUP,
                            gbps=nb / (ms * 1e-3) / 1e9, efficiency=nb / (ms * 1e-3) / copy_bw,
                            rel_err=_rel_err(layer(x), want))
                        if thr in theirs:
                            time_bnb(row, lambda x=x, b=theirs[thr]: b(x), ms)
                        rows.append(row)
                        _print_compare(row)
            del layers, theirs

    # ---- optimizer step: 1.07 B bf16 parameters ----------------------------------------------
    def bench_optim():
        from . import optim as O

        def model(dtype):
            ps = [nn.Parameter(randn(*s, dtype=dtype)) for s in OPTIM_SHAPES]
            for p in ps:
                p.grad = randn(*p.shape, dtype=dtype) * 1e-3
            return ps

        n = sum(a * b for a, b in OPTIM_SHAPES)
        shape = f"{len(OPTIM_SHAPES)}x{OPTIM_SHAPES[0][0]}x{OPTIM_SHAPES[0][1]}"

        def step_ms(make_opt, dtype=torch.bfloat16):
            ps = model(dtype)
            opt = make_opt(ps)
            opt.step()  # states created
            torch.cuda.synchronize()
            state = sum(t.numel() * t.element_size() for st in opt.state.values()
                        for t in st.values() if isinstance(t, torch.Tensor))
            ms = timer(opt.step)
            del ps, opt
            torch.cuda.empty_cache()
            return ms, state / n

        bnb_ms = None
        if bF is not None:
            import bitsandbytes.optim as bO
            bnb_ms, _ = step_ms(lambda ps: bO.AdamW8bit(ps, lr=1e-4))
        torch_ms, torch_state = step_ms(
            lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), torch.float32)
        for name, cls, nbytes in (("AdamW8bit", O.AdamW8bit, 10 * n),
                                  ("PagedAdamW8bit", O.PagedAdamW8bit, 10 * n),
                                  ("AdamW (32-bit states)", O.AdamW, 22 * n)):
            ms, per = step_ms(lambda ps, cls=cls: cls(ps, lr=1e-4))
            row = compare_row("optim", f"{name} step", shape, "bf16", ms,
                              "torch AdamW fused (fp32)", torch_ms, "speedup", 1.0,
                              gbps=nbytes / (ms * 1e-3) / 1e9,
                              efficiency=nbytes / (ms * 1e-3) / copy_bw,
                              state_bytes_per_param=per, target_efficiency=OPTIM_MIN_EFFICIENCY,
                              baseline_state_bytes_per_param=torch_state)
            if bnb_ms is not None and "8bit" in name:
                row["bnb_ms"] = bnb_ms
                row["speedup_vs_bnb"] = bnb_ms / ms
            rows.append(row)
            _print_compare(row)

    # ---- decode: compiled 4-layer NF4 MLP at batch 1 ----------------------------------------
    def bench_decode():
        kinds = ("bf16", "nf4") if quick else ("bf16", "nf4", "nf4_nested")
        d = decode_mlp_times(dev, kinds=kinds, flush=flush)
        base = d["bf16"]
        for kind in kinds[1:]:
            r = d[kind]
            nb = r["bytes"]
            rows.append(compare_row(
                "decode", "decode MLP " + ("nf4 nested" if kind == "nf4_nested" else "nf4"),
                "1x4096, 4x(4096->11008->4096)", "bf16", r["ms"], "bf16 nn.Linear", base["ms"],
                "speedup", DECODE_MIN_SPEEDUP, gbps=nb / (r["ms"] * 1e-3) / 1e9,
                efficiency=nb / (r["ms"] * 1e-3) / copy_bw, weight_bytes=nb,
                baseline_weight_bytes=base["bytes"], rel_err=r["rel_err"],
                cudagraph_skips=r["cudagraph_skips"],
                baseline_cudagraph_skips=base["cudagraph_skips"],
                timed_recompiles=r["timed_recompiles"] + base["timed_recompiles"]))
            _print_compare(rows[-1])

    # ---- prefill: 2048 x 8192 -> 28672 ------------------------------------------------------
    def bench_prefill():
        shape, flops = "2048x8192->28672", 2 * 2048 * 8192 * 28672
        p = prefill_times(timer, dev)
        rows.append(compare_row(
            "prefill", "Linear4bit nf4", shape, "bf16", p["nf4_ms"], "bf16 F.linear",
            p["bf16_ms"], "ratio", PREFILL_4BIT_MAX_RATIO,
            tflops=flops / (p["nf4_ms"] * 1e-3) / 1e12, rel_err=p["nf4_rel_err"]))
        _print_compare(rows[-1])
        rows.append(compare_row(
            "prefill", "Linear8bitLt t=0", shape, "fp16", p["int8_ms"], "fp16 F.linear",
            p["fp16_ms"], "speedup", PREFILL_INT8_MIN_SPEEDUP,
            tflops=flops / (p["int8_ms"] * 1e-3) / 1e12, rel_err=p["int8_rel_err"]))
        _print_compare(rows[-1])
        rows.append(compare_row(
            "prefill", "Linear8bitLt t=6 outliers", shape, "fp16", p["int8_t6_ms"],
            "Linear8bitLt t=0", p["int8_t0_outlier_ms"], "ratio", PREFILL_OUTLIER_MAX_RATIO,
            tflops=flops / (p["int8_t6_ms"] * 1e-3) / 1e12, rel_err=p["int8_t6_rel_err"],
            baseline_rel_err=p["int8_t0_outlier_rel_err"], outlier_cols=p["outlier_cols"],
            outlier_row_frac=p["outlier_row_frac"]))
        _print_compare(rows[-1])
        # threshold 6 against fp16 F.linear: 16 outlier columns, then every column one
        for op, (M, K, N), n_out in (
                ("Linear8bitLt t=6 outliers", PREFILL_SMALL_SHAPE, 16),
                ("Linear8bitLt t=6 all outliers", PREFILL_DENSE_OUTLIER_SHAPE,
                 PREFILL_DENSE_OUTLIER_SHAPE[1])):
            p = prefill_times(timer, dev, M, K, N, outlier_cols=n_out, nf4=False)
            rows.append(compare_row(
                "prefill", op, f"{M}x{K}->{N}", "fp16", p["int8_t6_ms"], "fp16 F.linear",
                p["fp16_outlier_ms"], "ratio", PREFILL_OUTLIER_VS_FP16_MAX_RATIO,
                tflops=2 * M * K * N / (p["int8_t6_ms"] * 1e-3) / 1e12,
                rel_err=p["int8_t6_rel_err"], outlier_cols=p["outlier_cols"],
                outlier_row_frac=p["outlier_row_frac"]))
            _print_compare(rows[-1])

    def bench_qlora():
        q = qlora_step_times(timer, dev)
        for suffix, what in (("", "compiled"), ("_cudagraphs", "compiled, CUDA graphs")):
            rows.append(dict(family="qlora", op=f"qlora step ({what})", shape="8x512x4096 4 layers",
                             dtype="bf16", ms=q["opsq_nf4_ms" + suffix],
                             bf16_ms=q["bf16_base_ms" + suffix],
                             ratio_vs_bf16_base=q["ratio" + suffix],
                             speedup_vs_bf16=1.0 / q["ratio" + suffix]))
            print(f"  qlora step ({what}): opsq {q['opsq_nf4_ms' + suffix]:.3f} ms, bf16 base "
                  f"{q['bf16_base_ms' + suffix]:.3f} ms ({q['ratio' + suffix]:.3f}x)",
                  file=sys.stderr, flush=True)

    def bench_llm():
        from . import bench_llm as L
        variants = [v for v in (llm_variants or L.LLM_DEFAULT_VARIANTS)
                    if bF is not None or not v.startswith("bnb_")]
        n0 = len(rows)

        def update(results):
            del rows[n0:]
            rows.extend(L.llm_rows(results, llm_layers))
            if on_progress is not None:
                on_progress(_result(rows, copy_bw, meta))
        L.run_llm(timer, dev, layers=llm_layers, variants=variants, new_tokens=llm_new_tokens,
                  log=lambda m: print(m, file=sys.stderr, flush=True), on_variant=update)

    sections = {"gemv": bench_gemv, "4bit": bench_4bit, "int8": bench_int8,
                "int8_linear": bench_int8_linear, "optim": bench_optim,
                "transform": bench_transform, "igemmlt": bench_igemmlt, "decode": bench_decode,
                "prefill": bench_prefill, "qlora": bench_qlora, "llm": bench_llm}
    for fam in families:
        t0 = time.time()
        print(f"[{fam}]", file=sys.stderr, flush=True)
        try:
            sections[fam]()
        except Exception as e:  # one broken family must not lose the others' results
            traceback.print_exc(file=sys.stderr)
            rows.append(dict(family=fam, op=f"{fam} benchmark", shape="", ms=None,
                             error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                             if str(e) else type(e).__name__))
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:  # a sticky CUDA error: the next families will record it too
            print(f"[{fam}] CUDA error after the family: {e}", file=sys.stderr, flush=True)
        print(f"[{fam}] {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        if on_progress is not None:
            on_progress(_result(rows, copy_bw, meta))
    return _result(rows, copy_bw, meta)


def _print_compare(r: dict) -> None:
    """One progress line (stderr) for a :func:`compare_row` row."""
    print(f"  {r['family']:10s} {r['op']:28s} {r['shape']:18s} {r['ms']:9.4f} ms vs "
          f"{r['baseline']} {r['baseline_ms']:.4f} ms: {_verdict(r)}", file=sys.stderr,
          flush=True)


def _verdict(r: dict) -> str:
    """``"speed-up 3.42x (target >= 3.00x) ok"`` / ``"ratio 1.21x (target <= 1.10x) MISS"``."""
    metric = r["target_metric"]
    value = r["speedup"] if metric == "speedup" else r["ratio"]
    name = "speed-up" if metric == "speedup" else "ratio"
    return (f"{name} {value:.2f}x (target {r['target_cmp']} {r['target']:.2f}x) "
            f"{'ok' if r['ok'] else 'MISS'}")


def _result(rows: list, copy_bw: float, meta: Optional[dict] = None) -> dict:
    """The results dict: run metadata plus ``rows`` (a list of dicts, one per table line).

    Keys: date (UTC ISO), gpu, torch, cuda, python, opsq, bitsandbytes and transformers
    (versions, or None where not imported: the llm family's numbers depend on transformers'
    generate), copy_bandwidth_gbps, ``meta`` entries (families, quick, with_bnb, flush), rows.
    """
    import opsq
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
        python=platform.python_version(), opsq=opsq.__version__,
        bitsandbytes=getattr(sys.modules.get("bitsandbytes"), "__version__", None),
        transformers=getattr(sys.modules.get("transformers"), "__version__", None),
        copy_bandwidth_gbps=copy_bw / 1e9, **(meta or {}), rows=list(rows))


def _family(row: dict) -> str:
    fam = row.get("family", "")
    return _FAMILY_ALIASES.get(fam, fam)


def _grouped(res: dict) -> list:
    """``[(family, rows)]`` in :data:`FAMILIES` order, then unknown families; no copy row."""
    groups: dict = {}
    for r in res.get("rows", []):
        fam = _family(r)
        if fam != "copy":
            groups.setdefault(fam, []).append(r)
    order = [f for f in FAMILIES if f in groups] + [f for f in groups if f not in FAMILIES]
    return [(f, groups[f]) for f in order]


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def format_table(res: dict) -> str:
    """The results dict as text: a header, then one small table per family, each under a line
    ``== family: description ==``. Works on a dict loaded from ``--json`` (no GPU needed).

    Bandwidth families print ms, GB/s, efficiency (% of copy bandwidth) and speed-ups vs
    bf16 / bitsandbytes where measured; decode / prefill print opsq ms, baseline ms, the
    speed-up or ratio, the target and ``ok`` / ``MISS``.
    """
    bw = res.get("copy_bandwidth_gbps")
    lines = [f"opsq bench on {res.get('gpu', '?')} (torch {res.get('torch', '?')}, CUDA "
             f"{res.get('cuda', '?')}, Python {res.get('python', '?')}, opsq "
             f"{res.get('opsq', '?')}, bitsandbytes {res.get('bitsandbytes') or 'absent'}"
             f"{', transformers ' + res['transformers'] if res.get('transformers') else ''}) "
             f"{res.get('date', '')}; copy bandwidth {_fmt(bw, '.0f', '?')} GB/s"
             f"{'; L2 flushed by a read (cold, clean)' if res.get('flush') == 'read' else ''}"]
    for fam, rows in _grouped(res):
        title = FAMILY_TITLES.get(fam)
        lines += ["", f"== {fam}: {title} ==" if title else f"== {fam} =="]
        if fam == "llm":
            from .bench_llm import format_llm
            lines += format_llm(rows)
            continue
        errors = [r for r in rows if "error" in r]
        rows = [r for r in rows if "error" not in r]
        if fam in ("decode", "prefill") or (rows and "target_metric" in rows[0]):
            if rows:
                lines.append(f"{'op':28s} {'shape':30s} {'dtype':5s} {'opsq ms':>9s} "
                             f"{'base ms':>9s}  {'baseline':18s} result")
            for r in rows:
                extra = ""
                if "efficiency" in r:
                    extra += f"  [{r['gbps']:.0f} GB/s, {100 * r['efficiency']:.1f}% of copy]"
                if "tflops" in r:
                    extra += f"  [{r['tflops']:.0f} TFLOPS]"
                if "bnb_ms" in r:
                    extra += f"  [bnb {r['bnb_ms']:.4f} ms: {r['speedup_vs_bnb']:.2f}x]"
                if "state_bytes_per_param" in r:
                    extra += f"  [states {r['state_bytes_per_param']:.2f} B/param]"
                skips = (r.get("cudagraph_skips") or 0) + (r.get("baseline_cudagraph_skips") or 0)
                if skips:
                    extra += f"  [cudagraph skipped x{skips}]"
                if r.get("timed_recompiles"):
                    extra += f"  [recompiled x{r['timed_recompiles']} while timing]"
                lines.append(f"{r['op']:28s} {r['shape']:30s} {r.get('dtype', ''):5s} "
                             f"{r['ms']:9.4f} {r['baseline_ms']:9.4f}  {r['baseline']:18s} "
                             f"{_verdict(r)}{extra}")
        elif fam == "igemmlt":
            if rows:
                lines.append(f"{'op':28s} {'shape':18s} {'ms':>9s} {'TOPS':>7s} "
                             f"{'_int_mm ms':>10s} {'x _int_mm':>9s} {'vs bnb':>7s}")
            for r in rows:
                lines.append(f"{r['op']:28s} {r['shape']:18s} {r['ms']:9.4f} "
                             f"{r['tops']:7.0f} {_fmt(r.get('int_mm_ms'), '10.4f'):>10s} "
                             f"{_fmt(r.get('speedup_vs_int_mm'), '.2f'):>9s} "
                             f"{_fmt(r.get('speedup_vs_bnb'), '.2f'):>7s}")
        elif fam == "qlora":
            if rows:
                lines.append(f"{'op':40s} {'shape':10s} {'opsq ms':>9s} {'bf16-base ms':>12s} "
                             f"{'ratio':>6s}")
            for r in rows:
                lines.append(f"{r['op']:40s} {r.get('shape', ''):10s} {r['ms']:9.4f} "
                             f"{r['bf16_ms']:12.4f} {r['ratio_vs_bf16_base']:6.3f}")
        else:
            if rows:
                lines.append(f"{'op':28s} {'shape':18s} {'dtype':7s} {'ms':>9s} {'GB/s':>8s} "
                             f"{'eff%':>6s} {'vs bf16':>8s} {'vs bnb':>7s}")
            for r in rows:
                eff = r.get("efficiency")
                lines.append(
                    f"{r['op']:28s} {r.get('shape', ''):18s} {r.get('dtype', ''):7s} "
                    f"{r['ms']:9.4f} {_fmt(r.get('gbps'), '8.0f'):>8s} "
                    f"{_fmt(None if eff is None else 100 * eff, '6.1f'):>6s} "
                    f"{_fmt(r.get('speedup_vs_bf16'), '.2f'):>8s} "
                    f"{_fmt(r.get('speedup_vs_bnb'), '.2f'):>7s}"
                    + (f"  (bnb error: {r['bnb_error']})" if "bnb_error" in r else ""))
        for r in errors:
            lines.append(f"{r.get('op', fam)}: ERROR {r['error']}")
    return "\n".join(lines)


def _speedup_rows(res: dict) -> list:
    """``[(label, family, speed-up vs the 16-bit / torch baseline or None, vs bnb or None,
    target speed-up or None)]`` for every row that has a comparison."""
    out = []
    for fam, rows in _grouped(res):
        for r in rows:
            if "error" in r:
                continue
            label = f"{r['op']} {r.get('shape', '')} {r.get('dtype', '')}".strip()
            if "variant" in r:
                label = f"{r['op']} {r['variant']}"
            target = None
            if "target_metric" in r:
                base = r["speedup"]
                label += f" (vs {r['baseline']})"
                target = r["target"] if r["target_metric"] == "speedup" else 1.0 / r["target"]
            elif "speedup_vs_int_mm" in r:
                base = r["speedup_vs_int_mm"]
                label += " (vs _int_mm)"
            else:
                base = r.get("speedup_vs_bf16")
            bnb = r.get("speedup_vs_bnb")
            if base is not None or bnb is not None:
                out.append((label, fam, base, bnb, target))
    return out


def plot_results(res: dict, path: str) -> str:
    """Draw the results dict to a PNG at ``path`` (matplotlib, Agg canvas; no GPU needed).

    Left: horizontal bars of bandwidth efficiency (% of the measured copy bandwidth) per
    op/shape/dtype row, with lines at 100 % and at the 80 / 85 % targets. Right: speed-up
    over the 16-bit torch baseline (and over bitsandbytes where measured) for every row that
    has one, including decode / prefill (a tick marks each target). Title: GPU, torch, CUDA,
    date.

    Returns:
        ``path``.
    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = _grouped(res)
    eff_rows = [(f"{r['op']} {r.get('shape', '')} {r.get('dtype', '')}".strip(), fam,
                 100 * r["efficiency"])
                for fam, rows in groups for r in rows
                if "error" not in r and r.get("efficiency") is not None]
    sp_rows = _speedup_rows(res)
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]  # C7 (grey) is bnb's
    color = {f: palette[i % len(palette)] for i, (f, _) in enumerate(groups)}

    n = max(len(eff_rows), len(sp_rows), 4)
    fig = Figure(figsize=(18, 1.6 + 0.28 * n))
    FigureCanvasAgg(fig)
    ax_eff, ax_sp = fig.subplots(1, 2, gridspec_kw=dict(wspace=0.8))

    def family_handles(fams):
        return [Patch(color=color[f], label=f) for f in dict.fromkeys(fams)]

    if eff_rows:
        ys = list(range(len(eff_rows)))[::-1]
        vals = [v for _, _, v in eff_rows]
        ax_eff.barh(ys, vals, color=[color[f] for _, f, _ in eff_rows], height=0.7)
        for y, v in zip(ys, vals):
            ax_eff.text(v + 1, y, f"{v:.1f} %", va="center", fontsize=6)
        ax_eff.set_yticks(ys, [lab for lab, _, _ in eff_rows], fontsize=7)
        handles = [Line2D([], [], color="black", lw=1.2, label="copy bandwidth (100 %)")]
        ax_eff.axvline(100, color="black", lw=1.2)
        for t, ls in zip(EFFICIENCY_TARGETS, ("--", ":")):
            ax_eff.axvline(100 * t, color="red", ls=ls, lw=1)
            handles.append(Line2D([], [], color="red", ls=ls, lw=1,
                                  label=f"{100 * t:.0f} % target"))
        # below the axes: a legend inside would cover bars and their value labels
        ax_eff.legend(handles=handles + family_handles(f for _, f, _ in eff_rows), fontsize=7,
                      loc="upper center", bbox_to_anchor=(0.5, -0.6 / (1.6 + 0.28 * n)),
                      ncol=3, frameon=False)
        ax_eff.set_xlim(0, max(115.0, max(vals) * 1.1))
    else:
        ax_eff.text(0.5, 0.5, "no bandwidth rows", ha="center", va="center",
                    transform=ax_eff.transAxes)
    bw = res.get("copy_bandwidth_gbps")
    ax_eff.set_xlabel("bandwidth efficiency, % of copy bandwidth"
                      + (f" ({bw:.0f} GB/s)" if bw else ""))
    ax_eff.set_title("minimum bytes / median time", fontsize=9)

    if sp_rows:
        ys = list(range(len(sp_rows)))[::-1]
        h = 0.38
        base = [(y, v, fam) for y, (_, fam, v, _, _) in zip(ys, sp_rows) if v is not None]
        bnb = [(y, v) for y, (_, _, _, v, _) in zip(ys, sp_rows) if v is not None]
        off = h / 2 if bnb else 0.0
        target_at = {y: t for y, (_, _, _, _, t) in zip(ys, sp_rows) if t is not None}
        span = max([v for _, v, _ in base] + list(target_at.values()) + [1.0])
        ax_sp.barh([y + off for y, _, _ in base], [v for _, v, _ in base],
                   height=h if bnb else 0.7, color=[color[f] for _, _, f in base])
        for y, v, _ in base:  # at the bar's end, or past a target tick that would cover it
            t = target_at.get(y)
            x = t if t is not None and 0.0 <= t - v < 0.12 * span else v
            ax_sp.text(x, y + off, f"  {v:.2f}x", va="center", fontsize=6)
        handles = family_handles(f for _, _, f in base)
        if bnb:
            ax_sp.barh([y - h / 2 for y, _ in bnb], [v for _, v in bnb], height=h,
                       color="0.75", edgecolor="0.3", hatch="//")
            for y, v in bnb:
                ax_sp.text(v, y - h / 2, f" {v:.2f}x", va="center", fontsize=6)
            handles.append(Patch(facecolor="0.75", edgecolor="0.3", hatch="//",
                                 label="vs bitsandbytes"))
        tg = [(y, t) for y, (_, _, _, _, t) in zip(ys, sp_rows) if t is not None]
        if tg:
            ax_sp.scatter([t for _, t in tg], [y + off for y, _ in tg], marker="|", s=120,
                          color="red", zorder=3)
            handles.append(Line2D([], [], color="red", marker="|", ls="", markersize=12,
                                  label="target"))
        ax_sp.set_yticks(ys, [lab for lab, *_ in sp_rows], fontsize=7)
        ax_sp.axvline(1.0, color="black", lw=1.2)
        top = max([v for _, v, _ in base] + [v for _, v in bnb] + [t for _, t in tg] + [1.0])
        ax_sp.set_xlim(0, top * 1.25)  # room for the value labels
        ax_sp.legend(handles=handles, fontsize=7, loc="upper center",
                     bbox_to_anchor=(0.5, -0.6 / (1.6 + 0.28 * n)), ncol=4, frameon=False)
    else:
        ax_sp.text(0.5, 0.5, "no speed-up rows", ha="center", va="center",
                   transform=ax_sp.transAxes)
    ax_sp.set_xlabel("speed-up over the 16-bit torch baseline (x, higher is better)")
    ax_sp.set_title("time of the baseline / time of opsq (labels name other baselines)",
                    fontsize=9)

    fig.suptitle(f"opsq bench: {res.get('gpu', '?')}, torch {res.get('torch', '?')}, "
                 f"CUDA {res.get('cuda', '?')}, {res.get('date', '')}", fontsize=11,
                 y=1.0 + 0.35 / (1.6 + 0.28 * n))  # above the panel titles at any height
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _write_json(res: dict, path: str) -> None:
    """Write ``res`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def main(argv: Optional[list] = None) -> int:
    """Console entry (``opsq bench``). Returns the exit code: 0, 1 when a family raised (its
    row says why) or the plot failed, 2 without a CUDA device (argparse errors exit 2)."""
    p = argparse.ArgumentParser(
        prog="opsq bench",
        description="Time opsq's ops and layers on the GPU against the copy bandwidth measured "
                    "in the same run, torch's 16-bit path and bitsandbytes (when importable).")
    p.add_argument("--json", metavar="FILE",
                   help="write the results to this JSON file (rewritten after each family)")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if importable")
    p.add_argument("--only", type=parse_only, default=None, metavar="FAMILIES",
                   help=f"comma-separated families to run: {','.join(FAMILIES)} (default all)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw efficiency and speed-ups to this PNG (needs matplotlib)")
    p.add_argument("--llm-layers", type=int, default=32, metavar="N",
                   help="decoder layers of the llm family's Llama-3-8B-shaped model (default 32)")
    p.add_argument("--llm-variants", default=None, metavar="V1,V2",
                   help="llm variants (default all): bf16,nf4,nf4_nested,fp4,int8_t6,int8_t0,"
                        "bnb_nf4,bnb_int8")
    p.add_argument("--llm-new-tokens", type=int, default=128, metavar="N",
                   help="new tokens per timed generate in the llm family (default 128)")
    p.add_argument("--flush", choices=FLUSHES, default="write",
                   help="how the L2 is flushed before each event-timed run: write (do_bench's "
                        "256 MiB write, the default: the run then pays for writing back dirty "
                        "lines) or read (a 256 MiB read: cold and clean L2); wall-clock rows "
                        "(load-time quantize, the llm family's generate and prefill) never flush")
    p.add_argument("--from-json", metavar="FILE",
                   help="do not run: print the table (and --plot) from a saved --json file")
    args = p.parse_args(argv)
    rc = 0
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
    else:
        if not torch.cuda.is_available():
            print("opsq bench: no CUDA device (the benchmark times GPU kernels; "
                  "--from-json FILE prints a saved run)", file=sys.stderr)
            return 2
        res = run(quick=args.quick, with_bnb=not args.no_bnb, only=args.only,
                  on_progress=(lambda r: _write_json(r, args.json)) if args.json else None,
                  llm_layers=args.llm_layers, llm_new_tokens=args.llm_new_tokens,
                  llm_variants=args.llm_variants.split(",") if args.llm_variants else None,
                  flush=args.flush)
        if args.json:
            _write_json(res, args.json)
        if any("error" in r for r in res["rows"]):
            rc = 1
    print(format_table(res))
    if args.plot:
        try:
            plot_results(res, args.plot)
            print(f"opsq bench: plot written to {args.plot}", file=sys.stderr)
        except ImportError:
            print("opsq bench: matplotlib is not installed; --plot skipped", file=sys.stderr)
        except Exception as e:
            print(f"opsq bench: plot failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
