"""The README's Python snippets run as written. Each block is executed with only the names it
leaves to the reader (``path``, ``x``, ``model``, ...) bound to small real objects; blocks whose
free names are the reader's own functions (``build_model...``) or that need 2 processes (the
FSDP2 recipe, covered by compile_tests/test_fsdp.py) are listed and skipped on purpose."""
import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# blocks run here, found by a line they contain (robust to the README's order)
RUN = {"layer": "layer = Linear4bit(4096, 4096", "hf": "cfg = OpsqConfig(load_in_4bit=True",
       "hf_enable": "opsq.hf.enable_transformers()", "peft": "opsq.lora.peft_config(LoraConfig",
       "export": "program = torch.export.export(model"}
# blocks deliberately not run: the reader's own model builders / a 2-process launch / the
# merge pass in transformers' compiled generate (tests/test_decoding.py runs it on a tiny Llama)
NOT_RUN = ("StaticGreedyDecoder(model", "fully_shard", "build_model(linear=",
           "compile_config=config")


def _block(key):
    found = [b for b in BLOCKS if RUN[key] in b]
    assert len(found) == 1, f"README block with {RUN[key]!r}: found {len(found)}"
    return found[0]


def test_every_block_is_run_or_listed():
    for b in BLOCKS:
        assert any(marker in b for marker in (*RUN.values(), *NOT_RUN)), b[:200]


def _tiny_llama(dirname):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(dirname)
    return str(dirname)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the block moves layers to 'cuda'")
def test_layer_block(tmp_path, monkeypatch):
    from opsq.nn import Linear4bit
    monkeypatch.chdir(tmp_path)
    ref = Linear4bit(4096, 4096, quant_type="nf4", compute_dtype=torch.bfloat16).to("cuda")
    torch.save(ref.state_dict(), "bnb_linear4bit.pt")
    env = {"x": torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16),
           "model": torch.nn.Sequential(ref)}
    exec(_block("layer"), env)
    assert torch.equal(env["layer"](env["x"]), ref(env["x"]))


def test_transformers_blocks(tmp_path):
    pytest.importorskip("transformers")
    from fixture_utils import FIXTURES
    import opsq.hf
    env = {"path": _tiny_llama(tmp_path / "tiny")}
    exec(_block("hf"), env)
    assert type(env["model"].model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    bnb = FIXTURES / "hf-bnb-0.50.2" / "llama_nf4_nested_bf16"
    if not bnb.is_dir():
        pytest.skip(f"fixtures not found at {bnb}")
    env = {"path": env["path"], "path_of_a_bnb_checkpoint": str(bnb),
           "AutoModelForCausalLM": env["AutoModelForCausalLM"],
           "BitsAndBytesConfig": env["BitsAndBytesConfig"]}
    try:
        exec(_block("hf_enable"), env)
    finally:
        opsq.hf.disable_transformers()
    assert type(env["model"].model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"


def test_peft_block(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from opsq.hf import OpsqConfig
    monkeypatch.chdir(tmp_path)
    path = _tiny_llama(tmp_path / "tiny")

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=OpsqConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    env = {"model": load(), "base": load()}
    exec(_block("peft"), env)
    assert os.path.isdir(tmp_path / "adapter")
    assert type(env["merged"].model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


@pytest.mark.slow
def test_export_block(tmp_path, monkeypatch):
    """The export block on a small CPU model with both layer kinds: the program, the saved file
    and the AOTInductor package all give the eager outputs."""
    from opsq.nn import Linear4bit, Linear8bitLt
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear4bit(64, 48), torch.nn.ReLU(),
                                Linear8bitLt(48, 32, has_fp16_weights=False, threshold=6.0)
                                ).to("cpu")  # quantizes
    x = torch.randn(3, 64) * 4
    env = {"model": model, "x": x}
    exec(_block("export"), env)
    want = model(x)
    assert torch.equal(env["program"].module()(x), want)
    assert torch.equal(torch.export.load("model.pt2").module()(x), want)
    torch.testing.assert_close(env["runner"](x), want, rtol=1e-5, atol=1e-5)
