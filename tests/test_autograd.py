"""Gradients of the opsq ops, layers and autograd API against float64 references.

Oracle: each op's function written again in plain PyTorch from the format (16-entry code
table, per-block absmax, int8 rows times their scale), evaluated in float64 on the same input
values, differentiated by torch autograd. Tolerance (FA3 style): opsq's error against the
float64 oracle may be at most twice the error of the same function computed by plain PyTorch in
the op's own dtype (plus a float32-level floor). Inputs are fresh random tensors every run.

``gradcheck``/``gradgradcheck``: the ops take 16/32-bit floats only, so they run on float32
inputs with loose tolerances, and only where the op is (multi)linear in the differentiable
inputs (the 4-bit linear in ``A``/``bias``/statistics, the dequantizers in their statistics
and maps, ``mm_dequant`` in its statistics, ``int8_linear`` in ``SCB``/``bias``): there
finite differences are exact up to float32 rounding. Quantizers are piecewise constant, so
gradcheck is not meaningful for them; their outputs are checked to be non-differentiable.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import opsq
from opsq import functional as Fq
from opsq.autograd import (MatMul4Bit, MatMul8bit, MatMul8bitLt, MatmulLtState, matmul,
                           matmul_4bit)
from opsq._autograd import NATIVE_AUTOGRAD_OPS, autograd_function
from opsq.nn import Linear4bit, Linear8bitLt
from opsq.testing import DEVICES

ops = torch.ops.opsq
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh leaf requiring grad (a copy of ``t``, optionally cast)."""
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def assert_grad_close(got: torch.Tensor, oracle: torch.Tensor, low: torch.Tensor,
                      name: str = "") -> None:
    """opsq's gradient ``got`` against the float64 ``oracle``: its error (Frobenius norm) may be
    at most twice that of ``low``, the same gradient computed by plain torch in low precision,
    plus a floor of 1e-6 of the oracle's norm."""
    assert got is not None, f"{name}: no gradient"
    assert got.shape == oracle.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(oracle.shape)}"
    ref = oracle.detach().double().cpu()
    err = (got.detach().double().cpu() - ref).norm().item()
    base = (low.detach().double().cpu() - ref).norm().item()
    floor = 1e-6 * ref.norm().item() + 1e-12
    assert err <= 2 * base + floor, (f"{name}: error {err:.3g} vs torch's {base:.3g} "
                                     f"(|ref| = {ref.norm().item():.3g})")


def grads(out: torch.Tensor, leaves: dict, G: torch.Tensor) -> dict:
    names = list(leaves)
    gs = torch.autograd.grad(out, [leaves[n] for n in names], G.to(out.dtype),
                             allow_unused=True)
    return dict(zip(names, gs))


# ---- float references of the 4-bit format -------------------------------------------------------
def unpack_codes(B: torch.Tensor, n: int) -> torch.Tensor:
    raw = B.contiguous().reshape(-1).view(torch.uint8)
    return torch.stack((raw >> 4, raw & 0xF), dim=-1).reshape(-1)[:n].long()


