"""Fake kernels and shared validation for the 4-bit family: ``quantize_4bit``,
``dequantize_4bit``, ``linear_4bit`` (``gemv_4bit`` is its alias, ``opsq._schemas.ALIASES``)
and ``linear_4bit_merged``.

The ``check_*`` helpers are the single source of validation for this family: the fake kernels
below and the reference kernels (``opsq.reference.fourbit``) both call them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._constants import FLOAT_DTYPES, NESTED_BLOCKSIZE, QUANT_STORAGE_DTYPES
from .._tiled16 import check_tiled16
from ._common import (ceil_div, check, check_blocksize, check_dim, check_dtype, check_float_dtype,
                      check_layout, check_min_dim, check_numel, check_quant_storage,
                      check_quant_type, check_same_device, check_shape_arg, check_type,
                      check_value, numel_of, register_fake)


def packed_numel(n, itemsize: int):
    """Elements of a ``quant_storage`` tensor (itemsize bytes each) holding ``n`` 4-bit codes."""
    return ceil_div(ceil_div(n, 2), itemsize)


def check_quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str,
                        quant_storage: torch.dtype):
    check_dtype("A", A, FLOAT_DTYPES)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_quant_storage(quant_storage)
    n = A.numel()
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    return (packed_numel(n, itemsize), 1), (ceil_div(n, blocksize),)


def check_absmax(A: torch.Tensor, absmax: torch.Tensor, n, blocksize: int,
                 nested_absmax, nested_code, offset, nested_blocksize: int) -> None:
    """Validate a (possibly nested) absmax for ``n`` elements quantized in ``blocksize`` blocks."""
    blocks = ceil_div(n, blocksize)
    check_dtype("absmax", absmax, (torch.float32, torch.uint8))
    check_numel("absmax", absmax, blocks, f" (one per block of {blocksize} of {n} elements)")
    check_same_device("A", A, absmax=absmax, nested_absmax=nested_absmax,
                      nested_code=nested_code, offset=offset)
    if absmax.dtype == torch.uint8:
        check_value(
            nested_absmax is not None and nested_code is not None and offset is not None,
            lambda: "absmax is uint8 (nested statistics): nested_absmax, nested_code and offset "
                    "are required")
        check_blocksize(nested_blocksize, "nested_blocksize")
        check_dtype("nested_absmax", nested_absmax, (torch.float32,))
        check_numel("nested_absmax", nested_absmax, ceil_div(blocks, nested_blocksize),
                    f" (one per {nested_blocksize} absmax codes)")
        check_dtype("nested_code", nested_code, (torch.float32,))
        check_numel("nested_code", nested_code, 256)
        check_dtype("offset", offset, (torch.float32,))
        check_numel("offset", offset, 1)
    else:
        check_value(
            nested_absmax is None and nested_code is None and offset is None,
            lambda: "nested_absmax/nested_code/offset given but absmax is float32; nested "
                    "statistics need absmax as uint8 codes")


def check_packed(name: str, B: torch.Tensor, n) -> None:
    check_dtype(name, B, QUANT_STORAGE_DTYPES)
    expected = packed_numel(n, B.element_size())
    check_numel(name, B, expected,
                f" ({n} 4-bit codes in {B.dtype} storage)")


def check_dequantize_4bit(A, absmax, blocksize, quant_type, shape: Sequence, dtype,
                          nested_absmax=None, nested_code=None, offset=None,
                          nested_blocksize=NESTED_BLOCKSIZE, layout="packed"):
    """Validate a ``dequantize_4bit`` call; returns the output shape ``tuple(shape)``.
    ``layout`` "tiled16" (codes ``A`` and ``absmax`` in :mod:`opsq._tiled16`'s order) also needs
    ``shape = [N, K]`` with blocksize 64, ``N % 16 == 0`` and ``K % 256 == 0`` (ValueError
    naming the value); a layout other than "packed" / "tiled16" is a ValueError too."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_float_dtype("dtype", dtype)
    check_shape_arg("shape", shape)
    check_layout(layout)
    if layout == "tiled16":
        check_value(len(shape) == 2,
                    lambda: f"layout 'tiled16' needs shape = [N, K], got {list(shape)}")
        check_tiled16(shape, blocksize, name="shape")
    n = numel_of(shape)
    check_packed("A", A, n)
    check_absmax(A, absmax, n, blocksize, nested_absmax, nested_code, offset, nested_blocksize)
    return tuple(shape)


def check_linear_4bit(A, B, shapeB: Sequence, absmax, blocksize, quant_type, bias=None,
                      nested_absmax=None, nested_code=None, offset=None,
                      nested_blocksize=NESTED_BLOCKSIZE, layout="packed"):
    """Validate a ``linear_4bit`` / ``gemv_4bit`` call; returns the output shape
    ``A.shape[:-1] + (N,)``. ``layout`` "tiled16" also needs blocksize 64, ``N % 16 == 0`` and
    ``K % 256 == 0`` (ValueError naming the value)."""
    check_dtype("A", A, FLOAT_DTYPES)
    check_min_dim("A", A, 1)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_value(len(shapeB) == 2,
                lambda: f"shapeB must be [N, K] (out_features, in_features), got "
                        f"{list(shapeB)}")
    check_shape_arg("shapeB", shapeB)
    N, K = shapeB
    check_layout(layout)
    if layout == "tiled16":
        check_tiled16(shapeB, blocksize)
    check(A.shape[-1] == K,
          lambda: f"A's last dimension ({A.shape[-1]}) must equal shapeB[1] = K ({K})")
    check_same_device("A", A, B=B, bias=bias)
    check_packed("B", B, N * K)
    check_absmax(A, absmax, N * K, blocksize, nested_absmax, nested_code, offset,
                 nested_blocksize)
    if bias is not None:
        check_dtype("bias", bias, FLOAT_DTYPES)
        check_dim("bias", bias, 1)
        check_numel("bias", bias, N, " (shapeB[0] = N)")
    return tuple(A.shape[:-1]) + (N,)


@register_fake("opsq::quantize_4bit")
def _quantize_4bit_fake(A, blocksize, quant_type, quant_storage):
    packed_shape, absmax_shape = check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    return (A.new_empty(packed_shape, dtype=quant_storage),
            A.new_empty(absmax_shape, dtype=torch.float32))


@register_fake("opsq::dequantize_4bit")
def _dequantize_4bit_fake(A, absmax, blocksize, quant_type, shape, dtype, nested_absmax=None,
                          nested_code=None, offset=None, nested_blocksize=NESTED_BLOCKSIZE,
                          layout="packed"):
    out_shape = check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                                      nested_absmax, nested_code, offset, nested_blocksize,
                                      layout)
    return A.new_empty(out_shape, dtype=dtype)


