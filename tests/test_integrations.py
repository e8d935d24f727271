"""transformers-style helpers on real transformers model classes built from tiny configs (no hub),
bitsandbytes' own checkpoints through set_module_quantized_tensor_to_device, and
execute_and_return."""
import subprocess
import sys

import pytest
import torch
from torch import nn

from opsq import functional as Fq
from opsq.integrations import (get_keys_to_not_convert, init_empty_weights,
                               load_quantized_state_dict, replace_with_bnb_linear,
                               set_module_quantized_tensor_to_device, should_convert_module)
from opsq.nn import Linear4bit, Linear8bitLt
from opsq.utils import execute_and_return

from fixture_utils import load_fixture

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2)


def _build(kind: str) -> nn.Module:
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128,
                                      n_positions=32, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=128, num_key_value_heads=2,
                                       max_position_embeddings=32, tie_word_embeddings=False,
                                       bos_token_id=0, eos_token_id=0, **SMALL)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.BertConfig(intermediate_size=128, max_position_embeddings=32, **SMALL)
    return transformers.BertForMaskedLM(cfg)


CONFIGS = {
    "nf4-nested": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "int8-thr6": transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
}


@pytest.mark.parametrize("kind,expected", [
    ("gpt2", ["lm_head", "transformer.wte"]),
    ("llama", ["lm_head"]),
    ("bert", ["bert.embeddings.word_embeddings", "cls.predictions.decoder"]),
])
def test_get_keys_to_not_convert(kind, expected):
    with init_empty_weights():
        model = _build(kind)
    assert get_keys_to_not_convert(model) == expected
    plain = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3)))
    assert get_keys_to_not_convert(plain) == ["1.0"]  # no tie, no output embedding: last one


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_replace_on_meta_without_allocating(kind, config):
    with init_empty_weights():
        model = _build(kind)
    sources = {n: type(m) for n, m in model.named_modules()
               if type(m) in (nn.Linear, Conv1D)}
    skip = get_keys_to_not_convert(model)
    replace_with_bnb_linear(model, skip, CONFIGS[config])
    cls = Linear4bit if config.startswith("nf4") else Linear8bitLt
    modules = dict(model.named_modules())
    for name, src in sources.items():
        if should_convert_module(name, skip):
            layer = modules[name]
            assert type(layer) is cls and layer.source_cls is src, name
            assert not any(p.requires_grad for p in layer.parameters())
        else:
            assert type(modules[name]) is src, name
    assert all(p.device.type == "meta" for p in model.parameters())
    if kind == "gpt2":
        attn = modules["transformer.h.0.attn.c_attn"]
        assert (attn.in_features, attn.out_features) == (64, 192)  # Conv1D weight is (in, out)


