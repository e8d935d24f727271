"""bitsandbytes-compatible functional API on top of ``torch.ops.opsq.*``.

Names and semantics follow ``bitsandbytes.functional``; every function is a thin wrapper that
calls one opsq op (plus cheap tensor bookkeeping), so it works on any device and under
``torch.compile``. Differences from bitsandbytes, on purpose:

* outliers are returned as a static boolean column mask ``outlier_cols`` of shape ``(K,)``
  (``mask.nonzero()`` gives bitsandbytes' index tensor), so no op has a data-dependent shape;
* quantized tensors are never transposed implicitly (``transposed_*`` flags are accepted and
  must be False);
* bad input raises ``TypeError`` / ``ValueError`` / ``RuntimeError`` naming the argument.
"""
from __future__ import annotations

import ctypes
import json
import math
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ._constants import (BLOCKSIZES, BLOCKWISE_BLOCKSIZES, FLOAT_DTYPES, NESTED_BLOCKSIZE,
                         QUANT_TYPES, BLOCKSIZE_4BIT_DEFAULT, quant_map)
from ._constants import check_int as _check_int
from ._constants import create_dynamic_map  # one home; re-exported as bitsandbytes has it
from ._composites import _check_out
from . import _tiled16
from ._constants import dynamic_map_on

__all__ = [
    "QuantState", "quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4",
    "dequantize_nf4", "dequantize_fp4", "quantize_blockwise", "dequantize_blockwise",
    "gemv_4bit", "int8_vectorwise_quant", "vectorwise_quant", "int8_vectorwise_dequant",
    "int8_double_quant", "double_quant", "int8_linear_matmul", "igemmlt", "int8_mm_dequant",
    "mm_dequant", "transform", "get_4bit_type", "create_dynamic_map", "create_linear_map",
    "create_normal_map", "create_fp8_map", "is_on_gpu", "get_ptr",
    "fix_4bit_weight_quant_state_from_module", "pack_dict_to_tensor", "unpack_tensor_to_dict",
    "igemm", "batched_igemm", "optimizer_update_32bit", "optimizer_update_8bit_blockwise",
    "get_paged", "prefetch_tensor",
]


# ---- code tables and 8-bit maps --------------------------------------------------------------
#: AbnormalFloat4 for blocksize 64, largest value first, as bitsandbytes' ``get_4bit_type("af4")``
#: returns it. Source: Yoshida, "NF4 Isn't Information Theoretically Optimal (and that's Good)",
#: arXiv:2306.06965.
_AF4_BLOCKSIZE_64: tuple[float, ...] = (
    1.0, 0.72424863, 0.55496234, 0.42563882, 0.31675666, 0.21961274, 0.12934483, 0.04273164,
    0.0, -0.04934812, -0.14982478, -0.25607552, -0.3736951, -0.51243739, -0.69441008, -1.0,
)
#: Symmetric 4-bit integers in bitsandbytes' ``get_4bit_type("int4")`` order (divided by 7).
_INT4_LEVELS: tuple[int, ...] = (7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7)