def _linear_4bit_fake(A, B, shapeB, absmax, blocksize, quant_type, bias=None,
                      nested_absmax=None, nested_code=None, offset=None,
                      nested_blocksize=NESTED_BLOCKSIZE, layout="packed"):
    out_shape = check_linear_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias,
                                  nested_absmax, nested_code, offset, nested_blocksize, layout)
    return A.new_empty(out_shape)


register_fake("opsq::linear_4bit")(_linear_4bit_fake)


def check_linear_4bit_merged(A, B, N, absmax, blocksize, quant_type, bias, nested_absmax,
                             nested_code, offset, nested_blocksize=NESTED_BLOCKSIZE,
                             layout="packed"):
    """Validate a ``linear_4bit_merged`` call: at least one weight, every list one entry a
    weight (ValueError naming the list), and each weight ``g`` a valid ``linear_4bit`` call with
    ``shapeB = [N[g], A.shape[-1]]`` (its error, of the same type, prefixed "weight g: ").
    Returns the output shapes ``A.shape[:-1] + (N[g],)``."""
    check_type(isinstance(B, (list, tuple)), lambda: f"B must be a list of Tensors, got "
                                                     f"{type(B).__name__}")
    G = len(B)
    check_value(G >= 1, lambda: "B must hold at least one weight, got an empty list")
    for name, lst in (("N", N), ("absmax", absmax), ("bias", bias),
                      ("nested_absmax", nested_absmax), ("nested_code", nested_code),
                      ("offset", offset)):
        check_value(len(lst) == G, lambda: f"{name} must hold one entry a weight ({G}), got "
                                           f"{len(lst)}")
    check_min_dim("A", A, 1)
    shapes = []
    for g in range(G):
        for name, t, optional in (("B", B[g], False), ("absmax", absmax[g], False),
                                  ("bias", bias[g], True),
                                  ("nested_absmax", nested_absmax[g], True),
                                  ("nested_code", nested_code[g], True),
                                  ("offset", offset[g], True)):
            check_type(isinstance(t, torch.Tensor) or (optional and t is None),
                       lambda: f"{name}[{g}] must be a Tensor, got {type(t).__name__}")
        try:
            shapes.append(check_linear_4bit(
                A, B[g], [N[g], A.shape[-1]], absmax[g], blocksize, quant_type, bias[g],
                nested_absmax[g], nested_code[g], offset[g], nested_blocksize, layout))
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"weight {g}: {e}") from None
    return shapes


@register_fake("opsq::linear_4bit_merged")
def _linear_4bit_merged_fake(A, B, N, absmax, blocksize, quant_type, bias, nested_absmax,
                             nested_code, offset, nested_blocksize=NESTED_BLOCKSIZE,
                             layout="packed"):
    shapes = check_linear_4bit_merged(A, B, N, absmax, blocksize, quant_type, bias,
                                      nested_absmax, nested_code, offset, nested_blocksize,
                                      layout)
    return [A.new_empty(shape) for shape in shapes]
