"""Fake kernel and shared validation for ``transform`` (legacy cuBLASLt int8 layouts)."""
from __future__ import annotations

import torch

from .._constants import ORDERS
from ._common import (ceil_div, check, check_dim, check_dtype, check_numel, check_shape_arg,
                      check_value, register_fake)


def tiled_numel(order: str, rows, cols):
    """Bytes of an int8 ``rows x cols`` matrix stored in ``order`` (padding included).

    Works on ints and SymInts. col32 pads columns to 32; col_turing also rows to 8;
    col_ampere also rows to 32 (cuBLASLt ``cublasLtOrder_t``).
    """
    if order == "row":
        return rows * cols
    cols_p = ceil_div(cols, 32) * 32
    if order == "col32":
        return rows * cols_p
    if order == "col_turing":
        return ceil_div(rows, 8) * 8 * cols_p
    return ceil_div(rows, 32) * 32 * cols_p


def check_transform(A, from_order, to_order, shape):
    check_dtype("A", A, (torch.int8,))
    for name, order in (("from_order", from_order), ("to_order", to_order)):
        check_value(order in ORDERS,
                    lambda: f"{name} must be one of {ORDERS}, got {order!r}")
    check_value(len(shape) == 2,
                lambda: f"shape must be [rows, cols], got {list(shape)}")
    check_shape_arg("shape", shape)
    rows, cols = shape
    if from_order == "row":
        check_dim("A", A, 2)
        check(A.shape[0] == rows and A.shape[1] == cols,
              lambda: f"A (row-major) must have shape {list(shape)}, got {tuple(A.shape)}")
    else:
        check_numel("A", A, tiled_numel(from_order, rows, cols),
                    f" ({from_order} layout of a {rows}x{cols} matrix, padding included)")
    if to_order == "row":
        return (rows, cols)
    return (tiled_numel(to_order, rows, cols),)


@register_fake("opsq::transform")
def _transform_fake(A, from_order, to_order, shape):
    return A.new_empty(check_transform(A, from_order, to_order, shape))