def _copy_out(out: torch.Tensor, res: torch.Tensor, name: str = "out") -> torch.Tensor:
    """Copy a result into a caller's ``out`` buffer, which must match it exactly: shape, dtype
    and device (bitsandbytes' ``.out`` ops check the same). A bare ``out.copy_(res)`` would
    broadcast into a larger ``out``, cast silently (an int32 product wrapped into an int8
    ``out``, a float result truncated into an int one) or write to another device (a meta
    ``out`` returned holding nothing).

    Raises:
        TypeError: ``out`` not a tensor, or of another dtype. ValueError: another shape or
            device (the ``.out`` overloads' check, :func:`opsq._composites._check_out`).
    """
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(out).__name__}")
    _check_out(name, out, res)
    return out.copy_(res)


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16-entry code table of a 4-bit data type, fp32 ``(16,)`` with values in [-1, 1],
    indexed by the 4-bit code (bitsandbytes 0.50 ``get_4bit_type``).

    Args:
        typename: ``"nf4"`` (NormalFloat, QLoRA, Dettmers et al. 2023), ``"fp4"``
            (bitsandbytes' E2M1 table), ``"int4"`` (``k / 7`` for ``k = 7 .. 0, 0 .. -7``) or
            ``"af4"`` (AbnormalFloat, arXiv:2306.06965; only published for blocksize 64).
        device: where the table is created. Default None: torch's default device (bitsandbytes
            defaults to ``"cuda"``).
        blocksize: only used by ``"af4"``, which exists for 64 only.
    Returns:
        fp32 ``(16,)`` on ``device``. Only nf4 and fp4 are understood by the 4-bit ops.
    Raises:
        ValueError: unknown ``typename``; ``"af4"`` with a blocksize other than 64
        (bitsandbytes raises NotImplementedError for both).
    """
    if typename in QUANT_TYPES:
        return quant_map(typename, device)
    if typename == "int4":
        # divided on the CPU: a GPU's fp32 division may differ in the last ulp
        return (torch.tensor(_INT4_LEVELS, dtype=torch.float32) / 7.0).to(device)
    if typename == "af4":
        if blocksize != 64:
            raise ValueError(f"blocksize: the af4 table exists for blocksize 64 only, got "
                             f"{blocksize!r}")
        return torch.tensor(_AF4_BLOCKSIZE_64, dtype=torch.float32, device=device)
    raise ValueError(f"typename must be one of {QUANT_TYPES + ('int4', 'af4')}, got "
                     f"{typename!r}")


def create_linear_map(signed: bool = True, total_bits: int = 8,
                      add_zero: bool = True) -> torch.Tensor:
    """An evenly spaced quantization map (bitsandbytes 0.50 ``create_linear_map``).

    ``count`` values from ``-1`` (``signed``) or ``0`` to ``1`` inclusive, as
    ``torch.linspace`` gives them in fp32: ``count = 2**total_bits``, or ``2**total_bits - 1``
    when ``signed`` and (``add_zero`` or ``total_bits < 8``), so that the grid has a midpoint at
    zero. When ``count < 256`` the map is padded to 256 entries by inserting ``256 - count``
    zeros after the first ``count // 2`` values (bitsandbytes' layout: a signed map stays
    sorted except that fp32 ``linspace`` may leave its midpoint a few ulp below 0; an unsigned
    map with ``total_bits < 8`` is not sorted).

    Args:
        signed: cover [-1, 1] (True) or [0, 1].
        total_bits: 1..8 bits of the simulated data type.
        add_zero: for a signed 8-bit map, use 255 values so that one of them is 0.
    Returns:
        fp32 ``(256,)`` on the CPU (bitsandbytes' follows torch's default dtype).
    Raises:
        ValueError: ``total_bits`` not an int in [1, 8].
    """
    _check_int("total_bits", total_bits, 1, 8)
    count = 2 ** total_bits
    if signed and (add_zero or total_bits < 8):
        count -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, count, dtype=torch.float32)
    if count == 256:
        return values
    half = count // 2
    return torch.cat([values[:half], values.new_zeros(256 - count), values[half:]])


#: Upper quantile of bitsandbytes' NF4 construction (its ``create_normal_map`` default): the
#: largest code sits at ``Phi^-1(0.9677083)`` ≈ 1.848 standard deviations before normalisation.
NF4_OFFSET = 0.9677083


def create_normal_map(offset: float = NF4_OFFSET, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat map: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, Dettmers et al.
    2023, Appendix E; bitsandbytes 0.50 ``create_normal_map``). The default call reproduces the
    NF4 table (``get_4bit_type("nf4")``) exactly.

    Positive levels: ``Phi^-1(p)`` for the first 8 (``use_extra_value``) or 7 of the fp32
    points ``torch.linspace(offset, 0.5, n + 1)`` (0.5 itself excluded); negative levels: the
    negated quantiles of the first 7 points of ``torch.linspace(offset, 0.5, 8)``. With zero
    padding the 256 values are sorted and divided by their maximum, ``Phi^-1(offset)``.
    ``Phi^-1`` is ``torch.special.ndtri`` in float64 rounded to fp32 (bitsandbytes uses scipy's
    ``norm.ppf``; no scipy is needed here).

    Args:
        offset: the largest quantile level, ``0.5 < offset < 1``.
        use_extra_value: 8 positive levels, 7 negative and zero (16 codes, asymmetric: NF4);
            False gives the symmetric 7 + 7 + zero type.
    Returns:
        fp32 ``(256,)`` on the CPU: the negative levels, then zeros, then the positive levels
        (so the 16 NF4 codes are ``[:8]`` and ``[-8:]``).
    Raises:
        ValueError: ``offset`` not a number in (0.5, 1).
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, float)) \
            or not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be a number in (0.5, 1), got {offset!r}")

    def quantiles(n: int) -> torch.Tensor:
        p = torch.linspace(float(offset), 0.5, n + 1, dtype=torch.float32)[:-1]
        return torch.special.ndtri(p.double()).float()

    positive = quantiles(8 if use_extra_value else 7)
    negative = -quantiles(7)
    zeros = positive.new_zeros(256 - positive.numel() - negative.numel())
    values = torch.cat([positive, zeros, negative]).sort().values
    return values / values.max()


def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2,
                   total_bits: int = 8) -> torch.Tensor:
    """A small floating-point map with bitsandbytes' own exponent convention (bitsandbytes 0.50
    ``create_fp8_map``; not IEEE / OCP FP8: the exponent runs downwards).

    With ``E = exponent_bits``, ``P = precision_bits``, ``bias = 2**(E-1)``, exponent field
    ``e`` and mantissa bits ``m`` (``frac = m / 2**P``), a code is worth
    ``frac * 2**-bias`` for ``e == 0`` (subnormals) and ``(1 + frac) * 2**(bias + 1 - e)``
    otherwise, with a sign bit when ``signed``. The ``2**total_bits`` values are sorted,
    zero-padded to 256 entries and divided by the largest.

    Args:
        signed: one sign bit.
        exponent_bits: E >= 1. precision_bits: P >= 0.
        total_bits: must equal ``E + P + signed``, at most 8.
    Returns:
        fp32 ``(256,)`` sorted values in [-1, 1] on the CPU (``E=2, P=1, total_bits=4``
        coincides with the FP4 table except the subnormal level: 1/48 here, 1/192 in FP4).
    Raises:
        ValueError: a bit count out of range or ``E + P + signed != total_bits``.
    """
    _check_int("exponent_bits", exponent_bits, 1)
    _check_int("precision_bits", precision_bits, 0)
    _check_int("total_bits", total_bits, 1, 8)
    if exponent_bits + precision_bits + (1 if signed else 0) != total_bits:
        raise ValueError(f"total_bits ({total_bits}) must equal exponent_bits ({exponent_bits}) "
                         f"+ precision_bits ({precision_bits}) + the sign bit "
                         f"({1 if signed else 0})")
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for e in range(2 ** exponent_bits):
        for m in range(2 ** precision_bits):
            frac = m / 2 ** precision_bits
            v = frac * 2.0 ** -bias if e == 0 else (1.0 + frac) * 2.0 ** (bias + 1 - e)
            values.append(v)
            if signed:
                values.append(-v)
    # Python's sort is stable: the two signed zeros keep bitsandbytes' order.
    values = sorted(values)
    values = sorted(values + [0.0] * (256 - len(values)))
    # float64 is exact for these dyadic values; one rounding to fp32 after the division gives
    # the correctly rounded fp32 quotient.
    table = torch.tensor(values, dtype=torch.float64)
    return (table / table.max()).float()


# ---- devices and pointers ------------------------------------------------------------------
def is_on_gpu(tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Check that all ``tensors`` live on one device (bitsandbytes 0.50 ``is_on_gpu``; despite
    the name, all-CPU inputs pass, as in 0.50: before 0.45 CPU tensors were rejected).

    ``None`` entries and tensors marked ``is_paged`` (bitsandbytes' paged buffers, reachable
    from any device) are skipped. Devices are compared by type and index (``cuda:0`` and
    ``cuda:1`` differ).

    Args:
        tensors: an iterable of tensors or None.
    Returns:
        True.
    Raises:
        TypeError: ``tensors`` not iterable, or an entry neither a tensor nor None.
        RuntimeError: the tensors are on more than one device (the message lists them).
    """
    try:
        items = list(tensors)
    except TypeError:
        raise TypeError(f"tensors must be an iterable of tensors (or None), got "
                        f"{type(tensors).__name__}") from None
    seen: dict[tuple, int] = {}
    for i, t in enumerate(items):
        if t is None or getattr(t, "is_paged", False):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor or None, got "
                            f"{type(t).__name__}")
        seen.setdefault((t.device.type, t.device.index), i)
    if len(seen) > 1:
        where = ", ".join(f"tensors[{i}] {tuple(items[i].shape)} on {items[i].device}"
                          for i in seen.values())
        target = "device" if ("cpu", None) in seen else "GPU"
        raise RuntimeError(f"tensors must all be on the same {target}; found {where}")
    return True


