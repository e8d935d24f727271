"""opsq.fusion: sibling linear_4bit calls merged into linear_4bit_merged, outputs unchanged."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from opsq.fusion import MergeLinear4bitPass, merge_linear_4bit
from opsq.nn import Linear4bit

ops = torch.ops.opsq
K = 256


def _weights(rows, seed=0, quant_type="nf4", blocksize=64):
    g = torch.Generator().manual_seed(seed)
    return [ops.quantize_4bit(torch.randn(n, K, generator=g), blocksize, quant_type, torch.uint8)
            for n in rows]


def _count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is op)


def _traced(f, x):
    gm = make_fx(f)(x)
    return gm, gm(x)


def test_siblings_merge_and_keep_their_bytes():
    q = _weights((64, 16, 16, 32, 32))
    bias = torch.randn(16, generator=torch.Generator().manual_seed(3))

    def f(x):
        h = torch.nn.functional.silu(x)
        a = ops.linear_4bit(h, q[0][0], [64, K], q[0][1], 64, "nf4")
        b = ops.linear_4bit(h, q[1][0], [16, K], q[1][1], 64, "nf4", bias)
        c = ops.linear_4bit(h, q[2][0], [16, K], q[2][1], 64, "nf4")
        y = x * 2 + a.sum(-1, keepdim=True)  # a second activation, read by two more calls
        return (ops.linear_4bit(y, q[3][0], [32, K], q[3][1], 64, "nf4")
                * ops.linear_4bit(y, q[4][0], [32, K], q[4][1], 64, "nf4"), b, c)

    x = torch.randn(3, K)
    gm, want = _traced(f, x)
    assert merge_linear_4bit(gm.graph) == 2
    gm.recompile()
    assert _count(gm, ops.linear_4bit.default) == 0
    assert _count(gm, ops.linear_4bit_merged.default) == 2
    for got, w in zip(gm(x), want):
        assert torch.equal(got, w)
    x2 = torch.randn(5, K)  # fresh input through the rewritten graph
    for got, w in zip(gm(x2), f(x2)):
        assert torch.equal(got, w)


def test_groups_are_cut_at_max_merged_and_mismatches_stay_single():
    q = _weights((16,) * 5)
    q_fp4 = _weights((16,), seed=1, quant_type="fp4")
    q_bs128 = _weights((16,), seed=2, blocksize=128)

    def f(x):
        outs = [ops.linear_4bit(x, B, [16, K], am, 64, "nf4") for B, am in q]
        outs.append(ops.linear_4bit(x, q_fp4[0][0], [16, K], q_fp4[0][1], 64, "fp4"))
        outs.append(ops.linear_4bit(x, q_bs128[0][0], [16, K], q_bs128[0][1], 128, "nf4"))
        outs.append(ops.linear_4bit(x * 3, q[0][0], [16, K], q[0][1], 64, "nf4"))
        return outs

    x = torch.randn(2, K)
    gm, want = _traced(f, x)
    # 5 NF4 siblings -> runs of 2, 2 and a single; the FP4, blocksize-128 and other-input
    # calls have no sibling
    assert merge_linear_4bit(gm.graph, max_merged=2) == 2
    gm.recompile()
    assert _count(gm, ops.linear_4bit_merged.default) == 2
    assert _count(gm, ops.linear_4bit.default) == 4
    for got, w in zip(gm(x), want):
        assert torch.equal(got, w)


def test_max_merged_below_two_is_an_error():
    with pytest.raises(ValueError, match="max_merged must be >= 2"):
        merge_linear_4bit(torch.fx.Graph(), max_merged=1)


class _Attention(nn.Module):
    """q/k/v of one normed input, as a decoder layer has them (plain, biased; a nested o
    projection of the same input stays single: plain and nested statistics are not merged)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = Linear4bit.from_float(nn.Linear(K, 64, bias=False), quant_type="nf4")
        self.k = Linear4bit.from_float(nn.Linear(K, 16), quant_type="nf4")
        self.v = Linear4bit.from_float(nn.Linear(K, 16, bias=False), quant_type="nf4")
        self.o = Linear4bit.from_float(nn.Linear(K, 32, bias=False), quant_type="nf4",
                                       compress_statistics=True)

    def forward(self, x):
        h = torch.nn.functional.rms_norm(x, (K,))
        return self.q(h), self.k(h), self.v(h), self.o(h)


def test_inductor_pass_merges_a_layer_and_keeps_its_bytes():
    """Inductor (CPU) with the pass against Inductor without it: the same bytes, one merged
    call where the three projections were."""
    import torch._inductor.config as inductor_config

    merged = []

    class Counting(MergeLinear4bitPass):
        def __call__(self, graph):
            merged.append(merge_linear_4bit(graph, self.max_merged))

    m = _Attention().eval()
    x = torch.randn(2, K)
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        torch._dynamo.reset()
        want = torch.compile(m, fullgraph=True)(x)
        torch._dynamo.reset()
        got = torch.compile(m, fullgraph=True,
                            options={"post_grad_custom_post_pass": Counting()})(x)
        torch._dynamo.reset()
    assert merged == [1]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_compile_options_spell_out_the_mode_and_add_the_pass():
    from torch._inductor import list_mode_options

    from opsq.fusion import MAX_MERGED, compile_options
    opts = compile_options("reduce-overhead")
    assert {k: v for k, v in opts.items() if k != "post_grad_custom_post_pass"} \
        == list_mode_options("reduce-overhead")
    p = opts["post_grad_custom_post_pass"]
    assert isinstance(p, MergeLinear4bitPass) and p.max_merged == MAX_MERGED
    assert compile_options(None) == {"post_grad_custom_post_pass": MergeLinear4bitPass()}
    assert MergeLinear4bitPass(2) != MergeLinear4bitPass(3)
    assert MergeLinear4bitPass(2).uuid() != MergeLinear4bitPass(3).uuid()
    with pytest.raises(ValueError, match="max_merged must be >= 2"):
        compile_options(max_merged=1)
    with pytest.raises(ValueError, match="max_merged must be >= 2"):
        MergeLinear4bitPass(0)
