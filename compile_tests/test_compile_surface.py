"""The rest of the bitsandbytes surface under torch.compile(fullgraph=True): embeddings, SwitchBack,
OutlierAwareLinear. Zero graph breaks, one graph across batch sizes, outputs (and gradients)
equal to eager, no module state changed by forward."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from opsq.nn import (Embedding, Embedding4bit, Embedding8bit, EmbeddingNF4, OutlierAwareLinear,
                     StableEmbedding, StandardLinear, SwitchBackLinearBnb, SwitchBackLinearGlobal,
                     SwitchBackLinearGlobalMemEfficient, SwitchBackLinearVectorwise)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from module_state import assert_unchanged, snapshot  # noqa: E402  (tests/module_state.py)


class _Bf16Inliers(OutlierAwareLinear):
    """Keeps the outlier columns in fp32 and rounds the rest to bf16; the forward adds the two
    parts separately."""

    def quantize_weight(self, w, outlier_idx):
        mask = torch.zeros(w.shape[1], dtype=torch.bool).index_fill(0, outlier_idx, True)
        return torch.where(mask, w, w.bfloat16().float())

    def forward_with_outliers(self, x, outlier_idx):
        outlier_part = x[..., outlier_idx] @ self.weight[:, outlier_idx].t()
        inlier_w = self.weight.index_fill(1, outlier_idx, 0.0)
        return F.linear(x, inlier_w, self.bias) + outlier_part


def _table(cls, **kw):
    torch.manual_seed(0)
    return cls.from_float(nn.Embedding(97, kw.pop("dim")), **kw)


EMBEDDINGS = {
    "Embedding": lambda: Embedding(97, 24, padding_idx=1, max_norm=2.0),
    "StableEmbedding": lambda: StableEmbedding(97, 24, dtype=torch.bfloat16),
    "Embedding4bit-straddling-nested": lambda: _table(Embedding4bit, dim=48, quant_type="fp4",
                                                      compress_statistics=True),
    "EmbeddingNF4-aligned-bf16-storage": lambda: _table(EmbeddingNF4, dim=128,
                                                        quant_storage=torch.bfloat16),
    "Embedding8bit": lambda: _table(Embedding8bit, dim=40),
}

LINEARS = {
    "SwitchBackLinearGlobal": lambda: SwitchBackLinearGlobal(64, 32),
    "SwitchBackLinearVectorwise": lambda: SwitchBackLinearVectorwise(64, 32),
    "SwitchBackLinearGlobalMemEfficient": lambda: SwitchBackLinearGlobalMemEfficient(64, 32),
    "SwitchBackLinear-eval-prepared": lambda: SwitchBackLinearVectorwise(64, 32).eval()
    .prepare_for_eval(),
    "StandardLinear": lambda: StandardLinear(64, 32),
    "SwitchBackLinearBnb-thr6": lambda: SwitchBackLinearBnb(64, 32, threshold=6.0),
    "OutlierAwareLinear": lambda: _Bf16Inliers(64, 32).prepare(torch.tensor([3, 17])),
}


def _run(module, inputs, backward=False):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    for i, x in enumerate(inputs):
        x2 = x.detach().clone().requires_grad_(backward)
        if i == 0:
            torch._dynamo.mark_dynamic(x2, 0)
        snap = snapshot(module)
        if backward:
            x1 = x.detach().clone().requires_grad_(True)
            ge, = torch.autograd.grad(module(x1).float().square().sum(), x1)
            gc, = torch.autograd.grad(compiled(x2).float().square().sum(), x2)
            torch.testing.assert_close(gc, ge, rtol=0, atol=0)
        else:
            torch.testing.assert_close(compiled(x2), module(x), rtol=0, atol=0)
        assert_unchanged(module, snap)
    assert sum(counters["graph_break"].values()) == 0
    assert backend.frame_count == 1, f"recompiled: {backend.frame_count} graphs"


@pytest.mark.parametrize("name", list(EMBEDDINGS))
def test_embeddings_compile_fullgraph(name):
    module = EMBEDDINGS[name]()
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, 97, (b, 5), generator=g) for b in (4, 7, 2)]
    _run(module, inputs)


@pytest.mark.parametrize("name", list(LINEARS))
def test_linears_compile_fullgraph(name):
    torch.manual_seed(2)
    module = LINEARS[name]()
    inputs = [torch.randn(b, 64) * 3 for b in (4, 9, 3)]
    _run(module, inputs, backward=module.training and name != "OutlierAwareLinear")


def test_compiled_switchback_weight_gradient_matches_eager():
    torch.manual_seed(3)
    layer = SwitchBackLinearGlobal(64, 32)
    x = torch.randn(6, 64)
    layer(x).square().sum().backward()
    eager = layer.weight.grad.clone()
    layer.weight.grad = None
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, eager, rtol=0, atol=0)


@pytest.mark.parametrize("device", [None, "cpu"], ids=["default-device", "cpu"])
def test_code_tables_compile_without_graph_breaks(device):
    """get_4bit_type / the default dynamic map inside a compiled function (opsq._constants.
    table_on: its per-device masters are bypassed while tracing): one graph, eager's values."""
    from opsq import functional as Fq
    from opsq._constants import dynamic_map_on

    def fn(x):
        return x * Fq.get_4bit_type("nf4", device) + x.sum() * dynamic_map_on(device)[:16]

    cnt = CompileCounterWithBackend("aot_eager")
    x = torch.randn(16)
    got = torch.compile(fn, fullgraph=True, backend=cnt)(x)
    assert cnt.frame_count == 1
    torch.testing.assert_close(got, fn(x), rtol=0, atol=0)
