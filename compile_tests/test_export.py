"""torch.export of models with opsq's quantized layers: one opsq op per layer in the graph, the
exported program runs equal to eager, and it survives torch.export.save / load (a deployment
needs ``import opsq`` so that ``torch.ops.opsq.*`` exist)."""
import io

import pytest
import torch

import opsq  # noqa: F401  (registers torch.ops.opsq.*)
from opsq.integrations import plain_weights
from opsq.nn import Linear4bit, Linear8bitLt

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=(
               pytest.mark.cuda,
               pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")))]


def _model(device, nested, threshold, dtype):
    torch.manual_seed(5)
    m = torch.nn.Sequential(
        Linear4bit(64, 48, quant_type="nf4", compress_statistics=nested),
        torch.nn.GELU(),
        Linear8bitLt(48, 32, has_fp16_weights=False, threshold=threshold),
        Linear4bit(32, 16, bias=False, quant_type="fp4", compress_statistics=False))
    return m.to(device).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested,threshold", [(True, 6.0), (False, 0.0)])
def test_export_one_op_per_layer_and_equal_to_eager(device, nested, threshold):
    dtype = torch.float32 if device == "cpu" else torch.float16
    m = _model(device, nested, threshold, dtype)
    x = torch.randn(3, 64, device=device, dtype=dtype) * 4  # some entries >= 6: outliers
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: batch},))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("opsq.") for t in targets) == 3
    assert targets.count("opsq.linear_4bit.default") == 2
    assert targets.count("opsq.int8_linear.default") == 1
    want = m(x)
    assert torch.equal(ep.module()(x), want)
    x5 = torch.randn(5, 64, device=device, dtype=dtype)
    assert torch.equal(ep.module()(x5), m(x5))  # dynamic batch
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    assert torch.equal(loaded.module()(x), want)


def test_exported_state_holds_every_parameter():
    m = _model("cpu", True, 6.0, torch.float32)
    ep = torch.export.export(m, (torch.randn(2, 64),))
    names = set(ep.state_dict)
    for name, _ in m.named_parameters():
        assert name in names, name
    # the module's own state_dict keeps bitsandbytes' keys
    sd = m.state_dict()
    assert "0.weight.absmax" in sd and "2.SCB" in sd and "0.weight_absmax" not in sd


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_aot_inductor_package_runs_equal_to_eager(device, tmp_path):
    """AOTInductor: export -> aoti_compile_and_package -> aoti_load_package. The opsq ops stay
    calls into the registered CUDA kernels (through the dispatcher), so the packaged model needs
    ``import opsq`` in the loading process, as the exported program does. The weights go in as
    plain parameters (:func:`opsq.integrations.plain_weights`)."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    m = _model(device, True, 6.0, dtype)
    x = torch.randn(4, 64, device=device, dtype=dtype) * 4
    ep = plain_weights(torch.export.export(m, (x,)))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        want = m(x)
        got = runner(x)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # GELU fused by Inductor
    assert torch.equal(ep.module()(x), want)  # the plain weights change nothing for the program
