"""SwitchBack int8 linear layers with bitsandbytes' names, built on opsq ops.

Source: Wortsman, Dettmers, Zettlemoyer, Morcos, Farhadi, Schmidt, "Stable and low-precision
training for large-scale vision-language models" (NeurIPS 2023), Section 2.2 / Algorithm 1.
SwitchBack runs the two matmuls whose inner dimension is the feature dimension in int8 — the
forward ``X Wᵀ`` and the input gradient ``G W`` — and "switches back" to 16-bit for the weight
gradient ``Gᵀ X``, whose inner dimension (batch x sequence) is large enough for int8 rounding
noise to accumulate:

* forward: ``X`` quantized row-wise (one absmax per token) with ``vectorwise_quant``; ``W``
  quantized tensor-wise (one absmax, "global") or row-wise ("vector-wise"); ``igemmlt`` then
  ``mm_dequant``;
* input gradient: ``G`` row-wise; ``W`` with the same global scale (global) or column-wise
  (vector-wise: each column of ``W`` is a row of the contracted operand ``Wᵀ``);
* weight gradient: ``Gᵀ X`` in the activations' (16-bit) dtype; the memory-efficient variant
  saves ``X`` as int8 and dequantizes it for this product.

Every step is a ``torch.ops.opsq`` op, so CUDA uses opsq's kernels and ``torch.compile`` sees a
plain graph (the autograd rule is a ``torch.autograd.Function``, which dynamo traces).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import FLOAT_DTYPES
from ._lifecycle import _apply_intent, _held_apply
from .linear8bit import Linear8bitLt

__all__ = ["SwitchBackLinear", "SwitchBackLinearGlobal", "SwitchBackLinearGlobalMemEfficient",
           "SwitchBackLinearVectorwise", "StandardLinear", "SwitchBackLinearBnb"]

ops = torch.ops.opsq


def dequantize_int8_rows(C: torch.Tensor, row_stats: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``C * row_stats / 127`` through ``mm_dequant`` (column scale 127).

    Args:
        C: int8 ``(M, K)``, row-wise quantized. row_stats: fp32 ``(M,)`` row absmax.
        dtype: output dtype (fp16/bf16/fp32).
    Returns:
        ``(M, K)`` in ``dtype``.
    """
    cols = torch.full((C.shape[-1],), 127.0, dtype=torch.float32, device=C.device)
    return ops.mm_dequant(C.to(torch.int32), row_stats, cols, None, dtype)


def _quantize_weight(weight: torch.Tensor, vectorwise: bool):
    """``(CW int8 (N, K), col_stats fp32 (N,))``: row-wise, or one tensor-wide absmax."""
    if vectorwise:
        CW, SW, _ = ops.vectorwise_quant(weight, 0.0)
        return CW, SW
    N = weight.shape[0]
    CW, SW, _ = ops.vectorwise_quant(weight.reshape(1, -1), 0.0)
    return CW.reshape(weight.shape), SW.expand(N).contiguous()


def _int8_matmul(X: torch.Tensor, CW: torch.Tensor, SW: torch.Tensor, bias, dtype):
    """``X (M, K) @ dequant(CW).T (+ bias)`` with ``X`` quantized row-wise per call."""
    CX, SX, _ = ops.vectorwise_quant(X, 0.0)
    return ops.mm_dequant(ops.igemmlt(CX, CW), SX, SW, bias, dtype)


