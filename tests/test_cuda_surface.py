"""The rest of the bitsandbytes surface on CUDA: quantized embeddings, SwitchBack, outlier-aware
and integration paths give the CPU's results, and compile with zero graph breaks."""
import copy

import pytest
import torch

from opsq.nn import (Embedding4bit, Embedding8bit, EmbeddingNF4, StableEmbedding,
                     SwitchBackLinear, SwitchBackLinearBnb, SwitchBackLinearGlobal,
                     SwitchBackLinearVectorwise)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("cls", [Embedding4bit, EmbeddingNF4, Embedding8bit])
def test_quantized_embedding_cuda_equals_cpu(cls):
    torch.manual_seed(0)
    cpu = cls(300, 96).to("cpu")           # quantizes on the CPU
    gpu = cls(300, 96)
    gpu.load_state_dict(cpu.state_dict())  # the same quantized table
    gpu = gpu.cuda()
    idx = torch.randint(0, 300, (4, 17))
    out_cpu = cpu(idx)
    out_gpu = gpu(idx.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=0, atol=0)
    compiled = torch.compile(gpu, fullgraph=True)
    torch.testing.assert_close(compiled(idx.cuda()).cpu(), out_cpu, rtol=0, atol=0)


def test_stable_embedding_cuda():
    torch.manual_seed(0)
    emb = StableEmbedding(100, 64)
    idx = torch.randint(0, 100, (3, 9))
    ref = emb(idx)
    gpu = copy.deepcopy(emb).cuda()
    torch.testing.assert_close(gpu(idx.cuda()).cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [SwitchBackLinear, SwitchBackLinearGlobal,
                                 SwitchBackLinearVectorwise])
def test_switchback_cuda_matches_cpu_forward_and_backward(cls):
    torch.manual_seed(0)
    cpu = cls(128, 64)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(8, 128)
    xc, xg = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    yc, yg = cpu(xc), gpu(xg)
    torch.testing.assert_close(yg.cpu(), yc, rtol=1e-4, atol=1e-4)
    yc.square().sum().backward()
    yg.square().sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=1e-3, atol=1e-3)


def test_switchback_bnb_cuda_compiles():
    torch.manual_seed(0)
    layer = SwitchBackLinearBnb(128, 64, has_fp16_weights=False, threshold=6.0).half().cuda()
    x = torch.randn(8, 128, device="cuda", dtype=torch.float16) * 3
    ref = layer(x)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), ref, rtol=0, atol=0)


def test_replace_with_bnb_linear_on_cuda_matches_float_model():
    transformers = pytest.importorskip("transformers")
    from opsq.integrations import replace_with_bnb_linear
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(ref)
    sd = ref.state_dict()
    model = replace_with_bnb_linear(model, quantization_config={"load_in_4bit": True,
                                                                "bnb_4bit_quant_type": "nf4"})
    model.load_state_dict(sd, strict=False)
    model = model.cuda()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        a = model(ids.cuda()).logits.float().cpu()
        b = ref(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.95, cos
