"""CPU tests of the llm benchmark family's pieces (the timed runs need a GPU: `opsq bench
--only llm`): the model builder swaps every linear but lm_head for the variant's layer and keeps
the function, the rows compare against bf16 and bitsandbytes, the table prints."""
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from opsq import bench  # noqa: E402
from opsq import bench_llm as L  # noqa: E402
from opsq.nn import Linear4bit, Linear8bitLt  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, max_position_embeddings=128)


@pytest.mark.parametrize("variant,cls", [("nf4", Linear4bit), ("nf4_nested", Linear4bit),
                                         ("fp4", Linear4bit), ("int8_t6", Linear8bitLt),
                                         ("int8_t0", Linear8bitLt)])
def test_build_llm_swaps_every_linear_but_lm_head(variant, cls):
    cfg = L.llama_config(2, **TINY)
    ref = L.build_llm("bf16", torch.device("cpu"), config=cfg)
    q = L.build_llm(variant, torch.device("cpu"), config=cfg)
    kinds = {name: type(m) for name, m in q.named_modules() if isinstance(m, (nn.Linear, cls))}
    assert type(q.lm_head) is nn.Linear
    swapped = [n for n, t in kinds.items() if t is cls]
    assert len(swapped) == 2 * 7, kinds  # q, k, v, o, gate, up, down per layer
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ref(ids).logits[0, -1].float()
        b = q(ids).logits[0, -1].float()
    assert not torch.equal(a, b)  # quantized
    assert L.cosine(a, b) > 0.98, (variant, L.cosine(a, b))
    assert L.weight_bytes(q) < L.weight_bytes(ref)


def test_nf4_packed_variant_keeps_the_packed_layout():
    """``nf4_packed`` is ``nf4`` held in bitsandbytes' order where opsq would tile it (the
    layout's A/B in one run): same outputs, layout "packed"; ``nf4`` tiles (CPU made eligible);
    not run unless named."""
    from unittest import mock
    from opsq import _tiled16
    lin = nn.Linear(512, 64, dtype=torch.bfloat16)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    with mock.patch.object(_tiled16, "tiled16_eligible", lambda *a, **k: True):
        tiled, packed = L.quantized_layer("nf4", lin), L.quantized_layer("nf4_packed", lin)
    assert (tiled.layout, packed.layout) == ("tiled16", "packed")
    assert not torch.equal(tiled.weight.data, packed.weight.data)  # the permutation happened
    assert torch.equal(tiled(x), packed(x))
    assert "nf4_packed" in L.LLM_VARIANTS and "nf4_packed" not in L.LLM_DEFAULT_VARIANTS


def test_quantized_layer_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        L.quantized_layer("nf5", nn.Linear(8, 8))
    with pytest.raises(ValueError, match="unknown llm variant"):
        L.run_llm(None, torch.device("cpu"), variants=["bf17"])


def _fake_results():
    lg = torch.randn(96, generator=torch.Generator().manual_seed(1))

    def res(step, comp, host, eager, pre, scale):
        return {"weight_bytes": int(16e9 / scale), "logits": lg + 0.01 * torch.randn(96),
                "decode step (CUDA graph)": {"ms": step},
                "generate compiled": {"ms": comp, "gpu_ms": comp - host, "host_ms": host,
                                      "peak_mem_bytes": int(17e9 / scale)},
                "generate opsq decoder": {"ms": step * 1.02, "gpu_ms": step, "host_ms": 0.02},
                "generate eager": {"ms": eager},
                "prefill 2048": {"ms": pre}}
    return {"bf16": res(5.0, 8.0, 3.0, 30.0, 60.0, 1),
            "nf4": res(1.9, 5.0, 3.1, 28.0, 66.0, 3.5),
            "bnb_nf4": res(4.0, 9.0, 4.0, 40.0, 90.0, 3.5),
            "int8_t6": {"decode step (CUDA graph)": {"error": "RuntimeError: boom"},
                        "logits": None}}