def get_ptr(A: Optional[torch.Tensor]) -> Optional[ctypes.c_void_p]:
    """Address of ``A``'s first element as a ``ctypes.c_void_p`` (bitsandbytes 0.50
    ``get_ptr``), None for None. opsq's kernels never need it (they are torch ops); it exists
    for code that hands tensors to its own ctypes libraries.

    Raises:
        TypeError: ``A`` is neither a tensor nor None.
    """
    if A is None:
        return None
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor or None, got {type(A).__name__}")
    return ctypes.c_void_p(A.data_ptr())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _dtype_from_name(name: Any, key: str) -> torch.dtype:
    """The float dtype a quant_state field names (``"bfloat16"`` or ``"torch.bfloat16"``).

    Raises:
        ValueError: not the name of fp16, bf16 or fp32 (the dtypes a quantized weight
            dequantizes to; an ``int64`` here would be silently wrong later).
    """
    text = name[6:] if isinstance(name, str) and name.startswith("torch.") else name
    dtype = getattr(torch, text, None) if isinstance(text, str) else None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant_state field {key!r} must name one of "
                         f"{[str(d)[6:] for d in FLOAT_DTYPES]}, got {name!r}")
    return dtype


def pack_dict_to_tensor(source_dict: dict) -> torch.Tensor:
    """JSON-encode a dict of plain values into a uint8 tensor (bitsandbytes' format for the
    ``quant_state.bitsandbytes__<type>`` entry of a 4-bit state dict).

    Raises:
        TypeError: a value is not JSON-serialisable.
    """
    data = json.dumps(source_dict).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def unpack_tensor_to_dict(tensor_data: torch.Tensor) -> dict:
    """Inverse of :func:`pack_dict_to_tensor`.

    Raises:
        ValueError: ``tensor_data`` is not a uint8 tensor holding a JSON object.
    """
    if not isinstance(tensor_data, torch.Tensor) or tensor_data.dtype != torch.uint8:
        raise ValueError("packed quant_state must be a uint8 tensor of UTF-8 JSON, got "
                         f"{type(tensor_data).__name__} "
                         f"{getattr(tensor_data, 'dtype', '')}")
    try:
        out = json.loads(bytes(tensor_data.cpu().reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"packed quant_state is not valid UTF-8 JSON: {e}") from None
    if not isinstance(out, dict):
        raise ValueError(f"packed quant_state must hold a JSON object, got {type(out).__name__}")
    return out


class QuantState:
    """Quantization state of a blockwise-quantized tensor (4-bit or 8-bit), bitsandbytes'
    ``QuantState``.

    Attributes:
        absmax: fp32 ``(blocks,)`` per-block absmax, or uint8 ``(blocks,)`` codes when nested.
        shape: logical shape of the original tensor (``torch.Size``); None for an 8-bit
            blockwise state (bitsandbytes does not record it there).
        code: the code table: 16 fp32 values (4-bit) or 256 (8-bit map).
        blocksize: elements per block, one of ``opsq._constants.BLOCKSIZES`` (4-bit) or
            ``opsq._constants.BLOCKWISE_BLOCKSIZES`` (8-bit blockwise, up to 16384).
        quant_type: "nf4" / "fp4" for 4-bit, None for 8-bit blockwise.
        dtype: dtype of the original tensor, the default dequantization dtype.
        offset: fp32 0-d tensor, mean of the first-level absmax (nested only).
        state2: the second-level :class:`QuantState` (nested only): uint8 codes of
            ``absmax - offset`` quantized blockwise with the dynamic map (blocksize 256 for a
            4-bit state, the outer blocksize for a nested 8-bit state).
        layout: byte order of ``absmax`` and of the codes it goes with: ``"packed"``
            (bitsandbytes', the default) or ``"tiled16"`` (:mod:`opsq._tiled16`, the decode
            kernel's order, which a 4-bit weight takes on an eligible CUDA device). A plain
            string; :meth:`as_dict` and :func:`dequantize_4bit` always give bitsandbytes'
            order, :meth:`to` only moves (the codes live outside the state, so whoever moves
            them changes the layout of both: ``opsq.nn.Params4bit.to``).
    """

    #: the default byte order (and that of states pickled before the layout existed)
    layout: str = "packed"
    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{t}" for t in QUANT_TYPES]
    valid_qs_keys = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state",
                     "quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                     "nested_dtype", "nested_offset"]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None,
                 dtype=None, offset=None, state2=None, layout: str = "packed"):
        self.absmax = absmax
        self.layout = layout
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getitem__(self, idx):
        """Legacy list form ``[absmax, shape, dtype, blocksize, [offset, state2], quant_type]``."""
        if self.nested:
            items = [self.absmax, self.shape, self.dtype, self.blocksize,
                     [self.offset, self.state2], self.quant_type]
        else:
            items = [self.absmax, self.shape, self.dtype, self.blocksize, None, self.quant_type]
        return items[idx]

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device) -> "QuantState":
        """Build a QuantState from the entries bitsandbytes writes in a state dict.

        ``qs_dict`` holds ``absmax``, ``quant_map``, optionally ``nested_absmax`` and
        ``nested_quant_map``, and ``quant_state.bitsandbytes__<nf4|fp4>`` (JSON in uint8) or
        the unpacked JSON fields; any key prefix such as ``"weight."`` is ignored. An 8-bit
        blockwise state (:func:`quantize_blockwise`) comes unpacked, with ``quant_type`` None
        and ``shape`` None (or a list), as :meth:`as_dict` and bitsandbytes 0.50 write it.

        Raises:
            ValueError: missing, unknown or malformed entries (the message names the key).
        """
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items()
                       if "quant_state" in k and isinstance(v, torch.Tensor)]
        if not packed_keys and not any(k.split(".")[-1] == "quant_type" for k in qs_dict):
            raise ValueError("expected a packed 'quant_state.bitsandbytes__<nf4|fp4>' entry or "
                             "an unpacked 'quant_type' field in the quant_state dict")
        if len(packed_keys) > 1:
            raise ValueError(f"several packed quant_state entries: {packed_keys}")
        if packed_keys:
            key = packed_keys[0]
            if key.split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(f"quant_state key {key!r} must end with one of "
                                 f"{cls.valid_qs_type_keys}")
            qs_dict.update(unpack_tensor_to_dict(qs_dict.pop(key)))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"unexpected quant_state entries {sorted(unknown)}")
        for key in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"):
            if key not in qs_dict:
                raise ValueError(f"quant_state is missing {key!r}")
        for key in ("absmax", "quant_map"):
            if not isinstance(qs_dict[key], torch.Tensor):
                raise ValueError(f"quant_state {key!r} must be a tensor")
        quant_type = qs_dict["quant_type"]
        if quant_type not in QUANT_TYPES and (packed_keys or quant_type is not None):
            raise ValueError(f"quant_state 'quant_type' must be one of {QUANT_TYPES} (or None "
                             f"for an unpacked 8-bit blockwise state), got {quant_type!r}")
        allowed = BLOCKWISE_BLOCKSIZES if quant_type is None else BLOCKSIZES
        if qs_dict["blocksize"] not in allowed:
            raise ValueError(f"quant_state 'blocksize' must be one of {allowed}, got "
                             f"{qs_dict['blocksize']!r}")
        shape = qs_dict["shape"]
        if not (shape is None and quant_type is None) and not (
                isinstance(shape, (list, tuple))
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                        for s in shape)):
            raise ValueError(f"quant_state 'shape' must be a list of sizes (None only for an "
                             f"8-bit state), got {shape!r}")
        state2 = offset = None
        if "nested_absmax" in qs_dict:
            for key in ("nested_quant_map", "nested_blocksize", "nested_offset", "nested_dtype"):
                if key not in qs_dict:
                    raise ValueError(f"nested quant_state is missing {key!r}")
            if not isinstance(qs_dict["nested_offset"], (int, float)):
                raise ValueError("quant_state 'nested_offset' must be a number, got "
                                 f"{qs_dict['nested_offset']!r}")
            offset = torch.tensor(float(qs_dict["nested_offset"]), dtype=torch.float32,
                                  device=device)
            state2 = cls(absmax=qs_dict["nested_absmax"].to(device),
                         blocksize=qs_dict["nested_blocksize"],
                         code=qs_dict["nested_quant_map"].to(device),
                         dtype=_dtype_from_name(qs_dict["nested_dtype"], "nested_dtype"))
        return cls(quant_type=quant_type, absmax=qs_dict["absmax"].to(device),
                   blocksize=qs_dict["blocksize"], code=qs_dict["quant_map"].to(device),
                   dtype=_dtype_from_name(qs_dict["dtype"], "dtype"), shape=shape,
                   offset=offset, state2=state2)

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes 0.50 writes it: ``quant_type``, ``absmax``, ``blocksize``,
        ``quant_map``, ``dtype`` (name), ``shape`` (tuple, None for an 8-bit state) and, when
        nested, ``nested_absmax``, ``nested_blocksize``, ``nested_quant_map``, ``nested_dtype``,
        ``nested_offset`` (float).

        With ``packed=True`` a 4-bit state gives only tensors, the plain fields JSON-packed
        into ``quant_state.bitsandbytes__<quant_type>`` (uint8). An 8-bit blockwise state
        (``quant_type`` None) has no such key, so ``packed=True`` returns the unpacked dict,
        as bitsandbytes does; :meth:`from_dict` reads both forms back. A ``"tiled16"`` state
        gives its absmax in bitsandbytes' order (a copy; sharded DTensors stay sharded)."""
        qs = {"quant_type": self.quant_type, "absmax": self._packed_absmax(), "blocksize": self.blocksize,
              "quant_map": self.code, "dtype": _dtype_name(self.dtype),
              "shape": None if self.shape is None else tuple(self.shape)}
        if self.nested:
            qs.update({"nested_absmax": self.state2.absmax,
                       "nested_blocksize": self.state2.blocksize,
                       "nested_quant_map": self.state2.code.clone(),
                       "nested_dtype": _dtype_name(self.state2.dtype),
                       "nested_offset": self.offset.item()})
        if not packed or self.quant_type is None:
            return qs
        out = {k: v for k, v in qs.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in qs.items() if not isinstance(v, torch.Tensor)}
        out["quant_state.bitsandbytes__" + self.quant_type] = pack_dict_to_tensor(plain)
        return out

    def to(self, device) -> None:
        """Move every tensor of the state to ``device`` in place (dtypes unchanged)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)

    def nested_args(self):
        """``(nested_absmax, nested_code, offset, nested_blocksize)`` for the 4-bit ops."""
        if not self.nested:
            return None, None, None, NESTED_BLOCKSIZE
        return (self.state2.absmax, self.state2.code, self.offset.reshape(1),
                self.state2.blocksize)

    def __eq__(self, other):
        """Equal statistics of the same format (absmax compared in bitsandbytes' order, so a
        ``"tiled16"`` state equals the packed state of the same weight)."""
        if not isinstance(other, QuantState):
            return False
        same = (torch.allclose(self._packed_absmax(), other._packed_absmax(), atol=1e-6)
                and self.shape == other.shape and torch.allclose(self.code, other.code)
                and self.dtype == other.dtype and self.blocksize == other.blocksize
                and self.quant_type == other.quant_type and self.nested == other.nested)
        if same and self.nested:
            same = (torch.allclose(self.offset, other.offset, atol=1e-6)
                    and self.state2 == other.state2)
        return same

    def _packed_absmax(self) -> torch.Tensor:
        """``absmax`` in bitsandbytes' order (a copy for a ``"tiled16"`` state)."""
        if self.layout == "tiled16":
            return _tiled16.on_full(_tiled16.unpack_absmax, self.absmax, self.shape)
        return self.absmax


