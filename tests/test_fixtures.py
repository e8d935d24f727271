"""opsq against bitsandbytes 0.50.2's own CUDA outputs (shared/fixtures/bnb-0.50.2)."""
import pytest
import torch

import opsq
from opsq import functional as F
from opsq._constants import create_dynamic_map
from opsq.nn import Linear8bitLt
from opsq.reference.fourbit import unpack_codes

from fixture_utils import fixture_cases, linear4bit_fixture, load_fixture, quant_meta

FOURBIT = fixture_cases("4bit") or ["nf4_bs64_bf16"]


def _nested(d, meta):
    if d["qs.absmax"].dtype != torch.uint8:
        return (None, None, None, 256)
    return (d["qs.nested_absmax"], d["qs.nested_quant_map"],
            torch.tensor([meta["nested_offset"]], dtype=torch.float32), meta["nested_blocksize"])


@pytest.mark.parametrize("case", FOURBIT)
def test_quantize_4bit_codes_match_bnb(case):
    d = load_fixture(case)
    meta = quant_meta(d)
    A = d["A"]
    packed, state = F.quantize_4bit(A, blocksize=meta["blocksize"], quant_type=meta["quant_type"],
                                    compress_statistics="nested_blocksize" in meta,
                                    quant_storage=d["packed"].dtype)
    assert packed.shape == d["packed"].shape and packed.dtype == d["packed"].dtype
    ours = unpack_codes(packed, A.numel())
    theirs = unpack_codes(d["packed"], A.numel())
    bad = (ours != theirs).nonzero().flatten()
    # Only exact ties (|x|/absmax within 1 ulp of a decision threshold) may round either way.
    _, am = torch.ops.opsq.quantize_4bit(A, meta["blocksize"], meta["quant_type"], torch.uint8)
    x = A.reshape(-1).float() * (1.0 / am.repeat_interleave(meta["blocksize"])[: A.numel()])
    table = F.get_4bit_type(meta["quant_type"])
    for i in bad.tolist():
        lo, hi = sorted((table[int(ours[i])].item(), table[int(theirs[i])].item()))
        mid = (lo + hi) / 2
        assert abs(abs(x[i].item()) - abs(mid)) < 4e-7, (i, x[i].item(), ours[i], theirs[i])
    assert bad.numel() <= max(1, A.numel() // 1000)


@pytest.mark.parametrize("case", FOURBIT)
def test_absmax_and_nested_state_match_bnb(case):
    d = load_fixture(case)
    meta = quant_meta(d)
    nested = "nested_blocksize" in meta
    _, state = F.quantize_4bit(d["A"], blocksize=meta["blocksize"],
                               quant_type=meta["quant_type"], compress_statistics=nested,
                               quant_storage=d["packed"].dtype)
    assert torch.equal(state.code, d["qs.quant_map"])
    if not nested:
        assert torch.equal(state.absmax, d["qs.absmax"])
        return
    assert torch.equal(state.state2.code, d["qs.nested_quant_map"])
    assert torch.equal(create_dynamic_map(), d["qs.nested_quant_map"])
    assert state.offset.item() == pytest.approx(meta["nested_offset"], rel=1e-6)
    torch.testing.assert_close(state.state2.absmax, d["qs.nested_absmax"], rtol=1e-6, atol=0)
    diff = (state.absmax.int() - d["qs.absmax"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("case", FOURBIT)
def test_dequantize_4bit_matches_bnb_exactly(case):
    d = load_fixture(case)
    meta = quant_meta(d)
    out = torch.ops.opsq.dequantize_4bit(d["packed"], d["qs.absmax"], meta["blocksize"],
                                         meta["quant_type"], list(d["A"].shape),
                                         d["dequant"].dtype, *_nested(d, meta))
    assert torch.equal(out, d["dequant"])


@pytest.mark.parametrize("case", FOURBIT)
def test_quant_state_from_dict_as_dict_roundtrip(case):
    d = load_fixture(case)
    qs = {k[3:]: v for k, v in d.items() if k.startswith("qs.")}
    state = F.QuantState.from_dict(qs, device="cpu")
    back = state.as_dict(packed=True)
    assert sorted(back) == sorted(qs)
    for k in qs:
        assert torch.equal(back[k], qs[k]), k
    out = F.dequantize_4bit(d["packed"], state)
    assert torch.equal(out, d["dequant"])


@pytest.mark.parametrize("case", FOURBIT)
@pytest.mark.parametrize("which", ["gemv", "matmul"])
def test_gemv_and_linear_4bit_match_bnb(case, which):
    d = load_fixture(case)
    if f"{which}_x" not in d:
        pytest.skip("no such output in this fixture")
    meta = quant_meta(d)
    op = torch.ops.opsq.gemv_4bit if which == "gemv" else torch.ops.opsq.linear_4bit
    x = d[f"{which}_x"]
    y = op(x, d["packed"], list(d["A"].shape), d["qs.absmax"], meta["blocksize"],
           meta["quant_type"], None, *_nested(d, meta))
    ref = d[f"{which}_out"]
    assert y.dtype == ref.dtype and y.shape == ref.shape
    # bnb accumulates in a different order; allow 1 ulp of the output dtype at its magnitude.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[ref.dtype]
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())


def _thr_key(thr):
    return f"{thr}".replace(".", "p")


@pytest.mark.parametrize("thr", [0.0, 6.0])
def test_int8_vectorwise_quant_matches_bnb(thr):
    d = load_fixture("int8_128x256")
    t = _thr_key(thr)
    CA, SCA, mask = F.int8_vectorwise_quant(d["A"], threshold=thr)
    assert torch.equal(SCA, d[f"vq{t}.SCA"])
    diff = (CA.int() - d[f"vq{t}.CA"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 2
    if thr > 0:
        assert torch.equal(mask.nonzero().flatten(), d[f"vq{t}.outlier_cols"])
        assert (CA[:, mask] == 0).all()
    else:
        assert not mask.any()


@pytest.mark.parametrize("thr", [0.0, 6.0])
def test_int8_double_quant_matches_bnb(thr):
    d = load_fixture("int8_128x256")
    t = _thr_key(thr)
    out_row, out_col, row_stats, col_stats, mask = F.int8_double_quant(d["A"], threshold=thr)
    assert torch.equal(row_stats, d[f"dq{t}.row_stats"])
    assert torch.equal(col_stats, d[f"dq{t}.col_stats"])
    r = (out_row.int() - d[f"dq{t}.out_row"].int()).abs()
    assert r.max() <= 1 and (r > 0).sum() <= 2
    # bnb scales columns in the input dtype (fp16) before dividing; opsq stays in fp32:
    # codes may differ by one at those near-ties, nowhere by more.
    c = (out_col.int() - d[f"dq{t}.out_col"].int()).abs()
    assert c.max() <= 1 and (c > 0).float().mean() < 0.01
    if thr > 0:
        assert torch.equal(mask.nonzero().flatten(), d[f"dq{t}.outlier_cols"])


def test_int8_weight_quant_igemmlt_mm_dequant_match_bnb():
    d = load_fixture("int8_128x256")
    CB, SCB, _ = F.int8_vectorwise_quant(d["W"])
    assert torch.equal(SCB, d["SCB"])
    diff = (CB.int() - d["CB"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 4
    C = F.int8_linear_matmul(d["vq0p0.CA"], d["CB"])
    assert torch.equal(C, d["C_int32"])
    out = F.int8_mm_dequant(d["C_int32"], d["vq0p0.SCA"], d["SCB"])
    assert out.dtype == torch.float16
    assert torch.equal(out, d["mm_dequant_fp16"])


@pytest.mark.parametrize("case", fixture_cases("linear4bit_state_dict") or ["linear4bit_fp4"])
def test_linear4bit_loads_bnb_state_dict(case):
    d, sd, layer = linear4bit_fixture(case)
    if "bias" in sd:  # a dtype-only conversion: does not quantize
        layer = layer.to(sd["bias"].dtype)
        assert not layer.is_quantized
    layer.load_state_dict(sd)
    y = layer(d["x"])
    assert y.dtype == d["y"].dtype
    torch.testing.assert_close(y.float(), d["y"].float(), rtol=8e-3, atol=8e-3)
    back = layer.state_dict()
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("case", fixture_cases("linear4bit_state_dict") or ["linear4bit_fp4"])
def test_linear4bit_quantizes_like_bnb(case):
    d, sd, layer = linear4bit_fixture(case)
    meta = quant_meta(d)
    layer.weight = opsq.nn.Params4bit(d["W_fp32"].clone(), quant_type=meta["quant_type"],
                                      compress_statistics="nested_blocksize" in meta)
    layer = layer.to("cpu")
    ours = layer.state_dict()
    assert sorted(ours) == sorted(sd)
    assert torch.equal(ours["weight"], sd["weight"])
    # the code table's bytes too: bitsandbytes stores FP4's code 8 as +0.0 (not -0.0)
    assert torch.equal(ours["weight.quant_map"].view(torch.int32),
                       sd["weight.quant_map"].view(torch.int32))
    assert torch.equal(ours["weight.quant_state.bitsandbytes__" + meta["quant_type"]],
                       sd["weight.quant_state.bitsandbytes__" + meta["quant_type"]]) or \
        "nested_blocksize" in meta  # nested_offset may differ in its last printed digit


def test_linear8bitlt_loads_bnb_state_dict_and_matches_output():
    d = load_fixture("linear8bit_thr6")
    sd = {k[3:]: v for k, v in d.items() if k.startswith("sd.")}
    layer = Linear8bitLt(256, 128, has_fp16_weights=False, threshold=6.0).half()
    assert not layer.is_quantized
    layer.load_state_dict(sd)
    y = layer(d["x"])
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, d["y"], rtol=2e-3, atol=4e-3)
    back = layer.state_dict()
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_linear8bitlt_quantizes_like_bnb():
    d = load_fixture("linear8bit_thr6")
    sd = {k[3:]: v for k, v in d.items() if k.startswith("sd.")}
    layer = Linear8bitLt(256, 128, has_fp16_weights=False, threshold=6.0)
    layer.weight.data = d["W_fp16"].clone()
    layer.bias.data = d["b_fp16"].clone()
    layer = layer.to("cpu")
    assert torch.equal(layer.SCB, sd["SCB"])
    diff = (layer.weight.data.int() - sd["weight"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).sum() <= 4
    torch.testing.assert_close(layer(d["x"]), d["y"], rtol=2e-3, atol=4e-3)
