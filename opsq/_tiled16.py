"""The "tiled16" layout of a 4-bit weight: the decode kernel's byte order, in pure PyTorch.

A 4-bit weight ``(N, K)`` is stored by bitsandbytes as "packed": the codes of the flattened
weight, two a byte (element 2j in the high nibble of byte j), and one absmax per block of
``blocksize`` consecutive elements. The tiled16 layout is a permutation of those same bytes and
absmax entries inside every tile of 16 rows x 256 columns, chosen so that each warp load of
``gemv4_tiled16_kernel`` (``opsq/csrc/gemv4.cuh``) reads 512 contiguous bytes (benchmarks/
NOTES.md, "The gemv repack"; ``tile16_repack`` of benchmarks/gemv_lab.cu is the same map).

Geometry (needs blocksize 64, ``N % 16 == 0``, ``K % 256 == 0``; ``S = K / 256`` steps a row):
tile ``b`` (rows ``16 b .. 16 b + 15``) and step ``s`` (columns ``256 s .. 256 s + 255``) form
run ``r = b S + s``, which holds

* 2048 code bytes at ``r * 2048``: for chunk ``c`` (0..3, 64 columns each) and lane
  ``l = 4 g + q`` (``g`` 0..7, ``q`` 0..3), 16 bytes at ``(32 c + l) * 16``: the 8 packed bytes
  of row ``16 b + g``, columns ``256 s + 64 c + 16 q`` .. ``+ 15``, then the same 8 bytes of row
  ``16 b + g + 8``;
* 64 absmax entries at ``r * 64``: the block (chunk ``c``) of row ``16 b + g + 8 h`` at
  ``16 c + 2 g + h`` (``h`` 0, 1).

As index arithmetic: packed bytes viewed as ``(N/16, 2 [h], 8 [g], S, 4 [c], 4 [q], 8 [byte])``
and permuted to ``(N/16, S, 4 [c], 8 [g], 4 [q], 2 [h], 8 [byte])``; packed absmax viewed as
``(N/16, 2 [h], 8 [g], S, 4 [c])`` and permuted to ``(N/16, S, 4 [c], 8 [g], 2 [h])``. Nested
statistics: the uint8 absmax codes take the absmax permutation; ``nested_absmax`` (one per
``nested_blocksize`` codes of the *packed* order), the maps and the offset are unchanged.

Every function here is a view, a permute and one copy, so it runs on every device and inside
compiled graphs; the results keep the input's dtype and shape (codes in any ``quant_storage``).
The codes move 8 bytes (one int64) an element where their storage offset allows. The ops read
the tiled16 layout in place (``linear_4bit`` / ``gemv_4bit`` and ``dequantize_4bit`` with
``layout="tiled16"``); these permutations serve the bytes that leave a layer (state dicts,
pickles, ``as_dict``, ``.to('cpu')``) and the reference kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._constants import TILED16_BLOCKSIZE, TILED16_ROWS, TILED16_STEP
from .meta._common import check_value

__all__ = ["tiled16_fits", "check_tiled16", "device_supports_tiled16", "tiled16_eligible",
           "layout_for", "to_layout", "repack_codes", "unpack_codes", "repack_absmax",
           "unpack_absmax", "repack", "unpack", "on_full"]

# (b, h, g, s, c, q, byte) -> (b, s, c, g, q, h, byte) and back
_CODES_TO_TILED = (0, 3, 4, 2, 5, 1, 6)
_CODES_TO_PACKED = (0, 5, 3, 1, 2, 4, 6)
# (b, h, g, s, c) -> (b, s, c, g, h) and back
_ABSMAX_TO_TILED = (0, 3, 4, 2, 1)
_ABSMAX_TO_PACKED = (0, 4, 3, 1, 2)


def tiled16_fits(shape: Sequence[int], blocksize: int) -> bool:
    """Whether a 4-bit weight of logical ``shape`` ``[N, K]`` and ``blocksize`` can take the
    tiled16 layout: 2-D, blocksize 64, ``N % 16 == 0``, ``K % 256 == 0``, not empty."""
    if len(shape) != 2:
        return False
    N, K = int(shape[0]), int(shape[1])
    return (blocksize == TILED16_BLOCKSIZE and N > 0 and K > 0 and N % TILED16_ROWS == 0
            and K % TILED16_STEP == 0)


def check_tiled16(shape: Sequence, blocksize: int, name: str = "shapeB") -> None:
    """Raise ValueError (naming the value) unless ``shape`` ``[N, K]`` / ``blocksize`` fit the
    tiled16 layout (the rule of :func:`tiled16_fits`; works on symbolic sizes). ``name``: the
    shape argument's name in the messages (``linear_4bit``'s "shapeB", ``dequantize_4bit``'s
    "shape")."""
    check_value(blocksize == TILED16_BLOCKSIZE,
                lambda: f"layout 'tiled16' needs blocksize {TILED16_BLOCKSIZE}, got {blocksize}")
    N, K = shape
    check_value(N % TILED16_ROWS == 0,
                lambda: f"layout 'tiled16' needs {name}[0] = N % {TILED16_ROWS} == 0, got {N}")
    check_value(K % TILED16_STEP == 0,
                lambda: f"layout 'tiled16' needs {name}[1] = K % {TILED16_STEP} == 0, got {K}")


def device_supports_tiled16(device) -> bool:
    """Whether a weight on ``device`` may take the tiled16 layout: a CUDA device on which the
    extension's tiled16 kernel has sm_90 code that runs (and its 68 KB of shared memory could
    be granted). False on every other device, and where the extension is not built."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    from ._extension import load_extension
    ext = load_extension()
    if ext is None or not hasattr(ext, "gemv_tiled16_supported"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return bool(ext.gemv_tiled16_supported(index))


def tiled16_eligible(shape: Sequence[int], blocksize: int, device) -> bool:
    """Whether a 4-bit weight (NF4 or FP4) of logical ``shape`` ``[N, K]`` and ``blocksize`` on
    ``device`` takes the tiled16 layout: :func:`tiled16_fits` and
    :func:`device_supports_tiled16`."""
    return tiled16_fits(shape, blocksize) and device_supports_tiled16(device)


def layout_for(shape: Sequence[int], blocksize: int, device) -> str:
    """The layout a 4-bit weight of ``shape`` / ``blocksize`` takes on ``device``: "tiled16"
    where :func:`tiled16_eligible`, else "packed"."""
    return "tiled16" if tiled16_eligible(shape, blocksize, device) else "packed"


def to_layout(B: torch.Tensor, absmax: torch.Tensor, shape: Sequence[int],
              layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, absmax)`` of the other layout permuted into ``layout`` (:func:`repack` for
    "tiled16", :func:`unpack` for "packed"); new tensors."""
    return (repack if layout == "tiled16" else unpack)(B, absmax, shape)


def on_full(fn, t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``fn(t, shape)`` for a permutation ``fn`` of this module, also for a sharded DTensor
    (FSDP2), with ``t``'s mesh and placements kept.

    Both orders keep every tile of 16 rows in the same range of the flat tensor, so where every
    rank's shard holds whole tiles (one ``Shard(0)`` placement, the others ``Replicate``, and the
    shard length a multiple of a tile; decided from global sizes, so every rank decides alike)
    each rank permutes its own shard, with no communication and on the shard's device (CPU
    offload included). Otherwise the permutation runs on the gathered full tensor (a collective:
    every rank must call it) and the result is sharded again, since a shard of one order is not
    then a shard of the other."""
    from .fsdp import is_dtensor
    if not is_dtensor(t):
        return fn(t, shape)
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    N, K = int(shape[0]), int(shape[1])
    shard_dims = [i for i, p in enumerate(t.placements) if not isinstance(p, Replicate)]
    if (len(shard_dims) == 1 and t.placements[shard_dims[0]] == Shard(0) and t.dim() >= 1
            and N > 0 and t.shape[0] % N == 0):
        per_row = t.shape[0] // N  # dim-0 entries a weight row holds
        world = t.device_mesh.size(shard_dims[0])
        chunk = -(-t.shape[0] // world)  # torch.chunk's shard length
        if chunk % (TILED16_ROWS * per_row) == 0:
            local = t.to_local()
            rows = local.shape[0] // per_row
            out = fn(local, [rows, K]) if rows else local.clone()
            return DTensor.from_local(out, t.device_mesh, t.placements, run_check=False,
                                      shape=t.shape, stride=t.stride())
    full = fn(t.full_tensor(), shape)
    return distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None)


def _code_dims(N: int, K: int, tiled: bool) -> tuple[int, ...]:
    S = K // TILED16_STEP
    if tiled:
        return (N // TILED16_ROWS, S, 4, 8, 4, 2, 8)
    return (N // TILED16_ROWS, 2, 8, S, 4, 4, 8)


def _absmax_dims(N: int, K: int, tiled: bool) -> tuple[int, ...]:
    S = K // TILED16_STEP
    if tiled:
        return (N // TILED16_ROWS, S, 4, 8, 2)
    return (N // TILED16_ROWS, 2, 8, S, 4)


def _permute_codes(B: torch.Tensor, shape: Sequence[int], to_tiled: bool,
                   words: bool = True) -> torch.Tensor:
    """The code permutation. The innermost dimension (8 bytes: 16 codes of one row, the unit
    both orders keep whole) moves as one int64 where the bytes' storage offset is a multiple of
    8 (8x fewer elements to copy than bytes; storages themselves start aligned), else (or with
    ``words=False``) as 8 uint8 elements; both give the same bytes."""
    N, K = shape
    raw = B.reshape(-1).view(torch.uint8)
    order = _CODES_TO_TILED if to_tiled else _CODES_TO_PACKED
    dims = _code_dims(N, K, tiled=not to_tiled)
    if words and raw.storage_offset() % 8 == 0:
        out = raw.view(torch.int64).view(dims[:-1]).permute(order[:-1]).contiguous()
        out = out.view(-1).view(torch.uint8)
    else:
        out = raw.view(dims).permute(order).contiguous().view(-1)
    return out.view(B.dtype).reshape(B.shape)


def _permute_absmax(absmax: torch.Tensor, shape: Sequence[int], to_tiled: bool) -> torch.Tensor:
    N, K = shape
    order = _ABSMAX_TO_TILED if to_tiled else _ABSMAX_TO_PACKED
    out = absmax.reshape(_absmax_dims(N, K, tiled=not to_tiled)).permute(order).contiguous()
    return out.reshape(absmax.shape)


def repack_codes(B: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Packed codes -> tiled16 codes.

    Args:
        B: packed codes of a ``shape = [N, K]`` weight, ``N K / 2`` bytes in any
            ``quant_storage`` dtype and shape (usually ``(k, 1)``).
        shape: ``[N, K]``; must satisfy :func:`tiled16_fits` with blocksize 64.
    Returns:
        A new tensor of ``B``'s dtype and shape holding the same bytes in tiled16 order.
    Raises:
        RuntimeError: ``B`` does not hold exactly ``N K / 2`` bytes.
    """
    return _permute_codes(B, shape, to_tiled=True)


def unpack_codes(B: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`repack_codes`: tiled16 codes -> bitsandbytes' packed bytes (same dtype
    and shape as ``B``)."""
    return _permute_codes(B, shape, to_tiled=False)


def repack_absmax(absmax: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Packed-order absmax -> tiled16 order.

    Args:
        absmax: ``(N K / 64,)`` entries of any dtype (fp32 values, their int32 bit patterns, or
            the uint8 codes of nested statistics), any shape with that many elements.
        shape: ``[N, K]`` as for :func:`repack_codes`.
    Returns:
        A new tensor of ``absmax``'s dtype and shape.
    Raises:
        RuntimeError: wrong number of entries.
    """
    return _permute_absmax(absmax, shape, to_tiled=True)


def unpack_absmax(absmax: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`repack_absmax`."""
    return _permute_absmax(absmax, shape, to_tiled=False)


def repack(B: torch.Tensor, absmax: Optional[torch.Tensor],
           shape: Sequence[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(repack_codes(B), repack_absmax(absmax))`` (absmax None passes through)."""
    return (repack_codes(B, shape),
            None if absmax is None else repack_absmax(absmax, shape))


def unpack(B: torch.Tensor, absmax: Optional[torch.Tensor],
           shape: Sequence[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(unpack_codes(B), unpack_absmax(absmax))`` (absmax None passes through)."""
    return (unpack_codes(B, shape),
            None if absmax is None else unpack_absmax(absmax, shape))
