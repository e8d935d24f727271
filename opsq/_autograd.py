"""Autograd of the opsq ops, attached with ``torch.library.register_autograd``.

Differentiable inputs and their gradients:

* ``linear_4bit`` / ``gemv_4bit``: ``A`` (grad @ dequant(B)) and ``bias`` (sum over rows).
  The packed weight and its statistics are frozen: their gradient is None.
* ``dequantize_4bit``: ``absmax`` when it is fp32 (per-block sum of grad * code value), and for
  nested statistics ``nested_absmax`` and ``offset``; the packed codes get None.
* ``dequantize_blockwise``: ``absmax``; the codes and the map get None.
* ``int8_linear``: ``A`` (grad @ dequant(W)), ``bias``, and ``B`` when it is a floating-point
  weight quantized per call (grad.T @ A: the straight-through estimator of LLM.int8 training);
  an int8 ``B`` and its ``SCB`` get None.
* ``mm_dequant``: ``bias``; the statistics get None.
* Quantizers (``quantize_4bit``, ``quantize_blockwise``, ``vectorwise_quant``, ``double_quant``)
  and ``igemmlt``/``transform``: outputs are marked non-differentiable; inputs get None.

Every backward is built from opsq ops and torch ops, so compiled backward graphs contain them.
"""
from __future__ import annotations

import torch

from ._schemas import SCHEMAS


def _arg_names(name: str) -> list[str]:
    schema = torch._C.parse_schema(f"opsq::{name}{SCHEMAS[name]}")
    return [a.name for a in schema.arguments]


class _Args:
    """Inputs of an op call by schema name (``setup_context`` receives them positionally)."""

    def __init__(self, name: str, inputs):
        self.__dict__.update(zip(_arg_names(name), inputs))


def _sum_to_bias(grad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)


# ---- linear_4bit / gemv_4bit ---------------------------------------------------------------
def _make_linear_4bit_autograd(name: str):
    def setup_context(ctx, inputs, output):
        a = _Args(name, inputs)
        ctx.a = a if ctx.needs_input_grad[0] else None
        ctx.bias_dtype = None if a.bias is None else a.bias.dtype

    def backward(ctx, grad):
        grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:
            a = ctx.a
            W = torch.ops.opsq.dequantize_4bit(
                a.B, a.absmax, a.blocksize, a.quant_type, a.shapeB, grad.dtype,
                a.nested_absmax, a.nested_code, a.offset, a.nested_blocksize)
            grad_A = grad.matmul(W)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[6]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad_A, None, None, None, None, None, grad_bias, None, None, None, None)

    torch.library.register_autograd(f"opsq::{name}", backward, setup_context=setup_context)


_make_linear_4bit_autograd("linear_4bit")
_make_linear_4bit_autograd("gemv_4bit")


# ---- dequantize_4bit -----------------------------------------------------------------------
def _dq4_setup(ctx, inputs, output):
    a = _Args("dequantize_4bit", inputs)
    ctx.a = a


def _block_sums(values: torch.Tensor, blocksize: int, blocks) -> torch.Tensor:
    flat = values.reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel()))
    return flat.view(blocks, blocksize).sum(1)


def _dq4_backward(ctx, grad):
    a = ctx.a
    need = ctx.needs_input_grad
    grads = [None] * 10
    if not (need[1] or need[6] or need[8]):
        return tuple(grads)
    # Code values (absmax = 1) times the incoming gradient, summed per block.
    blocks = a.absmax.numel()
    ones = torch.ones(blocks, dtype=torch.float32, device=grad.device)
    unit = torch.ops.opsq.dequantize_4bit(a.A, ones, a.blocksize, a.quant_type, a.shape,
                                          torch.float32)
    grad_absmax = _block_sums(grad.float() * unit, a.blocksize, blocks)
    if a.absmax.dtype == torch.float32:
        grads[1] = grad_absmax
        return tuple(grads)
    # Nested: absmax = code2[q] * nested_absmax[block2] + offset.
    if need[6]:
        ones2 = torch.ones_like(a.nested_absmax)
        unit2 = torch.ops.opsq.dequantize_blockwise(a.absmax, ones2, a.nested_code,
                                                    a.nested_blocksize, torch.float32)
        grads[6] = _block_sums(grad_absmax * unit2, a.nested_blocksize, a.nested_absmax.numel())
    if need[8]:
        grads[8] = grad_absmax.sum().reshape(a.offset.shape)
    return tuple(grads)


