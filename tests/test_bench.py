"""CPU tests of ``opsq bench`` (opsq/bench.py): the argument handling, the no-GPU exit, and the
table / plot rendering of a hand-made results dict holding a row of every family. The GPU
timing itself only runs on a device (``opsq bench``)."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from opsq import bench, bench_llm


def _bw_row(family, op, shape, dtype, ms, gbps, eff, **extra):
    return dict(family=family, op=op, shape=shape, dtype=dtype, ms=ms, gbps=gbps,
                efficiency=eff, backend="cuda", **extra)


def fake_results() -> dict:
    """A results dict as ``run()`` returns it, one or more rows per family, with targets both
    met (decode nf4, prefill int8) and missed (decode nested, prefill 4-bit, outliers)."""
    rows = [
        dict(family="copy", op="copy_", shape="1 GiB", ms=0.5, gbps=4200.0, efficiency=1.0),
        _bw_row("gemv", "gemv_4bit", "1x4096->4096", "bf16", 0.0123, 1500.0, 0.357,
                bf16_ms=0.0200, speedup_vs_bf16=1.626, bnb_ms=0.0150, speedup_vs_bnb=1.22),
        _bw_row("gemv", "gemv_4bit nested", "1x8192->28672", "fp16", 0.0456, 2600.0, 0.619,
                bf16_ms=0.120, speedup_vs_bf16=2.63),
        _bw_row("4bit", "dequantize_4bit", "8192x8192", "bf16", 0.0509, 3380.0, 0.797),
        _bw_row("int8", "vectorwise_quant t=6", "8192x8192", "fp16", 0.128, 1570.0, 0.371),
        _bw_row("transform", "transform row->col32", "8192x8192", "int8", 0.400, 335.0, 0.079),
        dict(family="igemmlt", op="igemmlt", shape="2048x8192x8192", dtype="int8", ms=0.292,
             int_mm_ms=0.296, speedup_vs_int_mm=1.014, tops=941.0, bnb_ms=0.350,
             speedup_vs_bnb=1.199),
        dict(family="igemmlt", op="igemmlt", shape="16x8192x8192", dtype="int8", ms=0.0412,
             tops=52.0, bnb_ms=0.0600, speedup_vs_bnb=1.456),  # no _int_mm at M <= 16
        bench.compare_row("decode", "decode MLP nf4", "1x4096, 4x(4096->11008->4096)", "bf16",
                          0.100, "bf16 nn.Linear", 0.350, "speedup", bench.DECODE_MIN_SPEEDUP,
                          gbps=2900.0, efficiency=0.69, rel_err=0.08, cudagraph_skips=0),
        bench.compare_row("decode", "decode MLP nf4 nested", "1x4096, 4x(4096->11008->4096)",
                          "bf16", 0.140, "bf16 nn.Linear", 0.350, "speedup",
                          bench.DECODE_MIN_SPEEDUP, gbps=2000.0, efficiency=0.48,
                          cudagraph_skips=2),
        bench.compare_row("prefill", "Linear4bit nf4", "2048x8192->28672", "bf16", 1.32,
                          "bf16 F.linear", 1.10, "ratio", bench.PREFILL_4BIT_MAX_RATIO,
                          tflops=730.0),
        bench.compare_row("prefill", "Linear8bitLt t=0", "2048x8192->28672", "fp16", 0.80,
                          "fp16 F.linear", 1.12, "speedup", bench.PREFILL_INT8_MIN_SPEEDUP),
        bench.compare_row("prefill", "Linear8bitLt t=6 outliers", "2048x8192->28672", "fp16",
                          0.96, "Linear8bitLt t=0", 0.80, "ratio",
                          bench.PREFILL_OUTLIER_MAX_RATIO, outlier_cols=16),
        bench.compare_row("prefill", "Linear8bitLt t=6 outliers", "2048x4096->4096", "fp16",
                          0.148, "fp16 F.linear", 0.092, "ratio",
                          bench.PREFILL_OUTLIER_VS_FP16_MAX_RATIO, outlier_cols=16),
        dict(family="qlora", op="qlora step (4x4096^2 nf4 + r16 LoRA)", shape="8x512",
             dtype="bf16", ms=12.5, bf16_ms=11.0, ratio_vs_bf16_base=12.5 / 11.0,
             speedup_vs_bf16=11.0 / 12.5),
        bench.compare_row("int8_linear", "Linear8bitLt t=6", "16x8192->8192", "fp16", 0.030,
                          "fp16 F.linear", 0.044, "speedup", bench.INT8_DECODE_MIN_SPEEDUP,
                          gbps=2237.0, efficiency=0.53, bnb_ms=0.063, speedup_vs_bnb=2.1),
        bench.compare_row("optim", "AdamW8bit step", "8x8192x16384", "bf16", 3.2,
                          "torch AdamW fused (fp32)", 6.0, "speedup", 1.0, gbps=3350.0,
                          efficiency=0.79, state_bytes_per_param=2.03, bnb_ms=4.0,
                          speedup_vs_bnb=1.25),
    ]
    rows += bench_llm.llm_rows({"bf16": {"decode step (CUDA graph)": {"ms": 5.0}},
                                "nf4": {"decode step (CUDA graph)": {"ms": 2.0}}}, 32)
    return dict(date="2026-11-22T10:00:00+00:00", gpu="NVIDIA H200", torch="2.11.0+cu130",
                cuda="13.0", python="3.12.3", opsq="0.1.0", bitsandbytes=None,
                copy_bandwidth_gbps=4243.0, families=list(bench.FAMILIES), quick=False,
                with_bnb=False, rows=rows)


def _line(text: str, op: str) -> str:
    """The one table line whose op column (text before the first run of 2+ spaces) is ``op``."""
    hits = [ln for ln in text.splitlines() if re.split(r"\s{2,}", ln)[0] == op]
    assert len(hits) == 1, (op, text)
    return hits[0]


def test_compare_row_targets():
    r = bench.compare_row("decode", "m", "s", "bf16", 0.1, "b", 0.35, "speedup", 3.0)
    assert r["speedup"] == pytest.approx(3.5) and r["ratio"] == pytest.approx(0.1 / 0.35)
    assert r["ok"] is True and r["target_cmp"] == ">="
    r = bench.compare_row("prefill", "m", "s", "bf16", 1.2, "b", 1.0, "ratio", 1.10)
    assert r["ok"] is False and r["target_cmp"] == "<=" and r["ratio"] == pytest.approx(1.2)
    assert bench.compare_row("prefill", "m", "s", "bf16", 1.1, "b", 1.0, "ratio", 1.15)["ok"]
    with pytest.raises(ValueError):
        bench.compare_row("prefill", "m", "s", "bf16", 1.0, "b", 1.0, "faster", 1.0)


def test_format_table_has_every_family_and_verdicts():
    res = fake_results()
    text = bench.format_table(res)
    assert text.splitlines()[0].startswith("opsq bench on NVIDIA H200 (torch 2.11.0+cu130, "
                                           "CUDA 13.0")
    assert "copy bandwidth 4243 GB/s" in text.splitlines()[0]
    headers = [ln for ln in text.splitlines() if ln.startswith("== ")]
    assert [h.split(":")[0][3:] for h in headers] == list(bench.FAMILIES)
    # families print in FAMILIES order, each header before its rows
    assert text.index("== gemv:") < text.index("gemv_4bit nested") < text.index("== 4bit:")

    gemv = _line(text, "gemv_4bit")
    assert "0.0123" in gemv and "1500" in gemv and "35.7" in gemv
    assert gemv.split()[-2:] == ["1.63", "1.22"]  # vs bf16, vs bnb
    assert _line(text, "gemv_4bit nested").split()[-2:] == ["2.63", "-"]  # no bnb timing
    big, small = ([ln for ln in text.splitlines() if ln.startswith("igemmlt ") and shape in ln]
                  for shape in (" 2048x8192x8192 ", " 16x8192x8192 "))
    assert len(big) == len(small) == 1
    assert big[0].split()[-4:] == ["941", "0.2960", "1.01", "1.20"]  # TOPS, _int_mm, x, vs bnb
    assert small[0].split()[-4:] == ["52", "-", "-", "1.46"]  # no _int_mm at M = 16

    nf4 = _line(text, "decode MLP nf4")
    assert "0.1000" in nf4 and "0.3500" in nf4
    assert "speed-up 3.50x (target >= 3.00x) ok" in nf4
    nested = _line(text, "decode MLP nf4 nested")
    assert "speed-up 2.50x (target >= 3.00x) MISS" in nested
    assert "cudagraph skipped x2" in nested
    assert "ratio 1.20x (target <= 1.10x) MISS" in _line(text, "Linear4bit nf4")
    assert "speed-up 1.40x (target >= 1.30x) ok" in _line(text, "Linear8bitLt t=0")
    outliers = [ln for ln in text.splitlines() if ln.startswith("Linear8bitLt t=6 outliers ")]
    assert len(outliers) == 2
    assert "2048x8192->28672" in outliers[0] and "ratio 1.20x (target <= 1.15x) MISS" in outliers[0]
    assert "2048x4096->4096" in outliers[1] and "fp16 F.linear" in outliers[1]
    assert "ratio 1.61x (target <= 1.00x) MISS" in outliers[1]
    assert "1.136" in _line(text, "qlora step (4x4096^2 nf4 + r16 LoRA)")
    assert "speed-up 1.47x (target >= 1.50x) MISS" in _line(text, "Linear8bitLt t=6")
    assert "speed-up 1.88x (target >= 1.00x) ok" in _line(text, "AdamW8bit step")
    assert "copy_" not in text  # the ceiling is in the header, not a table row


def test_format_table_error_rows_and_legacy_json():
    res = fake_results()
    res["rows"] = [dict(family="gemv_4bit", op="gemv_4bit", shape="1x4096->4096", dtype="bf16",
                        ms=0.014, gbps=600.0, efficiency=0.159, speedup_vs_bf16=1.35),
                   dict(family="decode", op="decode benchmark", shape="", ms=None,
                        error="RuntimeError: boom")]
    text = bench.format_table(res)
    assert "== gemv:" in text and "== gemv_4bit" not in text  # old family name folded in
    assert "decode benchmark: ERROR RuntimeError: boom" in text
    assert "== prefill" not in text


def test_format_table_survives_json_round_trip(tmp_path):
    res = fake_results()
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(res))
    assert bench.format_table(json.loads(path.read_text())) == bench.format_table(res)


def test_parse_only():
    assert bench.parse_only(None) == bench.FAMILIES
    assert bench.parse_only("all") == bench.FAMILIES
    assert bench.parse_only("prefill, gemv,decode,gemv") == ("gemv", "decode", "prefill")
    assert bench.parse_only(["qlora"]) == ("qlora",)
    for bad in ("bogus", "gemv,bogus", "", "gemv,"):
        with pytest.raises(Exception, match="choose from"):
            bench.parse_only(bad)


@pytest.mark.parametrize("argv", [["--only", "bogus"], ["--only", "gemv,nope"], ["--only", ""],
                                  ["--frobnicate"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: opsq bench" in err
    if argv[0] == "--only":
        assert "argument --only: unknown benchmark famil" in err and "choose from gemv" in err


def test_main_without_cuda_returns_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert bench.main(["--only", "decode,prefill", "--quick"]) == 2
    with pytest.raises(RuntimeError, match="CUDA"):
        bench.run(only="gemv")


def test_from_json_prints_table_without_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fake_results()))
    assert bench.main(["--from-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "== decode:" in out and "MISS" in out and " ok" in out


def test_plot_without_matplotlib_is_a_notice(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(fake_results()))
    png = tmp_path / "bench.png"
    assert bench.main(["--from-json", str(path), "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    assert "== qlora:" in captured.out
    assert not png.exists()


def test_plot_results_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert bench.plot_results(fake_results(), str(png)) == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_rows_cover_decode_and_prefill():
    labels = [lab for lab, *_ in bench._speedup_rows(fake_results())]
    assert any(lab.startswith("decode MLP nf4 ") and "vs bf16 nn.Linear" in lab
               for lab in labels)
    assert any(lab.startswith("Linear8bitLt t=6") for lab in labels)
    assert any("vs _int_mm" in lab for lab in labels)
    by_label = {lab: (base, bnb, target) for lab, _, base, bnb, target
                in bench._speedup_rows(fake_results())}
    base, bnb, target = by_label["gemv_4bit 1x4096->4096 bf16"]
    assert (base, bnb, target) == (pytest.approx(1.626), pytest.approx(1.22), None)
    # a ratio target (<= 1.10) is drawn as the speed-up 1 / 1.10
    base, _, target = by_label["Linear4bit nf4 2048x8192->28672 bf16 (vs bf16 F.linear)"]
    assert base == pytest.approx(1.10 / 1.32) and target == pytest.approx(1 / 1.10)
    # issue 14's int8 prefill target: threshold 6 at 2048x4096->4096 no slower than fp16
    base, _, target = by_label["Linear8bitLt t=6 outliers 2048x4096->4096 fp16 (vs fp16 F.linear)"]
    assert base == pytest.approx(0.092 / 0.148) and target == pytest.approx(1.0)


def test_plot_with_empty_results(tmp_path):
    pytest.importorskip("matplotlib")
    res = fake_results()
    res["rows"] = res["rows"][:1]  # only the copy row: both panels say "no ... rows"
    png = tmp_path / "empty.png"
    bench.plot_results(res, str(png))
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("nf4", [True, False])
def test_prefill_times_keys_on_cpu(nf4):
    """prefill_times' dictionary (what the prefill rows read), on a tiny shape with the CPU
    reference kernels and a timer that only calls: nf4=False skips the 4-bit half."""
    calls = []

    def timer(fn):
        fn()
        calls.append(fn)
        return 1.0 + len(calls)

    p = bench.prefill_times(timer, "cpu", M=8, K=64, N=32, outlier_cols=4, nf4=nf4)
    int8_keys = {"int8_ms", "fp16_ms", "int8_t0_outlier_ms", "int8_t6_ms", "fp16_outlier_ms"}
    assert int8_keys <= set(p)
    assert ({"nf4_ms", "bf16_ms"} <= set(p)) == nf4
    assert len(calls) == 3 * (len(int8_keys) + (2 if nf4 else 0))  # three rounds each
    assert p["outlier_cols"] == 4 and 0.5 < p["outlier_row_frac"] <= 1.0
    assert p["int8_t6_rel_err"] < 0.05  # the outlier columns go through the fp16 path


def test_table_header_names_transformers_when_recorded():
    """The llm family's numbers depend on transformers' generate: its version is recorded in
    the results (``transformers``) and printed in the table's first line when present."""
    head = bench.format_table({"gpu": "G", "torch": "2.x", "transformers": "5.17",
                               "rows": []}).splitlines()[0]
    assert "transformers 5.17" in head
    assert "transformers" not in bench.format_table({"gpu": "G", "rows": []}).splitlines()[0]