def fix_4bit_weight_quant_state_from_module(module: nn.Module) -> None:
    """Give a 4-bit module's weight its ``quant_state`` back when a wrapper replaced the
    parameter (FSDP, ``nn.Parameter(...)`` re-wrapping) and dropped its attributes
    (bitsandbytes 0.50 ``bitsandbytes.nn.modules.fix_4bit_weight_quant_state_from_module``,
    which ``Linear4bit.forward`` calls; opsq's layers keep their statistics in their own
    tensors and never need it, so it is here for code that reads ``module.weight.quant_state``).

    Does nothing when ``module.weight.quant_state`` is set. Otherwise ``module.quant_state``
    (opsq's ``Linear4bit`` / ``Embedding4bit`` rebuild it from their tensors) is attached to the
    weight, which is first re-wrapped as a quantized ``opsq.nn.Params4bit`` over the same data
    if it is not one.

    Args:
        module: a module with a ``weight`` of packed codes ``(k, 1)`` and a ``quant_state``.
    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or has no tensor ``weight``.
        ValueError: ``module.weight`` is not packed 4-bit codes of shape ``(k, 1)``.
    Warns:
        UserWarning: the module has no ``quant_state`` (not quantized yet): nothing is changed.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"module.weight must be a tensor, got {type(weight).__name__}")
    if getattr(weight, "quant_state", None) is not None:
        return
    state = getattr(module, "quant_state", None)
    if state is None:
        warnings.warn(f"{type(module).__name__}: no quant_state to restore, the weight is not "
                      "quantized yet; move the module to a device first (.to(device))",
                      stacklevel=2)
        return
    if weight.dim() != 2 or weight.shape[1] != 1:
        raise ValueError(f"module.weight must be packed 4-bit codes of shape (k, 1), got "
                         f"{tuple(weight.shape)}")
    from .nn.linear4bit import Params4bit, attach_quant_state  # opsq.nn imports this module
    if not isinstance(weight, Params4bit):
        weight = Params4bit(weight.data, requires_grad=False, quant_state=state,
                            blocksize=state.blocksize, compress_statistics=state.nested,
                            quant_type=state.quant_type, quant_storage=weight.dtype,
                            module=module, bnb_quantized=True)
        # plain registration: the module's statistics are already in place, nothing to adopt
        nn.Module.__setattr__(module, "weight", weight)
    attach_quant_state(weight, state)


# ---- 8-bit blockwise -----------------------------------------------------------------------
def nested_offset(absmax: torch.Tensor) -> torch.Tensor:
    """The offset of nested statistics: ``absmax.mean()`` as bitsandbytes computes it, or, when
    that is not finite (a NaN/Inf block), the mean of the finite absmax values only (0 if none),
    so one bad block spoils only its own nested block of 256 absmax values instead of every
    value of the tensor. No host sync; bit-identical to bitsandbytes for finite inputs.

    Args:
        absmax: fp32 ``(blocks,)``.
    Returns:
        fp32 0-d tensor on ``absmax``'s device.
    """
    plain = absmax.mean()
    # isfinite as |x| < inf: two kernels where torch.isfinite dispatches four (abs, ne, eq,
    # mul); this runs once per nested quantize, at load, for every linear of a model.
    finite = absmax.abs() < math.inf
    safe = torch.where(finite, absmax, 0.0).sum() / finite.sum().clamp_min(1)
    return torch.where(plain.abs() < math.inf, plain, safe)


def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None,
                       absmax: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                       blocksize: int = 4096, nested: bool = False):
    """8-bit blockwise quantization with a 256-entry map (default: the dynamic map of
    Dettmers et al., ICLR 2022).

    Args:
        A: float tensor (fp16/bf16/fp32), any shape.
        code: fp32 ``(256,)`` map; default :func:`create_dynamic_map`.
        absmax, out: optional outputs to write (fp32 ``(blocks,)``, uint8 ``A.shape``); without
            ``nested`` the state holds ``absmax`` itself, as bitsandbytes' does (with it, the
            fp32 absmax is written there and the state holds its nested codes).
        blocksize: elements per block, one of ``opsq._constants.BLOCKWISE_BLOCKSIZES``
            (powers of two, 32..16384).
        nested: also quantize the absmax (offset = :func:`nested_offset`, same blocksize).
    Returns:
        ``(out uint8 A.shape, QuantState)``.
    Raises:
        TypeError / ValueError: bad dtype or blocksize.
    """
    # the state holds its own copy of the map (as bitsandbytes: a caller's map may change later)
    code = dynamic_map_on(A.device) if code is None else code
    code = code.to(A.device, copy=True)
    q, am = torch.ops.opsq.quantize_blockwise(A, code, blocksize)
    if absmax is not None:  # (an unnested state holds the caller's buffer, as bitsandbytes')
        am = _copy_out(absmax, am, "absmax")
    if nested:
        offset = nested_offset(am)
        qa, state2 = quantize_blockwise(am - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=qa, code=code, blocksize=blocksize, dtype=A.dtype,
                           offset=offset, state2=state2)
    else:
        state = QuantState(absmax=am, code=code, blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        q = _copy_out(out, q)
    return q, state


def dequantize_blockwise(A: torch.Tensor, quant_state: Optional[QuantState] = None,
                         absmax: Optional[torch.Tensor] = None,
                         code: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                         blocksize: int = 4096, nested: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A] * absmax[block]`` in ``quant_state.dtype``
    (fp32 without a state).

    Raises:
        ValueError: neither ``quant_state`` nor ``absmax`` given.
    """
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        if code is None:
            code = dynamic_map_on(A.device)
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize,
                                 dtype=torch.float32)
    am = quant_state.absmax
    if quant_state.nested:
        am = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    dtype = out.dtype if out is not None else quant_state.dtype
    res = torch.ops.opsq.dequantize_blockwise(A, am.float(), quant_state.code,
                                              quant_state.blocksize, dtype)
    if out is not None:
        return _copy_out(out, res)
    return res


