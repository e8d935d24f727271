"""Legacy cuBLASLt int8 tile layouts (as used by bitsandbytes' ``transform``).

Pure-torch, vectorised re-implementation of the memory orders produced by
``cublasLtMatrixTransform`` for the ``cublasLtOrder_t`` values below (see
NVIDIA's cuBLASLt documentation of ``cublasLtOrder_t``).  The formulas were
checked byte-for-byte against NVIDIA's own output (H200, CUDA 13.0).

Orders (``r``/``c`` are the element's row/column in the row-major matrix):

``"row"``
    CUBLASLT_ORDER_ROW: plain row-major, offset ``r*cols + c``; no padding.
``"col32"``
    CUBLASLT_ORDER_COL32: the matrix is cut into column panels of 32 columns
    (cols padded to a multiple of 32); each panel holds ``rows`` rows of 32
    bytes, i.e. ld = 32*rows.  Offset
    ``(c//32)*32*rows + r*32 + c%32``.
``"col_turing"``
    CUBLASLT_ORDER_COL4_4R2_8C: rows padded to a multiple of 8 (``rows8``),
    cols to 32; column panels of 32 columns (ld = 32*rows8), each a column of
    8x32 tiles of 256 bytes.  Inside a tile, with ``i = r%8``, ``j = c%32``:
    the 128 bytes of the even rows come first, then the odd rows; within each
    half, 8 inner tiles of 4 columns x 4 rows (16 bytes, row-major) follow in
    column order.  Offset
    ``(c//32)*32*rows8 + (r//8)*256 + (i%2)*128 + (j//4)*16 + (i//2)*4 + j%4``.
``"col_ampere"``
    CUBLASLT_ORDER_COL32_2R_4R4: rows padded to a multiple of 32
    (``rows32``), cols to 32; column panels of 32 columns (ld = 32*rows32),
    each a column of 32x32 tiles of 1024 bytes.  Inside a tile, with
    ``i = r%32``, ``j = c%32``, the 32-byte row ``i`` is stored at row slot
    ``((i%8)//2*4 + i//8)*2 + i%2``.  Offset
    ``(c//32)*32*rows32 + (r//32)*1024 + (((i%8)//2*4 + i//8)*2 + i%2)*32 + j``.

Padding bytes (rows/cols added by the padding) are zero.
"""

from __future__ import annotations

import torch

__all__ = [
    "ORDERS",
    "padded_shape",
    "tiled_numel",
    "tile_offsets",
    "row_to_tiled",
    "tiled_to_row",
]

ORDERS = ("row", "col32", "col_turing", "col_ampere")

# order -> (row multiple, column multiple)
_PAD = {
    "row": (1, 1),
    "col32": (1, 32),
    "col_turing": (8, 32),
    "col_ampere": (32, 32),
}


def _check_order(order) -> str:
    if not isinstance(order, str) or order not in _PAD:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


