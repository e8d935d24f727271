"""``opsq bench --only llm``: the real workload, a Llama-3-8B-shaped transformers model decoding
at batch 1, in bf16, in opsq's 4-bit and 8-bit formats and (when importable) in bitsandbytes'.

The model is built from ``LlamaConfig`` (32 layers, hidden 4096, intermediate 14336, 32 heads,
8 KV heads, vocab 32000) with random weights (seeded: every variant quantizes the same bf16
weights); every ``nn.Linear`` but ``lm_head`` is swapped for the variant's layer.

Measures per variant (:func:`measure_variant`):

* ``generate compiled``: ``model.generate`` with ``cache_implementation="static"`` and
  ``CompileConfig(fullgraph=True)`` (transformers' documented fast path; for opsq's 4-bit
  models ``CompileConfig(fullgraph=True, mode=None, options=opsq.fusion.compile_options())``,
  the same mode plus the merge of sibling linears, and the row ``generate compiled, unmerged``
  without it), 32-token prompt,
  greedy. ms/token = (time of N new tokens - time of 1) / (N - 1), median of 3 after warm-up
  (the prompt's prefill cancels). GPU ms/token from ``torch.profiler`` kernel time over the same
  difference; host ms/token = the rest (time the GPU sat idle waiting for the host).
* ``generate eager``: the same without compile (dynamic cache), ms/token likewise.
* ``decode step``: one token through the model with a static cache, compiled with
  ``mode="reduce-overhead", fullgraph=True`` (a CUDA-graph replay), timed with ``do_bench``.
* ``generate opsq decoder``: :class:`opsq.decoding.StaticGreedyDecoder` (the fastest documented
  path: the same compiled step in a loop with no per-token host sync), ms/token as above.
* ``prefill 2048``: one eager forward of 2048 tokens (no cache), median of 5.
* peak memory during compiled generate and the weights' bytes; last-position logits of a fixed
  prompt (cosine to bf16 and to bitsandbytes' same variant).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

#: Every variant, in run order. ``bnb_*`` need bitsandbytes (0.50.2 for the GPU machine is in
#: ``../shared/peers``).
LLM_VARIANTS = ("bf16", "nf4", "nf4_nested", "fp4", "int8_t6", "int8_t0", "bnb_nf4",
                "bnb_int8", "nf4_packed")
#: The variants run when none are named: all but ``nf4_packed`` (NF4 held in bitsandbytes'
#: byte order on a device where opsq would tile it: the tiled16 layout's A/B, on request).
LLM_DEFAULT_VARIANTS = LLM_VARIANTS[:-1]
#: opsq variant -> the bitsandbytes variant of the same format and settings (``vs_bnb`` and
#: the logits cosine): NF4 with plain statistics, LLM.int8 at threshold 6. ``nf4_nested`` and
#: ``int8_t0`` have no bitsandbytes run of their settings, so no bitsandbytes column.
BNB_PEER = {"nf4": "bnb_nf4", "int8_t6": "bnb_int8"}

#: Measures, in table order: name -> (unit, target metric, {variant: target}).
#: ``speedup`` = bf16 ms / variant ms (>= target); ``ratio`` = variant ms / bf16 ms (<= target).
LLM_MEASURES = {
    "decode step (CUDA graph)": ("ms", "speedup", {"nf4": 2.5, "int8_t6": 1.5}),
    # the same step with opsq.fusion's merge of sibling 4-bit linears off (4-bit models only):
    # the merge's A/B in one run
    "decode step, unmerged": ("ms", "speedup", {}),
    "generate compiled": ("ms/token", "speedup", {"nf4": 2.0}),
    # transformers' CompileConfig without opsq.fusion's pass (4-bit models only; "generate
    # compiled" passes it as CompileConfig(mode=None, options=opsq.fusion.compile_options()))
    "generate compiled, unmerged": ("ms/token", "speedup", {}),
    "generate opsq decoder": ("ms/token", "speedup", {"nf4": 2.0}),
    "generate eager": ("ms/token", "speedup", {"nf4": 1.0, "int8_t6": 0.8, "int8_t0": 0.8}),
    "prefill 2048": ("ms", "ratio", {"nf4": 1.15}),
}
HOST_MAX_RATIO = 1.05     # opsq host ms/token in compiled generate <= bf16's * this
COSINE_MIN = 0.999        # logits cosine to bitsandbytes' same variant

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000)


def llama_config(layers: int = 32, **overrides):
    """The benchmark's ``LlamaConfig``: Llama-3-8B's shape with ``layers`` decoder layers
    (``overrides`` replace any field, e.g. a tiny model for tests)."""
    from transformers import LlamaConfig
    kw = dict(LLAMA3_8B, num_hidden_layers=layers, max_position_embeddings=4096,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _bnb_layer(variant: str, lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb
    if variant == "bnb_nf4":
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=lin.weight.dtype, compress_statistics=False,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(lin.weight.detach().contiguous(), requires_grad=False,
                                         compress_statistics=False, quant_type="nf4",
                                         blocksize=64, module=layer)
        layer.weight = layer.weight.to(lin.weight.device)  # quantizes
    else:  # bnb_int8, LLM.int8 with threshold 6 (transformers' default)
        layer = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        CB, SCB, _ = bnb.functional.int8_vectorwise_quant(lin.weight.detach().half())
        w = bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False)
        w.CB, w.SCB = CB, SCB
        layer.weight = w
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return layer


def quantized_layer(variant: str, lin: nn.Linear) -> nn.Module:
    """``lin`` (bf16/fp16 ``nn.Linear``) as the variant's layer, on ``lin``'s device.

    Raises:
        ValueError: unknown variant. ImportError: a ``bnb_*`` variant without bitsandbytes.
    """
    from opsq.nn import Linear4bit, Linear8bitLt
    if variant == "nf4_packed":  # the layer opsq builds for "nf4", kept in the packed layout
        from unittest import mock
        from opsq import _tiled16
        with mock.patch.object(_tiled16, "tiled16_eligible", lambda *a, **k: False):
            layer = quantized_layer("nf4", lin)
        assert layer.layout == "packed"
        return layer
    if variant in ("nf4", "nf4_nested", "fp4"):
        return Linear4bit.from_float(lin, quant_type=variant[:3], blocksize=64,
                                     compress_statistics=variant == "nf4_nested",
                                     compute_dtype=lin.weight.dtype)
    if variant in ("int8_t6", "int8_t0"):
        return Linear8bitLt.from_float(lin, threshold=6.0 if variant == "int8_t6" else 0.0,
                                       has_fp16_weights=False)
    if variant in ("bnb_nf4", "bnb_int8"):
        return _bnb_layer(variant, lin)
    raise ValueError(f"variant must be one of {LLM_VARIANTS}, got {variant!r}")


def build_llm(variant: str, dev, layers: int = 32, config=None, seed: int = 0) -> nn.Module:
    """The benchmark model in ``variant`` (see :data:`LLM_VARIANTS`), eval mode, no grad.

    The bf16 weights are drawn with ``seed`` on ``dev`` (so every variant quantizes the same
    weights); the swap happens one layer at a time, so peak memory stays near the bf16 model.
    """
    from transformers import LlamaForCausalLM
    config = config or llama_config(layers)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    if variant != "bf16":
        for name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child_name != "lm_head":
                    setattr(parent, child_name, quantized_layer(variant, child))
                    del child
        model.requires_grad_(False)
    if dev.type == "cuda" if isinstance(dev, torch.device) else str(dev).startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (bitsandbytes keeps CB/SCB/quant state outside the
    module's tensors: they are counted through the weight's attributes)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None and not isinstance(qs, torch.Tensor):
            for v in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
                add(v)
        add(getattr(t, "SCB", None))
    return total


def _cuda_kernel_ms(fn: Callable[[], object]) -> float:
    """GPU kernel time (ms) of ``fn()`` from ``torch.profiler``: the sum of every CUDA kernel's,
    memcpy's and memset's device time (one stream: the time the GPU was busy)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    total_us = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            total_us += evt.device_time
    return total_us / 1e3


