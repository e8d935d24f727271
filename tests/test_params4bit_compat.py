"""bitsandbytes 0.48+ surface of a 4-bit weight and the advisory warnings of the 4-bit layers:
Params4bit's quant_state fields as attributes (the dotted state-dict keys FSDP resolves with
getattr), torch.chunk / torch.split keeping the subclass and its state, the once-per-layer
compute_dtype warning (never from a compiled graph) and Embedding4bit's blocksize warning."""
import warnings

import pytest
import torch

from opsq import functional as Fq
from opsq.nn import Embedding4bit, Int8Params, Linear4bit, Linear8bitLt, Params4bit
from opsq.testing import DEVICES


def _weight(device, nested=True, shape=(48, 128)):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    return w, Params4bit(w, quant_type="nf4", compress_statistics=nested, blocksize=64).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
def test_state_fields_are_attributes(device, nested):
    w, p = _weight(device, nested)
    qs = p.quant_state
    assert p.absmax is qs.absmax and p.code is qs.code and p.quant_map is qs.code
    assert p.state2 is qs.state2
    if nested:
        assert p.nested_absmax is qs.state2.absmax and p.nested_quant_map is qs.state2.code
        assert p.nested_blocksize == qs.state2.blocksize and p.nested_dtype == qs.state2.dtype
        assert torch.equal(p.offset, qs.offset) and torch.equal(p.nested_offset, qs.offset)
    else:
        for name in ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype"):
            assert not hasattr(p, name)
    # the state the attributes expose is the one that dequantizes the packed bytes
    deq = Fq.dequantize_4bit(p.data, qs).float().cpu()
    assert (deq - w).abs().max() <= w.abs().max() / 7  # NF4's coarsest step is ~0.16 of absmax


