"""Format constants shared by every backend (one definition each).

Sources:
* NF4: the 16 NormalFloat quantiles of N(0, 1) normalised to [-1, 1], from
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023), Appendix E, as
  stored by bitsandbytes in ``QuantState.quant_map`` (the fixtures' ``qs.quant_map``).
* FP4: bitsandbytes' E2M1 table with its own exponent bias, sign in bit 3, as stored in the
  fixtures' ``qs.quant_map`` for ``quant_type="fp4"``.
* The 8-bit dynamic map: Dettmers et al., "8-bit Optimizers via Block-wise Quantization"
  (ICLR 2022), dynamic tree quantization, signed, 7 exponent bits; bitsandbytes'
  ``create_dynamic_map(signed=True)`` (the fixtures' ``qs.nested_quant_map``).
"""
from __future__ import annotations

import functools

import torch

#: Blocksizes accepted by the 4-bit ops (elements per absmax).
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Blocksizes accepted by the 8-bit blockwise ops (``quantize_blockwise`` /
#: ``dequantize_blockwise``): the 4-bit ones and two larger, as in bitsandbytes 0.50.
BLOCKWISE_BLOCKSIZES: tuple[int, ...] = BLOCKSIZES + (8192, 16384)
#: 4-bit code books.
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
#: Activation / output dtypes of the float ops.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
#: Storage dtypes for packed 4-bit codes (the bytes are viewed as this dtype).
QUANT_STORAGE_DTYPES: tuple[torch.dtype, ...] = (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)
#: Legacy int8 matrix orders of ``transform`` (cuBLASLt ``cublasLtOrder_t``).
ORDERS: tuple[str, ...] = ("row", "col32", "col_turing", "col_ampere")
#: ``Linear8bitLt`` ``weight_format`` codes as bitsandbytes writes them in state dicts.
LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: dict[str, int] = {
    "row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}
INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING: dict[int, str] = {
    v: k for k, v in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.items()}
#: Blocksize of the second-level (nested) absmax quantization.
NESTED_BLOCKSIZE = 256
#: Byte layouts of a 4-bit weight that ``linear_4bit`` / ``gemv_4bit`` read (argument
#: ``layout``): "packed" is bitsandbytes' (row-major flat codes, absmax per block); "tiled16"
#: is a permutation of the same bytes made for the decode kernel's loads (``opsq._tiled16``),
#: applied only while a weight sits on a CUDA device and never written to a checkpoint.
LAYOUTS_4BIT: tuple[str, ...] = ("packed", "tiled16")
#: The tiled16 geometry: tiles of 16 rows (output features) by 256 columns (one kernel step),
#: blocks of 64 codes (one mma chunk): the layout needs N % 16 == 0, K % 256 == 0 and
#: blocksize 64.
TILED16_ROWS = 16
TILED16_STEP = 256
TILED16_BLOCKSIZE = 64
#: The 4-bit functions' blocksize where the caller passes ``blocksize=None`` (bitsandbytes'
#: default, its signature's None).
BLOCKSIZE_4BIT_DEFAULT = 64

NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044556, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP4_CODE: tuple[float, ...] = (
    0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
    -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25,
)
#: FP4_CODE as bitsandbytes stores it in ``quant_map`` (:func:`quant_map`): code 8 as +0.0.
FP4_QUANT_MAP: tuple[float, ...] = tuple(v + 0.0 for v in FP4_CODE)  # -0.0 + 0.0 == +0.0
#: Decision thresholds on |x| / absmax between consecutive FP4 magnitudes (codes 0, 1, 6, 7,
#: 4, 5, 2, 3 in ascending order), as bitsandbytes' CUDA quantizer compares them (``x > t``
#: selects the larger magnitude). 0.583333 sits ~5 ulp below the exact midpoint 7/12; keeping
#: bitsandbytes' value keeps codes bit-identical with its checkpoints.
FP4_THRESHOLDS: tuple[float, ...] = (
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
#: FP4 codes of the magnitudes in ascending order (sign is bit 3).
FP4_CODES_ASCENDING: tuple[int, ...] = (0, 1, 6, 7, 4, 5, 2, 3)
#: Code (0..15) that dequantizes to exactly 0.0, used for padding and all-zero blocks.
ZERO_CODE: dict[str, int] = {"nf4": 7, "fp4": 0}


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16-entry fp32 code table of ``quant_type`` ("nf4" or "fp4") on ``device``.

    Raises:
        ValueError: ``quant_type`` is not "nf4" or "fp4".
    """
    if quant_type == "nf4":
        values = NF4_CODE
    elif quant_type == "fp4":
        values = FP4_CODE
    else:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return table_on(quant_type, values, device)


def quant_map(quant_type: str, device=None) -> torch.Tensor:
    """The code table of ``quant_type`` as bitsandbytes stores it (``QuantState.quant_map``, a
    checkpoint's ``weight.quant_map``, ``get_4bit_type``): :func:`code_table` except FP4's code
    8, which is +0.0 there (bitsandbytes builds that table from the integer ``-0``) while its
    dequantization gives -0.0 (the sign bit times 0), which :func:`code_table` keeps for the
    kernels. A state's table is only stored and compared by value; the ops look codes up in
    :func:`code_table`.

    Returns:
        fp32 ``(16,)`` on ``device``, owned by the caller.
    Raises:
        ValueError: ``quant_type`` is not "nf4" or "fp4".
    """
    if quant_type == "fp4":
        return table_on("fp4_map", FP4_QUANT_MAP, device)
    return code_table(quant_type, device)


#: Device-resident masters of :func:`table_on`, keyed by (name, device); never written.
_RESIDENT: dict = {}


def table_on(name: str, values: tuple, device=None) -> torch.Tensor:
    """A new fp32 tensor holding ``values`` (a small table: a code book, the dynamic map) on
    ``device`` (None: torch's default device). ``name`` identifies the values (one name, one
    table: "nf4", "fp4", "dynamic").

    The first call per (name, device) builds a master from the values; later calls clone it.
    On an accelerator building means a copy from pageable host memory, which synchronises the
    stream, while the clone is an asynchronous device-to-device copy: quantizing a model layer
    by layer stays free of host syncs (two per nested ``quantize_4bit`` otherwise). Masters live
    as long as the process (a few KB per device; one first built inside a private memory pool
    keeps that pool alive). Tracing (``torch.compile``, ``torch.export``), active dispatch modes
    and the meta device build the tensor from the values every call.

    Returns:
        fp32 ``(len(values),)``, owned by the caller (writing to it changes no later table).
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return torch.tensor(values, dtype=torch.float32, device=device)
    dev = torch.device(device) if device is not None else torch.get_default_device()
    if dev.type == "meta":
        return torch.tensor(values, dtype=torch.float32, device=dev)
    current = getattr(getattr(torch, dev.type, None), "current_device", None)
    if dev.index is None and dev.type != "cpu" and current is not None:
        dev = torch.device(dev.type, current())  # "cuda" and "cuda:0" share one master
    master = _RESIDENT.get((name, dev))
    if master is None:
        with torch.inference_mode(False):  # a normal tensor, also when first built in one
            master = torch.tensor(values, dtype=torch.float32, device=dev)
        _RESIDENT[(name, dev)] = master
    return master.clone()


def check_int(name: str, value, low: int, high: "int | None" = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``, else a ValueError naming
    ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low \
            or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {span}, got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def _dynamic_map_values(signed: bool, max_exponent_bits: int, total_bits: int) -> tuple:
    # n = total_bits - 1, m = min(max_exponent_bits, n). Exponent level i = 0 .. m-1 gives the
    # midpoints of an fp32 grid of k + 1 points on [0.1, 1] scaled by 10**(i - m + 1), with
    # k = 2**(i + n - m) (signed: both signs) or 2**(i + n - m + 1) (unsigned: the sign bit is
    # a fraction bit); when m < n, the 2**(n - m) - 1 codes without an indicator bit give the
    # midpoints of 2**(n - m) points at scale 1 (both signs). Then 0 and 1, zero-padded to 256.
    # fp32 grids and products: the published tables' exact bits.
    n = total_bits - 1
    m = min(max_exponent_bits, n)

    def level(k: int, scale: float) -> list:
        grid = torch.linspace(0.1, 1.0, k + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        out = (scale * mids).tolist()
        return out + ((-scale) * mids).tolist() if signed else out

    values: list = []
    for i in range(m):
        values += level(2 ** (i + n - m + (0 if signed else 1)), 10.0 ** (i - m + 1))
    if m < n:
        values += level(2 ** (n - m) - 1, 1.0)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return tuple(sorted(values))


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> torch.Tensor:
    """The dynamic (tree) quantization map: a decimal exponent and a linear fraction whose
    width shrinks as the exponent grows, 256 sorted fp32 values (bitsandbytes 0.50's
    ``create_dynamic_map``, bit for bit; the default call is the nested-absmax map of the
    fixtures, the unsigned one the second-moment map of 8-bit optimizers).

    Sources: Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (ICLR 2016,
    arXiv:1511.04561); Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR
    2022). A signed map with ``max_exponent_bits > total_bits - 1`` equals the one with
    ``total_bits - 1`` (the extra levels get no codes).

    Args:
        signed: both signs (weights, Adam's first moment) or [0, 1] (second moment).
        max_exponent_bits: >= 1; unsigned maps need ``total_bits - 1`` (other unsigned layouts
            do not fill the codes: bitsandbytes fails an assertion there).
        total_bits: 1..8.
    Returns:
        fp32 ``(256,)`` sorted, on the CPU (a new tensor each call).
    Raises:
        ValueError: bit counts outside those ranges.
    """
    check_int("total_bits", total_bits, 1, 8)
    check_int("max_exponent_bits", max_exponent_bits, 1)
    if not signed and max_exponent_bits != total_bits - 1:
        raise ValueError(f"max_exponent_bits must equal total_bits - 1 = {total_bits - 1} for "
                         f"an unsigned map (other layouts leave codes unused), got "
                         f"{max_exponent_bits}")
    return torch.tensor(_dynamic_map_values(bool(signed), max_exponent_bits, total_bits),
                        dtype=torch.float32)


def dynamic_map_on(device=None) -> torch.Tensor:
    """:func:`create_dynamic_map` with its defaults (signed, the nested-absmax map) as a new
    fp32 ``(256,)`` tensor on ``device``, through :func:`table_on` (no host sync once warm)."""
    return table_on("dynamic", _DYNAMIC_SIGNED, device)


#: The default dynamic map's values, computed once at import (``torch.compile`` reads the
#: tuple as a constant; it cannot trace the fp32 construction, which ends in ``tolist``).
_DYNAMIC_SIGNED: tuple = _dynamic_map_values(True, 7, 8)