def _wall_ms(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall-clock ms of ``fn()`` (synchronised before and after each run)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _per_token(run: Callable[[int], object], n: int, k: int, reps: int = 3,
               gpu: bool = False) -> dict:
    """Per-token cost of ``run(tokens)`` (a generate of ``tokens`` new tokens): the runs of
    ``n`` and of ``k`` < ``n`` tokens differ by ``n - k`` decode steps, so the prompt's prefill
    cancels.

    Returns:
        ``{"ms": wall ms/token, "wall_ms": wall ms of the n-token run, "tokens": n}``, plus with
        ``gpu`` ``"gpu_ms"`` (kernel ms/token, :func:`_cuda_kernel_ms`) and ``"host_ms"`` (the
        rest of ``ms``).
    """
    t_n = _wall_ms(lambda: run(n), reps)
    out = {"ms": (t_n - _wall_ms(lambda: run(k), reps)) / (n - k), "wall_ms": t_n, "tokens": n}
    if gpu:
        g = (_cuda_kernel_ms(lambda: run(n)) - _cuda_kernel_ms(lambda: run(k))) / (n - k)
        out.update(gpu_ms=g, host_ms=max(out["ms"] - g, 0.0))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flattened tensors, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def measure_variant(model: nn.Module, timer, dev, prompt_len: int = 32, new_tokens: int = 128,
                    eager_tokens: int = 32, prefill_len: int = 2048, reps: int = 3,
                    log: Callable[[str], None] = print) -> dict:
    """Every measure of the module docstring for one model. A measure that raises leaves
    ``{measure: {"error": ...}}`` and the others still run.

    Returns:
        ``{measure: {"ms", ...}}`` (``"generate compiled"`` also holds ``"peak_mem_bytes"``) plus
        ``"logits"`` (CPU fp32 ``(vocab,)``) and ``"weight_bytes"``.
    """
    from transformers import CompileConfig

    from opsq.decoding import StaticGreedyDecoder
    gen = torch.Generator(device=dev).manual_seed(123)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_len), device=dev, generator=gen)
    out: dict = {"weight_bytes": weight_bytes(model)}

    def attempt(name, fn):
        t0 = time.time()
        try:
            out[name] = fn()
        except Exception as e:  # record, keep measuring the rest
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            out[name] = {"error": msg}
            log(f"    {name}: ERROR {msg}")
        else:
            log(f"    {name}: {_brief(out[name])} ({time.time() - t0:.0f} s)")
        torch.cuda.empty_cache()

    with torch.no_grad():
        attempt("logits", lambda: model(prompt).logits[0, -1].float().cpu())

    def prefill():
        ids = torch.randint(3, vocab, (1, prefill_len), device=dev, generator=gen)
        with torch.no_grad():
            fn = (lambda: model(ids, use_cache=False, logits_to_keep=1))
            fn()
            return {"ms": _wall_ms(fn, 5)}
    attempt("prefill 2048", prefill)

    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(n, **kw):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **common, **kw)

    def eager():
        generate(4)
        return _per_token(generate, eager_tokens, 1, reps)
    attempt("generate eager", eager)

    from opsq.nn import Linear4bit
    four_bit = any(isinstance(m, Linear4bit) for m in model.modules())

    def compiled(merge_linears: bool):
        from torch._dynamo.utils import counters

        from opsq.fusion import compile_options
        config = (CompileConfig(fullgraph=True, mode=None, options=compile_options())
                  if merge_linears else CompileConfig(fullgraph=True))
        kw = dict(cache_implementation="static", compile_config=config)
        skips0 = counters["inductor"]["cudagraph_skips"]
        generate(new_tokens, **kw)  # compile, record the CUDA graphs
        generate(new_tokens, **kw)
        graphs0 = counters["stats"]["unique_graphs"]
        torch.cuda.reset_peak_memory_stats()
        res = _per_token(lambda n: generate(n, **kw), new_tokens, 1, reps, gpu=True)
        return dict(res, peak_mem_bytes=torch.cuda.max_memory_allocated(),
                    cudagraph_skips=int(counters["inductor"]["cudagraph_skips"] - skips0),
                    timed_recompiles=int(counters["stats"]["unique_graphs"] - graphs0))
    runs = [("generate compiled", four_bit)]
    if four_bit:
        runs.append(("generate compiled, unmerged", False))
    for name, merge in runs:
        attempt(name, lambda: compiled(merge))
        if hasattr(model, "_compiled_call"):  # transformers' compiled forward: free its graphs
            del model._compiled_call
        torch._dynamo.reset()

    dec = None

    def decode_step(merge_linears: bool):
        d = StaticGreedyDecoder(model, prompt_len + new_tokens + 8, merge_linears=merge_linears)
        d.prefill(prompt)
        for _ in range(3):  # compile, record, replay
            d.seek(prompt_len)
            d.decode_step()

        def one():
            d.seek(prompt_len)
            d.decode_step()
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return d, {"ms": timer(one)}

    def step():
        nonlocal dec
        dec, res = decode_step(True)
        return res
    attempt("decode step (CUDA graph)", step)

    def fast():
        dec.generate(prompt, new_tokens)
        return _per_token(lambda n: dec.generate(prompt, n), new_tokens, 2, reps, gpu=True)
    if dec is not None:
        attempt("generate opsq decoder", fast)
    del dec
    torch._dynamo.reset()
    if four_bit:
        attempt("decode step, unmerged", lambda: decode_step(False)[1])
        torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def _brief(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}"
                         for k, x in v.items())
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}"
    return str(v)