def test_state_fields_absent_before_quantization():
    p = Params4bit(torch.randn(8, 64))
    for name in ("absmax", "code", "quant_map", "offset", "nested_absmax"):
        with pytest.raises(AttributeError, match=name):
            getattr(p, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", ["chunk", "split", "method"])
def test_chunk_and_split_keep_the_subclass(device, split):
    _, p = _weight(device)
    n = p.shape[0]
    if split == "chunk":
        parts = torch.chunk(p, 3)
    elif split == "split":
        parts = torch.split(p, n // 4)
    else:
        parts = p.split(n // 2)
    assert all(type(x) is Params4bit for x in parts)
    assert all(x.quant_state is p.quant_state and x.bnb_quantized for x in parts)
    assert all(x.quant_type == "nf4" and x.blocksize == 64 for x in parts)
    assert torch.equal(torch.cat([x.data for x in parts]), p.data)
    # other functions give plain tensors, as for any nn.Parameter
    assert type(p.view(-1)) is torch.Tensor and type(p + 0) is torch.Tensor


@pytest.mark.parametrize("device", DEVICES)
def test_compute_dtype_warning_once_per_layer(device):
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    slow = Linear4bit(64, 16, compute_dtype=torch.float32, quant_type="nf4").to(device)
    with pytest.warns(UserWarning, match="compute_dtype=torch.float32"):
        y = slow(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(slow(x), y)  # once per layer
        fast = Linear4bit(64, 16, quant_type="nf4").to(device)
        fast(x)  # compute_dtype None: the input's dtype, no warning
        Linear4bit(64, 16, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)(x)
    other = Linear4bit(64, 16, compute_dtype=torch.float32, quant_type="nf4").to(device)
    with pytest.warns(UserWarning, match="compute_dtype"):  # a second layer warns for itself
        other(x)


def test_compute_dtype_warning_not_from_a_compiled_graph():
    torch._dynamo.reset()
    layer = Linear4bit(64, 16, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = compiled(x)
    assert not layer.__dict__.get("_warned_compute_dtype")
    with pytest.warns(UserWarning, match="compute_dtype"):  # eager still warns
        want = layer(x)
    assert torch.equal(out, want)


def test_embedding4bit_blocksize_warning():
    with pytest.warns(UserWarning, match="not a multiple of blocksize 64"):
        Embedding4bit(10, 96, blocksize=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Embedding4bit(10, 128, blocksize=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantized_first", [False, True])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_assigned_float_params4bit_quantizes_with_its_own_settings(device, quantized_first,
                                                                    kind):
    """A float Params4bit assigned to a 4-bit layer is quantized with its own blocksize,
    quant_type, compress_statistics and quant_storage (as bitsandbytes' Params4bit is), before
    or after the layer was quantized; the layer's settings follow. The layer's were different
    (fp4, 64, plain, uint8), so a layer that kept its own would give other bytes."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 256, generator=g)
    if kind == "linear":
        layer = Linear4bit(256, 32, bias=False, quant_type="fp4", compress_statistics=False)
    else:
        layer = Embedding4bit(32, 256, quant_type="fp4", compress_statistics=False)
    if quantized_first:
        layer = layer.to(device)
    layer.weight = Params4bit(W, requires_grad=False, blocksize=128, quant_type="nf4",
                              compress_statistics=True, quant_storage=torch.bfloat16)
    layer = layer.to(device)
    packed, state = Fq.quantize_4bit(W.to(device), blocksize=128, compress_statistics=True,
                                     quant_type="nf4", quant_storage=torch.bfloat16)
    assert (layer.blocksize, layer.quant_type, layer.compress_statistics,
            layer.quant_storage) == (128, "nf4", True, torch.bfloat16)
    sd = layer.state_dict()
    # bf16 storage: compare the bytes (code bytes can read as NaN)
    assert torch.equal(sd["weight"].view(torch.uint8), packed.view(torch.uint8))
    for k, v in state.as_dict(packed=True).items():
        assert torch.equal(sd["weight." + k], v), k


@pytest.mark.parametrize("bad, exc", [(dict(blocksize=100), ValueError),
                                      (dict(quant_type="int4"), ValueError),
                                      (dict(quant_storage=torch.bool), TypeError)])
def test_assigned_float_params4bit_with_bad_settings_is_rejected(bad, exc):
    layer = Linear4bit(256, 32, quant_type="nf4")
    arg = next(iter(bad))
    with pytest.raises(exc, match=arg):
        layer.weight = Params4bit(torch.randn(32, 256), requires_grad=False, **bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_fp16_weights", [False, True])
def test_assigned_float_int8params_keeps_its_has_fp16_weights(device, layer_fp16_weights):
    """A float Int8Params assigned to a Linear8bitLt brings its has_fp16_weights (as
    bitsandbytes' Int8Params.to decides by its own flag): True stays a float, trainable weight;
    False is quantized on the move, with its SCB, whatever the layer said before."""
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(8))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9)).to(device)
    for param_fp16_weights in (True, False):
        layer = Linear8bitLt(64, 32, bias=False, has_fp16_weights=layer_fp16_weights)
        layer.weight = Int8Params(W.clone(), requires_grad=param_fp16_weights,
                                  has_fp16_weights=param_fp16_weights)
        layer = layer.to(device)
        assert layer.has_fp16_weights is param_fp16_weights
        if param_fp16_weights:
            assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad
            assert "SCB" not in layer.state_dict()
        else:
            CB, SCB, _ = Fq.int8_vectorwise_quant(W.to(device))
            assert torch.equal(layer.weight.data, CB)
            assert torch.equal(layer.state_dict()["SCB"], SCB)
        want = Linear8bitLt.from_float(torch.nn.Linear(64, 32, bias=False), threshold=0.0,
                                       has_fp16_weights=param_fp16_weights)
        want.weight = Int8Params(W.clone(), requires_grad=param_fp16_weights,
                                 has_fp16_weights=param_fp16_weights)
        want = want.to(device)
        with torch.no_grad():
            assert torch.equal(layer(x), want(x))


def test_params4bit_blocksize_none_is_64():
    """bitsandbytes' Params4bit reads blocksize=None as 64."""
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    p = Params4bit(W, blocksize=None, quant_type="nf4")
    assert p.blocksize == 64 and p.to("cpu").quant_state.blocksize == 64


def _reference_forward(x, packed, state, bias):
    W = Fq.dequantize_4bit(packed, state)
    return torch.nn.functional.linear(x, W.to(x.dtype), bias)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_written_through_parameters_dict_brings_its_state(device):
    """accelerate's set_module_tensor_to_device and transformers' bitsandbytes loader write
    ``module._parameters["weight"] = Params4bit(..., module=module).to(dev)`` /
    ``Params4bit.from_prequantized(..., module=module)``, around ``__setattr__``. The module
    adopts the new codes and statistics (as bitsandbytes sets ``module.quant_state``), from
    meta and over an already quantized weight; before, the first route left a module that
    was not quantized and the second kept the old statistics in forward, silently."""
    g = torch.Generator().manual_seed(21)
    W1, W2 = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    x = torch.randn(3, 256, generator=g).to(device)
    # 1. from meta, accelerate's route: a new Params4bit of the old one's settings, moved
    m = Linear4bit(256, 64, bias=False, quant_type="nf4", compress_statistics=False,
                   device="meta")
    kwargs = dict(m.weight.__dict__)
    new = Params4bit(W1, requires_grad=False, **kwargs).to(device)
    m._parameters["weight"] = new
    packed1, state1 = Fq.quantize_4bit(W1.to(device), quant_type="nf4")
    assert m.is_quantized and m.weight is new
    torch.testing.assert_close(m(x), _reference_forward(x, packed1, state1, None),
                               rtol=1e-5, atol=1e-5)
    # 2. over a quantized weight: transformers' route with a bitsandbytes state dict
    packed2, state2 = Fq.quantize_4bit(W2, quant_type="nf4")
    stats = state2.as_dict(packed=True)
    m._parameters["weight"] = Params4bit.from_prequantized(packed2, stats, device=device,
                                                           module=m)
    want = torch.nn.functional.linear(x, Fq.dequantize_4bit(packed2, state2).to(device))
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    sd = m.state_dict()
    assert torch.equal(sd["weight"].cpu(), packed2)
    assert torch.equal(sd["weight.absmax"].cpu(), stats["absmax"])
    # a chunk (another shape) keeps the free-standing behaviour
    free = Params4bit.from_prequantized(packed2, stats, device=device, module=None)
    assert free.module is None and free.quant_state is not None


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_rejected_params4bit_assignment_leaves_the_layer_as_it_was(kind):
    """A float Params4bit of another shape assigned to a quantized layer is rejected, and the
    layer keeps its settings, codes and outputs (its settings are taken only on success)."""
    g = torch.Generator().manual_seed(11)
    if kind == "linear":
        layer = Linear4bit(256, 32, bias=False, quant_type="nf4",
                           compress_statistics=False).to("cpu")
        x = torch.randn(2, 256, generator=g)
    else:
        layer = Embedding4bit(32, 256, quant_type="nf4").to("cpu")
        x = torch.tensor([0, 5, 31])
    want, sd = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        layer.weight = Params4bit(torch.randn(16, 256, generator=g).to(torch.bfloat16),
                                  blocksize=128, quant_type="fp4", compress_statistics=True,
                                  quant_storage=torch.bfloat16)
    assert (layer.blocksize, layer.quant_type, layer.quant_storage) == (64, "nf4", torch.uint8)
    if kind == "linear":
        assert layer.weight_dtype == torch.float32
    assert torch.equal(layer(x), want)
    after = layer.state_dict()
    assert set(after) == set(sd) and all(torch.equal(after[k], v) for k, v in sd.items())
