"""Layer configuration as bitsandbytes code passes it, and loads that must not be silently
wrong (issue 15's first items): positional Linear8bitLt arguments of both bitsandbytes
signatures, the threshold's one home (``state.threshold``), validation at construction, string
``weight_format``, and int8 codes that arrive without their ``SCB``."""
import math
import warnings

import pytest
import torch
from torch import nn

from opsq._schemas import SCHEMAS
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


def test_linear8bitlt_positional_and_keyword_mix():
    # bitsandbytes >= 0.45 code: threshold by position, device / index by keyword
    layer = Linear8bitLt(64, 16, True, False, 6.0, device="meta")
    assert layer.weight.device.type == "meta" and layer.threshold == 6.0
    layer = Linear8bitLt(64, 16, True, False, 6.0, index=3, device="meta")
    assert (layer.index, layer.weight.device.type) == (3, "meta")
    layer = Linear8bitLt(64, 16, True, False, 6.0, None, "meta")
    assert layer.weight.device.type == "meta"
    with pytest.raises(TypeError, match="multiple values for argument 'threshold'"):
        Linear8bitLt(64, 16, True, False, 6.0, threshold=2.0)
    with pytest.raises(TypeError, match="at most 7 positional"):
        Linear8bitLt(64, 16, True, False, 6.0, None, "cpu", 1)


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
    # any non-finite entry: the mean of the finite ones (float64 check), 0 where none is finite
    am[7], am[9], am[11] = math.nan, -math.inf, -2.0
    fin = am.double()[torch.isfinite(am)]
    assert nested_offset(am).item() == pytest.approx(fin.mean().item(), rel=1e-6)
    assert nested_offset(torch.tensor([math.nan, math.inf, -math.inf])).item() == 0.0


# ---- one home for the statistics: reassigning the weight ------------------------------------
def _lin4(seed, **kw):
    torch.manual_seed(seed)
    return Linear4bit.from_float(nn.Linear(64, 16), quant_type="nf4", **kw)


@pytest.mark.parametrize("nested", [False, True])
def test_reassigned_params4bit_brings_its_statistics(nested):
    from opsq.nn import Params4bit
    a, b = _lin4(1, compress_statistics=nested), _lin4(2, compress_statistics=nested)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    b.weight = a.weight  # weight surgery between layers
    b.bias = a.bias
    assert torch.equal(b(x), a(x))
    # the PEFT merge idiom: a new float weight, quantized by .to()
    W2 = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    b.weight = Params4bit(W2, requires_grad=False, quant_type="nf4", blocksize=64,
                          compress_statistics=nested).to("cpu")
    want = Linear4bit.from_float(nn.Linear(64, 16), quant_type="nf4", compress_statistics=nested)
    want.weight = Params4bit(W2, requires_grad=False, quant_type="nf4", blocksize=64,
                             compress_statistics=nested)  # float: quantized now
    want.bias = b.bias
    assert torch.equal(b(x), want(x))
    W2q = ops.dequantize_4bit(b.weight, b.quant_state.absmax, 64, "nf4", [16, 64],
                              torch.float32, *b.quant_state.nested_args())
    assert (W2q - W2).abs().max() < 0.25 * W2.abs().max()  # the new weight, not the old one
    assert torch.allclose(b(x), torch.nn.functional.linear(x, W2q, b.bias), atol=1e-5)


def test_reassigned_params4bit_mismatch_is_an_error():
    from opsq.nn import Params4bit
    a, b = _lin4(1), Linear4bit.from_float(nn.Linear(32, 16), quant_type="nf4")
    with pytest.raises(ValueError, match="shape"):
        b.weight = a.weight
    with pytest.raises(ValueError, match="quant_state"):
        b.weight = Params4bit(a.weight.data, bnb_quantized=True)


def test_reassigned_int8params_brings_scb():
    from opsq.nn import Int8Params
    a, b = _int8(seed=1), _int8(seed=2)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    b.weight = a.weight
    b.bias = a.bias
    assert torch.equal(b(x), a(x))
    W2 = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    b.weight = Int8Params(W2, requires_grad=False, has_fp16_weights=False)
    CB, SCB, _ = torch.ops.opsq.vectorwise_quant(W2, 0.0)
    assert torch.equal(b.weight, CB) and torch.equal(b.SCB, SCB)
    assert torch.equal(b(x), ops.int8_linear(x, CB, SCB, b.bias, 6.0))
    with pytest.raises(ValueError, match="SCB"):
        b.weight = Int8Params(CB, requires_grad=False, has_fp16_weights=False)
    with pytest.raises(ValueError, match="CB must be int8 of shape"):
        b.weight = Linear8bitLt.from_float(nn.Linear(32, 16)).weight