def llm_rows(results: dict, layers: int) -> list:
    """JSON rows (``family: "llm"``) from ``{variant: measure_variant(...)}``: one per variant
    and measure, with ``speedup``/``ratio`` vs bf16's same measure, ``vs_bnb`` (bitsandbytes'
    same-format ms / ours) where it ran, the target and ``ok``; plus a ``logits`` row per
    variant (cosine to bf16 and to bitsandbytes' same format, weight bytes, peak memory)."""
    shape = f"Llama-3-8B shape, {layers} layers, batch 1"
    rows = []
    base = results.get("bf16", {})
    for measure, (unit, metric, targets) in LLM_MEASURES.items():
        for variant, res in results.items():
            r = res.get(measure)
            if r is None:
                continue
            row = dict(family="llm", op=measure, variant=variant, shape=shape, unit=unit,
                       dtype="bf16")
            if "error" in r:
                rows.append(dict(row, ms=None, error=r["error"]))
                continue
            row.update(r)
            b = base.get(measure, {})
            if b.get("ms") and variant != "bf16":
                row["baseline"], row["baseline_ms"] = "bf16", b["ms"]
                row["speedup"], row["ratio"] = b["ms"] / r["ms"], r["ms"] / b["ms"]
                row["speedup_vs_bf16"] = row["speedup"]
            peer = results.get(BNB_PEER.get(variant, ""), {}).get(measure, {})
            if peer.get("ms"):
                row["bnb_ms"], row["vs_bnb"] = peer["ms"], peer["ms"] / r["ms"]
                row["speedup_vs_bnb"] = row["vs_bnb"]
            if variant in targets and "speedup" in row:
                t = targets[variant]
                row.update(target_metric=metric, target=t,
                           target_cmp=">=" if metric == "speedup" else "<=")
                row["ok"] = bool(row["speedup"] >= t if metric == "speedup" else row["ratio"] <= t)
            if measure == "generate compiled" and variant != "bf16" and b.get("host_ms"):
                row["host_ratio_vs_bf16"] = r["host_ms"] / b["host_ms"] if b["host_ms"] else None
                row["host_ok"] = bool(r["host_ms"] <= HOST_MAX_RATIO * b["host_ms"] + 1e-9)
            rows.append(row)
    bl = base.get("logits")
    for variant, res in results.items():
        lg = res.get("logits")
        row = dict(family="llm", op="logits", variant=variant, shape=shape, unit="cosine",
                   ms=None, weight_bytes=res.get("weight_bytes"))
        comp = res.get("generate compiled", {})
        if isinstance(comp, dict) and comp.get("peak_mem_bytes"):
            row["peak_mem_bytes"] = comp["peak_mem_bytes"]
        if isinstance(lg, torch.Tensor):
            if isinstance(bl, torch.Tensor):
                row["cos_vs_bf16"] = cosine(lg, bl)
            peer = results.get(BNB_PEER.get(variant, ""), {}).get("logits")
            if isinstance(peer, torch.Tensor):
                row["cos_vs_bnb"] = cosine(lg, peer)
                row["target"], row["ok"] = COSINE_MIN, bool(row["cos_vs_bnb"] >= COSINE_MIN)
        rows.append(row)
    return rows


