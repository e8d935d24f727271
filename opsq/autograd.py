"""bitsandbytes' autograd-level API on top of the opsq ops.

Gradients live on the ops themselves (``torch.library.register_autograd``, see
``opsq._autograd``); these names keep bitsandbytes call sites working.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .functional import QuantState

__all__ = ["MatmulLtState", "MatMul8bitLt", "MatMul4Bit", "matmul", "matmul_4bit"]


@dataclasses.dataclass
class MatmulLtState:
    """State of an LLM.int8 matmul (bitsandbytes' ``MatmulLtState``).

    Attributes:
        CB: int8 ``(N, K)`` weight, or None to quantize the float weight per call.
        SCB: fp32 ``(N,)`` row absmax of ``CB``.
        threshold: outlier threshold (0 disables outliers).
        has_fp16_weights: the weight is float and trainable.
        is_training: training mode flag (kept for compatibility).
    """
    CB: Optional[torch.Tensor] = None
    SCB: Optional[torch.Tensor] = None
    threshold: float = 0.0
    has_fp16_weights: bool = True
    is_training: bool = True
    idx: Optional[torch.Tensor] = None
    formatB: str = "row"

    def reset_grads(self) -> None:
        """Compatibility no-op: opsq keeps no gradient buffers in the state."""


def matmul(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
           state: Optional[MatmulLtState] = None, threshold: float = 0.0,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLM.int8 ``A @ B.T + bias`` through ``torch.ops.opsq.int8_linear``.

    Args:
        A: ``(..., K)`` fp16/bf16/fp32.
        B: float weight ``(N, K)`` (quantized per call) unless ``state.CB`` is set.
        state: a :class:`MatmulLtState`; ``threshold`` overrides its threshold when > 0.
    Returns:
        ``(..., N)`` in ``A.dtype``.
    """
    state = state or MatmulLtState()
    thr = float(threshold) if threshold > 0.0 else float(state.threshold)
    if state.CB is not None and not state.has_fp16_weights:
        res = torch.ops.opsq.int8_linear(A, state.CB, state.SCB, bias, thr)
    else:
        res = torch.ops.opsq.int8_linear(A, B, None, bias, thr)
    if out is not None:
        return out.copy_(res)
    return res


def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState,
                out: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A @ dequant(B).T + bias`` for a packed 4-bit ``B`` of logical shape
    ``quant_state.shape = (N, K)`` (``B.t()`` accepted); one ``row`` of ``A`` without grad goes
    through ``gemv_4bit``, everything else through ``linear_4bit``.

    Raises:
        ValueError: ``quant_state`` is None.
    """
    if quant_state is None:
        raise ValueError("matmul_4bit needs the weight's quant_state")
    args = (A, B, list(quant_state.shape), quant_state.absmax, quant_state.blocksize,
            quant_state.quant_type, bias, *quant_state.nested_args())
    if A.numel() == A.shape[-1] and not A.requires_grad:
        res = torch.ops.opsq.gemv_4bit(*args)
    else:
        res = torch.ops.opsq.linear_4bit(*args)
    if out is not None:
        return out.copy_(res)
    return res


class MatMul8bitLt:
    """bitsandbytes-style ``MatMul8bitLt.apply(A, B, out, bias, state)``."""

    @staticmethod
    def apply(A, B, out=None, bias=None, state=None):
        return matmul(A, B, out=out, state=state, bias=bias)


class MatMul4Bit:
    """bitsandbytes-style ``MatMul4Bit.apply(A, B, out, bias, quant_state)``."""

    @staticmethod
    def apply(A, B, out=None, bias=None, quant_state=None):
        return matmul_4bit(A, B, quant_state, out=out, bias=bias)
