"""Numerical edge cases (issue 8): NaN/Inf containment, all-zero blocks, denormals, code
midpoints, fp16 overflow in mm_dequant. See README "Determinism and numerical edge cases"."""
from __future__ import annotations

import math

import pytest
import torch

from opsq._constants import NF4_CODE, ZERO_CODE, create_dynamic_map
from opsq.reference.fourbit import unpack_codes

ops = torch.ops.opsq
DYN = create_dynamic_map()


def _x(n=256, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "blockwise"])
def test_nonfinite_contained_to_its_block(bad, quant_type):
    x = _x()
    y = x.clone()
    y[70] = bad  # block 1 of 4 (blocksize 64)
    if quant_type == "blockwise":
        def rt(t):
            q, am = ops.quantize_blockwise(t, DYN, 64)
            return ops.dequantize_blockwise(q, am, DYN, 64, torch.float32), am
    else:
        def rt(t):
            q, am = ops.quantize_4bit(t, 64, quant_type, torch.uint8)
            return ops.dequantize_4bit(q, am, 64, quant_type, [256], torch.float32), am
    clean, am_clean = rt(x)
    dirty, am_dirty = rt(y)
    others = torch.ones(256, dtype=torch.bool)
    others[64:128] = False
    assert torch.equal(clean[others], dirty[others])
    assert torch.equal(am_clean[[0, 2, 3]], am_dirty[[0, 2, 3]])
    assert math.isnan(am_dirty[1]) if math.isnan(bad) else am_dirty[1] == math.inf


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_contained_to_its_row_int8(bad):
    x = _x(5 * 40).reshape(5, 40)
    y = x.clone()
    y[2, 7] = bad
    for threshold in (0.0, 2.5):
        c = ops.double_quant(x, threshold)
        d = ops.double_quant(y, threshold)
        rows = [0, 1, 3, 4]
        cols = torch.ones(40, dtype=torch.bool)
        if threshold > 0 and not math.isnan(bad):
            # +-Inf >= threshold is an outlier: by design its column goes to the 16-bit path
            assert d[4][7] and (d[0][:, 7] == 0).all()
            cols[7] = False
        assert torch.equal(c[0][rows][:, cols], d[0][rows][:, cols])
        assert torch.equal(c[2][rows], d[2][rows])
        assert (d[0][2] == 0).all() or threshold > 0  # NaN/Inf row: absmax non-finite, codes 0
        assert d[0].abs().max() <= 127


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_block_gives_absmax_zero_and_zero_code(quant_type):
    x = _x(192)
    x[64:128] = 0.0
    q, am = ops.quantize_4bit(x, 64, quant_type, torch.uint8)
    assert am[1] == 0
    assert (unpack_codes(q, 192)[64:128] == ZERO_CODE[quant_type]).all()
    deq = ops.dequantize_4bit(q, am, 64, quant_type, [192], torch.float32)
    assert (deq[64:128] == 0).all()
    qb, amb = ops.quantize_blockwise(x, DYN, 64)
    assert amb[1] == 0 and (ops.dequantize_blockwise(qb, amb, DYN, 64, torch.float32)[64:128]
                            == 0).all()
    CA, SCA, _ = ops.vectorwise_quant(torch.zeros(2, 8))
    assert (CA == 0).all() and (SCA == 0).all()


def test_denormal_blocks_quantize_like_normal_ones():
    # absmax 1e-40 is subnormal; 1/absmax overflows fp32, which used to turn 0 into NaN codes.
    scale = 1e-40
    x = torch.tensor([1.0, -0.5, 0.0, 0.3, 0.0, 0.7] + [0.0] * 58)
    for qt in ("nf4", "fp4"):
        q, am = ops.quantize_4bit(x * scale, 64, qt, torch.uint8)
        q2, _ = ops.quantize_4bit(x, 64, qt, torch.uint8)
        assert torch.equal(q, q2), qt
    qb, _ = ops.quantize_blockwise(x * scale, DYN, 64)
    assert torch.equal(qb, ops.quantize_blockwise(x, DYN, 64)[0])
    CA, SCA, _ = ops.vectorwise_quant((x * scale).reshape(1, -1))
    assert torch.equal(CA, ops.vectorwise_quant(x.reshape(1, -1))[0])


def test_values_at_code_midpoints_take_lower_code():
    table = torch.tensor(NF4_CODE, dtype=torch.float64)
    mids = ((table[1:] + table[:-1]) / 2).to(torch.float32)
    x = torch.cat([torch.tensor([1.0]), mids])  # absmax 1 so normed == x
    q, am = ops.quantize_4bit(x, 32, "nf4", torch.uint8)
    codes = unpack_codes(q, x.numel())
    assert codes[0] == 15
    assert torch.equal(codes[1:].long(), torch.arange(15))  # the lower of the two codes
    # just above a midpoint takes the upper code
    up = torch.nextafter(mids, torch.full_like(mids, 2.0))
    q, _ = ops.quantize_4bit(torch.cat([torch.tensor([1.0]), up]), 32, "nf4", torch.uint8)
    assert torch.equal(unpack_codes(q, 16)[1:].long(), torch.arange(1, 16))


def test_mm_dequant_fp16_overflow_is_inf():
    # Documented: fp16 output overflows to +-inf (not clamped), as bitsandbytes does.
    A = torch.tensor([[127 * 127 * 100, -127 * 127 * 100, 127 * 127]], dtype=torch.int32)
    row = torch.tensor([1000.0])
    col = torch.tensor([1000.0, 1000.0, 1.0])
    out = ops.mm_dequant(A, row, col)
    assert out.dtype == torch.float16
    assert out[0, 0] == math.inf and out[0, 1] == -math.inf and out[0, 2] == 1000.0
    assert torch.isfinite(ops.mm_dequant(A, row, col, None, torch.float32)).all()