# ---- loads that do not fit ---------------------------------------------------------------------
def test_float_weight_of_another_shape_is_rejected():
    torch.manual_seed(0)
    layer = Linear4bit.from_float(nn.Linear(128, 48), quant_type="nf4")
    sd = {"weight": torch.randn(96, 64), "bias": torch.randn(48)}  # same element count
    with pytest.raises(RuntimeError, match=r"does not fit this layer: expected \(48, 128\)"):
        layer.load_state_dict(sd)


def test_packed_checkpoint_of_another_layer_is_rejected():
    torch.manual_seed(0)
    other = Linear4bit.from_float(nn.Linear(64, 96), quant_type="nf4")  # 96x64 elements
    layer = Linear4bit.from_float(nn.Linear(128, 48), quant_type="nf4")  # 48x128: same count
    before = layer.state_dict()
    sd = other.state_dict()
    sd["bias"] = before["bias"]
    with pytest.raises(RuntimeError, match="quant_state shape"):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_quant_state_dtype_must_be_a_float_dtype():
    from opsq.functional import QuantState
    torch.manual_seed(0)
    layer = Linear4bit.from_float(nn.Linear(64, 16), quant_type="nf4")
    qs = layer.quant_state.as_dict()
    assert QuantState.from_dict(dict(qs), "cpu").dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        QuantState.from_dict(dict(qs, dtype="int64"), "cpu")


# ---- torch.save of a model, meta-device loading ---------------------------------------------------
def _quantized_modules():
    from opsq.nn import Embedding4bit, Embedding8bit
    torch.manual_seed(0)
    return {
        "Linear4bit": Linear4bit.from_float(nn.Linear(64, 16), quant_type="nf4"),
        "Linear4bit-nested": Linear4bit.from_float(nn.Linear(64, 16), quant_type="fp4",
                                                   compress_statistics=True),
        "Linear8bitLt": Linear8bitLt.from_float(nn.Linear(64, 16), threshold=6.0),
        "Linear8bitLt-fp16-weights": Linear8bitLt.from_float(nn.Linear(64, 16),
                                                             has_fp16_weights=True),
        "Embedding4bit": Embedding4bit.from_float(nn.Embedding(10, 64)),
        "Embedding8bit": Embedding8bit.from_float(nn.Embedding(10, 64)),
    }


def _input(name):
    if name.startswith("Embedding"):
        return torch.tensor([0, 3, 9, 3])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    x[0, 1] = 9.0  # an outlier at threshold 6
    return x


@pytest.mark.parametrize("name", list(_quantized_modules()))
def test_torch_save_round_trip(name, tmp_path):
    import copy
    import pickle
    m = _quantized_modules()[name]
    model = nn.Sequential(m)
    torch.save(model, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    x = _input(name)
    assert torch.equal(back(x), model(x))
    assert {k: v for k, v in back.state_dict().items()}.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), model(x))
    if name.startswith("Linear4bit"):  # the derived quant_state is back on the weight
        assert back[0].weight.quant_state is not None
        assert torch.equal(back[0].weight.quant_state.absmax, back[0].quant_state.absmax)


@pytest.mark.parametrize("name,make", [
    ("Linear4bit", lambda: Linear4bit(64, 16, quant_type="nf4")),
    ("Linear4bit-nested", lambda: Linear4bit(64, 16, quant_type="fp4")),
    ("Linear8bitLt", lambda: Linear8bitLt(64, 16, has_fp16_weights=False, threshold=6.0)),
])
def test_meta_device_load_with_assign(name, make):
    """How transformers and accelerate load big models: build on meta, then
    load_state_dict(assign=True). Every tensor must come off meta (the bias stayed there)."""
    src = _quantized_modules()[name]
    with torch.device("meta"):
        m = make()
    m.load_state_dict(src.state_dict(), assign=True)
    assert all(t.device.type == "cpu" for t in list(m.parameters()) + list(m.buffers()))
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in src.named_parameters()]
    x = _input(name)
    assert torch.equal(m(x), src(x))


