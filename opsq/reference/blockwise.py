"""Reference kernels of 8-bit blockwise quantization with a 256-entry map (the dynamic map of
Dettmers et al., ICLR 2022, by default). Each block of ``blocksize`` flat elements is scaled by
1 / max|x| and mapped to the nearest ``code`` entry (lower index on exact ties)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..meta._common import ceil_div
from ..meta.blockwise import check_dequantize_blockwise, check_quantize_blockwise


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    blocks = ceil_div(n, blocksize)
    return F.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)


def _unblock(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` values of padded ``blocks``, flat, in a storage of their own (a view into
    the padded one would be saved whole, and safetensors' save_model refuses such a tensor)."""
    flat = blocks.reshape(-1)
    return flat if flat.numel() == n else flat[:n].clone()


def nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the entry of ``code`` nearest to each element of ``x``."""
    sorted_code, order = torch.sort(code)
    mids = (sorted_code[1:] + sorted_code[:-1]) / 2
    return order[torch.bucketize(x, mids, right=False)].to(torch.uint8)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    shape, _ = check_quantize_blockwise(A, code, blocksize)
    n = A.numel()
    x = _blocks(A.reshape(-1).to(torch.float32), blocksize)
    absmax = x.abs().amax(dim=1) if x.numel() else x.new_empty((0,))
    scale = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = x * scale[:, None]
    # A subnormal absmax has no finite fp32 reciprocal: divide instead (0 * inf would be NaN).
    normed = torch.where(torch.isinf(scale)[:, None], x / absmax[:, None], normed)
    q = nearest_code(normed, code.reshape(-1).float())
    return _unblock(q, n).reshape(shape), absmax


def dequantize_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    shape = check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    n = A.numel()
    values = code.reshape(-1).float()[A.reshape(-1).long()]
    out = _blocks(values, blocksize) * absmax.reshape(-1, 1)
    return _unblock(out, n).to(dtype).reshape(shape)