torch.library.register_autograd("opsq::dequantize_4bit", _dq4_backward, setup_context=_dq4_setup)


# ---- dequantize_blockwise ------------------------------------------------------------------
def _dqb_setup(ctx, inputs, output):
    ctx.a = _Args("dequantize_blockwise", inputs)


def _dqb_backward(ctx, grad):
    a = ctx.a
    grad_absmax = None
    if ctx.needs_input_grad[1]:
        ones = torch.ones_like(a.absmax)
        unit = torch.ops.opsq.dequantize_blockwise(a.A, ones, a.code, a.blocksize, torch.float32)
        grad_absmax = _block_sums(grad.float() * unit, a.blocksize, a.absmax.numel())
    return None, grad_absmax, None, None, None


torch.library.register_autograd("opsq::dequantize_blockwise", _dqb_backward,
                                setup_context=_dqb_setup)


# ---- int8_linear ---------------------------------------------------------------------------
def _i8l_setup(ctx, inputs, output):
    a = _Args("int8_linear", inputs)
    need = ctx.needs_input_grad
    ctx.B = a.B if need[0] else None
    ctx.SCB = a.SCB if need[0] else None
    ctx.A = a.A if (need[1] and a.B.is_floating_point()) else None
    ctx.B_dtype = a.B.dtype
    ctx.bias_dtype = None if a.bias is None else a.bias.dtype


def _i8l_backward(ctx, grad):
    need = ctx.needs_input_grad
    grad_A = grad_B = grad_bias = None
    if need[0]:
        if ctx.B.dtype == torch.int8:
            # dequant(CB) = CB * SCB / 127, applied as a per-output-feature scale on grad.
            scale = (ctx.SCB / 127.0).to(grad.dtype)
            grad_A = (grad * scale).matmul(ctx.B.to(grad.dtype))
        else:
            grad_A = grad.matmul(ctx.B.to(grad.dtype))
    if need[1] and ctx.A is not None:
        g = grad.reshape(-1, grad.shape[-1])
        grad_B = g.t().matmul(ctx.A.reshape(-1, ctx.A.shape[-1]).to(g.dtype)).to(ctx.B_dtype)
    if need[3] and ctx.bias_dtype is not None:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, grad_B, None, grad_bias, None


torch.library.register_autograd("opsq::int8_linear", _i8l_backward, setup_context=_i8l_setup)


# ---- mm_dequant ----------------------------------------------------------------------------
def _mmd_setup(ctx, inputs, output):
    a = _Args("mm_dequant", inputs)
    ctx.bias_dtype = None if a.bias is None else a.bias.dtype


def _mmd_backward(ctx, grad):
    grad_bias = None
    if ctx.needs_input_grad[3] and ctx.bias_dtype is not None:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return None, None, None, grad_bias, None


torch.library.register_autograd("opsq::mm_dequant", _mmd_backward, setup_context=_mmd_setup)


# ---- non-differentiable ops ----------------------------------------------------------------
def _register_non_differentiable(name: str):
    n_args = len(_arg_names(name))

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*[o for o in outs if isinstance(o, torch.Tensor)])

    def backward(ctx, *grads):
        return (None,) * n_args

    torch.library.register_autograd(f"opsq::{name}", backward, setup_context=setup_context)


for _name in ("quantize_4bit", "quantize_blockwise", "vectorwise_quant", "double_quant",
              "igemmlt", "transform"):
    _register_non_differentiable(_name)
