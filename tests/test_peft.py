"""PEFT on opsq's quantized layers through ``opsq.lora.peft_config``: the LoRA layers PEFT
builds for Linear4bit / Linear8bitLt (forward against float64, eager and compiled training,
merge / unmerge / merge_and_unload with requantization into the same layer type, safe_merge,
adapter save and load). Skipped without PEFT (``pip install "opsq[peft]"``)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")
# PEFT 0.21 takes lora_B's bias (lora_bias=True) for an unsharded ZeRO-3 / FSDP tensor on save.
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* invalid shape:UserWarning")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import opsq  # noqa: E402
import opsq.functional as Fq  # noqa: E402
from opsq.lora import peft_config  # noqa: E402
from opsq.nn import Linear4bit, Linear8bitLt, LinearNF4  # noqa: E402
from opsq.testing import DEVICES  # noqa: E402

K, N = 128, 96

# Base layers: (id, how to quantize an nn.Linear). Every 4-bit setting merging must keep.
BASES = {
    "nf4": lambda lin: Linear4bit.from_float(lin, quant_type="nf4"),
    "fp4-nested": lambda lin: Linear4bit.from_float(lin, quant_type="fp4",
                                                    compress_statistics=True),
    "nf4-nested-bs128-bf16storage": lambda lin: Linear4bit.from_float(
        lin, quant_type="nf4", blocksize=128, compress_statistics=True,
        quant_storage=torch.bfloat16),
    "nf4-bf16model": lambda lin: Linear4bit.from_float(lin.to(torch.bfloat16), quant_type="nf4"),
    "int8": lambda lin: Linear8bitLt.from_float(lin, threshold=0.0),
    "int8-t6": lambda lin: Linear8bitLt.from_float(lin, threshold=6.0),
}
BASE_IDS = list(BASES)


class Tiny(nn.Module):
    """Two quantized projections and a float head (a stand-in for an attention block)."""

    def __init__(self, base: str, device, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        make = BASES[base]
        q, v = nn.Linear(K, N, bias=bias, device=device), nn.Linear(N, K, bias=bias, device=device)
        self.q_proj, self.v_proj = make(q), make(v)
        self.head = nn.Linear(K, 8, device=device)
        # The float weights before quantization (a plain attribute: no state-dict entry).
        self.float_weight = {"q_proj": q.weight.detach(), "v_proj": v.weight.detach()}

    def forward(self, x):
        return self.head(self.v_proj(F.gelu(self.q_proj(x))))


def wrap(base: str, device, **lora) -> tuple[nn.Module, nn.Module]:
    """``(peft model, an untouched copy of its base model)``; LoRA on q_proj and v_proj."""
    model = Tiny(base, device, bias=lora.pop("base_bias", True))
    pristine = copy.deepcopy(model)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    kwargs.update(lora)
    return get_peft_model(model, peft_config(LoraConfig(**kwargs))), pristine


def randomize_adapters(model: nn.Module, std: float = 0.25, name: str = "default") -> None:
    """A trained-looking adapter: lora_B != 0, its delta about the size of the base weight."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, opsq.lora.PeftQuantizedLinear) and name in m.lora_B:
            nn.init.normal_(m.lora_B[name].weight, std=std)
            if m.lora_B[name].bias is not None:
                nn.init.normal_(m.lora_B[name].bias, std=std)


