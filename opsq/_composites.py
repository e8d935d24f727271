"""Bodies of the composite ops and ``.out`` overloads of :mod:`opsq._schemas` (each a call of
opsq ops, registered ``CompositeImplicitAutograd``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._constants import NESTED_BLOCKSIZE


def gemm_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor,
              blocksize: int, quant_type: str, bias: Optional[torch.Tensor] = None,
              absmax_8bit: Optional[torch.Tensor] = None,
              absmax_code: Optional[torch.Tensor] = None,
              absmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bitsandbytes 0.50's ``gemm_4bit``: ``A @ dequant(B).T + bias``, ``(..., K)`` →
    ``(..., N)``. Plain statistics: ``absmax`` fp32 per block. Nested: ``absmax_8bit`` (uint8
    codes of absmax - offset), ``absmax`` (their fp32 scale per 256 codes), ``absmax_code``
    (256-entry map) and ``absmax_offset`` (0-dim): opsq's ``linear_4bit`` with nested_absmax,
    nested_code, offset and nested_blocksize 256. Errors are linear_4bit's (naming its
    arguments), and ValueError when only part of the nested triple is given."""
    if absmax_8bit is None:
        if absmax_code is not None or absmax_offset is not None:
            raise ValueError("absmax_code / absmax_offset given without absmax_8bit")
        return torch.ops.opsq.linear_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias)
    if absmax_code is None or absmax_offset is None:
        raise ValueError("absmax_8bit needs absmax_code and absmax_offset")
    return torch.ops.opsq.linear_4bit(A, B, shapeB, absmax_8bit, blocksize, quant_type, bias,
                                      absmax, absmax_code, absmax_offset.reshape(1),
                                      NESTED_BLOCKSIZE)


def int8_scaled_mm(A: torch.Tensor, B: torch.Tensor, row_stats: torch.Tensor,
                   col_stats: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """bitsandbytes 0.50's ``int8_scaled_mm``: ``mm_dequant(igemmlt(A, B), row_stats,
    col_stats, bias, dtype)``; A int8 ``(..., K)``, B int8 ``(N, K)``, row_stats ``(M,)``,
    col_stats ``(N,)`` fp32 → ``(..., N)`` in ``dtype`` (default fp16)."""
    return torch.ops.opsq.mm_dequant(torch.ops.opsq.igemmlt(A, B), row_stats, col_stats, bias,
                                     dtype)


def _check_out(name: str, out: torch.Tensor, want: torch.Tensor) -> None:
    if out.dtype != want.dtype:
        raise TypeError(f"{name} must have dtype {want.dtype}, got {out.dtype}")
    if out.shape != want.shape:
        raise ValueError(f"{name} must have shape {tuple(want.shape)}, got {tuple(out.shape)}")
    if out.device != want.device:
        raise ValueError(f"{name} must be on {want.device}, got {out.device}")


def out_kernel(name: str):
    """``name.out``: the functional op's result(s) copied into the given tensors."""
    op = getattr(torch.ops.opsq, name).default

    if name == "quantize_blockwise":
        def kernel(A, code, blocksize, *, out, absmax_out):
            q, absmax = op(A, code, blocksize)
            _check_out("out", out, q)
            _check_out("absmax_out", absmax_out, absmax)
            out.copy_(q)
            absmax_out.copy_(absmax)
            return out, absmax_out
        return kernel

    def kernel(*args, out):
        res = op(*args)
        _check_out("out", out, res)
        out.copy_(res)
        return out
    return kernel
