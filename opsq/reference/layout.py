"""Reference kernel of ``transform``: int8 matrices between row-major and the legacy cuBLASLt
tile orders (col32, col_turing = COL4_4R2_8C, col_ampere = COL32_2R_4R4); see
:mod:`opsq._layouts` for the index formulas."""
from __future__ import annotations

import torch

from .. import _layouts
from ..meta.layout import check_transform


def transform(A: torch.Tensor, from_order: str, to_order: str, shape) -> torch.Tensor:
    check_transform(A, from_order, to_order, shape)
    rows, cols = int(shape[0]), int(shape[1])
    row = A.contiguous() if from_order == "row" else \
        _layouts.tiled_to_row(A, from_order, rows, cols)
    if to_order == "row":
        return row.clone() if row is A else row
    return _layouts.row_to_tiled(row, to_order)
