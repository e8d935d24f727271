"""bitsandbytes' autograd-level API on top of the opsq ops.

bitsandbytes computes its gradients in ``torch.autograd.Function`` classes (``MatMul8bitLt``,
``MatMul4Bit``, ``MatMul8bit``). In opsq the gradients of the LLM.int8 and 4-bit matmuls live
on the ops themselves (``torch.library.register_autograd``, see :mod:`opsq._autograd`), so
:func:`matmul`, :func:`matmul_4bit`, :class:`MatMul8bitLt` and :class:`MatMul4Bit` are thin
call-compatible wrappers: one opsq op per call, differentiable, and ``torch.compile``-able with
``fullgraph=True``. Only :class:`MatMul8bit` (the seed's vector-wise int8 matmul, whose
*backward* is quantized too) is an ``autograd.Function``; its forward and backward are built
from ``vectorwise_quant``, ``igemmlt`` and ``mm_dequant``.

Nothing here mutates its arguments: unlike bitsandbytes, :class:`MatmulLtState` is never
written to by a matmul (no cached ``CB``/``SCB`` of a float weight, no ``threshold`` update).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional, Sequence

import torch

from ._autograd import apply_op
from .functional import QuantState, _copy_out
from .layout_utils import (get_inverse_transform_indices, get_tile_inds,  # noqa: F401
                           supports_igemmlt, undo_layout)
from .outlier_tools import GlobalOutlierPooler  # noqa: F401

__all__ = ["MatmulLtState", "MatMul8bitLt", "MatMul4Bit", "MatMul8bit", "matmul",
           "matmul_4bit", "matmul_cublas", "mm_cublas", "bmm_cublas"]

ops = torch.ops.opsq


@dataclasses.dataclass
class MatmulLtState:
    """State of an LLM.int8 matmul (bitsandbytes' ``MatmulLtState``).

    Attributes:
        CB: int8 ``(N, K)`` row-quantized weight, or None to quantize the float weight ``B``
            on every call (trainable weights).
        SCB: fp32 ``(N,)`` row absmax of ``CB`` (required with ``CB``).
        threshold: outlier threshold; 0 disables the mixed-precision decomposition.
        has_fp16_weights: the weight is a float, trainable tensor quantized per call; ``CB``
            is then ignored.
        is_training: bitsandbytes' training flag (kept for compatibility; opsq's gradients do
            not depend on it).
        The remaining fields (``CxB``, ``SB``, ``CxBt``, ``SBt``, ``CBt``, ``subB``, ``idx``,
        ``outlier_pool``, ``has_accumulated_gradients``, ``use_pool``, ``formatB``,
        ``force_no_igemmlt``) exist so bitsandbytes code that reads or sets them keeps
        running; opsq does not use them (outliers are a static column mask computed per call,
        and weights are always row-major).
    """
    CB: Optional[torch.Tensor] = None
    SCB: Optional[torch.Tensor] = None
    threshold: float = 0.0
    has_fp16_weights: bool = True
    is_training: bool = True
    idx: Optional[torch.Tensor] = None
    formatB: str = "row"
    CxB: Optional[torch.Tensor] = None
    SB: Optional[tuple] = None
    CxBt: Optional[torch.Tensor] = None
    SBt: Optional[tuple] = None
    CBt: Optional[torch.Tensor] = None
    subB: Optional[torch.Tensor] = None
    outlier_pool: Optional[object] = None
    has_accumulated_gradients: bool = False
    use_pool: bool = False
    force_no_igemmlt: bool = False

    def reset_grads(self) -> None:
        """Drop the cached quantized weight of a trainable (``has_fp16_weights``) state."""
        self.CB = self.SCB = None
        self.CxB = self.SB = self.CxBt = self.SBt = self.CBt = self.subB = None


def _finish(res: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    return res if out is None else _copy_out(out, res)


# =============================================================================================
# LLM.int8
# =============================================================================================
def matmul(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
           state: Optional[MatmulLtState] = None, threshold: float = 0.0,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLM.int8 ``A @ W.T + bias`` (Dettmers et al., "LLM.int8()", 2022): one
    ``torch.ops.opsq.int8_linear`` call, bitsandbytes' ``bnb.matmul``.

    The weight is, in this order: ``state.CB`` with ``state.SCB`` when the state holds a
    frozen int8 weight (``has_fp16_weights=False``); ``B`` itself when it is int8 (then
    ``state.SCB`` gives its scales); otherwise the float ``B``, quantized row-wise on every call
    (trainable: ``B`` gets the straight-through gradient ``grad.T @ A``).

    Args:
        A: ``(..., K)`` fp16/bf16/fp32 activations (differentiable).
        B: ``(N, K)`` weight: float (fp16/bf16/fp32) or int8 ``CB``.
        out: optional ``(..., N)`` tensor the result is copied into.
        state: a :class:`MatmulLtState` (default: a fresh one, float weight, threshold 0).
        threshold: outlier threshold; when > 0 it overrides ``state.threshold`` for this call
            (the state is not modified).
        bias: optional ``(N,)`` fp16/bf16/fp32 (differentiable).
    Returns:
        ``(..., N)`` in ``A.dtype``.
    Raises:
        ValueError: ``B`` is int8 but no ``state.SCB`` is given; a negative threshold.
        TypeError / RuntimeError: from the op's validation (dtypes, shapes, devices).
    """
    state = state or MatmulLtState()
    thr = float(threshold) if threshold > 0.0 else float(state.threshold)
    if state.CB is not None and not state.has_fp16_weights:
        if state.SCB is None:
            raise ValueError("state.CB is set but state.SCB (its fp32 row absmax) is None")
        res = apply_op("int8_linear", A, state.CB, state.SCB, bias, thr)
    elif B.dtype == torch.int8:
        if state.SCB is None:
            raise ValueError("B is int8 (CB) but state.SCB (its fp32 row absmax) is None")
        res = apply_op("int8_linear", A, B, state.SCB, bias, thr)
    else:
        res = apply_op("int8_linear", A, B, None, bias, thr)
    return _finish(res, out)


