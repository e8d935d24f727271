"""Reference kernels of the LLM.int8 family (Dettmers et al., "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale", 2022), vectorised pure PyTorch.

Row-wise (vector-wise) quantization: ``CA = round(A * 127 / SCA)`` with ``SCA`` the row's
max |A|. With ``threshold > 0`` every element with |A| >= threshold is an outlier: it is
excluded from the statistics, and every column holding one is flagged in the static boolean
mask ``outlier_cols`` and zeroed in the int8 output (the 16-bit part of the matmul handles it).
"""
from __future__ import annotations

import torch

from ..meta._common import numel_of
from ..meta.int8 import (check_igemmlt, check_int8_linear, check_mm_dequant,
                         check_vectorwise_quant)

#: 1 / 127**2, the LLM.int8 dequantization constant of ``mm_dequant``.
MM_DEQUANT_SCALE = 1.0 / (127.0 * 127.0)


def _masked(A: torch.Tensor, threshold: float):
    K = A.shape[-1]
    x = A.reshape(numel_of(A.shape[:-1]), K).to(torch.float32)
    if threshold > 0.0:
        outliers = x.abs() >= threshold
        return x.masked_fill(outliers, 0.0), outliers.any(dim=0)
    return x, torch.zeros(K, dtype=torch.bool, device=A.device)


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.shape[dim] == 0:
        return x.new_zeros(x.shape[1 - dim])
    return x.abs().amax(dim=dim)


def _quant(x: torch.Tensor, stats: torch.Tensor, dim: int) -> torch.Tensor:
    scale = torch.where(stats > 0, 127.0 / stats, torch.zeros_like(stats)).unsqueeze(dim)
    scaled = x * scale
    # Tiny stats (< 127 / fp32 max) overflow the reciprocal: divide first instead.
    scaled = torch.where(torch.isinf(scale), (x / stats.unsqueeze(dim)) * 127.0, scaled)
    # NaN (a NaN or Inf in the row) -> code 0, deterministically (a NaN -> int8 cast is UB).
    return torch.round(scaled.nan_to_num(nan=0.0)).clamp_(-127, 127).to(torch.int8)


def vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    shape, _, _ = check_vectorwise_quant(A, threshold)
    x, mask = _masked(A, threshold)
    stats = _absmax(x, 1)
    CA = _quant(x, stats, 1).masked_fill(mask.unsqueeze(0), 0)
    return CA.reshape(shape), stats, mask


def double_quant(A: torch.Tensor, threshold: float = 0.0):
    shape, _, _ = check_vectorwise_quant(A, threshold)
    x, mask = _masked(A, threshold)
    row_stats = _absmax(x, 1)
    col_stats = _absmax(x, 0)
    out_row = _quant(x, row_stats, 1).masked_fill(mask.unsqueeze(0), 0)
    out_col = _quant(x, col_stats, 0)
    return out_row.reshape(shape), out_col.reshape(shape), row_stats, col_stats, mask


def igemmlt(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    out_shape = check_igemmlt(A, B)
    # float64 holds every partial sum of int8 products exactly (|sum| < 2**53).
    a = A.reshape(numel_of(A.shape[:-1]), A.shape[-1]).to(torch.float64)
    return (a @ B.to(torch.float64).t()).to(torch.int32).reshape(out_shape)


def mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, bias=None,
               dtype=None) -> torch.Tensor:
    shape, out_dtype = check_mm_dequant(A, row_stats, col_stats, bias, dtype)
    N = A.shape[-1]
    a = A.reshape(numel_of(A.shape[:-1]), N).to(torch.float32)
    # Left-to-right C * row * col * (1/127^2), the order bitsandbytes' kernel uses.
    out = a * row_stats.reshape(-1, 1) * col_stats.reshape(1, N) * MM_DEQUANT_SCALE
    if bias is not None:
        out = out + bias.reshape(1, N).to(torch.float32)
    return out.to(out_dtype).reshape(shape)


def int8_linear(A: torch.Tensor, B: torch.Tensor, SCB=None, bias=None,
                threshold: float = 0.0) -> torch.Tensor:
    """LLM.int8 linear: y = A @ W.T + bias with W = CB * SCB / 127 (or a float W quantized
    per call), A quantized row-wise to int8; with ``threshold > 0`` the outlier columns of A are
    multiplied in 16-bit precision against the dequantized weight columns. Output in A.dtype."""
    out_shape = check_int8_linear(A, B, SCB, bias, threshold)
    if B.dtype != torch.int8:
        B, SCB, _ = vectorwise_quant(B, 0.0)
    K = A.shape[-1]
    CA, SCA, mask = vectorwise_quant(A, threshold)
    rows = numel_of(A.shape[:-1])
    out = mm_dequant(igemmlt(CA.reshape(rows, K), B), SCA, SCB, None, torch.float32)
    if threshold > 0.0:
        a = A.reshape(rows, K).to(torch.float32) * mask
        w = B.to(torch.float32) * (SCB.reshape(-1, 1) / 127.0) * mask
        out = out + a @ w.t()
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(A.dtype).reshape(out_shape)
