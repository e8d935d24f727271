"""Layer configuration as bitsandbytes code passes it, and loads that must not be silently
wrong (issue 15's first items): positional Linear8bitLt arguments of both bitsandbytes
signatures, the threshold's one home (``state.threshold``), validation at construction, string
``weight_format``, and int8 codes that arrive without their ``SCB``."""
import math
import warnings

import pytest
import torch
from torch import nn

from opsq.nn import Linear4bit, Linear8bitLt

ops = torch.ops.opsq


def _int8(threshold=6.0, seed=0):
    torch.manual_seed(seed)
    return Linear8bitLt.from_float(nn.Linear(64, 16), threshold=threshold)


def test_linear8bitlt_positional_orders():
    # bitsandbytes >= 0.45: (in, out, bias, has_fp16_weights, threshold, index, device)
    new = Linear8bitLt(64, 16, True, False, 6.0, None, "cpu")
    assert new.threshold == 6.0 and new.index is None and new.has_fp16_weights is False
    assert new.memory_efficient_backward is False
    # the seed's order: (in, out, bias, has_fp16_weights, memory_efficient_backward, threshold)
    with pytest.warns(DeprecationWarning, match="memory_efficient_backward"):
        old = Linear8bitLt(64, 16, True, False, True, 6.0)
    assert old.threshold == 6.0 and old.memory_efficient_backward is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Linear8bitLt(64, 16, True, False, False, 3.0).threshold == 3.0


def test_threshold_has_one_home():
    layer = _int8(threshold=0.0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    x[:, 7] = 20.0  # an outlier column at threshold 6
    layer.state.threshold = 6.0  # bitsandbytes' MatmulLtState is where callers set it
    assert layer.threshold == 6.0
    want = ops.int8_linear(x, layer.weight, layer.SCB, layer.bias, 6.0)
    assert torch.equal(layer(x), want)
    assert not torch.equal(want, ops.int8_linear(x, layer.weight, layer.SCB, layer.bias, 0.0))
    layer.threshold = 0.0
    assert layer.state.threshold == 0.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, -1.0])
def test_threshold_rejected_at_construction_and_assignment(bad):
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(64, 16, threshold=bad)
    layer = _int8()
    with pytest.raises(ValueError, match="threshold"):
        layer.threshold = bad
    assert layer.threshold == 6.0


@pytest.mark.parametrize("kw,exc,match", [
    (dict(compute_dtype="bfloat16"), TypeError, "compute_dtype"),
    (dict(compute_dtype=torch.float64), TypeError, "compute_dtype"),
    (dict(quant_type="nf5"), ValueError, "quant_type"),
    (dict(blocksize=48), ValueError, "blocksize"),
    (dict(quant_storage=torch.complex64), TypeError, "quant_storage"),
])
def test_linear4bit_validates_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        Linear4bit(64, 16, **kw)


@pytest.mark.parametrize("fmt", ["row", torch.tensor(0, dtype=torch.uint8), 0])
def test_weight_format_as_name_or_code(fmt):
    src = _int8(seed=3)
    sd = src.state_dict()
    sd["weight_format"] = fmt
    dst = _int8(seed=4)
    dst.load_state_dict(sd)
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.SCB, src.SCB)


def test_weight_format_unknown_name():
    sd = _int8().state_dict()
    sd["weight_format"] = "col64"
    with pytest.raises(RuntimeError, match="weight_format"):
        _int8(seed=1).load_state_dict(sd)


@pytest.mark.parametrize("quantized", [True, False])
def test_int8_weight_without_scb_is_never_paired_with_old_scales(quantized):
    src = _int8(seed=5)
    sd = {k: v for k, v in src.state_dict().items() if k not in ("SCB", "weight_format")}
    dst = _int8(seed=6) if quantized else Linear8bitLt(64, 16, has_fp16_weights=False)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match="SCB"):
        dst.load_state_dict(sd)
    res = dst.load_state_dict(sd, strict=False)
    assert "SCB" in res.missing_keys and "weight_scb" not in res.missing_keys
    after = dst.state_dict()
    for k in ("weight", "SCB"):
        if k in before:  # the old codes and scales stay together
            assert torch.equal(after[k], before[k])


def test_nan_weight_with_nested_statistics_stays_in_its_nested_group():
    """One NaN weight in a Linear4bit with nested statistics (the constructor's default) used
    to turn every output to NaN (the nested offset was the mean of all absmax values)."""
    torch.manual_seed(7)
    lin = nn.Linear(1024, 96, bias=False)  # 96 rows x 16 blocks of 64 = 1536 blocks, 6 groups
    with torch.no_grad():
        lin.weight[0, 3] = math.nan
    layer = Linear4bit.from_float(lin, quant_type="nf4", compress_statistics=True)
    W = ops.dequantize_4bit(layer.weight, layer.quant_state.absmax, 64, "nf4", [96, 1024],
                            torch.float32, *layer.quant_state.nested_args())
    bad = ~torch.isfinite(W.reshape(-1))
    group = 256 * 64  # elements per nested group
    assert bad[:group].any() and not bad[group:].any()
    y = layer(torch.randn(2, 1024))
    rows_in_group0 = group // 1024  # output features whose weights lie in group 0
    assert torch.isfinite(y[:, rows_in_group0:]).all()
    # finite weights: the same offset as the plain mean (bitsandbytes' format)
    from opsq.functional import nested_offset
    am = torch.rand(300, generator=torch.Generator().manual_seed(8)) + 0.5
    assert torch.equal(nested_offset(am), am.mean())
    am[5] = math.inf
    assert torch.isfinite(nested_offset(am))
