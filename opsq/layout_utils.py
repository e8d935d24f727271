"""Legacy cuBLASLt int8 tile layouts at the tensor level, with bitsandbytes' names.

Older bitsandbytes releases stored ``Linear8bitLt`` weights in the tile orders of
``cublasLtMatrixTransform`` (``weight_format`` 1 = col32, 2 = col_turing = COL4_4R2_8C,
3 = col_ampere = COL32_2R_4R4) as a padded 2-D int8 matrix. opsq converts with the
``torch.ops.opsq.transform`` op (exact against NVIDIA's output, see ``shared/fixtures/cublaslt``);
this module adds the tile-level helpers bitsandbytes exposed for undoing such a layout, and
:func:`maybe_rearrange_weight`, the state-dict rewrite that turns a legacy checkpoint entry into
row-major order.

Tiles: a tiled matrix is a sequence of tiles of ``tile_size`` elements (col32: 1x32, col_turing:
8x32, col_ampere: 32x32), ordered by 32-column panel, then by tile row inside the panel; within a
tile the order is a fixed permutation, which :func:`get_tile_inds` recovers by running the
``transform`` op itself on a traceable tile (so on CUDA it traces whichever kernel is registered).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ._constants import (INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING,
                         LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING)

__all__ = ["get_inverse_transform_indices", "get_tile_inds", "undo_layout",
           "maybe_rearrange_weight", "supports_igemmlt", "TILE_SIZES"]

#: (tile_rows, tile_cols) of each tiled order; a tiled matrix is a whole number of these tiles.
TILE_SIZES: dict[str, tuple[int, int]] = {
    "col32": (1, 32), "col_turing": (8, 32), "col_ampere": (32, 32)}


def _check_format(fmt) -> str:
    if fmt not in TILE_SIZES:
        raise ValueError(f"format must be one of {tuple(TILE_SIZES)}, got {fmt!r}")
    return fmt


def get_inverse_transform_indices(transform_tile: Callable[[torch.Tensor], torch.Tensor],
                                  tile_size: Sequence[int]) -> torch.Tensor:
    """Trace where a tile permutation sends each element.

    ``transform_tile`` is applied to int8 tiles of shape ``tile_size`` whose values encode each
    element's row-major position one base-256 digit at a time (an int8 holds one digit), and the
    digits read back from the output are reassembled.

    Args:
        transform_tile: maps an int8 ``tile_size`` tensor to a tensor with the same number of
            elements, permuted (e.g. ``lambda t: opsq.functional.transform(t, "col_turing")[0]``).
        tile_size: ``(tile_rows, tile_cols)``, both >= 1.
    Returns:
        int64 ``tile_size`` tensor ``inds``: ``inds.flatten()[p]`` is the row-major position in
        the original tile of the element the transform stored at flat position ``p``.
    Raises:
        ValueError: bad ``tile_size``; the transform changed the number of elements or is not a
            permutation.
    """
    if len(tile_size) != 2 or any(not isinstance(s, int) or s < 1 for s in tile_size):
        raise ValueError(f"tile_size must be (rows, cols) of positive ints, got {tile_size!r}")
    rows, cols = tile_size
    n = rows * cols
    positions = torch.arange(n, dtype=torch.int64)
    traced = torch.zeros(n, dtype=torch.int64)
    scale = 1
    while scale == 1 or scale < n:  # one pass per base-256 digit of the largest position
        digit = (positions // scale) % 256
        out = transform_tile((digit - 128).to(torch.int8).reshape(rows, cols))
        if not isinstance(out, torch.Tensor) or out.numel() != n:
            raise ValueError(f"transform_tile must return {n} elements for a {rows}x{cols} "
                             f"tile, got {getattr(out, 'shape', type(out))}")
        traced += (out.reshape(-1).cpu().to(torch.int64) + 128) * scale
        scale *= 256
    if not torch.equal(torch.sort(traced).values, positions):
        raise ValueError("transform_tile is not a permutation of the tile's elements")
    return traced.reshape(rows, cols)


def get_tile_inds(format: str, device=None) -> torch.Tensor:  # noqa: A002  (bitsandbytes' name)
    """Inverse tile indices of a legacy order, traced through ``torch.ops.opsq.transform``.

    Args:
        format: "col32" (1x32 tiles), "col_turing" (8x32) or "col_ampere" (32x32).
        device: where the traced transform runs and the result lives (default CPU).
    Returns:
        int64 ``TILE_SIZES[format]`` tensor, as :func:`get_inverse_transform_indices`.
    Raises:
        ValueError: unknown ``format``.
    """
    rows, cols = TILE_SIZES[_check_format(format)]
    device = torch.device("cpu") if device is None else torch.device(device)

    def transform_tile(tile: torch.Tensor) -> torch.Tensor:
        return torch.ops.opsq.transform(tile.to(device), "row", format, [rows, cols])

    with torch.no_grad():
        return get_inverse_transform_indices(transform_tile, (rows, cols)).to(device)


def undo_layout(permuted_tensor: torch.Tensor, tile_indices: torch.Tensor) -> torch.Tensor:
    """Row-major matrix from a tiled one (bitsandbytes' legacy ``Linear8bitLt`` weights).

    Args:
        permuted_tensor: ``(R, C)`` tensor (any dtype) holding a tiled matrix in storage order,
            ``R`` and ``C`` multiples of the tile's rows and columns (the padded shape that
            bitsandbytes' ``transform`` allocated).
        tile_indices: from :func:`get_tile_inds` / :func:`get_inverse_transform_indices`, shape
            ``(tile_rows, tile_cols)``, on ``permuted_tensor``'s device.
    Returns:
        contiguous ``(R, C)`` row-major tensor (padding included; slice it to the logical shape).
    Raises:
        ValueError: not 2-D, not a whole number of tiles, or mismatched devices.
    """
    if not isinstance(permuted_tensor, torch.Tensor) or permuted_tensor.dim() != 2:
        raise ValueError("permuted_tensor must be a 2-D tensor, got "
                         f"{getattr(permuted_tensor, 'shape', type(permuted_tensor))}")
    if not isinstance(tile_indices, torch.Tensor) or tile_indices.dim() != 2:
        raise ValueError("tile_indices must be a 2-D (tile_rows, tile_cols) tensor, got "
                         f"{getattr(tile_indices, 'shape', type(tile_indices))}")
    (R, C), (tr, tc) = permuted_tensor.shape, tile_indices.shape
    if R % tr or C % tc:
        raise ValueError(f"permuted_tensor {tuple(permuted_tensor.shape)} must be a whole number "
                         f"of {tr}x{tc} tiles")
    if tile_indices.device != permuted_tensor.device:
        raise ValueError(f"tile_indices must be on {permuted_tensor.device}, got "
                         f"{tile_indices.device}")
    tiles = permuted_tensor.reshape(-1, tr * tc)
    restored = torch.empty_like(tiles)
    restored[:, tile_indices.reshape(-1)] = tiles
    # Tile t sits at panel t // (R // tr), tile row t % (R // tr).
    restored = restored.reshape(C // tc, R // tr, tr, tc).permute(1, 2, 0, 3)
    return restored.reshape(R, C).contiguous()


def _format_name(fmt) -> str:
    if isinstance(fmt, torch.Tensor):
        fmt = fmt.item()
    if isinstance(fmt, str) and fmt in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING:
        return fmt
    if isinstance(fmt, int) and fmt in INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING:
        return INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING[fmt]
    raise ValueError(f"weight_format must be one of {LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING} "
                     f"(name or code), got {fmt!r}")


def maybe_rearrange_weight(state_dict: dict, prefix: str, local_metadata=None, strict=None,
                           missing_keys=None, unexpected_keys=None, error_msgs=None, *,
                           shape: Optional[Sequence[int]] = None) -> None:
    """Rewrite a legacy tiled ``{prefix}weight`` in ``state_dict`` to row-major, in place.

    Usable as a ``load_state_dict`` pre-hook (``module._register_load_state_dict_pre_hook``);
    ``Linear8bitLt`` needs none, it undoes legacy layouts in its own loader. Does nothing when
    ``{prefix}weight`` is absent or ``{prefix}weight_format`` is absent or row-major; afterwards
    ``{prefix}weight_format`` is ``tensor(0, dtype=uint8)`` and stays in ``state_dict``
    (bitsandbytes' hook deletes it): as a hook, on a module that owns a ``weight_format``
    buffer, or with ``strict=False``; a strict load into a module without one reports the key
    as unexpected.

    Args:
        state_dict: the checkpoint; ``{prefix}weight`` int8 tiled, either 2-D with the padded
            shape bitsandbytes allocated, or flat.
        prefix: the module's key prefix (e.g. ``"model.layers.0.mlp.fc1."``).
        shape: the logical ``(out_features, in_features)``; required for a flat weight, and
            trims a 2-D padded weight to it (without it, the padded matrix is kept).
    Raises:
        ValueError: unknown ``weight_format``; a flat weight without ``shape``; a weight whose
            size does not fit ``shape``.
    """
    wkey, fkey = prefix + "weight", prefix + "weight_format"
    if wkey not in state_dict or fkey not in state_dict:
        return
    order = _format_name(state_dict[fkey])
    if order != "row":
        weight = state_dict[wkey]
        if shape is not None:
            rows, cols = (int(s) for s in shape)
            state_dict[wkey] = torch.ops.opsq.transform(weight.reshape(-1).contiguous(), order,
                                                        "row", [rows, cols])
        elif weight.dim() == 2:
            state_dict[wkey] = undo_layout(weight, get_tile_inds(order, weight.device))
        else:
            raise ValueError(f"{wkey}: a flat {order} weight needs shape=(rows, cols)")
    state_dict[fkey] = torch.tensor(0, dtype=torch.uint8)


def supports_igemmlt(device=None) -> bool:
    """Whether ``torch.ops.opsq.igemmlt`` (int8 x int8 -> int32) runs on ``device``: always.

    bitsandbytes answers False below compute capability 7.5 and on GTX 16xx parts, where its
    cuBLASLt kernel cannot run. opsq's ``igemmlt`` has a native CUDA kernel where it was built and a
    reference kernel (exact int32 accumulation) for every other device, so int8 layers never need a
    fallback path; only speed differs. ``opsq.backends()["igemmlt"]`` tells which kernel serves a
    device type.

    Args:
        device: ``torch.device``, device string, CUDA ordinal or None.
    Raises:
        TypeError: ``device`` is of another type. ValueError: an unparsable device string.
    """
    if device is None or isinstance(device, torch.device):
        return True
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"device must be a torch.device, str, int or None, got "
                        f"{type(device).__name__}")
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from None
    return True