def format_llm(rows: list) -> list:
    """Text lines of the llm family's table (one line per variant and measure)."""
    W = max(len(m) for m in LLM_MEASURES)  # the measure column's width
    lines = [f"{'measure':{W}s} {'variant':11s} {'ms':>9s} {'bf16 ms':>9s} {'x bf16':>7s} "
             f"{'x bnb':>6s} {'gpu ms':>7s} {'host ms':>7s}  target"]
    for r in rows:
        if r.get("op") == "logits":
            continue
        if "error" in r:
            lines.append(f"{r['op']:{W}s} {r['variant']:11s} ERROR {r['error'][:90]}")
            continue

        def f(v, spec):
            return "-" if v is None else format(v, spec)
        tgt = ""
        if "target" in r:
            val = r["speedup"] if r["target_metric"] == "speedup" else r["ratio"]
            tgt = (f"{'x' if r['target_metric'] == 'speedup' else 'ratio'} {val:.2f} "
                   f"{r['target_cmp']} {r['target']:.2f} {'ok' if r['ok'] else 'MISS'}")
        if "host_ok" in r:
            tgt += f"{'; ' if tgt else ''}host {r['host_ratio_vs_bf16']:.2f}x bf16 " \
                   f"{'ok' if r['host_ok'] else 'MISS'}"
        lines.append(f"{r['op']:{W}s} {r['variant']:11s} {r['ms']:9.3f} "
                     f"{f(r.get('baseline_ms'), '9.3f'):>9s} {f(r.get('speedup'), '7.2f'):>7s} "
                     f"{f(r.get('vs_bnb'), '6.2f'):>6s} {f(r.get('gpu_ms'), '7.3f'):>7s} "
                     f"{f(r.get('host_ms'), '7.3f'):>7s}  {tgt}")
    lg = [r for r in rows if r.get("op") == "logits"]
    if lg:
        lines.append(f"{'logits / memory':{W}s} {'variant':11s} {'cos bf16':>9s} {'cos bnb':>9s} "
                     f"{'weights GB':>10s} {'peak GB':>8s}")
        for r in lg:
            def g(k, spec, scale=1.0):
                v = r.get(k)
                return "-" if v is None else format(v / scale, spec)
            lines.append(f"{'':{W}s} {r['variant']:11s} {g('cos_vs_bf16', '9.5f'):>9s} "
                         f"{g('cos_vs_bnb', '9.5f'):>9s} {g('weight_bytes', '10.2f', 1e9):>10s} "
                         f"{g('peak_mem_bytes', '8.2f', 1e9):>8s}"
                         + ("" if "ok" not in r else f"  cos >= {COSINE_MIN} "
                            f"{'ok' if r['ok'] else 'MISS'}"))
    return lines