def per_element(scales: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(blocksize)[:n]


def resolved_absmax(stats: dict, q: torch.Tensor | None, nbs: int, blocks: int):
    """The per-block absmax from reference leaves: ``absmax`` or the nested triple."""
    if "absmax" in stats:
        return stats["absmax"]
    code = stats["nested_code"]
    return code[q.long()] * per_element(stats["nested_absmax"], nbs, blocks) + stats["offset"]


def dequant_ref(codes, quant_type, stats, blocksize, shape, q=None, nbs=256):
    """Dequantized 4-bit weight in the dtype of the statistics (differentiable in them)."""
    n = codes.numel()
    sdtype = next(iter(stats.values())).dtype
    table = Fq.get_4bit_type(quant_type, device=codes.device).to(sdtype)
    absmax = resolved_absmax(stats, q, nbs, -(-n // blocksize))
    return (table[codes] * per_element(absmax, blocksize, n)).reshape(shape)


def quantized_weight(N, K, quant_type, nested, blocksize=64, device="cpu"):
    W = randn(N, K, device=device)
    packed, qs = Fq.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested,
                                  quant_type=quant_type)
    return packed, qs


def stat_tensors(qs) -> dict:
    """The differentiable statistics of a QuantState as op arguments by name."""
    if qs.nested:
        nabs, ncode, offset, _ = qs.nested_args()
        return {"nested_absmax": nabs, "nested_code": ncode, "offset": offset}
    return {"absmax": qs.absmax}


def op_args_4bit(qs, stats: dict):
    """(absmax, nested_absmax, nested_code, offset, nested_blocksize) for the ops."""
    if qs.nested:
        return (qs.absmax, stats["nested_absmax"], stats["nested_code"], stats["offset"],
                qs.state2.blocksize)
    return (stats["absmax"], None, None, None, 256)


def ref_stats(stats: dict, dtype) -> dict:
    return {k: leaf(v, dtype) for k, v in stats.items()}


# =================================================================================================
# linear_4bit / gemv_4bit / dequantize_4bit
# =================================================================================================
FOURBIT = [("nf4", False), ("fp4", False), ("nf4", True), ("fp4", True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dname)
@pytest.mark.parametrize("quant_type,nested", FOURBIT,
                         ids=[f"{q}{'-nested' if n else ''}" for q, n in FOURBIT])
@pytest.mark.parametrize("op", ["linear_4bit", "gemv_4bit"])
def test_linear_4bit_grads(op, quant_type, nested, dtype, device):
    N, K, bs = 40, 96, 64
    packed, qs = quantized_weight(N, K, quant_type, nested, bs, device)
    A = randn(*((1, 1, K) if op == "gemv_4bit" else (3, 5, K)), dtype=dtype, device=device)
    bias = randn(N, dtype=dtype, device=device)
    stats = {k: leaf(v) for k, v in stat_tensors(qs).items()}
    mine = {"A": leaf(A), "bias": leaf(bias), **stats}
    absmax, nabs, ncode, offset, nbs = op_args_4bit(qs, stats)
    out = getattr(ops, op)(mine["A"], packed, [N, K], absmax, bs, quant_type, mine["bias"],
                           nabs, ncode, offset, nbs)
    assert out.dtype == dtype and out.shape == (*A.shape[:-1], N)
    G = randn(*out.shape, dtype=dtype, device=device)
    got = grads(out, mine, G)

    codes = unpack_codes(packed, N * K)

    def reference(cdtype, sdtype):
        r = {"A": leaf(A, cdtype), "bias": leaf(bias, cdtype),
             **ref_stats(stat_tensors(qs), sdtype)}
        W = dequant_ref(codes, quant_type, {k: r[k] for k in stats}, bs, (N, K),
                        q=qs.absmax, nbs=nbs).to(cdtype)
        y = r["A"] @ W.t() + r["bias"]
        return grads(y, r, G)

    oracle, low = reference(torch.float64, torch.float64), reference(dtype, torch.float32)
    for name in mine:
        assert got[name].dtype == mine[name].dtype, name
        assert_grad_close(got[name], oracle[name], low[name], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dname)
@pytest.mark.parametrize("quant_type,nested", FOURBIT,
                         ids=[f"{q}{'-nested' if n else ''}" for q, n in FOURBIT])
def test_dequantize_4bit_grads(quant_type, nested, dtype, device):
    shape, bs = (33, 70), 128  # odd numel: a padded last block
    packed, qs = Fq.quantize_4bit(randn(*shape, device=device), blocksize=bs,
                                  compress_statistics=nested, quant_type=quant_type)
    stats = {k: leaf(v) for k, v in stat_tensors(qs).items()}
    absmax, nabs, ncode, offset, nbs = op_args_4bit(qs, stats)
    out = ops.dequantize_4bit(packed, absmax, bs, quant_type, list(shape), dtype, nabs, ncode,
                              offset, nbs)
    G = randn(*shape, dtype=dtype, device=device)
    got = grads(out, stats, G)
    codes = unpack_codes(packed, out.numel())

    def reference(cdtype, sdtype):
        r = ref_stats(stat_tensors(qs), sdtype)
        W = dequant_ref(codes, quant_type, r, bs, shape, q=qs.absmax, nbs=nbs).to(cdtype)
        return grads(W, r, G)

    oracle, low = reference(torch.float64, torch.float64), reference(dtype, torch.float32)
    for name in stats:
        assert_grad_close(got[name], oracle[name], low[name], name)


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_blockwise_grads(device):
    A = randn(1000, device=device)
    code = opsq._constants.create_dynamic_map().to(device)
    q, absmax = ops.quantize_blockwise(A, code, 256)
    mine = {"absmax": leaf(absmax), "code": leaf(code)}
    out = ops.dequantize_blockwise(q, mine["absmax"], mine["code"], 256, torch.float32)
    G = randn(1000, device=device)
    got = grads(out, mine, G)

    def reference(dtype):
        r = {"absmax": leaf(absmax, dtype), "code": leaf(code, dtype)}
        return grads(r["code"][q.long()] * per_element(r["absmax"], 256, 1000), r, G)

    oracle, low = reference(torch.float64), reference(torch.float32)
    for name in mine:
        assert_grad_close(got[name], oracle[name], low[name], name)


# =================================================================================================
# int8_linear / mm_dequant
# =================================================================================================
def rowquant(W: torch.Tensor):
    """Row-wise absmax int8 quantization, written independently of opsq: (CB, SCB)."""
    s = W.float().abs().amax(1)
    return torch.round(W.float() * (127.0 / s[:, None])).to(torch.int8), s


def int8_activation(A: torch.Tensor, threshold: float) -> torch.Tensor:
    """A as LLM.int8's forward multiplies it (float64): each row quantized to ±127 by its
    absmax over the non-outlier elements, columns holding an outlier (|a| >= threshold) exact."""
    x = A.detach().double().cpu().reshape(-1, A.shape[-1])
    outlier = x.abs() >= threshold if threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
    xs = x.masked_fill(outlier, 0.0).float()
    s = xs.abs().amax(1, keepdim=True)
    q = torch.round(xs * (127.0 / s)).double() * s.double() / 127.0
    return torch.where(outlier.any(0), x, q).reshape(A.shape).to(A.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dname)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
@pytest.mark.parametrize("weight", ["int8", "float"])
def test_int8_linear_grads(weight, threshold, dtype, device):
    N, K = 24, 128
    A = randn(2, 7, K, dtype=dtype, device=device, scale=1.5)
    bias = randn(N, dtype=dtype, device=device)
    Wf = randn(N, K, dtype=dtype, device=device)
    CB, SCB = rowquant(Wf)
    if weight == "int8":
        mine = {"A": leaf(A), "SCB": leaf(SCB), "bias": leaf(bias)}
        out = ops.int8_linear(mine["A"], CB, mine["SCB"], mine["bias"], threshold)
    else:
        mine = {"A": leaf(A), "B": leaf(Wf), "bias": leaf(bias)}
        out = ops.int8_linear(mine["A"], mine["B"], None, mine["bias"], threshold)
    G = randn(*out.shape, dtype=dtype, device=device)
    got = grads(out, mine, G)

    def reference(cdtype, sdtype):
        r = {"A": leaf(A, cdtype), "bias": leaf(bias, cdtype)}
        x = r["A"]
        if weight == "int8":  # exact in SCB; straight-through in A (its rounding as identity)
            r["SCB"] = leaf(SCB, sdtype)
            W = CB.to(sdtype) * r["SCB"][:, None] / 127.0
            x = x + (int8_activation(A, threshold).to(cdtype) - x).detach()
        else:  # straight-through in A and B: forward with dequant(Q(B)), B's gradient G.T @ A
            r["B"] = leaf(Wf, sdtype)
            Wq = (CB.float() * SCB[:, None] / 127.0).to(sdtype)
            W = r["B"] + (Wq - r["B"]).detach()
        y = x @ W.to(cdtype).t() + r["bias"]
        return grads(y, r, G)

    oracle = reference(torch.float64, torch.float64)
    low = reference(dtype, torch.float32 if weight == "int8" else dtype)
    for name in mine:
        assert got[name].dtype == mine[name].dtype, name
        assert_grad_close(got[name], oracle[name], low[name], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dname)
def test_mm_dequant_grads(dtype, device):
    A = torch.randint(-2 ** 20, 2 ** 20, (9, 31), dtype=torch.int32).to(device)
    row, col = randn(9, device=device).abs(), randn(31, device=device).abs()
    bias = randn(31, dtype=dtype, device=device)
    mine = {"row_stats": leaf(row), "col_stats": leaf(col), "bias": leaf(bias)}
    out = ops.mm_dequant(A, mine["row_stats"], mine["col_stats"], mine["bias"], dtype)
    G = randn(9, 31, dtype=dtype, device=device)
    got = grads(out, mine, G)

    def reference(cdtype, sdtype):
        r = {"row_stats": leaf(row, sdtype), "col_stats": leaf(col, sdtype),
             "bias": leaf(bias, cdtype)}
        y = (A.to(sdtype) * r["row_stats"][:, None] * r["col_stats"] / 127.0 ** 2).to(cdtype)
        return grads(y + r["bias"], r, G)

    oracle, low = reference(torch.float64, torch.float64), reference(dtype, torch.float32)
    for name in mine:
        assert_grad_close(got[name], oracle[name], low[name], name)


# =================================================================================================
# gradcheck / gradgradcheck (float32, loose tolerances, multilinear maps only)
# =================================================================================================
GC = dict(eps=1e-2, atol=2e-3, rtol=2e-3, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
def test_gradcheck_4bit(nested, device):
    N, K = 6, 64
    packed, qs = quantized_weight(N, K, "nf4", nested, 32, device)
    stats = {k: leaf(v) for k, v in stat_tensors(qs).items()}
    names = list(stats)

    def lin(A, bias, *s):
        st = dict(zip(names, s))
        absmax, nabs, ncode, offset, nbs = op_args_4bit(qs, st)
        return ops.linear_4bit(A, packed, [N, K], absmax, 32, "nf4", bias, nabs, ncode,
                               offset, nbs)

    def deq(*s):
        st = dict(zip(names, s))
        absmax, nabs, ncode, offset, nbs = op_args_4bit(qs, st)
        return ops.dequantize_4bit(packed, absmax, 32, "nf4", [N, K], torch.float32, nabs,
                                   ncode, offset, nbs)

    inputs = (leaf(randn(2, K, device=device)), leaf(randn(N, device=device)),
              *stats.values())
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lin, inputs, **GC)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradgradcheck(lin, inputs, **GC)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(deq, tuple(stats.values()), **GC)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_int8_and_blockwise(device):
    CB, SCB = rowquant(randn(5, 32, device=device))
    A = randn(3, 32, device=device)
    Ai = torch.randint(-999, 999, (3, 5), dtype=torch.int32).to(device)
    code = opsq._constants.create_dynamic_map().to(device)
    q, absmax = ops.quantize_blockwise(randn(300, device=device), code, 64)
    cases = [
        (lambda s, b: ops.int8_linear(A, CB, s, b, 2.0), (leaf(SCB), leaf(randn(5)))),
        (lambda r, c, b: ops.mm_dequant(Ai, r, c, b, torch.float32),
         (leaf(randn(3).abs()), leaf(randn(5).abs()), leaf(randn(5)))),
        (lambda a, c: ops.dequantize_blockwise(q, a, c, 64, torch.float32),
         (leaf(absmax), leaf(code))),
    ]
    # CUDA reductions (sums over blocks, index_add over codes) are not bitwise reproducible
    gc = dict(GC, nondet_tol=1e-5) if device == "cuda" else GC
    for fn, inputs in cases:
        inputs = tuple(t.to(device).detach().requires_grad_(True) for t in inputs)
        with pytest.warns(UserWarning, match="double precision"):
            assert torch.autograd.gradcheck(fn, inputs, **gc)
        with pytest.warns(UserWarning, match="double precision"):
            assert torch.autograd.gradgradcheck(fn, inputs, **gc)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_newly_differentiable_inputs(device):
    """opcheck (autograd registration, compiled backward) with the statistics requiring grad."""
    CB, SCB = rowquant(randn(5, 32, device=device))
    code = opsq._constants.create_dynamic_map().to(device)
    q, absmax = ops.quantize_blockwise(randn(300, device=device), code, 64)
    packed, qs = quantized_weight(6, 64, "fp4", True, 64, device)
    nabs, ncode, offset, nbs = qs.nested_args()
    samples = [
        (ops.int8_linear, (leaf(randn(3, 32, device=device)), CB, leaf(SCB), None, 2.0)),
        (ops.mm_dequant, (torch.randint(-99, 99, (3, 5), dtype=torch.int32).to(device),
                          leaf(randn(3, device=device).abs()),
                          leaf(randn(5, device=device).abs()))),
        (ops.dequantize_blockwise, (q, absmax, leaf(code), 64, torch.float32)),
        (ops.linear_4bit, (leaf(randn(2, 64, device=device)), packed, [6, 64], qs.absmax, 64,
                           "fp4", None, leaf(nabs), leaf(ncode), leaf(offset), nbs)),
    ]
    for op, args in samples:
        torch.library.opcheck(op.default, args)


# =================================================================================================
# Non-differentiable inputs: the documented answers
# =================================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_quantizer_outputs_are_not_differentiable(device):
    A = leaf(randn(8, 64, device=device))
    code = opsq._constants.create_dynamic_map().to(device)
    outs = [*ops.quantize_4bit(A, 64, "nf4", torch.uint8), *ops.vectorwise_quant(A, 1.0),
            *ops.double_quant(A, 1.0), *ops.quantize_blockwise(A, code, 64)]
    assert all(not o.requires_grad for o in outs)
    with pytest.raises(RuntimeError, match="does not require grad"):
        outs[1].sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_packed_float_storage_gets_no_gradient(device):
    W = randn(16, 64, device=device)
    packed, qs = Fq.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                  quant_storage=torch.bfloat16, compress_statistics=False)
    packed = leaf(packed)  # bytes stored as bf16: not numbers, so no gradient
    A = leaf(randn(3, 64, device=device))
    ops.linear_4bit(A, packed, [16, 64], qs.absmax, 64, "nf4").sum().backward()
    assert packed.grad is None and A.grad is not None


# =================================================================================================
# Layers
# =================================================================================================
L4 = [("nf4", True, None), ("fp4", False, torch.float16), ("nf4", False, torch.bfloat16),
      ("fp4", True, torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type,nested,compute", L4,
                         ids=[f"{q}-{'nested' if n else 'plain'}-{c and dname(c)}"
                              for q, n, c in L4])
def test_linear4bit_layer_grads(quant_type, nested, compute, device):
    layer = Linear4bit(96, 48, quant_type=quant_type, compress_statistics=nested,
                       compute_dtype=compute).to(device)
    x = leaf(randn(4, 6, 96, device=device))
    y = layer(x)
    assert y.dtype == torch.float32
    G = randn(*y.shape, device=device)
    got = grads(y, {"x": x, "bias": layer.bias}, G)
    W64 = Fq.dequantize_4bit(layer.weight, layer.quant_state).float()

    def reference(cdtype):
        r = {"x": leaf(x), "bias": leaf(layer.bias)}
        yr = r["x"].to(cdtype) @ W64.to(cdtype).t() + r["bias"].to(cdtype)
        return grads(yr.float() if cdtype != torch.float64 else yr, r, G)

    oracle, low = reference(torch.float64), reference(compute or torch.float32)
    for name in got:
        assert_grad_close(got[name], oracle[name], low[name], name)
    assert layer.weight.grad is None and not layer.weight.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("has_fp16_weights", [False, True], ids=["frozen", "trainable"])
def test_linear8bitlt_layer_grads(has_fp16_weights, threshold, device):
    torch.manual_seed(torch.seed() % 2 ** 31)
    layer = Linear8bitLt(64, 40, has_fp16_weights=has_fp16_weights,
                         threshold=threshold).to(device)
    x = leaf(randn(3, 5, 64, device=device, scale=3.0))  # some |x| >= 6: outlier columns
    y = layer(x)
    G = randn(*y.shape, device=device)
    params = {"x": x, "bias": layer.bias}
    if has_fp16_weights:
        assert layer.weight.requires_grad and layer.weight.is_floating_point()
        params["weight"] = layer.weight
        CB, SCB = rowquant(layer.weight.detach())
    else:
        assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
        CB, SCB = layer.weight.detach(), layer.SCB
    got = grads(y, params, G)
    Wq = CB.double() * SCB.double()[:, None] / 127.0

    def reference(cdtype):
        r = {k: leaf(v, cdtype) for k, v in params.items()}
        W = Wq.to(cdtype)
        if has_fp16_weights:
            W = r["weight"] + (W - r["weight"]).detach()
        return grads(r["x"] @ W.t() + r["bias"], r, G)

    oracle, low = reference(torch.float64), reference(torch.float32)
    for name in got:
        assert_grad_close(got[name], oracle[name], low[name], name)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("has_fp16_weights", [False, True], ids=["frozen", "trainable"])
def test_linear8bitlt_trains(has_fp16_weights, threshold):
    """A few SGD steps lower the loss; a frozen int8 weight stays bit-identical, a trainable
    float weight moves and is re-quantized per step."""
    torch.manual_seed(0)
    pre = nn.Linear(16, 64)
    layer = Linear8bitLt(64, 8, has_fp16_weights=has_fp16_weights, threshold=threshold).to("cpu")
    model = nn.Sequential(pre, nn.GELU(), layer)
    x, target = randn(32, 16, scale=4.0), randn(32, 8)
    before = layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(30):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    if has_fp16_weights:
        assert not torch.equal(layer.weight.detach(), before)
    else:
        assert torch.equal(layer.weight.detach(), before) and layer.weight.grad is None


# =================================================================================================
# opsq.autograd API
# =================================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_lt_api(device):
    A = leaf(randn(4, 32, device=device, scale=3.0))
    W = leaf(randn(12, 32, device=device))
    bias = leaf(randn(12, device=device))
    CB, SCB = rowquant(W.detach())
    want = ops.int8_linear(A, W, None, bias, 5.0)
    got = matmul(A, W, threshold=5.0, bias=bias)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gA, gW = torch.autograd.grad(got.square().sum(), (A, W))
    torch.testing.assert_close(gW, 2 * got.detach().t() @ A.detach(), rtol=1e-5, atol=1e-5)
    state = MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, threshold=5.0)
    frozen = MatMul8bitLt.apply(A, W, None, bias, state)
    torch.testing.assert_close(frozen, ops.int8_linear(A, CB, SCB, bias, 5.0), rtol=0, atol=0)
    assert state.threshold == 5.0 and state.CB is CB  # matmul never writes the state
    out = torch.empty(4, 12, device=device)
    matmul(A.detach(), CB, out=out, state=MatmulLtState(SCB=SCB))
    torch.testing.assert_close(out, ops.int8_linear(A.detach(), CB, SCB), rtol=0, atol=0)
    with pytest.raises(ValueError, match="SCB"):
        matmul(A, CB)
    state.reset_grads()
    assert state.CB is None and state.SCB is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
def test_matmul_4bit_api(nested, device):
    packed, qs = quantized_weight(24, 64, "nf4", nested, 64, device)
    bias = randn(24, device=device)
    W = Fq.dequantize_4bit(packed, qs).float()
    x1 = randn(1, 1, 64, device=device)
    y1 = matmul_4bit(x1, packed.t(), qs, bias=bias)  # gemv path, bitsandbytes' B.t()
    torch.testing.assert_close(y1, x1 @ W.t() + bias, rtol=1e-5, atol=1e-5)
    x = leaf(randn(5, 64, device=device))
    y = MatMul4Bit.apply(x, packed, None, bias, qs)
    torch.testing.assert_close(y, matmul_4bit(x, packed, qs, bias=bias), rtol=0, atol=0)
    g, = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, W.sum(0).expand(5, 64), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quant_state"):
        matmul_4bit(x, packed, None)


def int8_mm_oracle(X: torch.Tensor, Y: torch.Tensor, quant_type: str) -> torch.Tensor:
    """float64 X @ Y with X quantized per row and Y per column ("vector") or each per tensor
    ("linear"), round-to-nearest to ±127."""
    X, Y = X.detach().cpu().float(), Y.detach().cpu().float()
    if quant_type == "vector":
        sx, sy = X.abs().amax(1, keepdim=True), Y.abs().amax(0, keepdim=True)
    else:
        sx, sy = X.abs().amax(), Y.abs().amax()
    qx, qy = torch.round(X * (127.0 / sx)), torch.round(Y * (127.0 / sy))
    return (qx.double() @ qy.double()) * sx.double() * sy.double() / 127.0 ** 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["vector", "linear"])
def test_matmul8bit_int8_forward_and_backward(quant_type, device):
    A = leaf(randn(2, 6, 48, device=device))
    B = leaf(randn(48, 20, device=device))
    y = MatMul8bit.apply(A, B, quant_type=quant_type)
    assert y.shape == (2, 6, 20) and y.dtype == torch.float32
    A2 = A.detach().reshape(12, 48)
    torch.testing.assert_close(y.detach().cpu().double().reshape(12, 20),
                               int8_mm_oracle(A2, B, quant_type), rtol=1e-5, atol=1e-5)
    G = randn(2, 6, 20, device=device)
    gA, gB = torch.autograd.grad(y, (A, B), G)
    G2 = G.reshape(12, 20)
    torch.testing.assert_close(gA.cpu().double().reshape(12, 48),
                               int8_mm_oracle(G2, B.detach().t(), quant_type),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gB.cpu().double(), int8_mm_oracle(A2.t(), G2, quant_type),
                               rtol=1e-5, atol=1e-5)
    exact = (A2.double().cpu() @ B.detach().double().cpu())
    err = (y.detach().cpu().double().reshape(12, 20) - exact).norm() / exact.norm()
    assert err < 0.03  # int8 is an approximation of the float product, not garbage


@pytest.mark.parametrize("device", DEVICES)
def test_matmul8bit_precision_and_batched(device):
    A = leaf(randn(3, 4, 16, device=device).double())
    B = leaf(randn(3, 16, 8, device=device).double())
    # precision != 8 everywhere: an exact float64 matmul, so gradcheck is meaningful
    fn = lambda a, b: MatMul8bit.apply(a, b, precision=[16, 16, 16])  # noqa: E731
    assert torch.autograd.gradcheck(fn, (A, B), fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (A, B), fast_mode=True)
    y = MatMul8bit.apply(A.float(), B.float(), precision=(8, 32, 32))
    for i in range(3):
        torch.testing.assert_close(y[i].detach().double().cpu(),
                                   int8_mm_oracle(A[i], B[i], "vector"), rtol=1e-5, atol=1e-5)
    Af, Bf = leaf(A.float()), leaf(B.float())
    gA, gB = torch.autograd.grad(MatMul8bit.apply(Af, Bf, precision=(8, 32, 32)).sum(),
                                 (Af, Bf))
    torch.testing.assert_close(gA, torch.ones(3, 4, 8, device=device) @ Bf.detach().mT)
    torch.testing.assert_close(gB, Af.detach().mT @ torch.ones(3, 4, 8, device=device))
    with pytest.raises(ValueError, match="quant_type"):
        MatMul8bit.apply(A, B, quant_type="zeropoint")
    with pytest.raises(ValueError, match="precision"):
        MatMul8bit.apply(A, B, precision=[8, 8])
    with pytest.raises(ValueError, match="B.shape"):
        MatMul8bit.apply(A[0], B[0].t())
    with pytest.raises(TypeError, match="B must be a floating-point"):
        MatMul8bit.apply(A[0].float(), torch.ones(16, 8, dtype=torch.int8, device=device))


# ---- the gradient path of the C++ Autograd kernels ------------------------------------------
@pytest.mark.parametrize("name", NATIVE_AUTOGRAD_OPS)
def test_native_autograd_function_matches_registration(name):
    """On CUDA, linear_4bit / gemv_4bit / int8_linear run a C++ Autograd kernel that calls
    `opsq._autograd.autograd_function(name).apply` when a gradient is needed. That Function
    must give the registered op's output and gradients exactly (checked here on the CPU,
    where the op itself runs the Python registration)."""
    gen = torch.Generator().manual_seed(5)
    N, K = 24, 64
    W = torch.randn(N, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    if name == "int8_linear":
        CB, SCB, _ = ops.vectorwise_quant(W, 0.0)
        SCB = SCB.clone().requires_grad_(True)
        args = [None, CB, SCB, bias.clone().requires_grad_(True), 6.0]
    else:
        packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
        args = [None, packed, [N, K], absmax.clone().requires_grad_(True), 64, "nf4",
                bias.clone().requires_grad_(True), None, None, None, 256]
    A = torch.randn(3, K, generator=gen)
    A[0, 5] = 9.0  # an outlier column for int8_linear at threshold 6
    G = torch.randn(3, N, generator=gen)
    outs, grads_ = [], []
    for call in (getattr(ops, name), autograd_function(name).apply):
        a = [A.clone().requires_grad_(True)] + [t.detach().clone().requires_grad_(True)
                                                if isinstance(t, torch.Tensor) and t.requires_grad
                                                else t for t in args[1:]]
        out = call(*a)
        leaves = [t for t in a if isinstance(t, torch.Tensor) and t.requires_grad]
        grads_.append(torch.autograd.grad(out, leaves, G))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for g0, g1 in zip(*grads_):
        assert torch.equal(g0, g1)
