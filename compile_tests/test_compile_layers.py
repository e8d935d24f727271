"""Quantized models under torch.compile(fullgraph=True): zero graph breaks, no recompiles when
the batch size changes (mark_dynamic), outputs equal to eager, compiled backward."""
import pytest
import torch
from torch import nn

from opsq.nn import Linear4bit, Linear8bitLt


class _Counter:
    """A backend that counts compiled graphs and runs them eagerly (aot_eager)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)


def _model(kind, **kw):
    torch.manual_seed(0)
    if kind == "4bit":
        layers = [Linear4bit(64, 96, quant_type=kw.get("quant_type", "nf4"),
                             compress_statistics=kw.get("nested", True),
                             compute_dtype=kw.get("compute_dtype")),
                  nn.GELU(), Linear4bit(96, 32, bias=False, quant_type="fp4")]
    else:
        layers = [Linear8bitLt(64, 96, has_fp16_weights=False, threshold=kw.get("threshold", 6.0)),
                  nn.GELU(), Linear8bitLt(96, 32, has_fp16_weights=False,
                                          threshold=kw.get("threshold", 6.0))]
    return nn.Sequential(*layers).to("cpu")


CONFIGS = [("4bit", {}), ("4bit", {"nested": False, "quant_type": "fp4"}),
           ("4bit", {"compute_dtype": torch.bfloat16}),
           ("int8", {"threshold": 6.0}), ("int8", {"threshold": 0.0})]


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=[f"{k}-{kw}" for k, kw in CONFIGS])
def test_fullgraph_no_graph_breaks_no_recompile(kind, kw):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = _model(kind, **kw)
    backend = _Counter()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for batch in (4, 7, 2, 13):  # size 1 is specialised by dynamo itself (0/1 rule)
        x = torch.randn(batch, 64) * 4
        if batch == 4:
            torch._dynamo.mark_dynamic(x, 0)
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert sum(counters["graph_break"].values()) == 0
    assert backend.graphs == 1, f"recompiled: {backend.graphs} graphs"


@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_one_opsq_op_per_layer_in_graph(kind):
    model = _model(kind)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=capture)(torch.randn(3, 64))
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    name = "linear_4bit" if kind == "4bit" else "int8_linear"
    opsq_calls = [t for t in targets if "opsq" in str(t)]
    assert len(opsq_calls) == 2 and all(name in str(t) for t in opsq_calls)


@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_compiled_backward_matches_eager(kind):
    torch._dynamo.reset()
    model = _model(kind)
    x = (torch.randn(5, 64) * 4).requires_grad_(True)
    y = model(x).square().sum()
    gx, = torch.autograd.grad(y, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x2 = x.detach().clone().requires_grad_(True)
    gx2, = torch.autograd.grad(compiled(x2).square().sum(), x2)
    torch.testing.assert_close(gx2, gx)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_inductor_matches_eager(kind):
    torch._dynamo.reset()
    model = _model(kind)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(6, 64) * 4
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: Linear4bit(64, 32, quant_type="nf4"),
                                  lambda: Linear4bit(64, 32, quant_type="fp4",
                                                     compress_statistics=True),
                                  lambda: Linear8bitLt(64, 32, has_fp16_weights=False,
                                                       threshold=6.0)])
def test_cpu_autocast_eager_equals_compiled(make):
    """Under CPU autocast (bf16) a quantized layer gives the same bytes in eager as compiled,
    and as without autocast: its op computes in the dtypes it documents (the reference kernels'
    own F.linear / @ used to be recast to bf16 in eager only, up to 0.017 off)."""
    torch.manual_seed(0)
    layer = make().to("cpu")
    x = torch.randn(4, 64) * 3
    x[:, 5] = 9.0  # an outlier column for threshold 6
    with torch.no_grad():
        plain = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = layer(x)
            torch._dynamo.reset()
            compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(eager, plain) and torch.equal(compiled, plain)
