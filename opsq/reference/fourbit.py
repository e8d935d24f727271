"""Reference kernels of the 4-bit family (NF4 / FP4), vectorised pure PyTorch.

Format (bitsandbytes-compatible): the input is flattened row-major and cut into blocks of
``blocksize`` elements; ``absmax`` (fp32) is each block's max |x|; each element is scaled by
``1 / absmax`` and mapped to the nearest of the 16 code values (a value exactly at the midpoint
of two codes takes the lower one, as bitsandbytes' CUDA decision tree does); code 2j goes to the
high nibble and 2j+1 to the low nibble of byte j; an odd tail and any storage padding hold the
code of 0.0. An all-zero block stores absmax 0 and the zero code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._constants import (FP4_CODES_ASCENDING, FP4_THRESHOLDS, NF4_CODE, ZERO_CODE,
                          code_table)
from .. import _tiled16
from ..meta._common import ceil_div, numel_of
from ..meta.fourbit import (check_dequantize_4bit, check_linear_4bit, check_linear_4bit_merged,
                            check_quantize_4bit)
from .blockwise import _blocks, _unblock, dequantize_blockwise


def _nf4_codes(x: torch.Tensor) -> torch.Tensor:
    # Midpoints computed in float64 and rounded once to fp32 (bitsandbytes' decision tree).
    table = torch.tensor(NF4_CODE, dtype=torch.float64, device=x.device)
    mids = ((table[1:] + table[:-1]) / 2).to(torch.float32)
    return torch.bucketize(x, mids, right=False).to(torch.uint8)


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    thresholds = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=x.device)
    codes = torch.tensor(FP4_CODES_ASCENDING, dtype=torch.uint8, device=x.device)
    idx = torch.bucketize(x.abs(), thresholds, right=False)
    return codes[idx] | ((x < 0).to(torch.uint8) << 3)


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str,
                  quant_storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    packed_shape, _ = check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    n = A.numel()
    x = _blocks(A.reshape(-1).to(torch.float32), blocksize)
    absmax = x.abs().amax(dim=1) if x.numel() else x.new_empty((0,))
    scale = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = x * scale[:, None]
    # A subnormal absmax has no finite fp32 reciprocal: divide instead (0 * inf would be NaN).
    normed = torch.where(torch.isinf(scale)[:, None], x / absmax[:, None], normed)
    codes = (_nf4_codes if quant_type == "nf4" else _fp4_codes)(normed).reshape(-1)
    codes = codes[:n]
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    nbytes = packed_shape[0] * itemsize
    zero = ZERO_CODE[quant_type]
    codes = F.pad(codes, (0, 2 * nbytes - n), value=zero)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(quant_storage).reshape(packed_shape), absmax


def resolve_absmax(absmax: torch.Tensor, nested_absmax, nested_code, offset,
                   nested_blocksize: int) -> torch.Tensor:
    """fp32 absmax, decoding nested (uint8) statistics: code2[q] * nested_absmax + offset."""
    if absmax.dtype != torch.uint8:
        return absmax
    out = dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize,
                               torch.float32)
    return out + offset.reshape(())


def unpack_codes(A: torch.Tensor, n) -> torch.Tensor:
    """The first ``n`` 4-bit codes (uint8, 0..15) of packed storage ``A`` (any dtype)."""
    raw = A.reshape(-1).view(torch.uint8)[: ceil_div(n, 2)]
    return torch.stack((raw >> 4, raw & 0xF), dim=-1).reshape(-1)[:n]


def dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
                    shape, dtype: torch.dtype, nested_absmax=None, nested_code=None,
                    offset=None, nested_blocksize: int = 256,
                    layout: str = "packed") -> torch.Tensor:
    """``code[q] * absmax[block]`` of the first ``prod(shape)`` codes of ``A``, in ``dtype``
    with ``shape``. A "tiled16" weight (codes and absmax, :mod:`opsq._tiled16`; ``shape`` [N, K])
    is un-packed to bitsandbytes' layout first (the CUDA kernel reads it in place; same
    values)."""
    out_shape = check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype,
                                      nested_absmax, nested_code, offset, nested_blocksize,
                                      layout)
    if layout == "tiled16":
        A, absmax = _tiled16.unpack(A, absmax, out_shape)
    n = numel_of(out_shape)
    scales = resolve_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    values = code_table(quant_type, A.device)[unpack_codes(A, n).long()]
    out = _blocks(values, blocksize) * scales.reshape(-1, 1)
    return _unblock(out, n).to(dtype).reshape(out_shape)


def linear_4bit(A: torch.Tensor, B: torch.Tensor, shapeB, absmax: torch.Tensor, blocksize: int,
                quant_type: str, bias=None, nested_absmax=None, nested_code=None, offset=None,
                nested_blocksize: int = 256, layout: str = "packed") -> torch.Tensor:
    """y = A @ dequant(B).T + bias, with the weight dequantized to A.dtype (as bitsandbytes
    does) and the product accumulated in fp32; output in A.dtype. A "tiled16" weight (codes
    and absmax, :mod:`opsq._tiled16`) is un-packed to bitsandbytes' layout first."""
    check_linear_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, nested_absmax,
                      nested_code, offset, nested_blocksize, layout)
    if layout == "tiled16":
        B, absmax = _tiled16.unpack(B, absmax, shapeB)
    W = dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, A.dtype, nested_absmax,
                        nested_code, offset, nested_blocksize)
    b = None if bias is None else bias.to(A.dtype).float()
    return F.linear(A.float(), W.float(), b).to(A.dtype)


def linear_4bit_merged(A: torch.Tensor, B, N, absmax, blocksize: int, quant_type: str, bias,
                       nested_absmax, nested_code, offset, nested_blocksize: int = 256,
                       layout: str = "packed") -> list:
    """``[linear_4bit(A, B[g], [N[g], K], absmax[g], ..., bias[g], ...) for g]``: each weight's
    product exactly as :func:`linear_4bit` computes it alone."""
    check_linear_4bit_merged(A, B, N, absmax, blocksize, quant_type, bias, nested_absmax,
                             nested_code, offset, nested_blocksize, layout)
    return [linear_4bit(A, B[g], [N[g], A.shape[-1]], absmax[g], blocksize, quant_type, bias[g],
                        nested_absmax[g], nested_code[g], offset[g], nested_blocksize, layout)
            for g in range(len(B))]