class MatMul8bitLt:
    """bitsandbytes' ``MatMul8bitLt.apply(A, B, out=None, bias=None, state=None)``: same as
    :func:`matmul`. The gradients live on ``opsq::int8_linear``: ``A`` gets
    ``grad @ dequant(CB)``, a float ``B`` gets ``grad.T @ A``, ``bias`` gets ``grad.sum(0)``.
    """

    @staticmethod
    def apply(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None,
              state: Optional[MatmulLtState] = None) -> torch.Tensor:
        return matmul(A, B, out=out, state=state, bias=bias)


# =============================================================================================
# 4-bit
# =============================================================================================
def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState,
                out: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A @ dequant(B).T + bias`` for a packed 4-bit weight (QLoRA's matmul), bitsandbytes'
    ``bnb.matmul_4bit``.

    One ``opsq::linear_4bit`` call (its CUDA kernel runs the fused GEMV for up to 8 rows,
    batch-1 decoding included); differentiable in ``A``, ``bias`` and the fp32 statistics.

    Deprecated orientation (bitsandbytes 0.50): when the weight was quantized as a ``[K, N]``
    tensor, i.e. ``A.shape[-1] == quant_state.shape[0] != quant_state.shape[1]``, the result
    is ``A @ dequant(B) + bias`` (the weight dequantized in ``A.dtype``, then a dense matmul)
    with a ``DeprecationWarning`` (not under ``torch.compile``). A square weight is always
    read as ``[N, K]``. Re-quantize such weights as ``[N, K]`` to get the fused kernel.

    Args:
        A: ``(..., K)`` fp16/bf16/fp32.
        B: packed codes ``(ceil(N*K/2/itemsize), 1)`` in any ``quant_storage`` dtype, or its
            transpose (bitsandbytes passes ``weight.t()``).
        quant_state: the weight's :class:`~opsq.functional.QuantState`; ``quant_state.shape``
            is ``(N, K)`` (or the deprecated ``(K, N)``).
        out: optional ``(..., N)`` tensor the result is copied into.
        bias: optional ``(N,)``.
    Returns:
        ``(..., N)`` in ``A.dtype``.
    Raises:
        ValueError: ``quant_state`` is None or its shape is not 2-D.
        TypeError / RuntimeError: from the op's validation (dtypes, shapes, devices).
    Warns:
        DeprecationWarning: the weight is in ``[K, N]`` orientation.
    """
    try:  # the hot path's only check; a missing state/shape or a 0-d A lands in the slow path
        # (A.dim() first: under torch.compile, Dynamo raises a bare IndexError for a 0-d A's
        # shape[-1] that no except clause sees, instead of the op's "A must have at least 1
        # dimension")
        usual = A.dim() > 0 and A.shape[-1] == quant_state.shape[-1]
    except (AttributeError, TypeError, IndexError):
        usual = False
    if not usual and _is_kn_weight(A, quant_state):
        return _matmul_4bit_kn(A, B, quant_state, out, bias)
    res = apply_op("linear_4bit", A, B, list(quant_state.shape), quant_state.absmax,
                   quant_state.blocksize, quant_state.quant_type, bias,
                   *quant_state.nested_args(),
                   quant_state.layout)  # the kernel picks the GEMV for few rows
    return _finish(res, out)


def _is_kn_weight(A, quant_state) -> bool:
    """Whether :func:`matmul_4bit` meets bitsandbytes' deprecated ``[K, N]`` weight
    (``A.shape[-1] == quant_state.shape[0]``); any other mismatch is left to the op's own
    message. Raises ValueError for a missing state or a state shape that is not 2-D."""
    if quant_state is None:
        raise ValueError("matmul_4bit needs the weight's quant_state")
    shape = getattr(quant_state, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"quant_state.shape must be [N, K] (out_features, in_features), got "
                         f"{None if shape is None else list(shape)}")
    return isinstance(A, torch.Tensor) and A.dim() >= 1 and A.shape[-1] == shape[0]


def _matmul_4bit_kn(A, B, quant_state, out, bias) -> torch.Tensor:
    """``A @ dequant(B) + bias`` for a weight quantized as ``[K, N]``, with the deprecation
    warning (not under ``torch.compile``)."""
    K, N = quant_state.shape
    if not torch.compiler.is_compiling():
        warnings.warn(
            f"matmul_4bit: the weight was quantized from a [K, N] tensor (quant_state.shape="
            f"{[K, N]}); it is dequantized and multiplied densely. Re-quantize it in "
            "[N, K] (out_features, in_features) orientation; bitsandbytes will reject this "
            "in a future version.", DeprecationWarning, stacklevel=3)
    W = apply_op("dequantize_4bit", B.reshape(-1, 1), quant_state.absmax,
                 quant_state.blocksize, quant_state.quant_type, [K, N], A.dtype,
                 *quant_state.nested_args(), quant_state.layout)
    return _finish(torch.nn.functional.linear(A, W.t(), bias), out)


class MatMul4Bit:
    """bitsandbytes' ``MatMul4Bit.apply(A, B, out=None, bias=None, quant_state=None)``: always
    ``opsq::linear_4bit`` (differentiable in ``A`` and ``bias``)."""

    @staticmethod
    def apply(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
              bias: Optional[torch.Tensor] = None,
              quant_state: Optional[QuantState] = None) -> torch.Tensor:
        if quant_state is None:
            raise ValueError("MatMul4Bit needs the weight's quant_state")
        res = apply_op("linear_4bit", A, B, list(quant_state.shape), quant_state.absmax,
                       quant_state.blocksize, quant_state.quant_type, bias,
                       *quant_state.nested_args(), quant_state.layout)
        return _finish(res, out)


# =============================================================================================
# Vector-wise int8 matmul with int8 gradients (bitsandbytes' seed MatMul8bit / matmul_cublas)
# =============================================================================================
MATMUL8BIT_QUANT_TYPES = ("vector", "linear")


def _int8_mm(X: torch.Tensor, Y: torch.Tensor, quant_type: str,
             dtype: torch.dtype) -> torch.Tensor:
    """``X @ Y`` for ``X (M, K)``, ``Y (K, N)`` through int8: ``X`` quantized per row and
    ``Y`` per column (``"vector"``), or each with one tensor-wide absmax (``"linear"``), both
    to ±127 by round-to-nearest; int32 accumulation (``igemmlt``) and
    ``out = C * sx * sy / 127²`` (``mm_dequant``)."""
    if X.dtype == torch.float64:  # the int8 ops take 16/32-bit floats; fp32 holds int8 steps
        X = X.float()
    if Y.dtype == torch.float64:
        Y = Y.float()
    M, K = X.shape
    N = Y.shape[1]
    Yt = Y.t().contiguous()  # (N, K): a row of Yt is a column of Y
    if quant_type == "vector":
        CX, SX, _ = ops.vectorwise_quant(X.contiguous(), 0.0)
        CY, SY, _ = ops.vectorwise_quant(Yt, 0.0)
    else:  # "linear": one statistic for the whole tensor = row quantization of its flat view
        CX, SX, _ = ops.vectorwise_quant(X.reshape(1, M * K), 0.0)
        CY, SY, _ = ops.vectorwise_quant(Yt.reshape(1, N * K), 0.0)
        CX, SX = CX.reshape(M, K), SX.expand(M).contiguous()
        CY, SY = CY.reshape(N, K), SY.expand(N).contiguous()
    return ops.mm_dequant(ops.igemmlt(CX, CY), SX, SY, None, dtype)


def _mm(X: torch.Tensor, Y: torch.Tensor, int8: bool, quant_type: str,
        dtype: torch.dtype) -> torch.Tensor:
    """``X @ Y`` (2-D, or 3-D batched), through int8 when ``int8`` else in floating point."""
    if not int8:
        return torch.matmul(X, Y.to(X.dtype)).to(dtype)
    if X.dim() == 2:
        return _int8_mm(X, Y, quant_type, dtype)
    return torch.stack([_int8_mm(x, y, quant_type, dtype) for x, y in zip(X.unbind(0),
                                                                           Y.unbind(0))])


def _check_matmul8bit(A: torch.Tensor, B: torch.Tensor, quant_type: str,
                      precision: Sequence[int]) -> None:
    if quant_type not in MATMUL8BIT_QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {MATMUL8BIT_QUANT_TYPES}, got "
                         f"{quant_type!r}")
    if len(precision) != 3 or not all(isinstance(p, int) for p in precision):
        raise ValueError("precision must be three ints [forward, grad_B, grad_A] (8 = int8, "
                         f"anything else = floating point), got {list(precision)}")
    for name, t in (("A", A), ("B", B)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if A.device != B.device:
        raise ValueError(f"B must be on the same device as A ({A.device}), got {B.device}")
    if B.dim() == 2:
        if A.dim() < 1 or A.shape[-1] != B.shape[0]:
            raise ValueError(f"A (..., K) @ B (K, N): A's last dimension must equal "
                             f"B.shape[0]; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    elif B.dim() == 3:
        if A.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[2] != B.shape[1]:
            raise ValueError(f"batched A (b, M, K) @ B (b, K, N): got A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)}")
    else:
        raise ValueError(f"B must be (K, N) or batched (b, K, N), got shape {tuple(B.shape)}")


class _MatMul8bitFn(torch.autograd.Function):
    # forward and setup_context apart: torch.func transforms (grad, vjp, ...) need it so
    @staticmethod
    def setup_context(ctx, inputs, output):
        A, B, quant_type, precision = inputs
        ctx.quant_type, ctx.precision = quant_type, precision
        ctx.save_for_backward(A if ctx.needs_input_grad[1] else None,
                              B if ctx.needs_input_grad[0] else None)
        ctx.A_shape, ctx.dtypes = A.shape, (A.dtype, B.dtype)

    @staticmethod
    def forward(A, B, quant_type, precision):
        if B.dim() == 2:
            out = _mm(A.reshape(-1, A.shape[-1]), B, precision[0] == 8, quant_type, A.dtype)
            return out.reshape(*A.shape[:-1], B.shape[1])
        return _mm(A, B, precision[0] == 8, quant_type, A.dtype)

    @staticmethod
    def backward(ctx, grad):
        A, B = ctx.saved_tensors
        quant_type, precision = ctx.quant_type, ctx.precision
        A_dtype, B_dtype = ctx.dtypes
        grad_A = grad_B = None
        if ctx.needs_input_grad[1]:  # dL/dB = A^T @ G, quantized along the token dimension
            if B.dim() == 2:
                At = A.reshape(-1, A.shape[-1]).t()
                grad_B = _mm(At, grad.reshape(-1, grad.shape[-1]), precision[1] == 8,
                             quant_type, grad.dtype)
            else:
                grad_B = _mm(A.transpose(1, 2), grad, precision[1] == 8, quant_type,
                             grad.dtype)
            grad_B = grad_B.to(B_dtype)
        if ctx.needs_input_grad[0]:  # dL/dA = G @ B^T, quantized along the output dimension
            if B.dim() == 2:
                g = grad.reshape(-1, grad.shape[-1])
                grad_A = _mm(g, B.t(), precision[2] == 8, quant_type, grad.dtype)
                grad_A = grad_A.reshape(ctx.A_shape)
            else:
                grad_A = _mm(grad, B.transpose(1, 2), precision[2] == 8, quant_type,
                             grad.dtype)
            grad_A = grad_A.to(A_dtype)
        return grad_A, grad_B, None, None


class MatMul8bit:
    """bitsandbytes' seed ``MatMul8bit.apply(A, B, out=None, quant_type="vector",
    precision=[8, 8, 8])``: ``A @ B`` with int8 vector-wise quantization in the forward *and*
    in both gradient matmuls (Dettmers et al., "8-bit Optimizers"/"LLM.int8()" line of work;
    bitsandbytes' ``matmul_cublas``).

    Each of the three matmuls ``out = A @ B``, ``grad_B = A.T @ G`` and ``grad_A = G @ B.T``
    quantizes its left operand along its rows and its right operand along its columns (the
    contraction dimension is the one reduced by the absmax), multiplies int8 × int8 → int32
    (``opsq::igemmlt``) and rescales by ``sx * sy / 127²`` (``opsq::mm_dequant``).

    Args:
        A: ``(..., K)`` floating point, or ``(b, M, K)`` with a batched ``B``.
        B: ``(K, N)`` or ``(b, K, N)`` floating point. Note the layout: ``A @ B``, not
            ``A @ B.T`` as in :func:`matmul`.
        out: optional tensor the result is copied into.
        quant_type: ``"vector"`` (one absmax per row of the left / column of the right
            operand) or ``"linear"`` (one absmax per tensor).
        precision: ``[forward, grad_B, grad_A]`` bits; 8 runs that matmul in int8, any other
            value in the inputs' floating-point dtype (e.g. ``[8, 16, 16]``: int8 forward,
            exact gradients).
    Returns:
        ``(..., N)`` (``(b, M, N)``) in ``A.dtype``; differentiable in ``A`` and ``B``.
    Raises:
        ValueError: unknown ``quant_type``, malformed ``precision``, shape or device mismatch.
        TypeError: a non-floating-point ``A`` or ``B``.
    """

    @staticmethod
    def apply(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
              quant_type: str = "vector",
              precision: Sequence[int] = (8, 8, 8)) -> torch.Tensor:
        precision = tuple(precision)
        _check_matmul8bit(A, B, quant_type, precision)
        return _finish(_MatMul8bitFn.apply(A, B, quant_type, precision), out)


def matmul_cublas(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
                  quant_type: str = "vector",
                  precision: Sequence[int] = (8, 8, 8)) -> torch.Tensor:
    """bitsandbytes' ``matmul_cublas``: :class:`MatMul8bit` (``A @ B`` in int8)."""
    return MatMul8bit.apply(A, B, out, quant_type, precision)


mm_cublas = matmul_cublas
bmm_cublas = matmul_cublas