# ---- 4-bit ---------------------------------------------------------------------------------
def quantize_4bit(A: torch.Tensor, absmax: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None, blocksize: Optional[int] = None,
                  compress_statistics: bool = False, quant_type: str = "fp4",
                  quant_storage: torch.dtype = torch.uint8):
    """Blockwise 4-bit (NF4 / FP4) quantization (QLoRA, Dettmers et al. 2023).

    Args:
        A: fp16/bf16/fp32 tensor of any shape (flattened row-major).
        blocksize: elements per absmax block, one of 32..4096 (powers of two); None: 64, as
            bitsandbytes.
        compress_statistics: nested absmax (offset = :func:`nested_offset`, the mean of absmax;
            absmax - offset quantized 8-bit blockwise with blocksize 256 and the dynamic map).
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed bytes are viewed as.
        absmax, out: optional outputs to copy into (the state keeps its own fp32 absmax;
            bitsandbytes' holds the ``absmax`` buffer).
    Returns:
        ``(packed (ceil(n/2/itemsize), 1) quant_storage, QuantState)``.
    Raises:
        TypeError: ``A`` not floating point or bad ``quant_storage``.
        ValueError: bad ``blocksize`` or ``quant_type``.
    """
    if blocksize is None:
        blocksize = BLOCKSIZE_4BIT_DEFAULT
    packed, am = torch.ops.opsq.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = quant_map(quant_type, A.device)
    if compress_statistics:
        offset = nested_offset(am)
        qabsmax, state2 = quantize_blockwise(am - offset, blocksize=NESTED_BLOCKSIZE)
        state = QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                           code=code, quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=am, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                           code=code, quant_type=quant_type)
    if absmax is not None:
        _copy_out(absmax, am, "absmax")
    if out is not None:
        packed = _copy_out(out, packed)
    return packed, state