def dequantized(layer: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp32 ``(N, K)`` weight of an opsq quantized layer (a 4-bit one dequantized to ``dtype``
    first: its ``weight_dtype`` is what PEFT's merge adds the delta to)."""
    if isinstance(layer, Linear4bit):
        state = layer.quant_state
        state.dtype = dtype
        return Fq.dequantize_4bit(layer.weight, state).float()
    if not layer.is_quantized:  # has_fp16_weights
        return layer.weight.detach().float()
    return Fq.int8_vectorwise_dequant(layer.weight, layer.SCB)


def quantized_like(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w`` quantized with ``layer``'s settings and dequantized again (fp32)."""
    if isinstance(layer, Linear4bit):
        packed, state = Fq.quantize_4bit(w, blocksize=layer.blocksize,
                                         compress_statistics=layer.compress_statistics,
                                         quant_type=layer.quant_type,
                                         quant_storage=layer.quant_storage)
        state.dtype = torch.float32
        return Fq.dequantize_4bit(packed, state)
    CB, SCB, _ = Fq.int8_vectorwise_quant(w)
    return Fq.int8_vectorwise_dequant(CB, SCB)


def quantized_layer_like(layer: nn.Module, w: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A fresh opsq layer of ``layer``'s type and settings quantized from float ``w``/``bias``."""
    lin = nn.Linear(w.shape[1], w.shape[0], device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    if isinstance(layer, Linear4bit):
        return Linear4bit.from_float(lin, quant_type=layer.quant_type, blocksize=layer.blocksize,
                                     compress_statistics=layer.compress_statistics,
                                     quant_storage=layer.quant_storage)
    return Linear8bitLt.from_float(lin, threshold=layer.threshold)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n.rsplit(".", 1)[-1]: m for n, m in model.named_modules()
            if isinstance(m, opsq.lora.PeftQuantizedLinear)}


# ---- dispatch ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_get_peft_model_wraps_opsq_layers_in_quantization_aware_lora(device):
    model = nn.ModuleDict({
        "a": LinearNF4(K, N).to(device), "b": Linear8bitLt.from_float(nn.Linear(K, N)).to(device),
        "c": nn.Linear(K, N, device=device)})
    model = get_peft_model(model, peft_config(r=2, target_modules=["a", "b", "c"]))
    inner = model.base_model.model
    assert type(inner.a) is opsq.lora.PeftLinear4bit
    assert type(inner.b) is opsq.lora.PeftLinear8bitLt
    assert type(inner.c) is peft.tuners.lora.Linear  # every other layer: PEFT's own
    assert type(inner.a.get_base_layer()) is LinearNF4
    for m in (inner.a, inner.b):  # adapters train in fp32 on the base's device
        assert m.lora_A["default"].weight.device.type == device
        assert m.lora_A["default"].weight.dtype == torch.float32
        assert m.lora_A["default"].weight.requires_grad
    assert not any(p.requires_grad for p in inner.a.get_base_layer().parameters())


def test_import_opsq_does_not_import_peft():
    import subprocess
    import sys
    code = ("import sys, opsq; assert 'peft' not in sys.modules, 'imported'; "
            "assert hasattr(opsq.lora, 'PeftLinear4bit') and 'peft' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_peft_config_forms_and_errors(tmp_path):
    a = LoraConfig(r=2, target_modules=["q_proj"])
    assert peft_config(a) is a and a._custom_modules[Linear4bit] is opsq.lora.PeftLinear4bit
    assert peft_config(r=3, target_modules=["x"]).r == 3
    a.save_pretrained(tmp_path)
    loaded = peft_config(str(tmp_path))
    assert loaded.r == 2 and loaded._custom_modules[Linear8bitLt] is opsq.lora.PeftLinear8bitLt
    with pytest.raises(TypeError, match="not both"):
        peft_config(a, r=4)
    with pytest.raises(TypeError, match="LoraConfig"):
        peft_config(peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def test_lora_variants_are_refused_clearly():
    with pytest.raises(ValueError, match="plain LoRA only"):
        wrap("nf4", "cpu", use_dora=True)


# ---- forward ----------------------------------------------------------------------------------
def lora_reference(layer, x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``base(x) + scaling * B(A(dropped))``, the adapter part in float64 and rounded to the
    base output's dtype before the sum, as PEFT's bitsandbytes layers add it."""
    A = layer.lora_A["default"].weight.double()
    B = layer.lora_B["default"]
    update = dropped.double() @ A.T @ B.weight.double().T
    if B.bias is not None:
        update = update + B.bias.double()
    base = layer.get_base_layer()(x)
    return base.double() + (layer.scaling["default"] * update).to(base.dtype).double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("base", BASE_IDS)
def test_forward_equals_base_plus_scaled_adapter(base, dtype, device):
    model, _ = wrap(base, device, lora_dropout=0.25, lora_bias=True)
    randomize_adapters(model)
    layer = lora_layers(model)["q_proj"]
    x = torch.randn(5, 3, K, device=device, dtype=dtype)
    # The output is the base's dtype: the adapter's output is rounded to it, then the sum.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-5)
    layer.eval()  # dropout off
    y = layer(x)
    assert y.dtype == dtype and y.shape == (5, 3, N)
    torch.testing.assert_close(y.double(), lora_reference(layer, x, x), **tol)
    # PEFT's bitsandbytes-layer arithmetic (peft/tuners/lora/bnb.py), byte for byte
    with torch.no_grad():
        xa = x.to(layer.lora_A["default"].weight.dtype)
        adapter = layer.lora_B["default"](layer.lora_A["default"](xa)) * layer.scaling["default"]
        base = layer.get_base_layer()(x)
        assert torch.equal(y, base + adapter.to(base.dtype))
    layer.train()  # dropout on: the same mask as F.dropout draws from the same seed
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x.float(), 0.25, training=True)
    torch.testing.assert_close(y.double(), lora_reference(layer, x, dropped), **tol)
    with model.disable_adapter():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x), rtol=0, atol=0)


def two_adapters(device):
    """An NF4 model with random adapters "default" and "other" (r=2) on q_proj, and its q_proj
    LoRA layer."""
    model, _ = wrap("nf4", device)
    model.add_adapter("other", peft_config(r=2, lora_alpha=4, target_modules=["q_proj"]))
    randomize_adapters(model)
    randomize_adapters(model, name="other")
    return model, lora_layers(model)["q_proj"]


@pytest.mark.parametrize("device", DEVICES)
def test_two_active_adapters_and_mixed_batch(device):
    model, layer = two_adapters(device)
    x = torch.randn(4, K, device=device)
    base = layer.get_base_layer()(x).double()
    parts = {n: layer.scaling[n] * (x.double() @ layer.lora_A[n].weight.double().T
                                    @ layer.lora_B[n].weight.double().T)
             for n in ("default", "other")}
    model.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(layer(x).double(), base + parts["default"] + parts["other"],
                               rtol=1e-5, atol=1e-5)
    y = layer(x, adapter_names=["default", "__base__", "other", "default"])
    want = torch.stack([base[0] + parts["default"][0], base[1], base[2] + parts["other"][2],
                        base[3] + parts["default"][3]])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


# ---- training ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("base", ["nf4", "fp4-nested", "int8-t6"])
def test_training_reduces_loss(base, compiled, device):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model, _ = wrap(base, device, lora_dropout=0.05)
    torch.manual_seed(2)
    teacher = nn.Linear(K, 8, device=device)
    x = torch.randn(64, K, device=device)
    with torch.no_grad():
        target = model(x) + 0.5 * teacher(x)  # reachable through the adapters
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    fn = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(fn(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    if compiled:  # one graph, still one graph after the adapters changed (no recompiles)
        assert not counters["graph_break"]
        assert counters["stats"]["unique_graphs"] == 1


# ---- merging ----------------------------------------------------------------------------------
def settings(layer: nn.Module) -> tuple:
    if isinstance(layer, Linear4bit):
        return (type(layer), layer.quant_type, layer.blocksize, layer.compress_statistics,
                layer.quant_storage, layer.weight_dtype, layer.weight.dtype)
    return type(layer), layer.threshold, layer.has_fp16_weights, layer.weight.dtype


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).norm().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", BASE_IDS)
def test_merge_and_unload_requantizes_into_the_same_layer(base, device):
    model, pristine = wrap(base, device, lora_bias=True)
    randomize_adapters(model)
    layers = lora_layers(model)
    x = torch.randn(16, K, device=device)
    with torch.no_grad():
        y_model = model(x)
    expected = {}
    for name, m in layers.items():
        b = m.get_base_layer()
        delta = m.get_delta_weight("default")
        w_base = dequantized(b, getattr(b, "weight_dtype", None))  # what PEFT merges into
        expected[name] = (settings(b), w_base + delta,
                          b.bias.detach().float() + m.lora_B["default"].bias.float()
                          * m.scaling["default"], m)
    torch.manual_seed(3)
    inputs = {"q_proj": torch.randn(16, K, device=device),
              "v_proj": torch.randn(16, N, device=device)}
    with torch.no_grad():
        unmerged = {n: layers[n](inputs[n]) for n in layers}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Already merged" or other warnings
        merged_model = model.merge_and_unload()
    for name, (before, w_float_merge, bias, lora_layer) in expected.items():
        layer = getattr(merged_model, name)
        # An opsq layer again, with the same quantization settings.
        assert type(layer) in (Linear4bit, Linear8bitLt) and settings(layer) == before
        # Exactly "dequantize, add the delta, quantize with the layer's settings".
        torch.testing.assert_close(dequantized(layer), quantized_like(layer, w_float_merge),
                                   rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, bias.to(layer.bias.dtype), rtol=1e-6, atol=1e-6)
        # Merged vs unmerged output: the new rounding error is bounded by what quantizing the
        # float model with the adapter merged into it costs (one quantization step of a weight
        # of the same magnitude; for int8 both include the activations' int8 rounding).
        w0 = getattr(pristine, name)
        w_fresh = pristine.float_weight[name] + lora_layer.get_delta_weight("default")
        fresh = quantized_layer_like(layer, w_fresh, bias)
        with torch.no_grad():
            y = layer(inputs[name])
            e_merge = error(y, unmerged[name])
            e_fresh = error(fresh(inputs[name]), F.linear(inputs[name], w_fresh, bias))
            e_nomerge = error(w0(inputs[name]), unmerged[name])  # the adapter's own effect
        assert e_merge <= 1.25 * e_fresh, (e_merge, e_fresh)
        assert e_merge < 0.5 * e_nomerge, (e_merge, e_nomerge)  # the delta is in there
    # The whole merged model keeps the adapters' effect (far closer to the adapted model than
    # the base is), and saves and loads like any quantized opsq model (bitsandbytes format).
    with torch.no_grad():
        y_merged = merged_model(x)
        assert error(y_merged, y_model) < 0.5 * error(pristine(x), y_model)
    fresh = Tiny(base, device)
    fresh.load_state_dict(merged_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y_merged, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", BASE_IDS)
def test_merge_then_unmerge_restores_base_within_requantization_error(base, device):
    model, _ = wrap(base, device)
    randomize_adapters(model)
    layers = lora_layers(model)
    x = {"q_proj": torch.randn(8, K, device=device), "v_proj": torch.randn(8, N, device=device)}
    w0 = {n: dequantized(m.get_base_layer()) for n, m in layers.items()}
    with torch.no_grad():
        y0 = {n: m(x[n]) for n, m in layers.items()}
    params0 = {n: m.get_base_layer().weight for n, m in layers.items()}
    model.merge_adapter()
    for name, m in layers.items():
        assert m.merged and m.merged_adapters == ["default"]
        base_layer = m.get_base_layer()
        assert base_layer.weight is params0[name]  # requantized in place
        with torch.no_grad():  # merged: the LoRA layer is its base, no adapter added again
            torch.testing.assert_close(m(x[name]), base_layer(x[name]), rtol=0, atol=0)
    merged_w = {n: dequantized(m.get_base_layer(), getattr(m.get_base_layer(), "weight_dtype",
                                                           None))
                for n, m in layers.items()}
    model.unmerge_adapter()
    for name, m in layers.items():
        b = m.get_base_layer()
        assert not m.merged and b.weight is params0[name]
        delta = m.get_delta_weight("default")
        w_back = dequantized(b)
        # Exactly "dequantize, subtract the delta, quantize with the layer's settings" ...
        torch.testing.assert_close(w_back, quantized_like(b, merged_w[name] - delta),
                                   rtol=0, atol=0)
        # ... so the base comes back within two requantizations (merge, unmerge), each no worse
        # than quantizing the float weight with the adapter merged (same magnitude) once.
        w_float = model.base_model.model.float_weight[name] + delta
        w_float_q = quantized_like(b, w_float)
        budget = error(w_float_q, w_float)
        assert error(w_back, w0[name]) <= 2 * budget, (error(w_back, w0[name]), budget)
        with torch.no_grad():  # the same bound on the outputs (int8: + activation rounding)
            y = m(x[name])
            out_budget = error(F.linear(x[name], w_float_q), F.linear(x[name], w_float))
        assert error(y, y0[name]) <= 2 * out_budget, (error(y, y0[name]), out_budget)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", ["nf4", "int8", "int8-t6"])
def test_merging_an_untrained_adapter_is_lossless(base, device):
    # lora_B starts at zero. Non-nested NF4 requantizes its own dequantized values exactly;
    # int8 gets the same codes CB, and SCB back to within an ulp (127 * SCB * fp32(1/127)).
    model, pristine = wrap(base, device)
    merged = model.merge_and_unload()
    for name in ("q_proj", "v_proj"):
        a, b = getattr(merged, name), getattr(pristine, name)
        if isinstance(a, Linear4bit):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.weight_absmax, b.weight_absmax)
        else:
            assert torch.equal(a.weight, b.weight)
            torch.testing.assert_close(a.SCB, b.SCB, rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", ["nf4-nested-bs128-bf16storage", "int8"])
def test_safe_merge_rejects_non_finite_weights_and_leaves_base_untouched(base, device):
    model, _ = wrap(base, device)
    layer = lora_layers(model)["q_proj"]
    before = {k: v.clone() for k, v in layer.get_base_layer().state_dict().items()}
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    after = layer.get_base_layer().state_dict()
    assert not layer.merged
    for k, v in before.items():
        assert torch.equal(after[k].view(torch.uint8) if v.dtype == torch.bfloat16 else after[k],
                           v.view(torch.uint8) if v.dtype == torch.bfloat16 else v), k
    with torch.no_grad():  # a finite adapter merges safely
        layer.lora_B["default"].weight.zero_()
    model.merge_adapter(safe_merge=True)
    assert layer.merged


@pytest.mark.parametrize("device", DEVICES)
def test_merging_two_adapters_requantizes_once(device):
    _, layer = two_adapters(device)
    b = layer.get_base_layer()
    want = quantized_like(b, dequantized(b) + layer.get_delta_weight("default")
                          + layer.get_delta_weight("other"))
    layer.merge(adapter_names=["default", "other"])
    assert layer.merged_adapters == ["default", "other"]
    torch.testing.assert_close(dequantized(b), want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_into_int8_layer_with_float_weights(device):
    # has_fp16_weights=True: the weight is float (quantized per call); merging adds in float.
    torch.manual_seed(0)
    layer = Linear8bitLt.from_float(nn.Linear(K, N, device=device), has_fp16_weights=True)
    w0 = layer.weight.detach().clone()
    model = get_peft_model(nn.ModuleDict({"q_proj": layer}),
                           peft_config(r=4, lora_alpha=8, target_modules=["q_proj"]))
    randomize_adapters(model)
    lora = lora_layers(model)["q_proj"]
    delta = lora.get_delta_weight("default")
    lora.merge()
    assert not layer.is_quantized and layer.has_fp16_weights
    torch.testing.assert_close(layer.weight, w0 + delta, rtol=0, atol=0)
    lora.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)


# ---- save / load ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", ["nf4-nested-bs128-bf16storage", "int8-t6"])
def test_adapter_save_and_load_gives_identical_outputs(base, device, tmp_path):
    model, pristine = wrap(base, device, lora_bias=True)
    randomize_adapters(model)
    x = torch.randn(6, K, device=device)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # adapters only

    loaded = PeftModel.from_pretrained(pristine, tmp_path, config=peft_config(tmp_path))
    inner = loaded.base_model.model
    assert type(inner.q_proj) is opsq.lora.PeftLinear4bit or \
        type(inner.q_proj) is opsq.lora.PeftLinear8bitLt
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    merged = loaded.merge_and_unload()  # and it merges, unlike PEFT's plain lora.Linear
    assert isinstance(merged.q_proj, (Linear4bit, Linear8bitLt))


@pytest.mark.parametrize("base", ["nf4", "int8-t6"])
def test_second_adapter_from_load_adapter_is_quantization_aware(base, tmp_path):
    """PeftModel.load_adapter reads its LoraConfig from disk and takes no config: after any
    peft_config call, that config wraps opsq's layers too, so a second adapter on other modules
    merges (before: PEFT's plain lora.Linear there, and merge_and_unload raised halfway through,
    with the first adapter's layers already merged)."""
    model, pristine = wrap(base, "cpu", target_modules=["q_proj"])
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "a")
    other = get_peft_model(copy.deepcopy(pristine),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]))
    assert type(other.base_model.model.v_proj) in (opsq.lora.PeftLinear4bit,
                                                    opsq.lora.PeftLinear8bitLt)
    randomize_adapters(other)
    other.save_pretrained(tmp_path / "b")

    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path / "a",
                                       config=peft_config(tmp_path / "a"))
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    inner = loaded.base_model.model
    assert type(inner.v_proj) is type(inner.q_proj)
    loaded.base_model.set_adapter(["default", "b"])
    x = torch.randn(5, K)
    with torch.no_grad():
        both = loaded(x)
        with loaded.disable_adapter():
            base_out = loaded(x)
    merged = loaded.merge_and_unload(adapter_names=["default", "b"])
    assert isinstance(merged.q_proj, (Linear4bit, Linear8bitLt))
    assert isinstance(merged.v_proj, (Linear4bit, Linear8bitLt))
    with torch.no_grad():
        out = merged(x)
    assert error(out, both) < 0.25 * error(base_out, both)  # both adapters are in it


def test_prepare_model_for_kbit_training_accepts_a_plain_module():
    """A plain nn.Module (no transformers methods) with opsq layers: PEFT's function runs
    unflagged, as it does for such a module (it raised AttributeError on the flags' branch)."""
    model = Tiny("nf4", "cpu")
    out = opsq.lora.prepare_model_for_kbit_training(model)
    assert out is model
    assert not any(p.requires_grad for p in model.parameters())
    assert "is_loaded_in_4bit" not in model.__dict__


def test_peft_model_pickles(tmp_path):
    # torch.save(model) finds the lazily built classes as opsq.lora.<name>.
    model, _ = wrap("nf4", "cpu")
    randomize_adapters(model)
    x = torch.randn(3, K)
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    assert type(again.base_model.model.q_proj) is opsq.lora.PeftLinear4bit
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


# ---- a transformers model loaded in 4/8 bit through opsq -----------------------------------
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_qlora_train_merge_save(bits, device, tmp_path):
    transformers = pytest.importorskip("transformers")
    from peft import prepare_model_for_kbit_training
    from opsq.hf import OpsqConfig
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "float")
    qcfg = (OpsqConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
            if bits == 4 else OpsqConfig(load_in_8bit=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", quantization_config=qcfg, dtype=torch.bfloat16).to(device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, peft_config(r=4, lora_alpha=8,
                                              target_modules=["q_proj", "v_proj", "down_proj"]))
    want = opsq.lora.PeftLinear4bit if bits == 4 else opsq.lora.PeftLinear8bitLt
    assert type(model.base_model.model.model.layers[0].mlp.down_proj) is want
    ids = torch.randint(0, 128, (2, 16), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids).logits.float()
    merged = model.merge_and_unload()
    assert type(merged.model.layers[0].mlp.down_proj) is (Linear4bit if bits == 4
                                                          else Linear8bitLt)
    with torch.no_grad():
        logits = merged(input_ids=ids).logits.float()
    assert error(logits, adapted) < 0.25 * error(base, adapted)  # the adapters are in it
    merged.save_pretrained(tmp_path / "merged")  # bitsandbytes format, loads back as is
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").to(device)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits.float(), logits, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["nf4", "int8_t6"])
def test_prepare_model_for_kbit_training_turns_checkpointing_on(variant, device):
    """PEFT's prepare_model_for_kbit_training turns on gradient checkpointing and input
    gradients only for a model flagged is_loaded_in_4bit/8bit, which opsq's models are not:
    opsq.lora.prepare_model_for_kbit_training sets the flags for PEFT's call only; a LoRA step
    then trains through the checkpointed layers."""
    pytest.importorskip("transformers")
    from peft import get_peft_model
    from peft import prepare_model_for_kbit_training as peft_prepare

    from opsq import bench_llm as L
    from opsq.lora import prepare_model_for_kbit_training
    tiny = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)

    def model():
        m = L.build_llm("bf16", torch.device(device), config=L.llama_config(2, **tiny), seed=3)
        for _, parent in list(m.named_modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and name != "lm_head":
                    setattr(parent, name, L.quantized_layer(variant, child))
        return m
    alone = peft_prepare(model())
    assert not alone.is_gradient_checkpointing  # what this function is for
    m = prepare_model_for_kbit_training(model())
    assert m.is_gradient_checkpointing
    assert "is_loaded_in_4bit" not in m.__dict__ and "is_loaded_in_8bit" not in m.__dict__
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4)).to(device)
    assert m.get_input_embeddings()(ids).requires_grad
    pm = get_peft_model(m, peft_config(r=4, target_modules=["q_proj", "v_proj"]))
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]  # (lora_B starts at 0)
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                         for g in grads)