def _check_size(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    try:
        value = value.__index__()  # int, or e.g. a numpy / 0-d torch integer
    except (AttributeError, TypeError):
        raise ValueError(f"{name} must be a non-negative int, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value}")
    return value


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def padded_shape(order: str, rows: int, cols: int) -> tuple[int, int]:
    """Return ``(rows_padded, cols_padded)`` of a ``rows x cols`` matrix in ``order``.

    ``"row"``: unchanged; ``"col32"``: cols rounded up to 32;
    ``"col_turing"``: rows to 8, cols to 32; ``"col_ampere"``: rows to 32,
    cols to 32.  Source: cuBLASLt ``cublasLtOrder_t`` documentation
    (CUBLASLT_ORDER_ROW / COL32 / COL4_4R2_8C / COL32_2R_4R4).

    Raises:
        ValueError: ``order`` is not in :data:`ORDERS`; ``rows`` or ``cols``
            is negative or not an integer.
    """
    order = _check_order(order)
    rows = _check_size("rows", rows)
    cols = _check_size("cols", cols)
    rm, cm = _PAD[order]
    return _round_up(rows, rm), _round_up(cols, cm)


def tiled_numel(order: str, rows: int, cols: int) -> int:
    """Number of elements of the flat tiled buffer of a ``rows x cols`` matrix.

    Equals ``rows_padded * cols_padded`` from :func:`padded_shape` (for the
    tiled orders: ld * number of 32-column panels, ld = 32 * rows_padded).
    Source: cuBLASLt ``cublasLtOrder_t`` documentation.

    Raises:
        ValueError: unknown ``order``; negative / non-integer ``rows`` or ``cols``.
    """
    rp, cp = padded_shape(order, rows, cols)
    return rp * cp


def tile_offsets(order: str, rows: int, cols: int, device=None) -> torch.Tensor:
    """Flat offsets of each element of a row-major matrix in the tiled buffer.

    Args:
        order: one of :data:`ORDERS`.
        rows, cols: logical (unpadded) matrix shape, non-negative ints.
        device: torch device of the result (default: CPU).

    Returns:
        int64 tensor of shape ``(rows, cols)``; entry ``[r, c]`` is the index
        of element ``(r, c)`` in the flat buffer of length
        ``tiled_numel(order, rows, cols)``.  Distinct elements map to distinct
        offsets; offsets not hit are padding.  For ``"row"``: ``r*cols + c``.
        Formulas (see the module docstring) follow cuBLASLt's
        ``cublasLtOrder_t`` documentation and match ``cublasLtMatrixTransform``.

    Raises:
        ValueError: unknown ``order``; negative / non-integer ``rows`` or ``cols``.
    """
    rp, _ = padded_shape(order, rows, cols)
    r = torch.arange(rows, dtype=torch.int64, device=device).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.int64, device=device).unsqueeze(0)
    if order == "row":
        off = r * cols + c
    else:
        panel = (c // 32) * (32 * rp)  # start of the 32-column panel (ld = 32*rp)
        j = c % 32
        if order == "col32":
            off = panel + r * 32 + j
        elif order == "col_turing":
            i = r % 8
            off = (panel + (r // 8) * 256 + (i % 2) * 128 + (i // 2) * 4
                   + (j // 4) * 16 + j % 4)
        else:  # col_ampere
            i = r % 32
            slot = ((i % 8) // 2 * 4 + i // 8) * 2 + i % 2
            off = panel + (r // 32) * 1024 + slot * 32 + j
    return off.expand(rows, cols).contiguous()


def row_to_tiled(A: torch.Tensor, order: str) -> torch.Tensor:
    """Convert a row-major matrix to the flat tiled buffer of ``order``.

    Args:
        A: 2-D tensor ``(rows, cols)`` (normally int8; any dtype works),
            interpreted row-major (non-contiguous inputs are fine).
        order: one of :data:`ORDERS`.

    Returns:
        1-D tensor of ``A.dtype`` on ``A.device`` with
        ``tiled_numel(order, rows, cols)`` elements; padding positions are 0.
        Matches ``cublasLtMatrixTransform`` from CUBLASLT_ORDER_ROW to the
        cuBLASLt ``cublasLtOrder_t`` order (COL32 / COL4_4R2_8C / COL32_2R_4R4).

    Raises:
        ValueError: ``A`` is not a 2-D tensor; unknown ``order``.
    """
    order = _check_order(order)
    if not isinstance(A, torch.Tensor) or A.dim() != 2:
        raise ValueError(f"A must be a 2-D tensor, got {getattr(A, 'shape', type(A))}")
    rows, cols = A.shape
    n = tiled_numel(order, rows, cols)
    if order == "row":
        return A.contiguous().reshape(-1).clone()
    out = torch.zeros(n, dtype=A.dtype, device=A.device)
    if rows and cols:
        off = tile_offsets(order, rows, cols, device=A.device)
        out[off.reshape(-1)] = A.reshape(-1)
    return out


def tiled_to_row(B: torch.Tensor, order: str, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`row_to_tiled`: gather a tiled buffer back to row-major.

    Args:
        B: tensor of any shape with exactly ``tiled_numel(order, rows, cols)``
            elements, read in its logical (flattened) order.
        order: one of :data:`ORDERS`.
        rows, cols: logical (unpadded) matrix shape, non-negative ints.

    Returns:
        Contiguous tensor ``(rows, cols)`` of ``B.dtype`` on ``B.device``;
        padding positions of ``B`` are ignored.  Layout source: cuBLASLt
        ``cublasLtOrder_t`` documentation.

    Raises:
        ValueError: unknown ``order``; negative / non-integer ``rows`` or
            ``cols``; ``B`` not a tensor or ``B.numel()`` != tiled_numel.
    """
    order = _check_order(order)
    rows = _check_size("rows", rows)
    cols = _check_size("cols", cols)
    n = tiled_numel(order, rows, cols)
    if not isinstance(B, torch.Tensor):
        raise ValueError(f"B must be a tensor, got {type(B)}")
    if B.numel() != n:
        raise ValueError(
            f"B has {B.numel()} elements, expected tiled_numel({order!r}, {rows}, {cols}) = {n}"
        )
    flat = B.reshape(-1)
    if order == "row":
        return flat.reshape(rows, cols).contiguous().clone()
    if rows == 0 or cols == 0:
        return torch.empty(rows, cols, dtype=B.dtype, device=B.device)
    off = tile_offsets(order, rows, cols, device=B.device)
    return flat[off]