def dequantize_4bit(A: torch.Tensor, quant_state: Optional[QuantState] = None,
                    absmax: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                    blocksize: Optional[int] = None, quant_type: str = "fp4") -> torch.Tensor:
    """Dequantize packed 4-bit codes: ``code[q] * absmax[block]`` in ``quant_state.dtype``.

    Without ``quant_state``, ``absmax`` and ``out`` (which gives shape and dtype) are required.
    A ``quant_state.layout == "tiled16"`` weight (codes ``A`` and ``absmax``) is read in place
    (the op's ``layout="tiled16"``; nothing is un-packed) and gives the same values as a
    never-moved weight, so PEFT merges and transformers' dequantize see no difference.

    Codes passed transposed (``A.t()``, shape ``(1, n)``, ``n > 1``, as older bitsandbytes
    callers wrote ``dequantize_4bit(weight.t(), state).t()``) give the result transposed, as
    bitsandbytes' ``dequantize_4bit`` does for an ``A`` of one row (which it also does for the
    ``(1, 1)`` codes of a weight of one byte; opsq does not).

    ``blocksize`` (without ``quant_state``): None means 64, as in bitsandbytes.

    Raises:
        ValueError: neither a ``quant_state`` nor ``absmax`` and ``out``.
    """
    if blocksize is None:
        blocksize = BLOCKSIZE_4BIT_DEFAULT
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype,
                                 blocksize=blocksize, quant_type=quant_type,
                                 code=quant_map(quant_type, A.device))
    dtype = out.dtype if out is not None else quant_state.dtype
    res = torch.ops.opsq.dequantize_4bit(A, quant_state.absmax, quant_state.blocksize,
                                         quant_state.quant_type, list(quant_state.shape), dtype,
                                         *quant_state.nested_args(),
                                         quant_state.layout)
    if out is not None:
        res = _copy_out(out, res)
    # (a (1, 1) tensor is the packed form of a weight of <= 2 codes a byte, not a transposed one)
    return res.t() if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and res.dim() == 2 \
        else res


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False,
                 quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False,
                 quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type="nf4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type="fp4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def gemv_4bit(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
              transposed_A: bool = False, transposed_B: bool = False,
              state: Optional[QuantState] = None, bias: Optional[torch.Tensor] = None):
    """``A @ dequant(B).T (+ bias)`` without materialising the weight; the decode kernel.

    Args:
        A: ``(..., K)`` fp16/bf16/fp32 activations (few rows).
        B: packed 4-bit weight of logical shape ``state.shape = (N, K)`` (``B.t()`` accepted).
        state: the weight's :class:`QuantState`.
    Returns:
        ``(..., N)`` in ``A.dtype``.
    Raises:
        ValueError: no ``state``, or a transposed flag set.
    """
    if state is None:
        raise ValueError("gemv_4bit needs the weight's quant_state (state=...)")
    if transposed_A or transposed_B:
        raise ValueError("gemv_4bit: transposed_A / transposed_B are not supported")
    res = torch.ops.opsq.gemv_4bit(A, B, list(state.shape), state.absmax, state.blocksize,
                                   state.quant_type, bias, *state.nested_args(),
                                   state.layout)
    if out is not None:
        return _copy_out(out, res)
    return res


# ---- LLM.int8 ------------------------------------------------------------------------------
def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """Row-wise int8 quantization (LLM.int8).

    Returns:
        ``(CA int8 A.shape, SCA fp32 (rows,), outlier_cols bool (K,))``; with
        ``threshold > 0`` values with |x| >= threshold are excluded from SCA and their columns
        are zeroed in CA and flagged in ``outlier_cols``.
    Raises:
        TypeError: ``A`` not fp16/bf16/fp32. ValueError: ``threshold`` < 0 or NaN.
    """
    return torch.ops.opsq.vectorwise_quant(A, float(threshold))


