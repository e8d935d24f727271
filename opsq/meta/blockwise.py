"""Fake kernels and shared validation for 8-bit blockwise (dynamic map) quantization:
``quantize_blockwise`` and ``dequantize_blockwise``."""
from __future__ import annotations

import torch

from .._constants import FLOAT_DTYPES
from ._common import (ceil_div, check_blockwise_blocksize, check_dtype, check_float_dtype,
                      check_numel, check_same_device, register_fake)


def check_quantize_blockwise(A, code, blocksize):
    check_dtype("A", A, FLOAT_DTYPES)
    check_dtype("code", code, (torch.float32,))
    check_numel("code", code, 256)
    check_blockwise_blocksize(blocksize)
    check_same_device("A", A, code=code)
    return tuple(A.shape), (ceil_div(A.numel(), blocksize),)


def check_dequantize_blockwise(A, absmax, code, blocksize, dtype):
    check_dtype("A", A, (torch.uint8,))
    check_dtype("absmax", absmax, (torch.float32,))
    check_dtype("code", code, (torch.float32,))
    check_numel("code", code, 256)
    check_blockwise_blocksize(blocksize)
    check_float_dtype("dtype", dtype)
    check_numel("absmax", absmax, ceil_div(A.numel(), blocksize),
                f" (one per block of {blocksize} of {A.numel()} elements)")
    check_same_device("A", A, absmax=absmax, code=code)
    return tuple(A.shape)


@register_fake("opsq::quantize_blockwise")
def _quantize_blockwise_fake(A, code, blocksize):
    shape, absmax_shape = check_quantize_blockwise(A, code, blocksize)
    return A.new_empty(shape, dtype=torch.uint8), A.new_empty(absmax_shape, dtype=torch.float32)


@register_fake("opsq::dequantize_blockwise")
def _dequantize_blockwise_fake(A, absmax, code, blocksize, dtype):
    return A.new_empty(check_dequantize_blockwise(A, absmax, code, blocksize, dtype), dtype=dtype)