def test_should_convert_module_patterns():
    assert not should_convert_module("lm_head", ["lm_head"])
    assert not should_convert_module("model.lm_head", ["lm_head"])
    assert not should_convert_module("h.0.attn.c_proj", ["attn"])
    assert should_convert_module("layer.11.attn", ["layer.1"])
    assert should_convert_module("mlp.gate_proj", ["mlp.gate"])
    assert should_convert_module("anything", None)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_checkpoint_round_trip_matches_float_model(kind, config):
    torch.manual_seed(0)
    float_model = _build(kind).eval()
    float_sd = float_model.state_dict()
    ids = torch.randint(0, 128, (2, 12))

    def quantized():
        with init_empty_weights():
            model = _build(kind)
        replace_with_bnb_linear(model, get_keys_to_not_convert(model), CONFIGS[config])
        return model

    # 1. Quantize from the float checkpoint (Conv1D weights transposed on the way).
    m1 = quantized()
    load_quantized_state_dict(m1, float_sd, device="cpu")
    m1.eval()
    assert all(t.device.type == "cpu" for t in list(m1.parameters()) + list(m1.buffers()))
    if kind == "gpt2":
        assert m1.lm_head.weight is m1.transformer.wte.weight  # still tied
    # 2. The bitsandbytes-format checkpoint it writes loads into a fresh meta model.
    ckpt = m1.state_dict()
    if config.startswith("nf4"):
        assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in ckpt or \
            "transformer.h.0.attn.c_attn.weight.nested_absmax" in ckpt
    else:
        assert all(k[:-len("weight")] + "SCB" in ckpt for k, v in ckpt.items()
                   if k.endswith(".weight") and v.dtype == torch.int8)
    m2 = quantized()
    load_quantized_state_dict(m2, ckpt, device="cpu")
    m2.eval()
    with torch.no_grad():
        y_float = float_model(ids).logits
        y1, y2 = m1(ids).logits, m2(ids).logits
        torch.testing.assert_close(y2, y1, rtol=0, atol=0)
        # Sanity bound vs the float model (NF4 ~0.08-0.13 here, int8 ~0.01); the tight check
        # for 4 bit is the dequantized-weight oracle below.
        assert _rel(y1, y_float) < (0.25 if config.startswith("nf4") else 0.03)
        if config.startswith("nf4"):  # 4-bit = the float model with dequantized weights
            oracle = _build(kind).eval()
            oracle.load_state_dict(float_sd)
            oracle_modules = dict(oracle.named_modules())
            for name, layer in m1.named_modules():
                if isinstance(layer, Linear4bit):
                    w = Fq.dequantize_4bit(layer.weight, layer.quant_state)
                    target = oracle_modules[name]
                    target.weight.data = w.t().contiguous() if isinstance(target, Conv1D) else w
            torch.testing.assert_close(y1, oracle(ids).logits, rtol=1e-4, atol=1e-4)


def test_load_quantized_state_dict_reports_problems():
    with init_empty_weights():
        model = _build("llama")
    replace_with_bnb_linear(model, ["lm_head"], CONFIGS["int8-thr6"])
    sd = _build("llama").state_dict()
    bad = dict(sd)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(128, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="up_proj.weight: an int8 weight needs its row scales"):
        load_quantized_state_dict(model, bad)
    partial = {k: v for k, v in sd.items() if "layers.1" not in k}
    partial["extra.weight"] = torch.zeros(1)
    with init_empty_weights():
        model = _build("llama")
    replace_with_bnb_linear(model, ["lm_head"], CONFIGS["int8-thr6"])
    missing, unexpected = load_quantized_state_dict(model, partial, strict=False)
    assert unexpected == ["extra.weight"] and any("layers.1" in k for k in missing)
    with pytest.raises(RuntimeError, match="missing keys"):
        load_quantized_state_dict(model, partial)
    with torch.device("meta"):  # everything on meta: the rotary buffers are never filled
        model = _build("llama")
    with pytest.raises(RuntimeError, match="init_empty_weights"):
        load_quantized_state_dict(model, sd)


def test_replace_quantizes_real_weights_at_once():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 64)
    ref = model(x)
    replace_with_bnb_linear(model, [], {"load_in_8bit": True, "llm_int8_threshold": 0.0})
    assert isinstance(model[0], Linear8bitLt) and model[0].is_quantized
    assert _rel(model(x), ref) < 0.03
    with pytest.raises(ValueError, match="exactly one"):
        replace_with_bnb_linear(model, [], {"load_in_8bit": True, "load_in_4bit": True})
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        replace_with_bnb_linear(nn.Linear(2, 2), [], {"load_in_4bit": True,
                                                      "bnb_4bit_compute_dtype": "float17"})


def _holder(layer_cls, **kw):
    parent = nn.Module()
    parent.proj = layer_cls(**kw)
    return parent


