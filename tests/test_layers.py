"""Layer semantics: quantize on first move, dtype-safe moves, state dicts, errors."""
import copy
import io

import pytest
import torch
from torch import nn

import opsq
from opsq.testing import DEVICES
from opsq.nn import Int8Params, Linear4bit, Linear8bitLt, LinearFP4, LinearNF4, Params4bit


def test_linear4bit_quantizes_on_first_move_only():
    layer = Linear4bit(64, 32, quant_type="nf4")
    assert not layer.is_quantized
    with pytest.raises(RuntimeError, match="not quantized yet"):
        layer(torch.randn(2, 64))
    layer = layer.half()  # dtype change only: not a move
    assert not layer.is_quantized
    layer = layer.to("cpu")
    assert layer.is_quantized and layer.weight.dtype == torch.uint8
    assert isinstance(layer.weight, Params4bit) and layer.weight.quant_state is not None
    assert layer.weight.shape == (64 * 32 // 2, 1)


class _Tagged(torch.Tensor):
    """An activation subclass whose __torch_function__ counts calls (and otherwise passes)."""

    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_linear4bit_forward_skips_params4bit_torch_function(monkeypatch):
    """With plain activations, Linear4bit.forward never enters Params4bit.__torch_function__
    (Python, ~4-5 us a call on every decode step); an activation subclass still gets its own
    __torch_function__, and both give the same numbers."""
    torch.manual_seed(3)
    layer = Linear4bit.from_float(nn.Linear(64, 32), quant_type="nf4", compress_statistics=True)
    x = torch.randn(2, 64)
    seen = []
    original = Params4bit.__torch_function__.__func__

    def spy(cls, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(cls, func, types, args, kwargs)

    monkeypatch.setattr(Params4bit, "__torch_function__", classmethod(spy))
    want = layer(x)
    assert seen == []
    got = layer(x.as_subclass(_Tagged))
    assert _Tagged.calls > 0 and seen  # the slow path: every subclass asked, as before
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0)
    pieces = torch.chunk(layer.weight, 2)  # the chunk / split special case still holds
    assert len(pieces) == 2 and isinstance(pieces[0], Params4bit)


def test_quantized_state_survives_dtype_moves():
    layer = Linear4bit(64, 32, quant_type="fp4", quant_storage=torch.bfloat16).to("cpu")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer = layer.half().float().bfloat16()
    after = layer.state_dict()
    for k in before:
        if k == "bias":
            continue
        assert after[k].dtype == before[k].dtype and torch.equal(after[k].view(torch.uint8)
                                                                 if after[k].dtype == torch.bfloat16
                                                                 else after[k], before[k].view(torch.uint8)
                                                                 if before[k].dtype == torch.bfloat16
                                                                 else before[k]), k
    assert layer.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("cls,qt", [(LinearNF4, "nf4"), (LinearFP4, "fp4")])
def test_nf4_fp4_classes(cls, qt):
    layer = cls(32, 16).to("cpu")
    assert layer.quant_type == qt and layer.is_quantized


def test_from_float_matches_reference_and_state_dict_roundtrip():
    lin = nn.Linear(128, 48)
    q = Linear4bit.from_float(lin, quant_type="nf4", compress_statistics=True)
    x = torch.randn(3, 128)
    W = opsq.functional.dequantize_4bit(q.weight, q.weight.quant_state)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, W, lin.bias), rtol=1e-5,
                               atol=1e-5)
    sd = q.state_dict()
    assert "weight.quant_state.bitsandbytes__nf4" in sd and "weight.nested_absmax" in sd
    fresh = Linear4bit(128, 48, quant_type="nf4")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


def test_from_prequantized():
    lin = nn.Linear(64, 32)
    q = Linear4bit.from_float(lin, quant_type="fp4")
    sd = q.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p = Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert p.bnb_quantized and p.quant_state.quant_type == "fp4"
    layer = Linear4bit(64, 32, quant_type="fp4")
    layer.weight = p
    layer.bias = nn.Parameter(lin.bias.detach().clone())
    layer = layer.to("cpu")
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), q(x), rtol=0, atol=0)


