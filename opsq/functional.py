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

import json
from typing import Any, Optional

import torch

from ._constants import (BLOCKSIZES, FLOAT_DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES, code_table,
                         create_dynamic_map)

__all__ = [
    "QuantState", "quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4",
    "dequantize_nf4", "dequantize_fp4", "quantize_blockwise", "dequantize_blockwise",
    "gemv_4bit", "int8_vectorwise_quant", "vectorwise_quant", "int8_double_quant",
    "double_quant", "int8_linear_matmul", "igemmlt", "int8_mm_dequant", "mm_dequant",
    "transform", "get_4bit_type", "create_dynamic_map", "pack_dict_to_tensor",
    "unpack_tensor_to_dict",
]


def get_4bit_type(typename: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 code table of ``typename`` ("nf4" or "fp4").

    Raises:
        ValueError: unknown ``typename``.
    """
    return code_table(typename, device)


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
        shape: logical shape of the original tensor (``torch.Size``).
        code: the code table: 16 fp32 values (4-bit) or 256 (8-bit map).
        blocksize: elements per block, one of ``opsq._constants.BLOCKSIZES``.
        quant_type: "nf4" / "fp4" for 4-bit, None for 8-bit blockwise.
        dtype: dtype of the original tensor, the default dequantization dtype.
        offset: fp32 0-d tensor, mean of the first-level absmax (nested only).
        state2: the second-level :class:`QuantState` (nested only): uint8 codes of
            ``absmax - offset`` quantized blockwise (blocksize 256) with the dynamic map.
    """

    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{t}" for t in QUANT_TYPES]
    valid_qs_keys = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state",
                     "quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                     "nested_dtype", "nested_offset"]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None,
                 dtype=None, offset=None, state2=None):
        self.absmax = absmax
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
        """Build a 4-bit QuantState from the entries bitsandbytes writes in a state dict.

        ``qs_dict`` holds ``absmax``, ``quant_map``, optionally ``nested_absmax`` and
        ``nested_quant_map``, and ``quant_state.bitsandbytes__<nf4|fp4>`` (JSON in uint8) or
        the unpacked JSON fields; any key prefix such as ``"weight."`` is ignored.

        Raises:
            ValueError: missing, unknown or malformed entries (the message names the key).
        """
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items()
                       if "quant_state" in k and isinstance(v, torch.Tensor)]
        if not packed_keys and "quant_type" not in qs_dict:
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
        if qs_dict["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant_state 'quant_type' must be one of {QUANT_TYPES}, got "
                             f"{qs_dict['quant_type']!r}")
        if qs_dict["blocksize"] not in BLOCKSIZES:
            raise ValueError(f"quant_state 'blocksize' must be one of {BLOCKSIZES}, got "
                             f"{qs_dict['blocksize']!r}")
        shape = qs_dict["shape"]
        if not (isinstance(shape, (list, tuple)) and all(isinstance(s, int) and s >= 0
                                                         for s in shape)):
            raise ValueError(f"quant_state 'shape' must be a list of sizes, got {shape!r}")
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
        return cls(quant_type=qs_dict["quant_type"], absmax=qs_dict["absmax"].to(device),
                   blocksize=qs_dict["blocksize"], code=qs_dict["quant_map"].to(device),
                   dtype=_dtype_from_name(qs_dict["dtype"], "dtype"), shape=torch.Size(shape),
                   offset=offset, state2=state2)

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as bitsandbytes writes it. With ``packed=True``: only tensors, the plain
        fields JSON-packed into ``quant_state.bitsandbytes__<quant_type>`` (uint8)."""
        qs = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
              "quant_map": self.code, "dtype": _dtype_name(self.dtype),
              "shape": tuple(self.shape)}
        if self.nested:
            qs.update({"nested_absmax": self.state2.absmax,
                       "nested_blocksize": self.state2.blocksize,
                       "nested_quant_map": self.state2.code.clone(),
                       "nested_dtype": _dtype_name(self.state2.dtype),
                       "nested_offset": self.offset.item()})
        if not packed:
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
        if not isinstance(other, QuantState):
            return False
        same = (torch.allclose(self.absmax, other.absmax, atol=1e-6)
                and self.shape == other.shape and torch.allclose(self.code, other.code)
                and self.dtype == other.dtype and self.blocksize == other.blocksize
                and self.quant_type == other.quant_type and self.nested == other.nested)
        if same and self.nested:
            same = (torch.allclose(self.offset, other.offset, atol=1e-6)
                    and self.state2 == other.state2)
        return same


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
    finite = torch.isfinite(absmax)
    safe = torch.where(finite, absmax, 0.0).sum() / finite.sum().clamp_min(1)
    return torch.where(torch.isfinite(plain), plain, safe)


def quantize_blockwise(A: torch.Tensor, code: Optional[torch.Tensor] = None,
                       absmax: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                       blocksize: int = 4096, nested: bool = False):
    """8-bit blockwise quantization with a 256-entry map (default: the dynamic map of
    Dettmers et al., ICLR 2022).

    Args:
        A: float tensor (fp16/bf16/fp32), any shape.
        code: fp32 ``(256,)`` map; default :func:`create_dynamic_map`.
        absmax, out: optional outputs to write (fp32 ``(blocks,)``, uint8 ``A.shape``).
        blocksize: elements per block.
        nested: also quantize the absmax (offset = :func:`nested_offset`, blocksize 256).
    Returns:
        ``(out uint8 A.shape, QuantState)``.
    Raises:
        TypeError / ValueError: bad dtype or blocksize.
    """
    if code is None:
        code = create_dynamic_map().to(A.device)
    q, am = torch.ops.opsq.quantize_blockwise(A, code, blocksize)
    if nested:
        offset = nested_offset(am)
        qa, state2 = quantize_blockwise(am - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=qa, code=code, blocksize=blocksize, dtype=torch.float32,
                           offset=offset, state2=state2)
    else:
        state = QuantState(absmax=am, code=code, blocksize=blocksize, dtype=A.dtype)
    if absmax is not None:
        absmax.copy_(am)
    if out is not None:
        out.copy_(q)
        q = out
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
            code = create_dynamic_map().to(A.device)
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize,
                                 dtype=torch.float32)
    am = quant_state.absmax
    if quant_state.nested:
        am = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    dtype = out.dtype if out is not None else quant_state.dtype
    res = torch.ops.opsq.dequantize_blockwise(A, am.float(), quant_state.code,
                                              quant_state.blocksize, dtype)
    if out is not None:
        return out.copy_(res)
    return res


# ---- 4-bit ---------------------------------------------------------------------------------
def quantize_4bit(A: torch.Tensor, absmax: Optional[torch.Tensor] = None,
                  out: Optional[torch.Tensor] = None, blocksize: int = 64,
                  compress_statistics: bool = False, quant_type: str = "fp4",
                  quant_storage: torch.dtype = torch.uint8):
    """Blockwise 4-bit (NF4 / FP4) quantization (QLoRA, Dettmers et al. 2023).

    Args:
        A: fp16/bf16/fp32 tensor of any shape (flattened row-major).
        blocksize: elements per absmax block, one of 32..4096 (powers of two).
        compress_statistics: nested absmax (offset = :func:`nested_offset`, the mean of absmax;
            absmax - offset quantized 8-bit blockwise with blocksize 256 and the dynamic map).
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed bytes are viewed as.
        absmax, out: optional outputs to copy into.
    Returns:
        ``(packed (ceil(n/2/itemsize), 1) quant_storage, QuantState)``.
    Raises:
        TypeError: ``A`` not floating point or bad ``quant_storage``.
        ValueError: bad ``blocksize`` or ``quant_type``.
    """
    packed, am = torch.ops.opsq.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = code_table(quant_type, A.device)
    if compress_statistics:
        offset = nested_offset(am)
        qabsmax, state2 = quantize_blockwise(am - offset, blocksize=NESTED_BLOCKSIZE)
        state = QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                           code=code, quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=am, shape=A.shape, dtype=A.dtype, blocksize=blocksize,
                           code=code, quant_type=quant_type)
    if absmax is not None:
        absmax.copy_(am)
    if out is not None:
        out.copy_(packed)
        packed = out
    return packed, state


def dequantize_4bit(A: torch.Tensor, quant_state: Optional[QuantState] = None,
                    absmax: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                    blocksize: int = 64, quant_type: str = "fp4") -> torch.Tensor:
    """Dequantize packed 4-bit codes: ``code[q] * absmax[block]`` in ``quant_state.dtype``.

    Without ``quant_state``, ``absmax`` and ``out`` (which gives shape and dtype) are required.

    Raises:
        ValueError: neither a ``quant_state`` nor ``absmax`` and ``out``.
    """
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype,
                                 blocksize=blocksize, quant_type=quant_type,
                                 code=code_table(quant_type, A.device))
    dtype = out.dtype if out is not None else quant_state.dtype
    res = torch.ops.opsq.dequantize_4bit(A, quant_state.absmax, quant_state.blocksize,
                                         quant_state.quant_type, list(quant_state.shape), dtype,
                                         *quant_state.nested_args())
    if out is not None:
        return out.copy_(res)
    return res


def quantize_nf4(A, absmax=None, out=None, blocksize=64, compress_statistics=False,
                 quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=64, compress_statistics=False,
                 quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=64):
    """:func:`dequantize_4bit` with ``quant_type="nf4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=64):
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
                                   state.quant_type, bias, *state.nested_args())
    if out is not None:
        return out.copy_(res)
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
    for dst, src in ((out_row, res[0]), (out_col, res[1]), (row_stats, res[2]),
                     (col_stats, res[3])):
        if dst is not None:
            dst.copy_(src)
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
        return out.copy_(res)
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
        return out.copy_(res)
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
        res = out.copy_(res)
    return res, (tuple(shape), to_order)
