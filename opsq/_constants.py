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

#: Blocksizes accepted by the 4-bit and 8-bit blockwise ops (elements per absmax).
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
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
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_map_values(signed: bool, max_exponent_bits: int, total_bits: int) -> tuple:
    # Each exponent level e (0 .. max_exponent_bits-1) contributes the midpoints of an evenly
    # spaced grid on [0.1, 1] with 2**(e + spare) + 1 points, scaled by 10**(e - (E-1)).
    # The remaining bits go to the fraction; 0 and 1.0 complete the table.
    payload_bits = total_bits - (1 if signed else 0)
    values: list[float] = []
    for e in range(max_exponent_bits):
        points = 2 ** (e + payload_bits - max_exponent_bits) + 1 if signed else \
            2 ** (e + payload_bits - max_exponent_bits + 1) + 1
        # fp32 grid and fp32 products: the published table's exact bits.
        grid = torch.linspace(0.1, 1.0, points, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10.0 ** (e - (max_exponent_bits - 1))
        values += (scale * mids).tolist()
        if signed:
            values += ((-scale) * mids).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    values.sort()
    return tuple(values)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> torch.Tensor:
    """The 8-bit dynamic (tree) quantization map, ``2**total_bits`` sorted fp32 values.

    Source: Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022);
    identical to bitsandbytes' ``create_dynamic_map`` (the fixtures' ``nested_quant_map``).

    Raises:
        ValueError: the bit counts leave no fraction bits.
    """
    if total_bits < 2 or max_exponent_bits >= total_bits:
        raise ValueError(
            f"max_exponent_bits ({max_exponent_bits}) must be < total_bits ({total_bits})")
    return torch.tensor(_dynamic_map_values(signed, max_exponent_bits, total_bits),
                        dtype=torch.float32)
