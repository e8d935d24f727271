"""Compiled training steps (``torch.compile(fullgraph=True)``, forward and backward) through
opsq's quantized layers: zero graph breaks, one graph for several batch sizes (dynamic batch
via ``mark_dynamic``), gradients equal to eager.

Model: a residual MLP block whose Linear layers are Linear4bit (nf4 / fp4 / nested nf4,
fp16 / bf16 / fp32 compute) with LoRA adapters, or Linear8bitLt (frozen int8 with LoRA, or
``has_fp16_weights=True`` with the weight itself trained; thresholds 0 and 6), with and
without non-reentrant activation checkpointing (alternating over the cases, so each quant
type, dtype, mode and threshold runs both ways). Backend ``aot_eager`` (AOTAutograd's joint
forward/backward graph, run eagerly); one Inductor case is marked slow.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from opsq.autograd import MatMul8bit
from opsq.lora import LoRALinear
from opsq.nn import Linear4bit, Linear8bitLt
from opsq.testing import DEVICES

D, H = 64, 96


class Block(nn.Module):
    def __init__(self, make_linear, ckpt: bool):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        nn.init.constant_(self.norm.weight, 3.0)  # ~5% of |inputs| >= 6: int8 outlier columns
        self.up, self.down = make_linear(D, H), make_linear(H, D)
        self.ckpt = ckpt

    def _mlp(self, x):
        return self.down(F.gelu(self.up(self.norm(x))))

    def forward(self, x):
        if self.ckpt:
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)


def make_model(kind: str, cfg: dict, ckpt: bool, device) -> nn.Module:
    torch.manual_seed(torch.seed() % 2 ** 31)  # fresh weights every run

    def make_linear(k, n):
        if kind == "4bit":
            layer = Linear4bit(k, n, quant_type=cfg["quant_type"], compute_dtype=cfg["compute"],
                               compress_statistics=cfg["nested"])
            return LoRALinear(layer, r=4, alpha=8)
        layer = Linear8bitLt(k, n, has_fp16_weights=cfg["trainable"],
                             threshold=cfg["threshold"])
        return layer if cfg["trainable"] else LoRALinear(layer, r=4, alpha=8)

    model = nn.Sequential(Block(make_linear, ckpt)).to(device)
    for m in model.modules():  # a non-zero LoRA B, so both adapter weights get gradients
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)
    return model


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def step_grads(fn, model, x, target, dynamic=False) -> dict[str, torch.Tensor]:
    """Gradients of one training step's loss w.r.t. the trainable parameters and ``x``
    (with ``dynamic``, the batch dimension is marked dynamic)."""
    x = x.detach().clone().requires_grad_(True)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(target, 0)
    params = trainable(model)
    loss = F.mse_loss(fn(x), target)
    gs = torch.autograd.grad(loss, [x, *params.values()])
    return {"loss": loss.detach(), "x": gs[0], **dict(zip(params, gs[1:]))}


class CountingBackend:
    """``aot_eager`` (or Inductor) that counts the graphs dynamo hands it."""

    def __init__(self, inner: str = "aot_eager"):
        self.graphs, self.inner = 0, inner

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            return compile_fx(gm, example_inputs)
        from torch._dynamo.backends.debugging import aot_eager
        return aot_eager(gm, example_inputs)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, None: 1e-5}


def run_compiled_training(kind, cfg, ckpt, device, batches=(6, 3, 9), backend="aot_eager"):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = make_model(kind, cfg, ckpt, device)
    counting = CountingBackend(backend)
    compiled = torch.compile(model, fullgraph=True, backend=counting)
    tol = TOL[cfg.get("compute")]
    for i, batch in enumerate(batches):
        x = (torch.randn(batch, 5, D) * 3).to(device)
        target = torch.randn(batch, 5, D).to(device)
        want = step_grads(model, model, x, target)
        got = step_grads(compiled, model, x, target, dynamic=i == 0)
        assert set(got) == set(want) and len(want) > 2
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol,
                                       msg=lambda m, n=name: f"{n} (batch {batch}): {m}")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counting.graphs == 1, f"recompiled: {counting.graphs} graphs for {batches}"
    return model


QUANT = (("nf4", False), ("fp4", False), ("nf4", True))
COMPUTE = (torch.float16, torch.bfloat16, torch.float32)
# Every quant type x compute dtype; checkpointing alternates so that each quant type and each
# dtype is trained both with and without it (one compile per case keeps the suite fast).
FOURBIT = [(dict(quant_type=q, nested=n, compute=c), (i + j) % 2 == 1)
           for i, (q, n) in enumerate(QUANT) for j, c in enumerate(COMPUTE)]
INT8 = [(dict(trainable=t, threshold=th), (i + j) % 2 == 1)
        for i, t in enumerate((False, True)) for j, th in enumerate((0.0, 6.0))]


def case_id(case) -> str:
    cfg, ckpt = case
    if "quant_type" in cfg:
        name = (f"{cfg['quant_type']}{'-nested' if cfg['nested'] else ''}-"
                f"{str(cfg['compute']).replace('torch.', '')}")
    else:
        name = f"{'trainable' if cfg['trainable'] else 'frozen'}-t{cfg['threshold']:g}"
    return f"{name}-{'ckpt' if ckpt else 'plain'}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FOURBIT, ids=case_id)
def test_compiled_qlora_step_linear4bit(case, device):
    cfg, ckpt = case
    run_compiled_training("4bit", cfg, ckpt, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", INT8, ids=case_id)
def test_compiled_training_step_linear8bitlt(case, device):
    cfg, ckpt = case
    model = run_compiled_training("int8", cfg, ckpt, device)
    first = model[0].up
    if cfg["trainable"]:
        assert first.weight.requires_grad and first.weight.is_floating_point()
    else:
        assert first.base.weight.dtype == torch.int8 and not first.base.weight.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_backward_contains_opsq_ops(device):
    """The joint graph AOTAutograd builds holds the opsq ops of the backward (dequantize_4bit
    for the 4-bit input gradient, vectorwise_quant for the per-step weight quantization)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    seen: list[str] = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    def backend(gm, example_inputs):
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    torch._dynamo.reset()
    model = nn.Sequential(
        LoRALinear(Linear4bit(D, H, quant_type="nf4"), r=4),
        Linear8bitLt(H, D, has_fp16_weights=True, threshold=6.0)).to(device)
    x = torch.randn(4, D, device=device, requires_grad=True)
    torch.compile(model, fullgraph=True, backend=backend)(x).sum().backward()
    assert any("opsq.linear_4bit" in s for s in seen) and any("int8_linear" in s for s in seen)
    assert any("opsq.dequantize_4bit" in s for s in seen), "4-bit backward without opsq op"
    assert any("opsq.vectorwise_quant" in s for s in seen), "int8 backward without opsq op"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_matmul8bit_matches_eager(device):
    """The seed's int8 matmul (an autograd.Function over opsq ops) compiles with fullgraph."""
    torch._dynamo.reset()
    A = torch.randn(2, 5, D, device=device, requires_grad=True)
    B = torch.randn(D, 24, device=device, requires_grad=True)

    def fn(a, b):
        return MatMul8bit.apply(a, b, quant_type="vector", precision=(8, 8, 8)).square().sum()

    want = torch.autograd.grad(fn(A, B), (A, B))
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(A, B),
                              (A, B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_inductor_qlora_step(device):
    run_compiled_training("4bit", dict(quant_type="nf4", nested=True, compute=torch.bfloat16),
                          True, device, backend="inductor")