def test_llm_rows_and_table():
    rows = L.llm_rows(_fake_results(), 32)
    step = {(r["op"], r["variant"]): r for r in rows}
    r = step[("decode step (CUDA graph)", "nf4")]
    assert r["speedup"] == pytest.approx(5.0 / 1.9) and r["target"] == 2.5 and r["ok"]
    assert r["vs_bnb"] == pytest.approx(4.0 / 1.9)
    c = step[("generate compiled", "nf4")]
    assert c["target"] == 2.0 and not c["ok"]
    assert c["host_ratio_vs_bf16"] == pytest.approx(3.1 / 3.0) and c["host_ok"]
    p = step[("prefill 2048", "nf4")]
    assert p["ratio"] == pytest.approx(1.1) and p["ok"]
    assert step[("decode step (CUDA graph)", "int8_t6")]["error"].startswith("RuntimeError")
    lg = step[("logits", "nf4")]
    assert lg["cos_vs_bnb"] > 0.99 and "cos_vs_bf16" in lg
    res = {"rows": rows, "gpu": "test", "copy_bandwidth_gbps": 4000.0}
    text = bench.format_table(res)
    assert "== llm:" in text and "MISS" in text and "ERROR RuntimeError: boom" in text
    assert any(lab.startswith("decode step (CUDA graph) nf4")
               for lab, *_ in bench._speedup_rows(res))


def test_parse_only_knows_llm():
    assert bench.parse_only("llm") == ("llm",)


def test_measure_variant_runs_every_measure_on_the_cpu(monkeypatch):
    """measure_variant end to end on a tiny model, with the CUDA calls stubbed (the timings are
    the GPU machine's; this catches a broken measure before device time is spent on it): every
    measure of the 4-bit model gives a number (the merged and unmerged compiled generate and
    decode step included), bf16 has no "unmerged" rows, and the table prints them."""
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(L, "_cuda_kernel_ms", lambda fn: (fn(), 0.0)[1])
    cpu = torch.device("cpu")
    res = {}
    for v in ("bf16", "nf4"):
        model = L.build_llm(v, cpu, config=L.llama_config(2, **TINY), seed=3)
        res[v] = L.measure_variant(model, lambda fn: (fn(), 1.0)[1], cpu, new_tokens=6,
                                   eager_tokens=3, prefill_len=8, reps=1, log=lambda s: None)
        torch._dynamo.reset()
    want = set(L.LLM_MEASURES)
    assert want - set(res["nf4"]) == set(), want - set(res["nf4"])
    assert {m for m in want if "unmerged" in m} & set(res["bf16"]) == set()
    for v, r in res.items():
        for m in want & set(r):
            # (a number: per-token ms is a difference of two wall times, noisy on a CPU)
            assert "error" not in r[m] and math.isfinite(r[m]["ms"]), (v, m, r[m])
    lines = L.format_llm(L.llm_rows(res, 2))
    rows = [ln for ln in lines if ln.startswith(tuple(want))]
    assert len(rows) == sum(len(want & set(r)) for r in res.values())
    # the variant column starts at one offset: the measure column fits its longest name
    w = max(map(len, want))
    assert all(ln[w] == " " and ln[w + 1] in "bn" for ln in rows), "\n".join(rows)


def test_bnb_column_only_for_the_same_format():
    """The llm table's bitsandbytes column compares a variant with bitsandbytes' run of the same
    format and settings only: nf4 with bnb_nf4 (plain statistics), int8_t6 with bnb_int8
    (threshold 6). nf4_nested and int8_t0 used to be compared with those runs too."""
    res = _fake_results()
    res["nf4_nested"] = res["nf4"]
    rows = {(r["op"], r["variant"]): r for r in L.llm_rows(res, 32)}
    assert "vs_bnb" in rows[("decode step (CUDA graph)", "nf4")]
    assert "vs_bnb" not in rows[("decode step (CUDA graph)", "nf4_nested")]
    assert "cos_vs_bnb" not in rows[("logits", "nf4_nested")]
    assert L.BNB_PEER == {"nf4": "bnb_nf4", "int8_t6": "bnb_int8"}