def bnb_available() -> bool:
    """Whether bitsandbytes imports (with a working CUDA library)."""
    try:
        import bitsandbytes  # noqa: F401
        return True
    except Exception:
        return False


def run_llm(timer, dev, layers: int = 32, variants=None, new_tokens: int = 128,
            log: Callable[[str], None] = print, on_variant=None) -> dict:
    """Build and measure each variant in turn (freeing the previous one). bitsandbytes
    variants are skipped (with a note) when bitsandbytes is not importable. ``on_variant`` is
    called with the results so far after each variant."""
    variants = list(variants or LLM_DEFAULT_VARIANTS)
    bad = [v for v in variants if v not in LLM_VARIANTS]
    if bad:
        raise ValueError(f"unknown llm variant(s) {bad}; choose from {LLM_VARIANTS}")
    have_bnb = bnb_available()
    results: dict = {}
    for variant in variants:
        if variant.startswith("bnb_") and not have_bnb:
            log(f"  [llm] {variant}: bitsandbytes not importable, skipped")
            continue
        t0 = time.time()
        log(f"  [llm] {variant}: building {layers} layers")
        try:
            model = build_llm(variant, dev, layers)
        except Exception as e:
            results[variant] = {m: {"error": f"build: {type(e).__name__}: {e}"[:200]}
                                for m in LLM_MEASURES}
            log(f"  [llm] {variant}: build failed: {e}")
            continue
        results[variant] = measure_variant(model, timer, dev, new_tokens=new_tokens, log=log)
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        log(f"  [llm] {variant}: {time.time() - t0:.0f} s")
        if on_variant is not None:
            on_variant(results)
    return results


__all__ = ["LLM_VARIANTS", "LLM_DEFAULT_VARIANTS", "LLM_MEASURES", "llama_config", "build_llm", "quantized_layer",
           "measure_variant", "llm_rows", "format_llm", "run_llm", "weight_bytes", "cosine"]