def test_set_tensor_from_bnb_4bit_checkpoint():
    d = load_fixture("linear4bit_nf4_nested")
    sd = {k[3:]: v for k, v in d.items() if k.startswith("sd.")}
    N, K = d["W_fp32"].shape
    with init_empty_weights():
        parent = _holder(nn.Linear, in_features=K, out_features=N)
    replace_with_bnb_linear(parent, [], {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                         "bnb_4bit_use_double_quant": True})
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    set_module_quantized_tensor_to_device(parent, "proj.weight", "cpu", sd["weight"],
                                          quantized_stats=stats)
    set_module_quantized_tensor_to_device(parent, "proj.bias", "cpu", sd["bias"])
    y = parent.proj(d["x"])
    torch.testing.assert_close(y.float(), d["y"].float(), rtol=8e-3, atol=8e-3)
    with pytest.raises(TypeError, match="quantized_stats"):
        set_module_quantized_tensor_to_device(parent, "proj.weight", "cpu", sd["weight"])
    with pytest.raises(ValueError, match="elements"):
        set_module_quantized_tensor_to_device(parent, "proj.weight", "cpu", sd["weight"][:10],
                                              quantized_stats=stats)
    with pytest.raises(ValueError, match="shape"):
        set_module_quantized_tensor_to_device(parent, "proj.weight", "cpu", torch.randn(3, 3))
    with pytest.raises(ValueError, match="no parameter or buffer"):
        set_module_quantized_tensor_to_device(parent, "proj.nope", "cpu", torch.randn(3))
    with pytest.raises(ValueError, match="not the weight of a quantized layer"):
        set_module_quantized_tensor_to_device(parent, "proj.bias", "cpu", sd["bias"],
                                              quantized_stats=stats)


def test_set_tensor_from_bnb_8bit_checkpoint():
    d = load_fixture("linear8bit_thr6")
    sd = {k[3:]: v for k, v in d.items() if k.startswith("sd.")}
    with init_empty_weights():
        parent = _holder(nn.Linear, in_features=256, out_features=128)
    replace_with_bnb_linear(parent, [], {"load_in_8bit": True, "llm_int8_threshold": 6.0})
    set_module_quantized_tensor_to_device(parent, "proj.weight", "cpu", sd["weight"],
                                          fp16_statistics=sd["SCB"])
    set_module_quantized_tensor_to_device(parent, "proj.bias", "cpu", sd["bias"])
    torch.testing.assert_close(parent.proj(d["x"]), d["y"], rtol=2e-3, atol=4e-3)
    with pytest.raises(ValueError, match="row scales"):
        set_module_quantized_tensor_to_device(parent, "proj.weight", "cpu", sd["weight"])
    with pytest.raises(TypeError, match="must be int8"):
        set_module_quantized_tensor_to_device(parent, "proj.weight", "cpu", d["W_fp16"],
                                              fp16_statistics=sd["SCB"])
    # Fresh float weight of a Conv1D source is (in, out): transposed before quantizing.
    with init_empty_weights():
        conv = _holder(Conv1D, nf=128, nx=256)
    replace_with_bnb_linear(conv, [], {"load_in_8bit": True, "llm_int8_threshold": 6.0})
    set_module_quantized_tensor_to_device(conv, "proj.weight", "cpu", d["W_fp16"].t())
    set_module_quantized_tensor_to_device(conv, "proj.bias", "cpu", d["b_fp16"])
    torch.testing.assert_close(conv.proj(d["x"]), d["y"], rtol=2e-3, atol=4e-3)


def test_execute_and_return():
    script = "import sys; print('a; b | $HOME'); print('e', file=sys.stderr)"
    out, err = execute_and_return([sys.executable, "-c", script])
    assert (out, err) == ("a; b | $HOME", "e")
    out, _ = execute_and_return(f"{sys.executable} -c 'print(1+1)'")  # shlex-split, no shell
    assert out == "2"
    with pytest.raises(FileNotFoundError, match="program not found"):
        execute_and_return(["opsq-no-such-program-xyz"])
    with pytest.raises(TimeoutError, match="killed"):
        execute_and_return([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    with pytest.raises(subprocess.CalledProcessError, match="status 3: boom"):
        execute_and_return(
            [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
            check=True)
    assert execute_and_return([sys.executable, "-c", "import sys; sys.exit(3)"]) == ("", "")
    with pytest.raises(ValueError, match="empty"):
        execute_and_return([])
    with pytest.raises(TypeError, match=r"command\[1\]"):
        execute_and_return(["echo", 3])
    with pytest.raises(ValueError, match="timeout"):
        execute_and_return(["echo"], timeout=0)
    with pytest.raises(NotADirectoryError, match="cwd"):
        execute_and_return(["echo"], cwd="/no/such/dir")