def test_swapping_weight_parameter_keeps_metadata():
    layer = Linear4bit(64, 32, quant_type="nf4").to("cpu")
    x = torch.randn(2, 64)
    y = layer(x)
    layer.weight = nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # plain param
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_deepcopy_and_pickle():
    layer = Linear4bit(64, 32, quant_type="nf4").to("cpu")
    x = torch.randn(2, 64)
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = Linear4bit(64, 32, quant_type="nf4")
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_load_float_weight_into_quantized_layer_quantizes_it():
    lin = nn.Linear(64, 32)
    q = Linear4bit(64, 32, quant_type="nf4").to("cpu")
    q.load_state_dict(lin.state_dict())
    ref = Linear4bit.from_float(lin, quant_type="nf4", compress_statistics=True)
    x = torch.randn(2, 64)
    torch.testing.assert_close(q(x), ref(x), rtol=0, atol=0)


def test_bad_quant_state_reports_error():
    q = Linear4bit.from_float(nn.Linear(64, 32), quant_type="nf4")
    sd = q.state_dict()
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"),
                                                              dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="not valid UTF-8 JSON"):
        Linear4bit(64, 32, quant_type="nf4").load_state_dict(sd)
    sd = q.state_dict()
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="absmax"):
        Linear4bit(64, 32, quant_type="nf4").load_state_dict(sd)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_linear8bitlt_modes(threshold):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).half()
    x = torch.randn(5, 64, dtype=torch.float16) * 3
    frozen = Linear8bitLt(64, 32, has_fp16_weights=False, threshold=threshold).half()
    frozen.weight = Int8Params(lin.weight.data.clone(), requires_grad=False,
                               has_fp16_weights=False)
    frozen.bias = nn.Parameter(lin.bias.detach().clone())
    frozen = frozen.to("cpu")
    assert frozen.is_quantized and frozen.weight.dtype == torch.int8
    trainable = Linear8bitLt(64, 32, has_fp16_weights=True, threshold=threshold).half()
    trainable.load_state_dict(lin.state_dict())
    trainable = trainable.to("cpu")
    assert not trainable.is_quantized and trainable.weight.requires_grad
    torch.testing.assert_close(frozen(x), trainable(x), rtol=0, atol=0)
    ref = lin(x).double()
    assert ((frozen(x).double() - ref).norm() / ref.norm()) < 0.02
    out = trainable(x).float().sum()
    out.backward()
    assert trainable.weight.grad is not None and trainable.weight.grad.shape == (32, 64)
    sd = frozen.state_dict()
    assert set(sd) == {"weight", "bias", "SCB", "weight_format"}
    assert sd["weight_format"].item() == 0 and sd["weight_format"].dtype == torch.uint8


def test_linear8bitlt_loads_legacy_tiled_weight():
    lin = nn.Linear(70, 40).half()
    q = Linear8bitLt.from_float(lin, threshold=0.0)
    sd = q.state_dict()
    x = torch.randn(3, 70, dtype=torch.float16)
    for fmt, order in ((1, "col32"), (2, "col_turing"), (3, "col_ampere")):
        legacy = dict(sd)
        legacy["weight"] = torch.ops.opsq.transform(sd["weight"], "row", order, [40, 70])
        legacy["weight_format"] = torch.tensor(fmt, dtype=torch.uint8)
        layer = Linear8bitLt(70, 40, has_fp16_weights=False).half()
        layer.load_state_dict(legacy)
        torch.testing.assert_close(layer(x), q(x), rtol=0, atol=0)


def test_linear8bitlt_rejects_negative_threshold():
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(8, 8, threshold=-1.0)


@pytest.mark.parametrize("make", [lambda: Linear4bit(96, 32, quant_type="nf4"),
                                  lambda: Linear4bit(96, 32, quant_type="fp4",
                                                     compress_statistics=False),
                                  lambda: Linear8bitLt(96, 32, has_fp16_weights=False)])