class _SwitchBackMatmul(torch.autograd.Function):
    """``x @ weight.T + bias`` with SwitchBack's int8 forward / int8 input-gradient / 16-bit
    weight-gradient rule (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, vectorwise: bool, mem_efficient: bool):
        K = x.shape[-1]
        X = x.reshape(-1, K)
        CW, SW = _quantize_weight(weight, vectorwise)
        CX, SX, _ = ops.vectorwise_quant(X, 0.0)
        out = ops.mm_dequant(ops.igemmlt(CX, CW), SX, SW, bias, x.dtype)
        ctx.vectorwise, ctx.mem_efficient = vectorwise, mem_efficient
        ctx.x_shape, ctx.w_shape, ctx.w_dtype = x.shape, weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Vector-wise re-quantizes W column-wise in the backward; global reuses CW and SW.
        w_saved = weight if vectorwise else CW
        if mem_efficient:
            ctx.save_for_backward(CX, SX, w_saved, SW)
        else:
            ctx.save_for_backward(X, w_saved, SW)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        if ctx.mem_efficient:
            CX, SX, w_saved, SW = ctx.saved_tensors
            X = None
        else:
            X, w_saved, SW = ctx.saved_tensors
        N, K = ctx.w_shape
        G = grad.reshape(-1, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if ctx.vectorwise:  # W column-wise: the rows of W.T
                CWt, SWt = _quantize_weight(w_saved.t().contiguous(), True)
            else:  # one global scale serves W and W.T
                CWt, SWt = w_saved.t().contiguous(), SW[:1].expand(K).contiguous()
            grad_x = _int8_matmul(G, CWt, SWt, None, grad.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if X is None:
                X = dequantize_int8_rows(CX, SX, grad.dtype)
            grad_w = G.t().matmul(X.to(G.dtype)).to(ctx.w_dtype)
        if ctx.needs_input_grad[2] and ctx.bias_dtype is not None:
            grad_b = G.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


def _check_input(x: torch.Tensor, in_features: int, layer: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{layer}: x must have dtype in {list(FLOAT_DTYPES)}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{layer}: x must have shape (..., {in_features}) (in_features), got "
                         f"{tuple(x.shape)}")


class SwitchBackLinear(nn.Linear):
    """SwitchBack linear layer (Wortsman et al., 2023): int8 forward and input gradient, 16-bit
    weight gradient. A trainable float weight; opsq ops on every device (no Triton needed).

    Args:
        in_features: K. out_features: N. bias: add a bias ``(N,)``.
        device, dtype: of the float parameters.
        vector_wise_quantization: quantize ``W`` row-wise (one scale per output feature) in the
            forward and column-wise in the backward, instead of one tensor-wide scale.
        mem_efficient: save ``X`` as int8 + row scales for the backward (global scaling only).
    Shapes:
        x ``(..., K)`` fp16/bf16/fp32 → ``(..., N)`` in x's dtype.
    Inference: :meth:`prepare_for_eval` quantizes the weight once into the buffers ``W_int8``
    (int8 ``(N, K)``) and ``state_W`` (fp32 ``(N,)``); in ``eval()`` mode ``forward`` then uses
    them. ``train()`` drops them (they would go stale as the weight trains).
    Raises:
        ValueError: ``mem_efficient`` with ``vector_wise_quantization``; in ``forward``, x's last
            dimension is not K. TypeError: x is not fp16/bf16/fp32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, vector_wise_quantization: bool = False, mem_efficient: bool = False):
        super().__init__(in_features, out_features, bias, device, dtype)
        if mem_efficient and vector_wise_quantization:
            raise ValueError("mem_efficient=True is only supported with global (tensor-wise) "
                             "weight scaling, not vector_wise_quantization=True")
        self.vector_wise_quantization = vector_wise_quantization
        self.mem_efficient = mem_efficient
        self.register_buffer("W_int8", None, persistent=False)
        self.register_buffer("state_W", None, persistent=False)

    @torch.no_grad()
    def prepare_for_eval(self) -> "SwitchBackLinear":
        """Quantize the current weight once for inference (see the class docstring)."""
        self.W_int8, self.state_W = _quantize_weight(self.weight.detach(),
                                                     self.vector_wise_quantization)
        return self

    def train(self, mode: bool = True):
        if mode:
            self.W_int8 = self.state_W = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # the prepared int8 weight and its fp32 scales follow device moves only: a dtype
        # conversion of the model (.half(), .to(torch.bfloat16)) must not round state_W
        if self.state_W is None:
            return super()._apply(fn, recurse)
        device, to_empty = _apply_intent(fn)
        _held_apply(self, nn.Linear, fn, recurse, device, to_empty, ("W_int8", "state_W"))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features, type(self).__name__)
        if self.training or self.W_int8 is None:
            return _SwitchBackMatmul.apply(x, self.weight, self.bias,
                                           self.vector_wise_quantization, self.mem_efficient)
        out = _int8_matmul(x.reshape(-1, self.in_features), self.W_int8, self.state_W,
                           self.bias, x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", vector_wise_quantization="
                f"{self.vector_wise_quantization}, mem_efficient={self.mem_efficient}")


class SwitchBackLinearGlobal(SwitchBackLinear):
    """:class:`SwitchBackLinear` with one tensor-wide weight scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype,
                         vector_wise_quantization=False)


class SwitchBackLinearGlobalMemEfficient(SwitchBackLinear):
    """:class:`SwitchBackLinearGlobal` that saves ``X`` as int8 for the backward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype,
                         vector_wise_quantization=False, mem_efficient=True)


class SwitchBackLinearVectorwise(SwitchBackLinear):
    """:class:`SwitchBackLinear` with row-wise weight scales (column-wise in the backward)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype,
                         vector_wise_quantization=True)


class StandardLinear(nn.Linear):
    """The 16-bit baseline of the SwitchBack family: ``F.linear`` (same constructor as
    :class:`SwitchBackLinear`, for side-by-side comparisons)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features, type(self).__name__)
        return F.linear(x, self.weight, self.bias)


class SwitchBackLinearBnb(Linear8bitLt):
    """bitsandbytes' ``SwitchBackLinearBnb``: the LLM.int8 forward of :class:`Linear8bitLt`
    (row-wise int8, outlier columns in 16-bit when ``threshold > 0``) with the backward of
    ``torch.ops.opsq.int8_linear``: ``grad_x = grad @ dequant(W_int8)`` as a 16-bit matmul and,
    with ``has_fp16_weights``, the 16-bit weight gradient ``grad_W = gradᵀ x``. bitsandbytes
    also casts inputs to fp16; opsq keeps the input's dtype.

    Args:
        input_features: K. output_features: N. bias: add a bias ``(N,)``.
        has_fp16_weights: keep a float, trainable weight (quantized per call).
        memory_efficient_backward: accepted for compatibility (opsq's backward never keeps an
            extra copy of the weight).
        threshold: LLM.int8 outlier threshold (0 disables).
        index: unused, for compatibility. device: of the float parameters.
    Shapes:
        x ``(..., K)`` fp16/bf16/fp32 → ``(..., N)`` in x's dtype.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 has_fp16_weights: bool = True, memory_efficient_backward: bool = False,
                 threshold: float = 0.0, index=None, device=None):
        super().__init__(input_features, output_features, bias, has_fp16_weights, threshold,
                         index, device)
        self.memory_efficient_backward = memory_efficient_backward