def test_outlier_input_has_few_outlier_columns():
    """The int8 family's threshold-6 input holds LLM.int8's few outlier features: exactly the 16
    chosen columns reach |x| >= 6 (the family's old 2 N(0, 1) input at 8192 rows made every
    column an outlier column)."""
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(4))
    xo, cols = bench._with_outlier_columns(x, 16, 20.0)
    hit = (xo.abs() >= 6.0).any(dim=0)
    assert int(hit.sum()) == 16 and bool(hit[cols].all())
    assert torch.equal(xo[:, ~hit], x[:, ~hit])


def test_interleaved_times_each_function_in_turn():
    """_interleaved times the functions in turn, round after round, and keeps each one's
    median: a drift over the run falls on both sides of a ratio."""
    calls, clock = [], iter(range(100))

    def timer(fn):
        calls.append(fn())
        return float(next(clock))
    out = bench._interleaved(timer, {"a": lambda: "a", "b": lambda: "b"}, rounds=3)
    assert calls == ["a", "b"] * 3 and out == {"a": 2.0, "b": 3.0}


def test_flush_is_recorded_and_checked(monkeypatch, capsys):
    """``--flush read`` is recorded in the results and named in the table's first line; a
    flush other than write/read is refused by name, on the command line and in the functions
    (before any CUDA work)."""
    head = bench.format_table({"gpu": "G", "flush": "read", "rows": []}).splitlines()[0]
    assert "L2 flushed by a read" in head
    for res in ({"gpu": "G", "flush": "write", "rows": []}, {"gpu": "G", "rows": []}):
        assert "flushed" not in bench.format_table(res).splitlines()[0]
    with pytest.raises(SystemExit) as e:
        bench.main(["--flush", "sideways"])
    assert e.value.code == 2 and "argument --flush: invalid choice" in capsys.readouterr().err
    for call in (lambda: bench._timer("sideways"), lambda: bench._l2_flush("sideways"),
                 lambda: bench.run(only="gemv", flush="sideways")):
        with pytest.raises(ValueError, match="flush must be one of"):
            call()
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "run", lambda **kw: seen.append(kw["flush"]) or
                        {"gpu": "G", "flush": kw["flush"], "rows": []})
    assert bench.main(["--flush", "read", "--only", "gemv"]) == 0
    assert bench.main(["--only", "gemv"]) == 0
    assert seen == ["read", "write"]  # the flag reaches run(); write is the default
    assert "L2 flushed by a read" in capsys.readouterr().out.splitlines()[0]