# ---- a non-tensor where a Tensor is required -----------------------------------------------
def _placeholder_args(op):
    schema = torch._C.parse_schema(f"opsq::{op}{SCHEMAS[op]}")
    args = []
    for a in schema.arguments:
        t = str(a.type)
        if t.startswith("Optional["):
            args.append(None)
        elif a.name in ("dtype", "quant_storage"):  # ScalarType (an int in the schema's repr)
            args.append(torch.float32)
        else:
            args.append({"Tensor": torch.ones(4), "int": 64, "str": "nf4", "float": 0.0,
                         "List[int]": [2, 2], "List[Tensor]": [torch.ones(4)],
                         "List[Optional[Tensor]]": [None]}[t])
    return schema, args


def _required_tensor_cases():
    for op in SCHEMAS:
        schema, _ = _placeholder_args(op)
        for i, a in enumerate(schema.arguments):
            if str(a.type) == "Tensor":
                yield op, i, a.name


@pytest.mark.parametrize("op,pos,name", list(_required_tensor_cases()))
def test_none_for_a_required_tensor_names_the_argument(op, pos, name):
    _, args = _placeholder_args(op)
    args[pos] = None
    with pytest.raises(TypeError, match=rf"^{name} must be a Tensor, got NoneType"):
        getattr(ops, op)(*args)


# ---- torch.func through the layers and the matmul functions ------------------------------------
def _func_cases():
    import opsq
    torch.manual_seed(0)
    l4 = Linear4bit.from_float(nn.Linear(64, 16), quant_type="nf4", compress_statistics=True)
    l8 = Linear8bitLt.from_float(nn.Linear(64, 16), threshold=6.0)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    return {
        "Linear4bit": lambda x: l4(x),
        "Linear8bitLt": lambda x: l8(x),
        "matmul_4bit": lambda x: opsq.matmul_4bit(x, l4.weight.t(), l4.weight.quant_state),
        "matmul": lambda x: opsq.matmul(x, w, threshold=6.0),
        "matmul_cublas": lambda x: opsq.matmul_cublas(x, w.t()),
    }


@pytest.mark.parametrize("name", list(_func_cases()))
def test_torch_func_grad_and_vjp(name):
    f = _func_cases()[name]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    x[0, 5] = 9.0  # an outlier column for the int8 paths
    G = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    xr = x.clone().requires_grad_(True)
    (f(xr) * G).sum().backward()
    g = torch.func.grad(lambda t: (f(t) * G).sum())(x)
    assert torch.equal(g, xr.grad)
    out, vjp = torch.func.vjp(f, x)
    assert torch.equal(out, f(x)) and torch.equal(vjp(G)[0], xr.grad)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_embedding_weight_reassignment_brings_statistics(kind):
    from opsq.nn import Embedding4bit, Embedding8bit, Int8Params, Params4bit
    cls = Embedding4bit if kind == "4bit" else Embedding8bit
    torch.manual_seed(0)
    a, b = cls.from_float(nn.Embedding(10, 64)), cls.from_float(nn.Embedding(10, 64))
    idx = torch.tensor([0, 3, 9])
    b.weight = a.weight
    assert torch.equal(b(idx), a(idx))
    table = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    want = cls.from_float(nn.Embedding.from_pretrained(table))
    b.weight = (Params4bit(table, requires_grad=False, quant_type="fp4", blocksize=64,
                           compress_statistics=False) if kind == "4bit"
                else Int8Params(table, requires_grad=False, has_fp16_weights=False))
    assert torch.equal(b(idx), want(idx))
    with pytest.raises(ValueError):
        b.weight = cls.from_float(nn.Embedding(12, 64)).weight


def test_apply_intent_lets_unexpected_errors_through():
    from opsq.nn._lifecycle import _apply_intent

    class Boom(Exception):
        pass

    def bug(t):
        raise Boom("a bug in the function")
    with pytest.raises(Boom):
        _apply_intent(bug)
    layer = Linear4bit.from_float(nn.Linear(64, 16), quant_type="nf4")
    with pytest.raises(Boom):
        layer._apply(bug)

    def rejects(t):  # a function the empty probe cannot satisfy: "no move", no error here
        return t.view(3, 5)
    assert _apply_intent(rejects) == (None, False)
    assert _apply_intent(lambda t: t.to("meta")) == (torch.device("meta"), False)
    assert _apply_intent(lambda t: t.half()) == (None, False)
