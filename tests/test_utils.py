"""opsq.utils.replace_linear against bitsandbytes 0.50.2's: skip_modules given as one name, and
copy_weights over frozen and already quantized layers (those cases failed before their fixes; the
iterable forms of skip_modules are the guard that the fix kept them)."""
import pytest
import torch
from torch import nn

from opsq.nn import Linear4bit, Linear8bitLt
from opsq.utils import replace_linear


def _named_model():
    m = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4)))
    m.lm_head = nn.Linear(4, 2)
    m.h = nn.Linear(2, 2)  # a one-letter name, one of the characters of "lm_head"
    return m


def test_skip_modules_as_a_single_str_name():
    m = replace_linear(_named_model(), lambda i, o, b: nn.Identity(), skip_modules="lm_head")
    assert type(m.lm_head) is nn.Linear          # skipped, as bitsandbytes does
    assert type(m.h) is nn.Identity              # not skipped as a character of "lm_head"
    assert type(m[0]) is nn.Identity and type(m[1][0]) is nn.Identity


def test_skip_modules_iterables_unchanged():
    for skip in (["lm_head"], ("lm_head",), {"lm_head"}, (n for n in ["lm_head"])):
        m = replace_linear(_named_model(), lambda i, o, b: nn.Identity(), skip_modules=skip)
        assert type(m.lm_head) is nn.Linear and type(m.h) is nn.Identity
        assert type(m[1][0]) is nn.Identity


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def test_copy_weights_keeps_frozen_parameters_frozen():
    m = _model().requires_grad_(False)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    replace_linear(m, nn.Linear, copy_weights=True)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k])
    assert not any(p.requires_grad for p in m.parameters())
    m = _model()  # trainable stays trainable
    replace_linear(m, nn.Linear, copy_weights=True)
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("make", [
    lambda i, o, b: Linear4bit(i, o, b, quant_type="nf4", compute_dtype=torch.float32),
    lambda i, o, b: Linear8bitLt(i, o, b, has_fp16_weights=False),
], ids=["4bit", "8bit"])
def test_copy_weights_from_already_quantized_layers(make):
    m = replace_linear(_model(), make, copy_weights=True).to("cpu")  # quantized here
    x = torch.randn(3, 64)
    y0 = m(x)
    replace_linear(m, make, copy_weights=True)  # a second pass (bitsandbytes shares the weight)
    m = m.to("cpu")
    torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