vectorwise_quant = int8_vectorwise_quant

#: fp32(1/127): LLM.int8 dequantizes by multiplying with this reciprocal (bitsandbytes 0.50
#: ``int8_vectorwise_dequant``), not by dividing by 127; kept for bit-identical results.
_RECIPROCAL_127 = float(torch.tensor(1.0 / 127.0, dtype=torch.float32))


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Undo :func:`int8_vectorwise_quant`: ``A * stats[row] * fp32(1/127)``, row-wise
    (LLM.int8, Dettmers et al. 2022; bitsandbytes 0.50 ``int8_vectorwise_dequant``).

    Args:
        A: int8 ``(..., K)``; its rows are all dimensions but the last.
        stats: float ``(rows,)`` (or any shape with ``rows`` elements), the row absmax ``SCA``
            in the units of the original tensor; used in fp32.
    Returns:
        fp32 ``A.shape`` on ``A``'s device; ``(A * stats) * fp32(1/127)``, each product
        rounded to fp32, as bitsandbytes computes it. Outlier columns zeroed by the quantizer
        stay 0.
    Raises:
        TypeError: ``A`` not an int8 tensor, ``stats`` not a floating-point tensor.
        ValueError: ``A`` 0-d, ``stats`` with a number of elements other than the row count,
            or on another device.
    """
    if not isinstance(A, torch.Tensor) or A.dtype != torch.int8:
        raise TypeError(f"A must be an int8 tensor, got "
                        f"{getattr(A, 'dtype', type(A).__name__)}")
    if not isinstance(stats, torch.Tensor) or not stats.is_floating_point():
        raise TypeError(f"stats must be a floating-point tensor, got "
                        f"{getattr(stats, 'dtype', type(stats).__name__)}")
    if A.dim() < 1:
        raise ValueError("A must have at least one dimension (..., K), got a 0-d tensor")
    rows = math.prod(A.shape[:-1])
    if stats.numel() != rows:
        raise ValueError(f"stats must have one value per row of A: {rows} for A of shape "
                         f"{tuple(A.shape)}, got {stats.numel()}")
    if stats.device != A.device:
        raise ValueError(f"stats must be on A's device ({A.device}), got {stats.device}")
    scale = stats.to(torch.float32).reshape(*A.shape[:-1], 1)
    return A * scale * _RECIPROCAL_127


def int8_double_quant(A: torch.Tensor, col_stats=None, row_stats=None, out_col=None,
                      out_row=None, threshold: float = 0.0):
    """Row-wise and column-wise int8 quantization with outlier handling.

    Returns:
        ``(out_row int8, out_col int8, row_stats fp32 (rows,), col_stats fp32 (K,),
        outlier_cols bool (K,))``.
    Raises:
        TypeError / ValueError as :func:`int8_vectorwise_quant`.
    """
    res = torch.ops.opsq.double_quant(A, float(threshold))
    for name, dst, src in (("out_row", out_row, res[0]), ("out_col", out_col, res[1]),
                           ("row_stats", row_stats, res[2]), ("col_stats", col_stats, res[3])):
        if dst is not None:
            _copy_out(dst, src, name)
    return res


double_quant = int8_double_quant


def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
                       dtype=torch.int32) -> torch.Tensor:
    """int8 ``A (..., K)`` times int8 ``B (N, K)`` transposed: int32 ``(..., N)``.

    Raises:
        TypeError: non-int8 inputs or ``dtype`` other than int32. RuntimeError: K mismatch.
    """
    if dtype != torch.int32:
        raise TypeError(f"int8_linear_matmul: dtype must be torch.int32, got {dtype}")
    res = torch.ops.opsq.igemmlt(A, B)
    if out is not None:
        return _copy_out(out, res)
    return res


def igemmlt(A: torch.Tensor, B: torch.Tensor, SA=None, SB=None, out=None, Sout=None,
            dtype=torch.int32):
    """Legacy form of :func:`int8_linear_matmul`: returns ``(C int32, Sout)`` with row-major
    operands (``SA``/``SB`` are ignored: opsq's operands are always row-major)."""
    C = int8_linear_matmul(A, B, out=out, dtype=dtype)
    return C, (Sout if Sout is not None else (tuple(C.shape), "row"))


def int8_mm_dequant(A: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor,
                    out: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``A * row_stats * col_stats / 127**2 (+ bias)`` from int32 ``A (..., N)``;
    output fp16 unless ``dtype`` (or ``out``) says otherwise."""
    if out is not None and dtype is None:
        dtype = out.dtype
    res = torch.ops.opsq.mm_dequant(A, row_stats, col_stats, bias, dtype)
    if out is not None:
        return _copy_out(out, res)
    return res


def mm_dequant(A, quant_state=None, row_stats=None, col_stats=None, out=None,
               new_row_stats=None, new_col_stats=None, bias=None):
    """Legacy form of :func:`int8_mm_dequant` (``quant_state``/``new_*`` are ignored).

    Raises:
        ValueError: ``row_stats`` or ``col_stats`` missing.
    """
    if row_stats is None or col_stats is None:
        raise ValueError("mm_dequant needs row_stats and col_stats")
    return int8_mm_dequant(A, row_stats, col_stats, out=out, bias=bias)


def transform(A: torch.Tensor, to_order: str, from_order: str = "row", out=None,
              transpose: bool = False, state=None, ld=None):
    """Convert an int8 matrix between row-major and the cuBLASLt tile orders "col32",
    "col_turing" (COL4_4R2_8C) and "col_ampere" (COL32_2R_4R4).

    Args:
        A: int8, ``(rows, cols)`` when ``from_order="row"``, else the flat tiled buffer.
        state: ``(shape, from_order)`` of a tiled ``A`` (as returned by this function).
    Returns:
        ``(out, (shape, to_order))``.
    Raises:
        ValueError: unknown order, ``transpose=True``, or a tiled ``A`` without ``state``.
    """
    if transpose:
        raise ValueError("transform: transpose=True is not supported")
    if state is not None:
        shape, from_order = state
    elif from_order == "row":
        shape = tuple(A.shape)
    else:
        raise ValueError("transform: a tiled A needs state=(shape, from_order)")
    res = torch.ops.opsq.transform(A, from_order, to_order, list(shape))
    if out is not None:
        res = _copy_out(out, res)
    return res, (tuple(shape), to_order)


# ---- bitsandbytes 0.50's remaining functional names ----------------------------------------------
def igemm(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
          transposed_A: bool = False, transposed_B: bool = False) -> torch.Tensor:
    """int8 matrix product with int32 accumulation, ``op(A) @ op(B)`` (bitsandbytes 0.50
    ``igemm``): ``A`` int8 ``(..., K)`` (``(K, M)`` when ``transposed_A``, 2-D), ``B`` int8
    ``(K, N)`` (``(N, K)`` when ``transposed_B``). Returns int32 ``(..., N)`` (into ``out`` if
    given). Runs :func:`int8_linear_matmul` (``torch.ops.opsq.igemmlt``) on ``B`` as ``(N, K)``.

    Raises:
        TypeError: non-int8 operands. RuntimeError: the inner dimensions differ.
    """
    a = A.t() if transposed_A else A
    b = B if transposed_B else B.t()
    return int8_linear_matmul(a, b, out=out)


def batched_igemm(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None,
                  transposed_A: bool = False, transposed_B: bool = False) -> torch.Tensor:
    """:func:`igemm` over a batch (bitsandbytes 0.50 ``batched_igemm``): int8 ``A (b, M, K)``
    and ``B (b, K, N)`` (their last two dimensions swapped when ``transposed_*``) -> int32
    ``(b, M, N)``, one :func:`igemm` per batch entry.

    Raises:
        RuntimeError: ``A`` or ``B`` not 3-D, or their batch sizes differ.
    """
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0]:
        raise RuntimeError(f"batched_igemm: A and B must be 3-D with one batch size, got "
                           f"{tuple(A.shape)} and {tuple(B.shape)}")
    M = A.shape[2] if transposed_A else A.shape[1]
    N = B.shape[1] if transposed_B else B.shape[2]
    res = torch.empty((A.shape[0], M, N), dtype=torch.int32, device=A.device)
    for i in range(A.shape[0]):
        res[i] = igemm(A[i], B[i], transposed_A=transposed_A, transposed_B=transposed_B)
    if out is not None:
        return _copy_out(out, res)
    return res


def optimizer_update_32bit(optimizer_name: str, g: torch.Tensor, p: torch.Tensor,
                           state1: torch.Tensor, beta1: float, eps: float, step: int, lr: float,
                           state2: Optional[torch.Tensor] = None, beta2: float = 0.0,
                           beta3: float = 0.0, alpha: float = 0.0, weight_decay: float = 0.0,
                           gnorm_scale: float = 1.0, unorm_vec: Optional[torch.Tensor] = None,
                           max_unorm: float = 0.0, skip_zeros: bool = False) -> None:
    """bitsandbytes 0.50's ``optimizer_update_32bit`` (its argument order and defaults): one
    in-place update of ``p`` and its fp32 states, ``torch.ops.opsq.optimizer_update_32bit``
    (formulas in :mod:`opsq.reference.optim`; ``param_norm`` 0: ``||p||`` is computed).

    Raises:
        ValueError / TypeError / RuntimeError: as the op (the argument is named).
    """
    torch.ops.opsq.optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec,
                                          max_unorm, 0.0, beta1, beta2, beta3, alpha, eps,
                                          weight_decay, step, lr, gnorm_scale, skip_zeros)


def optimizer_update_8bit_blockwise(optimizer_name: str, g: torch.Tensor, p: torch.Tensor,
                                    state1: torch.Tensor, state2: Optional[torch.Tensor],
                                    beta1: float, beta2: float, beta3: float, alpha: float,
                                    eps: float, step: int, lr: float, qmap1: torch.Tensor,
                                    qmap2: Optional[torch.Tensor], absmax1: torch.Tensor,
                                    absmax2: Optional[torch.Tensor], weight_decay: float = 0.0,
                                    gnorm_scale: float = 1.0, skip_zeros: bool = False) -> None:
    """bitsandbytes 0.50's ``optimizer_update_8bit_blockwise``: one in-place update of ``p``
    and its 8-bit blockwise states (blocks of 256), ``torch.ops.opsq.optimizer_update_8bit_
    blockwise`` with the same arguments.

    Raises:
        ValueError / TypeError / RuntimeError: as the op (the argument is named).
    """
    torch.ops.opsq.optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1,
        qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros)


def get_paged(*shape: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """A zero tensor of ``shape`` in CUDA unified memory (bitsandbytes 0.50 ``get_paged``; its
    buffer is not zeroed), owned by the tensor, on ``device`` (default: the current CUDA
    device). ``is_paged`` is set on it, as bitsandbytes does.

    Raises:
        RuntimeError: no CUDA device, or opsq's CUDA extension is not built.
    """
    from ._extension import extension_error, load_extension
    ext = load_extension()
    if ext is None or not torch.cuda.is_available():
        raise RuntimeError("get_paged needs a CUDA device and opsq's CUDA extension "
                           f"({extension_error() or 'no CUDA device'})")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None \
        else torch.device(device)
    out = ext.paged_zeros(list(shape), torch.empty(0, dtype=dtype, device=device))
    out.is_paged = True
    out.page_deviceid = device.index
    return out


def prefetch_tensor(A: torch.Tensor, to_cpu: bool = False) -> None:
    """Migrate a unified-memory tensor (from :func:`get_paged` or a paged optimizer's state) to
    its GPU, or to the host when ``to_cpu``, asynchronously on the current stream
    (bitsandbytes 0.50 ``prefetch_tensor``).

    Raises:
        ValueError: ``A`` is not in CUDA unified memory.
    """
    from ._extension import load_extension
    ext = load_extension()
    if ext is None or not A.is_cuda or not ext.is_managed(A):
        raise ValueError("A must be a paged tensor (CUDA unified memory, e.g. from get_paged)")
    ext.prefetch(A, -1 if to_cpu else A.device.index)