def test_parameter_order_does_not_depend_on_how_the_layer_was_quantized(make):
    """torch optimizers key their state by parameter position: a layer quantized by a move and
    one quantized by a state-dict load list [weight, bias, ...statistics] alike (the move used to
    put the bias first), so an optimizer checkpoint of one resumes into the other."""
    torch.manual_seed(3)
    moved = make().to("cpu")
    loaded = make()
    loaded.load_state_dict(moved.state_dict())
    names = [n for n, _ in moved.named_parameters()]
    assert names == [n for n, _ in loaded.named_parameters()]
    assert names[:2] == ["weight", "bias"] and list(moved.state_dict())[:2] == ["weight", "bias"]
    moved.bias.requires_grad_(True)
    opt = torch.optim.Adam([p for p in moved.parameters() if p.requires_grad], lr=1e-3)
    moved(torch.randn(2, 96)).sum().backward()
    opt.step()
    loaded.bias.requires_grad_(True)
    opt2 = torch.optim.Adam([p for p in loaded.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.state[loaded.bias]["exp_avg"], opt.state[moved.bias]["exp_avg"])


def _pair(make, device, seed_a=0, seed_b=1):
    torch.manual_seed(seed_a)
    a = make().to(device)
    torch.manual_seed(seed_b)
    b = make().to(device)
    b.bias = a.bias
    return a, b


@pytest.mark.parametrize("device", DEVICES)
def test_bitsandbytes_in_place_weight_swap_is_adopted(device):
    """bitsandbytes' idiom for swapping a 4-bit layer's weight in place, ``weight.data = codes;
    weight.quant_state = state`` (its layers read weight.quant_state at every call): the layer
    computes with the new codes and state at once (it used to keep its old statistics)."""
    make = lambda: Linear4bit(128, 64, quant_type="nf4", compress_statistics=False)  # noqa: E731
    a, b = _pair(make, device)
    x = torch.randn(3, 128, device=device)
    assert not torch.equal(a(x), b(x))
    b.weight.data = a.weight.data.clone()
    b.weight.quant_state = a.weight.quant_state
    assert torch.equal(b(x), a(x))
    assert torch.equal(b.state_dict()["weight.absmax"], a.state_dict()["weight.absmax"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["4bit", "from_prequantized", "int8"])
def test_weight_written_into_parameters_is_adopted_at_the_next_move(kind, device):
    """A quantized weight written straight into ``module._parameters`` (another layer's
    ``Params4bit``, a checkpoint's ``Params4bit`` without ``module=``, transformers' 8-bit
    ``Int8Params(CB)`` then ``weight.SCB = SCB``) brings its statistics at the module's next
    move, as an assignment does (the layer used to pair the new codes with its old statistics,
    silently, even after moves)."""
    if kind == "int8":
        make = lambda: Linear8bitLt(128, 64, has_fp16_weights=False)  # noqa: E731
    else:
        make = lambda: Linear4bit(128, 64, quant_type="nf4")  # noqa: E731
    a, b = _pair(make, device)
    x = torch.randn(3, 128, device=device)
    if kind == "4bit":
        b._parameters["weight"] = a.weight
    elif kind == "from_prequantized":
        sd = a.state_dict()
        stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
        b._parameters["weight"] = Params4bit.from_prequantized(sd["weight"], stats,
                                                               device=device)
    else:
        b._parameters["weight"] = Int8Params(a.weight.data.clone(), requires_grad=False,
                                             has_fp16_weights=False)
        b.weight.SCB = a.SCB.clone()
    b.to(device)
    assert torch.equal(b(x), a(x))
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_assign_load_into_a_quantized_meta_layer(kind):
    """``load_state_dict(sd, assign=True)`` into a quantized layer whose tensors are on meta
    (``from_float`` of a meta ``nn.Linear``, or ``.to("meta")`` for offloading) takes the
    checkpoint's tensors, as torch's assign does (the codes and statistics used to be "copied"
    into the meta tensors, a no-op, and the layer failed at its first call)."""
    torch.manual_seed(5)
    if kind == "4bit":
        src = Linear4bit(128, 64, quant_type="nf4").to("cpu")
        from_meta = lambda lin: Linear4bit.from_float(lin, quant_type="nf4")  # noqa: E731
        moved = lambda: Linear4bit(128, 64, quant_type="nf4").to("cpu").to("meta")  # noqa: E731
    else:
        src = Linear8bitLt(128, 64, has_fp16_weights=False).to("cpu")
        from_meta = lambda lin: Linear8bitLt.from_float(lin, threshold=0.0)  # noqa: E731
        moved = lambda: Linear8bitLt(128, 64, has_fp16_weights=False).to("cpu").to("meta")  # noqa: E731
    with torch.device("meta"):
        lin = nn.Linear(128, 64)
    x = torch.randn(2, 128)
    for layer in (from_meta(lin), moved()):
        layer.load_state_dict(src.state_dict(), assign=True)
        assert all(t.device.type == "cpu" for t in layer.parameters())
        assert torch.equal(layer(x), src(x))


def test_nested_layer_saves_with_safetensors_save_model(tmp_path):
    """safetensors' save_model takes a nested 4-bit layer whose block count is not a multiple of
    the nested blocksize: every statistic owns its storage (the reference quantizer returned
    the uint8 codes as a view into its padded buffer, which save_model refuses)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(2)
    layer = Linear4bit(64, 64, quant_type="nf4", compress_statistics=True).to("cpu")
    sd = layer.state_dict()
    for k, v in sd.items():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_model(nn.Sequential(layer), str(path))
    fresh = nn.Sequential(Linear4bit(64, 64, quant_type="nf4", compress_statistics=True))
    safetensors_torch.load_model(fresh, str(path))
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("make", [lambda: Linear4bit(64, 32), lambda: Linear8bitLt(64, 32),
                                  lambda: opsq.nn.Embedding4bit(10, 64),
                                  lambda: opsq.nn.Embedding8bit(10, 64)])
def test_torchscript_gets_a_clear_error(make):
    """torch.jit.script of a quantized layer raises a RuntimeError naming the layer and the
    supported routes (it failed inside the script compiler: "Unknown type annotation: 'str'")."""
    with pytest.raises(RuntimeError, match="TorchScript.*torch.export"):
        torch.jit.script(nn.Sequential(make().to("cpu")))


@pytest.mark.parametrize("make", [lambda: Linear4bit(64, 32, quant_type="nf4"),
                                  lambda: Linear8bitLt(64, 32, has_fp16_weights=False),
                                  lambda: opsq.nn.Embedding4bit(10, 64),
                                  lambda: opsq.nn.Embedding8bit(10, 64)])
def test_partial_load_reports_only_public_missing_keys(make):
    """A partial strict=False load (the bias only, a LoRA-style dict) reports the missing keys of
    the state dict's own names, as bitsandbytes does: 'weight', never the internal statistic
    names (weight_absmax, weight_scb, ...) that no state dict holds."""
    layer = make().to("cpu")
    partial = {k: v for k, v in layer.state_dict().items() if k == "bias"}
    result = layer.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["weight"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "weight"\.'):
        layer.load_state_dict(partial)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 32])
def test_linear4bit_under_autocast_computes_in_its_input_dtype(device, rows):
    """Under autocast (bf16) an fp32 call of Linear4bit returns what it returns without it, in
    fp32, as the fake kernel and compiled graphs say: the op's own matmul (the reference's
    F.linear, the CUDA op's dequantize + at::linear for many rows) is not recast."""
    torch.manual_seed(8)
    layer = Linear4bit(128, 64, quant_type="nf4").to(device)
    x = torch.randn(rows, 128, device=device)
    with torch.no_grad():
        plain = layer(x)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            cast = layer(x)
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)


def test_copied_layer_weight_is_bound_to_its_copy():
    """A deepcopied or unpickled Linear4bit's weight names its new module, so bitsandbytes'
    in-place swap is adopted there at once and a move does not re-adopt the layer's own weight
    (the copy's weight named no module: the swap was lost until a move, which re-adopted)."""
    make = lambda: Linear4bit(128, 64, quant_type="nf4", compress_statistics=False)  # noqa: E731
    a, b = _pair(make, "cpu")
    x = torch.randn(3, 128)
    buf = io.BytesIO()
    torch.save(b, buf)
    buf.seek(0)
    for c in (copy.deepcopy(b), torch.load(buf, weights_only=False)):
        assert c.weight.module is c and not c._weight_is_foreign(c.weight)
        c.weight.data = a.weight.data.clone()
        c.weight.quant_state = a.weight.quant_state
        assert torch.equal(c(x), a(x))


def test_int8_weight_with_a_slice_of_a_fused_scale_storage_is_adopted():
    """Two layers whose row scales are slices of one fused storage: the other layer's
    Int8Params written into _parameters is still told apart from the layer's own and adopted
    at the next move (the storages' bases compared equal)."""
    a, b = _pair(lambda: Linear8bitLt(128, 64, has_fp16_weights=False), "cpu")
    fused = torch.cat([a.weight_scb.detach(), b.weight_scb.detach()])
    with torch.no_grad():
        a.weight_scb = nn.Parameter(fused[:64], requires_grad=False)
        b.weight_scb = nn.Parameter(fused[64:], requires_grad=False)
    a._sync_weight_state()
    b._sync_weight_state()
    x = torch.randn(3, 128)
    want = a(x)
    b._parameters["weight"] = Int8Params(a.weight.data.clone(), requires_grad=False,
                                         has_fp16_weights=False)
    b.weight.SCB = a.SCB
    b.to("cpu")
    assert torch.equal(b(x), want)


def test_int8params_deepcopy_keeps_cb_aliasing_data():
    """copy.deepcopy of a quantized Int8Params keeps CB aliasing the copied data, as
    bitsandbytes' does (one int8 buffer, not two); a CB apart from data stays apart."""
    p = Int8Params(torch.randn(8, 16), requires_grad=False).to("cpu")
    d = copy.deepcopy(p)
    assert d.CB is not None and d.CB.data_ptr() == d.data_ptr()
    assert d.data_ptr() != p.data_ptr()
    assert torch.equal(d.data, p.data) and torch.equal(d.SCB, p.SCB)
    assert d.SCB.data_ptr() != p.SCB.data_ptr()


def test_int8params_deepcopy_of_a_separate_cb_stays_separate():
    data = torch.zeros(2, 3, dtype=torch.int8)
    cb = torch.ones(2, 3, dtype=torch.int8)
    d = copy.deepcopy(Int8Params(data, False, False, cb, torch.ones(2)))
    assert torch.equal(d.CB, cb) and d.CB.data_ptr() != d.data_ptr()


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_packed_codes_without_statistics_report_missing_keys(nested, storage):
    """A state dict holding the packed codes but none of bitsandbytes' statistics keys (what
    torch.distributed.checkpoint's broadcast_from_rank0 hands the other ranks) reports the
    missing keys (it said "a float weight of shape (N*K/2, 1) does not fit this layer") and
    keeps the old codes with their statistics."""
    torch.manual_seed(0)
    src = Linear4bit(72, 100, quant_type="nf4", compress_statistics=nested,
                     quant_storage=storage).to("cpu")
    torch.manual_seed(1)
    dst = Linear4bit(72, 100, quant_type="nf4", compress_statistics=nested,
                     quant_storage=storage).to("cpu")
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    only_codes = {"weight": src.state_dict()["weight"].clone(), "bias": src.bias.detach().clone()}
    with pytest.raises(RuntimeError) as e:
        dst.load_state_dict(only_codes)
    assert "Missing key(s)" in str(e.value) and "weight.absmax" in str(e.value), str(e.value)
    assert "float weight" not in str(e.value)
    res = dst.load_state_dict(only_codes, strict=False)
    assert "weight.absmax" in res.missing_keys
    after = dst.state_dict()
    # the old codes and statistics are kept together (never new codes with old statistics)
    for k in before:
        if k != "bias":
            assert torch.equal(after[k].view(torch.uint8) if after[k].dim() else after[k],
                               before[k].view(torch.uint8) if before[k].dim() else before[k]), k
    # a float weight of the layer's shape is still quantized as before
    dst.load_state_dict({"weight": torch.randn(100, 72), "bias": torch.zeros(100)})
