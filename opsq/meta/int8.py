"""Fake kernels and shared validation for the LLM.int8 family: ``vectorwise_quant``,
``double_quant``, ``igemmlt``, ``mm_dequant`` and ``int8_linear``."""
from __future__ import annotations

import torch

from .._constants import FLOAT_DTYPES
from ._common import (check, check_dim, check_dtype, check_float_dtype, check_min_dim, check_numel,
                      check_same_device, check_threshold, check_value, numel_of, register_fake)


def check_vectorwise_quant(A, threshold):
    check_dtype("A", A, FLOAT_DTYPES)
    check_min_dim("A", A, 1)
    check_threshold(threshold)
    rows = numel_of(A.shape[:-1])
    return tuple(A.shape), (rows,), (A.shape[-1],)


def check_igemmlt(A, B):
    check_dtype("A", A, (torch.int8,))
    check_dtype("B", B, (torch.int8,))
    check_min_dim("A", A, 1)
    check_dim("B", B, 2)
    check_same_device("A", A, B=B)
    check(A.shape[-1] == B.shape[1],
          lambda: f"A's last dimension ({A.shape[-1]}) must equal B's K "
                  f"(B.shape[1] = {B.shape[1]}); B is (N, K) and the op computes A @ B.T")
    return tuple(A.shape[:-1]) + (B.shape[0],)


def check_mm_dequant(A, row_stats, col_stats, bias, dtype):
    check_dtype("A", A, (torch.int32,))
    check_min_dim("A", A, 1)
    check_dtype("row_stats", row_stats, (torch.float32,))
    check_dtype("col_stats", col_stats, (torch.float32,))
    check_same_device("A", A, row_stats=row_stats, col_stats=col_stats, bias=bias)
    rows = numel_of(A.shape[:-1])
    check_numel("row_stats", row_stats, rows, " (one per row of A)")
    check_numel("col_stats", col_stats, A.shape[-1], " (one per column of A)")
    if dtype is not None:
        check_float_dtype("dtype", dtype)
    if bias is not None:
        check_dtype("bias", bias, FLOAT_DTYPES)
        check_numel("bias", bias, A.shape[-1], " (one per column of A)")
    return tuple(A.shape), (torch.float16 if dtype is None else dtype)


def check_int8_linear(A, B, SCB, bias, threshold):
    check_dtype("A", A, FLOAT_DTYPES)
    check_min_dim("A", A, 1)
    check_threshold(threshold)
    check_dtype("B", B, (torch.int8,) + FLOAT_DTYPES)
    check_dim("B", B, 2)
    check_same_device("A", A, B=B, SCB=SCB, bias=bias)
    check(A.shape[-1] == B.shape[1],
          lambda: f"A's last dimension ({A.shape[-1]}) must equal B.shape[1] "
                  f"(in_features = {B.shape[1]})")
    N = B.shape[0]
    if B.dtype == torch.int8:
        check_value(SCB is not None,
                    lambda: "SCB (fp32 row scales of the int8 weight B) is required when "
                            "B is int8")
        check_dtype("SCB", SCB, (torch.float32,))
        check_numel("SCB", SCB, N, " (one per row of B)")
    else:
        check_value(SCB is None,
                    lambda: "SCB must be None when B is a floating-point weight "
                            "(it is quantized per call)")
    if bias is not None:
        check_dtype("bias", bias, FLOAT_DTYPES)
        check_dim("bias", bias, 1)
        check_numel("bias", bias, N, " (one per output feature)")
    return tuple(A.shape[:-1]) + (N,)


@register_fake("opsq::vectorwise_quant")
def _vectorwise_quant_fake(A, threshold=0.0):
    shape, rows, cols = check_vectorwise_quant(A, threshold)
    return (A.new_empty(shape, dtype=torch.int8), A.new_empty(rows, dtype=torch.float32),
            A.new_empty(cols, dtype=torch.bool))


@register_fake("opsq::double_quant")
def _double_quant_fake(A, threshold=0.0):
    shape, rows, cols = check_vectorwise_quant(A, threshold)
    return (A.new_empty(shape, dtype=torch.int8), A.new_empty(shape, dtype=torch.int8),
            A.new_empty(rows, dtype=torch.float32), A.new_empty(cols, dtype=torch.float32),
            A.new_empty(cols, dtype=torch.bool))


@register_fake("opsq::igemmlt")
def _igemmlt_fake(A, B):
    return A.new_empty(check_igemmlt(A, B), dtype=torch.int32)


@register_fake("opsq::mm_dequant")
def _mm_dequant_fake(A, row_stats, col_stats, bias=None, dtype=None):
    shape, out_dtype = check_mm_dequant(A, row_stats, col_stats, bias, dtype)
    return A.new_empty(shape, dtype=out_dtype)


@register_fake("opsq::int8_linear")
def _int8_linear_fake(A, B, SCB=None, bias=None, threshold=0.0):
    return A.new_empty(check_int8_linear(A, B, SCB, bias, threshold))
