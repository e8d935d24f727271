"""Bad-input matrix (issue 8): every op and layer fed wrong dtypes, devices, shapes, values and
corrupted state. Each row either raises a clear exception whose message names the argument, or is
handled correctly ("ok", checked against a reference result). Op rows run twice: eager, and under
``torch.compile(fullgraph=True, backend="aot_eager")`` through the fake kernels, on every device
(CPU, and CUDA where present: the rows' CPU tensors move there with their strides and storage
offsets, so the CUDA kernels' own checks face the same inputs); layer and state-dict rows run
eager on the CPU. "meta" stands in for "another device".
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch
import torch._dynamo
from torch import nn

import opsq.functional as Fq
from opsq import reference as ref
from opsq._constants import create_dynamic_map
from opsq.nn import Embedding4bit, Embedding8bit, Linear4bit, Linear8bitLt
from opsq.testing import DEVICES

ops = torch.ops.opsq
META = "meta"
OK = "ok"

torch.manual_seed(0)
_A = torch.randn(4, 64)
_Q, _AM = ops.quantize_4bit(_A, 64, "nf4", torch.uint8)
_CODE = create_dynamic_map()
_QB, _AMB = ops.quantize_blockwise(_A, _CODE, 64)
_W = torch.randn(8, 64)
_CB, _SCB, _ = ops.vectorwise_quant(_W)
_C32 = torch.randint(-1000, 1000, (4, 8), dtype=torch.int32)
_NQ, _NAM = ops.quantize_blockwise(_AM - _AM.mean(), _CODE, 256)
_OFF = _AM.mean().reshape(1)
_NESTED = dict(nested_absmax=_NAM, nested_code=_CODE, offset=_OFF)


@dataclass
class Row:
    name: str
    op: Optional[str]              # torch.ops.opsq.<op>, or None for an eager-only layer row
    args: tuple = ()
    exc: Any = OK                   # exception type, or OK
    match: str = ""                 # regex the message must contain (names the argument)
    kwargs: dict = field(default_factory=dict)
    check: Optional[Callable] = None  # OK rows: check(result) -> None (asserts)
    call: Optional[Callable] = None   # layer rows: zero-argument callable


def _eq(expected):
    def check(out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        exps = expected() if callable(expected) else expected
        exps = exps if isinstance(exps, (tuple, list)) else (exps,)
        assert len(outs) == len(exps)
        for o, e in zip(outs, exps):
            assert o.shape == e.shape and o.dtype == e.dtype, (o.shape, e.shape, o.dtype, e.dtype)
            assert torch.equal(o, e) or (o.is_floating_point() and torch.allclose(o, e,
                                                                                   equal_nan=True))
    return check


def _shapes(*shapes):
    def check(out):
        assert [tuple(t.shape) for t in out] == [tuple(s) for s in shapes]
    return check


def _noncontig(t):
    """A non-contiguous view holding the same values as ``t`` (2-D)."""
    v = t.t().contiguous().t()
    assert not v.is_contiguous() or t.dim() < 2 or min(t.shape) <= 1
    return v


def _offset_view(t):
    """A view of ``t`` with a non-zero storage offset."""
    big = torch.cat([torch.zeros(7, dtype=t.dtype), t.reshape(-1)])
    v = big[7:].view(t.shape)
    assert v.storage_offset() == 7
    return v


def _dq4(q, am, shape=(4, 64), **kw):
    return ops.dequantize_4bit(q, am, 64, "nf4", list(shape), torch.float32, **kw)


def _roundtrip_ok(shape, blocksize=64):
    def check(out):
        q, am = out
        deq = ops.dequantize_4bit(q, am, blocksize, "nf4", list(shape), torch.float32)
        assert deq.shape == tuple(shape)
    return check


def _p(*a):
    return a


OP_ROWS: list[Row] = [
    # ---- quantize_4bit ---------------------------------------------------------------------
    Row("q4_A_int32", "quantize_4bit", _p(_A.int(), 64, "nf4", torch.uint8), TypeError, r"\bA\b"),
    Row("q4_A_float64", "quantize_4bit", _p(_A.double(), 64, "nf4", torch.uint8), TypeError,
        r"\bA\b must have dtype"),
    Row("q4_blocksize_48", "quantize_4bit", _p(_A, 48, "nf4", torch.uint8), ValueError,
        r"blocksize must be one of"),
    Row("q4_blocksize_0", "quantize_4bit", _p(_A, 0, "nf4", torch.uint8), ValueError,
        r"blocksize.*got 0"),
    Row("q4_blocksize_8192", "quantize_4bit", _p(_A, 8192, "nf4", torch.uint8), ValueError,
        r"blocksize must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\), got 8192"),
    Row("q4_blocksize_neg", "quantize_4bit", _p(_A, -64, "nf4", torch.uint8), ValueError,
        r"blocksize"),
    Row("q4_quant_type_int4", "quantize_4bit", _p(_A, 64, "int4", torch.uint8), ValueError,
        r"quant_type.*'int4'"),
    Row("q4_quant_type_upper", "quantize_4bit", _p(_A, 64, "NF4", torch.uint8), ValueError,
        r"quant_type"),
    Row("q4_storage_bool", "quantize_4bit", _p(_A, 64, "nf4", torch.bool), TypeError,
        r"quant_storage.*torch.bool"),
    Row("q4_storage_complex", "quantize_4bit", _p(_A, 64, "nf4", torch.complex64), TypeError,
        r"quant_storage.*complex64"),
    Row("q4_noncontig_ok", "quantize_4bit", _p(_noncontig(_A), 64, "nf4", torch.uint8),
        check=_eq(lambda: ops.quantize_4bit(_A, 64, "nf4", torch.uint8))),
    Row("q4_offset_view_ok", "quantize_4bit", _p(_offset_view(_A), 64, "fp4", torch.int32),
        check=_eq(lambda: ops.quantize_4bit(_A, 64, "fp4", torch.int32))),
    Row("q4_zero_size_ok", "quantize_4bit", _p(torch.zeros(0, 5), 64, "nf4", torch.int32),
        check=_shapes((0, 1), (0,))),
    Row("q4_one_element_ok", "quantize_4bit", _p(torch.tensor([2.5]), 64, "nf4", torch.float64),
        check=_roundtrip_ok((1,))),
    Row("q4_K_not_multiple_ok", "quantize_4bit", _p(torch.randn(3, 100), 64, "nf4", torch.uint8),
        check=_roundtrip_ok((3, 100))),
    # ---- dequantize_4bit -------------------------------------------------------------------
    Row("dq4_A_numel", "dequantize_4bit", _p(_Q[:-1], _AM, 64, "nf4", [4, 64], torch.float32),
        RuntimeError, r"\bA must have 128 elements"),
    Row("dq4_A_bool", "dequantize_4bit",
        _p(_Q.view(torch.bool), _AM, 64, "nf4", [4, 64], torch.float32), TypeError,
        r"\bA must have dtype"),
    Row("dq4_absmax_numel", "dequantize_4bit", _p(_Q, _AM[:3], 64, "nf4", [4, 64], torch.float32),
        RuntimeError, r"absmax must have 4 elements"),
    Row("dq4_absmax_fp16", "dequantize_4bit",
        _p(_Q, _AM.half(), 64, "nf4", [4, 64], torch.float32), TypeError, r"absmax must have dtype"),
    Row("dq4_absmax_other_device", "dequantize_4bit",
        _p(_Q, _AM.to(META), 64, "nf4", [4, 64], torch.float32), ValueError,
        r"absmax must be on the same device"),
    Row("dq4_dtype_int32", "dequantize_4bit", _p(_Q, _AM, 64, "nf4", [4, 64], torch.int32),
        TypeError, r"dtype must be one of"),
    Row("dq4_quant_type", "dequantize_4bit", _p(_Q, _AM, 64, "nf8", [4, 64], torch.float32),
        ValueError, r"quant_type"),
    Row("dq4_blocksize", "dequantize_4bit", _p(_Q, _AM, 63, "nf4", [4, 64], torch.float32),
        ValueError, r"blocksize"),
    Row("dq4_shape_negative", "dequantize_4bit", _p(_Q, _AM, 64, "nf4", [-4, -64], torch.float32),
        RuntimeError, r"shape must have non-negative"),
    Row("dq4_shape_empty", "dequantize_4bit", _p(_Q, _AM, 64, "nf4", [], torch.float32),
        ValueError, r"shape must not be empty"),
    Row("dq4_uint8_absmax_no_nested", "dequantize_4bit",
        _p(_Q, _NQ, 64, "nf4", [4, 64], torch.float32), ValueError, r"nested_absmax"),
    Row("dq4_nested_with_float_absmax", "dequantize_4bit",
        _p(_Q, _AM, 64, "nf4", [4, 64], torch.float32), ValueError, r"nested_absmax/nested_code/offset given", kwargs=dict(_NESTED)),
    Row("dq4_nested_absmax_numel", "dequantize_4bit",
        _p(_Q, _NQ, 64, "nf4", [4, 64], torch.float32),
        RuntimeError, r"nested_absmax must have 1", kwargs=dict(_NESTED, nested_absmax=torch.ones(2))),
    Row("dq4_nested_code_numel", "dequantize_4bit",
        _p(_Q, _NQ, 64, "nf4", [4, 64], torch.float32),
        RuntimeError, r"nested_code must have 256", kwargs=dict(_NESTED, nested_code=_CODE[:16])),
    Row("dq4_offset_dtype", "dequantize_4bit", _p(_Q, _NQ, 64, "nf4", [4, 64], torch.float32),
        TypeError, r"offset must have dtype", kwargs=dict(_NESTED, offset=_OFF.double())),
    Row("dq4_nested_blocksize", "dequantize_4bit",
        _p(_Q, _NQ, 64, "nf4", [4, 64], torch.float32), ValueError, r"nested_blocksize", kwargs=dict(_NESTED, nested_blocksize=100)),
    Row("dq4_nested_other_device", "dequantize_4bit",
        _p(_Q, _NQ, 64, "nf4", [4, 64], torch.float32),
        ValueError, r"nested_code must be on the same", kwargs=dict(_NESTED, nested_code=_CODE.to(META))),
    Row("dq4_strided_absmax_ok", "dequantize_4bit",
        _p(_Q, torch.stack([_AM, _AM], 1)[:, 0], 64, "nf4", [4, 64], torch.float32),
        check=_eq(lambda: _dq4(_Q, _AM))),
    Row("dq4_absmax_2d_ok", "dequantize_4bit",
        _p(_Q, _AM.reshape(4, 1), 64, "nf4", [4, 64], torch.float32),
        check=_eq(lambda: _dq4(_Q, _AM))),
    Row("dq4_zero_size_ok", "dequantize_4bit",
        _p(torch.zeros(0, 1, dtype=torch.uint8), torch.zeros(0), 64, "nf4", [0, 5], torch.float16),
        check=_eq(torch.zeros(0, 5, dtype=torch.float16))),
    # ---- gemv_4bit / linear_4bit -----------------------------------------------------------
    Row("lin4_A_int8", "linear_4bit", _p(_A.to(torch.int8), _Q, [4, 64], _AM, 64, "nf4"),
        TypeError, r"\bA must have dtype"),
    Row("lin4_K_mismatch", "linear_4bit", _p(torch.randn(2, 32), _Q, [4, 64], _AM, 64, "nf4"),
        RuntimeError, r"shapeB\[1\]"),
    Row("lin4_shapeB_3d", "linear_4bit", _p(_A, _Q, [4, 8, 8], _AM, 64, "nf4"), ValueError,
        r"shapeB must be \[N, K\]"),
    Row("lin4_bias_numel", "linear_4bit", _p(_A, _Q, [4, 64], _AM, 64, "nf4", torch.ones(5)),
        RuntimeError, r"bias must have 4"),
    Row("lin4_bias_int", "linear_4bit",
        _p(_A, _Q, [4, 64], _AM, 64, "nf4", torch.ones(4, dtype=torch.int64)), TypeError,
        r"bias must have dtype"),
    Row("lin4_bias_other_device", "linear_4bit",
        _p(_A, _Q, [4, 64], _AM, 64, "nf4", torch.ones(4, device=META)), ValueError,
        r"bias must be on the same device"),
    Row("lin4_B_other_device", "gemv_4bit", _p(_A[:1], _Q.to(META), [4, 64], _AM, 64, "nf4"),
        ValueError, r"\bB must be on the same device"),
    Row("lin4_A_0dim", "gemv_4bit", _p(torch.tensor(1.0), _Q, [4, 64], _AM, 64, "nf4"),
        RuntimeError, r"\bA must have at least 1"),
    Row("lin4_B_numel", "linear_4bit", _p(_A, _Q[:10], [4, 64], _AM, 64, "nf4"), RuntimeError,
        r"\bB must have 128 elements"),
    Row("lin4_noncontig_A_ok", "linear_4bit", _p(_noncontig(_A), _Q, [4, 64], _AM, 64, "nf4"),
        check=_eq(lambda: ops.linear_4bit(_A, _Q, [4, 64], _AM, 64, "nf4"))),
    Row("gemv4_one_token_ok", "gemv_4bit", _p(_A[:1], _Q, [4, 64], _AM, 64, "nf4"),
        check=_eq(lambda: ops.linear_4bit(_A, _Q, [4, 64], _AM, 64, "nf4")[:1])),
    Row("lin4_zero_batch_ok", "linear_4bit", _p(torch.zeros(0, 64), _Q, [4, 64], _AM, 64, "nf4"),
        check=_eq(torch.zeros(0, 4))),
    # ---- linear_4bit_merged ----------------------------------------------------------------
    Row("lin4m_no_weight", "linear_4bit_merged", _p(_A, [], [], [], 64, "nf4", [], [], [], []),
        ValueError, r"\bB must hold at least one weight"),
    Row("lin4m_list_lengths", "linear_4bit_merged",
        _p(_A, [_Q], [4], [_AM, _AM], 64, "nf4", [None], [None], [None], [None]), ValueError,
        r"\babsmax must hold one entry a weight \(1\), got 2"),
    Row("lin4m_second_weight_numel", "linear_4bit_merged",
        _p(_A, [_Q, _Q[:10]], [4, 4], [_AM, _AM], 64, "nf4", [None] * 2, [None] * 2, [None] * 2,
           [None] * 2), RuntimeError, r"\bweight 1: B must have 128 elements"),
    Row("lin4m_second_bias_numel", "linear_4bit_merged",
        _p(_A, [_Q, _Q], [4, 4], [_AM, _AM], 64, "nf4", [None, torch.ones(5)], [None] * 2,
           [None] * 2, [None] * 2), RuntimeError, r"\bweight 1: bias must have 4 elements"),
    Row("lin4m_two_weights_ok", "linear_4bit_merged",
        _p(_A, [_Q, _Q], [4, 4], [_AM, _AM], 64, "nf4", [None, torch.ones(4)], [None] * 2,
           [None] * 2, [None] * 2),
        check=_eq(lambda: [ops.linear_4bit(_A, _Q, [4, 64], _AM, 64, "nf4"),
                           ops.linear_4bit(_A, _Q, [4, 64], _AM, 64, "nf4", torch.ones(4))])),
    # ---- quantize_blockwise / dequantize_blockwise ------------------------------------------
    Row("qb_code_numel", "quantize_blockwise", _p(_A, _CODE[:255], 64), RuntimeError,
        r"code must have 256"),
    Row("qb_code_fp16", "quantize_blockwise", _p(_A, _CODE.half(), 64), TypeError,
        r"code must have dtype"),
    Row("qb_A_int", "quantize_blockwise", _p(_A.long(), _CODE, 64), TypeError, r"\bA must have"),
    Row("qb_blocksize", "quantize_blockwise", _p(_A, _CODE, 100), ValueError, r"blocksize"),
    Row("qb_code_other_device", "quantize_blockwise", _p(_A, _CODE.to(META), 64), ValueError,
        r"code must be on the same device"),
    Row("qb_noncontig_ok", "quantize_blockwise", _p(_noncontig(_A), _CODE, 64),
        check=_eq((_QB, _AMB))),
    Row("qb_code_2d_ok", "quantize_blockwise", _p(_A, _CODE.reshape(16, 16), 64),
        check=_eq((_QB, _AMB))),
    Row("qb_empty_ok", "quantize_blockwise", _p(torch.zeros(0), _CODE, 64),
        check=_shapes((0,), (0,))),
    Row("qb_one_element_ok", "quantize_blockwise", _p(torch.tensor([-3.0]), _CODE, 4096),
        check=_eq((torch.tensor([0], dtype=torch.uint8), torch.tensor([3.0])))),
    Row("qb_blocksize_32768", "quantize_blockwise", _p(_A, _CODE, 32768), ValueError,
        r"blocksize must be one of \(32, .*, 8192, 16384\), got 32768"),
    Row("qb_blocksize_3000", "quantize_blockwise", _p(_A, _CODE, 3000), ValueError,
        r"blocksize must be one of \(32, .*, 8192, 16384\), got 3000"),
    Row("qb_blocksize_16384_offset_ok", "quantize_blockwise",
        _p(_offset_view(_A.reshape(-1)), _CODE, 16384),
        check=_eq(lambda: ref.quantize_blockwise(_A.reshape(-1), _CODE, 16384))),
    Row("dqb_A_float", "dequantize_blockwise", _p(_A, _AMB, _CODE, 64, torch.float32), TypeError,
        r"\bA must have dtype"),
    Row("dqb_absmax_numel", "dequantize_blockwise", _p(_QB, _AMB[:1], _CODE, 64, torch.float32),
        RuntimeError, r"absmax must have 4"),
    Row("dqb_dtype_f64", "dequantize_blockwise", _p(_QB, _AMB, _CODE, 64, torch.float64),
        TypeError, r"dtype must be one of"),
    Row("dqb_absmax_other_device", "dequantize_blockwise",
        _p(_QB, _AMB.to(META), _CODE, 64, torch.float32), ValueError,
        r"absmax must be on the same device"),
    Row("dqb_blocksize_32768", "dequantize_blockwise",
        _p(_QB, _AMB[:1], _CODE, 32768, torch.float32), ValueError,
        r"blocksize must be one of \(32, .*, 16384\), got 32768"),
    Row("dqb_blocksize_8192_ok", "dequantize_blockwise",
        _p(_QB, _AMB[:1], _CODE, 8192, torch.bfloat16),
        check=_eq(lambda: (_CODE[_QB.long()] * _AMB[0]).to(torch.bfloat16))),
    Row("dqb_code_2d_ok", "dequantize_blockwise",
        _p(_QB, _AMB.reshape(2, 2), _CODE.reshape(16, 16), 64, torch.float32),
        check=_eq(lambda: ops.dequantize_blockwise(_QB, _AMB, _CODE, 64, torch.float32))),
    # ---- vectorwise_quant / double_quant -----------------------------------------------------
    Row("vq_threshold_neg", "vectorwise_quant", _p(_A, -1.0), ValueError, r"threshold"),
    Row("vq_threshold_nan", "vectorwise_quant", _p(_A, math.nan), ValueError, r"threshold.*nan"),
    Row("vq_threshold_inf", "vectorwise_quant", _p(_A, math.inf), ValueError, r"threshold.*inf"),
    Row("vq_A_int8", "vectorwise_quant", _p(_A.to(torch.int8)), TypeError, r"\bA must have"),
    Row("vq_A_0dim", "vectorwise_quant", _p(torch.tensor(2.0)), RuntimeError, r"\bA must have at"),
    Row("dq_threshold_neginf", "double_quant", _p(_A, -math.inf), ValueError, r"threshold"),
    Row("dq_A_bool", "double_quant", _p(_A > 0), TypeError, r"\bA must have"),
    Row("dq_noncontig_ok", "double_quant", _p(_noncontig(_A), 1.5),
        check=_eq(lambda: ops.double_quant(_A, 1.5))),
    Row("vq_zero_cols_ok", "vectorwise_quant", _p(torch.zeros(3, 0)),
        check=_shapes((3, 0), (3,), (0,))),
    Row("vq_one_element_ok", "vectorwise_quant", _p(torch.tensor([[-0.5]])),
        check=_eq((torch.tensor([[-127]], dtype=torch.int8), torch.tensor([0.5]),
                   torch.tensor([False])))),
    # ---- igemmlt -----------------------------------------------------------------------------
    Row("ig_A_float", "igemmlt", _p(_A, _CB), TypeError, r"\bA must have dtype"),
    Row("ig_B_int32", "igemmlt", _p(_CB, _CB.int()), TypeError, r"\bB must have dtype"),
    Row("ig_B_3d", "igemmlt", _p(_CB, _CB.reshape(2, 4, 64)), RuntimeError, r"\bB must be 2-D"),
    Row("ig_K_mismatch", "igemmlt", _p(_CB[:, :32], _CB), RuntimeError, r"B's K"),
    Row("ig_B_other_device", "igemmlt", _p(_CB, _CB.to(META)), ValueError,
        r"\bB must be on the same device"),
    Row("ig_minus128_ok", "igemmlt",
        _p(torch.full((2, 300), -128, dtype=torch.int8), torch.full((3, 300), -128,
                                                                    dtype=torch.int8)),
        check=_eq(torch.full((2, 3), 300 * 128 * 128, dtype=torch.int32))),
    Row("ig_K0_ok", "igemmlt",
        _p(torch.zeros(3, 0, dtype=torch.int8), torch.zeros(2, 0, dtype=torch.int8)),
        check=_eq(torch.zeros(3, 2, dtype=torch.int32))),
    Row("ig_noncontig_B_ok", "igemmlt", _p(_CB[:2], _noncontig(_CB)),
        check=_eq(lambda: ops.igemmlt(_CB[:2], _CB))),
    # ---- mm_dequant --------------------------------------------------------------------------
    Row("mmd_A_int8", "mm_dequant", _p(_C32.to(torch.int8), torch.ones(4), torch.ones(8)),
        TypeError, r"\bA must have dtype"),
    Row("mmd_row_stats_numel", "mm_dequant", _p(_C32, torch.ones(3), torch.ones(8)),
        RuntimeError, r"row_stats must have 4"),
    Row("mmd_col_stats_fp16", "mm_dequant", _p(_C32, torch.ones(4), torch.ones(8).half()),
        TypeError, r"col_stats must have dtype"),
    Row("mmd_bias_numel", "mm_dequant", _p(_C32, torch.ones(4), torch.ones(8), torch.ones(4)),
        RuntimeError, r"bias must have 8"),
    Row("mmd_dtype_int8", "mm_dequant", _p(_C32, torch.ones(4), torch.ones(8), None, torch.int8),
        TypeError, r"dtype must be one of"),
    Row("mmd_col_stats_other_device", "mm_dequant",
        _p(_C32, torch.ones(4), torch.ones(8, device=META)), ValueError,
        r"col_stats must be on the same device"),
    Row("mmd_bias_2d_ok", "mm_dequant",
        _p(_C32[:, :4], torch.ones(4), torch.ones(4), torch.arange(4.0).reshape(4, 1)),
        check=_eq(lambda: ops.mm_dequant(_C32[:, :4], torch.ones(4), torch.ones(4),
                                         torch.arange(4.0)))),
    # ---- int8_linear -------------------------------------------------------------------------
    Row("i8l_A_int8", "int8_linear", _p(_A.to(torch.int8), _CB, _SCB), TypeError,
        r"\bA must have dtype"),
    Row("i8l_SCB_missing", "int8_linear", _p(_A, _CB), ValueError, r"SCB .*required"),
    Row("i8l_SCB_with_float_B", "int8_linear", _p(_A, _W, _SCB), ValueError, r"SCB must be None"),
    Row("i8l_SCB_numel", "int8_linear", _p(_A, _CB, _SCB[:4]), RuntimeError, r"SCB must have 8"),
    Row("i8l_bias_2d", "int8_linear", _p(_A, _CB, _SCB, torch.ones(8, 1)), RuntimeError,
        r"bias must be 1-D"),
    Row("i8l_threshold_nan", "int8_linear", _p(_A, _CB, _SCB, None, math.nan), ValueError,
        r"threshold"),
    Row("i8l_B_other_device", "int8_linear", _p(_A, _CB.to(META), _SCB), ValueError,
        r"\bB must be on the same device"),
    Row("i8l_K_mismatch", "int8_linear", _p(_A[:, :32], _CB, _SCB), RuntimeError,
        r"in_features = 64"),
    Row("i8l_noncontig_A_ok", "int8_linear", _p(_noncontig(_A), _CB, _SCB, None, 1.0),
        check=_eq(lambda: ops.int8_linear(_A, _CB, _SCB, None, 1.0))),
    # ---- transform ---------------------------------------------------------------------------
    Row("tr_A_int32", "transform", _p(_CB.int(), "row", "col32", [8, 64]), TypeError,
        r"\bA must have dtype in \[torch.int8\], got torch.int32"),
    Row("tr_from_order", "transform", _p(_CB, "col64", "row", [8, 64]), ValueError,
        r"from_order must be one of"),
    Row("tr_to_order", "transform", _p(_CB, "row", "COL32", [8, 64]), ValueError,
        r"to_order must be one of"),
    Row("tr_shape_3", "transform", _p(_CB, "row", "col32", [8, 64, 1]), ValueError,
        r"shape must be \[rows, cols\]"),
    Row("tr_row_shape_mismatch", "transform", _p(_CB, "row", "col32", [64, 8]), RuntimeError,
        r"\bA \(row-major\) must have shape"),
    Row("tr_col32_numel", "transform", _p(_CB.reshape(-1)[:100], "col32", "row", [8, 64]),
        RuntimeError, r"\bA must have 512 elements"),
    Row("tr_noncontig_ok", "transform", _p(_noncontig(_CB), "row", "col_turing", [8, 64]),
        check=_eq(lambda: ops.transform(_CB, "row", "col_turing", [8, 64]))),
    Row("tr_1x1_ok", "transform", _p(torch.tensor([[5]], dtype=torch.int8), "row", "col_ampere",
                                     [1, 1]),
        check=lambda out: (out.shape == (1024,) and out[0] == 5 and out[1:].eq(0).all())
        or pytest.fail(str(out))),
]


# ---- layers and state dicts (eager only) ----------------------------------------------------
def _lin4(**kw):
    torch.manual_seed(1)
    return Linear4bit.from_float(nn.Linear(64, 8), **kw)


def _lin8():
    torch.manual_seed(2)
    return Linear8bitLt.from_float(nn.Linear(64, 8), threshold=6.0)


def _sd4(**kw):
    return dict(_lin4(**kw).state_dict())


def _load4(mutate, fresh=False, **kw):
    sd = _sd4(**kw)
    mutate(sd)
    layer = Linear4bit(64, 8, quant_type="nf4", **kw) if fresh else _lin4(**kw)
    layer.load_state_dict(sd)


def _qs(mutate):
    qs = {k[len("weight."):]: v for k, v in _sd4().items() if k.startswith("weight.")}
    mutate(qs)
    return Fq.QuantState.from_dict(qs, device="cpu")


def _packed_key(d):
    return next(k for k in d if "quant_state" in k)


def _json_edit(**changes):
    def mutate(qs):
        key = _packed_key(qs)
        fields = Fq.unpack_tensor_to_dict(qs[key])
        fields.update(changes)
        for k, v in list(fields.items()):
            if v is _DROP:
                del fields[k]
        qs[key] = Fq.pack_dict_to_tensor(fields)
    return mutate


_DROP = object()


def _set(key, value):
    def mutate(d):
        d[key] = value(d[key]) if callable(value) else value
    return mutate


def _drop(key):
    return lambda d: d.pop(key)


def _load8(mutate):
    sd = dict(_lin8().state_dict())
    mutate(sd)
    _lin8().load_state_dict(sd)


def _roundtrip4():
    a = _lin4(compress_statistics=True, quant_storage=torch.bfloat16)
    b = Linear4bit(64, 8, compress_statistics=True, quant_type="nf4",
                   quant_storage=torch.bfloat16)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(a(x), b(x))


LAYER_ROWS: list[Row] = [
    Row("Linear4bit_quant_type", None, call=lambda: Linear4bit(64, 8, quant_type="int4").to("cpu"),
        exc=ValueError, match=r"quant_type"),
    Row("Linear4bit_blocksize", None, call=lambda: Linear4bit(64, 8, blocksize=48).to("cpu"),
        exc=ValueError, match=r"blocksize"),
    Row("Linear4bit_quant_storage_bool", None,
        call=lambda: Linear4bit(64, 8, quant_storage=torch.bool).to("cpu"), exc=TypeError,
        match=r"quant_storage"),
    Row("Linear4bit_forward_K", None, call=lambda: _lin4()(torch.randn(2, 32)), exc=RuntimeError,
        match=r"shapeB\[1\]"),
    Row("Linear4bit_forward_int", None,
        call=lambda: _lin4()(torch.ones(2, 64, dtype=torch.int64)), exc=TypeError,
        match=r"\bA must have dtype"),
    Row("Linear4bit_K_not_multiple_ok", None,
        call=lambda: Linear4bit.from_float(nn.Linear(100, 3), blocksize=64)(torch.randn(2, 100)),
        check=lambda y: y.shape == (2, 3) and bool(torch.isfinite(y).all()) or pytest.fail("")),
    Row("Linear8bitLt_threshold_neg", None, call=lambda: Linear8bitLt(64, 8, threshold=-1.0),
        exc=ValueError, match=r"threshold"),
    Row("Linear8bitLt_threshold_nan", None, call=lambda: Linear8bitLt(64, 8, threshold=math.nan),
        exc=ValueError, match=r"threshold"),
    Row("Linear8bitLt_forward_K", None, call=lambda: _lin8()(torch.randn(2, 63)),
        exc=RuntimeError, match=r"in_features"),
    Row("Embedding4bit_index_out_of_range", None,
        call=lambda: Embedding4bit.from_float(nn.Embedding(10, 64))(torch.tensor([3, 10])),
        exc=RuntimeError, match=r"num_embeddings=10"),
    Row("Embedding4bit_float_index", None,
        call=lambda: Embedding4bit.from_float(nn.Embedding(10, 64))(torch.tensor([1.0])),
        exc=TypeError, match=r"input must be int32 or int64"),
    Row("Embedding8bit_negative_index", None,
        call=lambda: Embedding8bit.from_float(nn.Embedding(10, 64))(torch.tensor([-1])),
        exc=RuntimeError, match=r"num_embeddings=10"),
    # QuantState.from_dict: corrupted dicts
    Row("qs_missing_absmax", None, call=lambda: _qs(_drop("absmax")), exc=ValueError,
        match=r"'absmax'"),
    Row("qs_missing_quant_map", None, call=lambda: _qs(_drop("quant_map")), exc=ValueError,
        match=r"'quant_map'"),
    Row("qs_missing_packed_json", None, call=lambda: _qs(lambda d: d.pop(_packed_key(d))),
        exc=ValueError, match=r"quant_state"),
    Row("qs_malformed_json", None,
        call=lambda: _qs(lambda d: d.__setitem__(_packed_key(d), torch.tensor(
            list(b'{"quant_type": "nf4", '), dtype=torch.uint8))),
        exc=ValueError, match=r"not valid UTF-8 JSON"),
    Row("qs_json_not_object", None,
        call=lambda: _qs(lambda d: d.__setitem__(_packed_key(d), torch.tensor(
            list(json.dumps([1, 2]).encode()), dtype=torch.uint8))),
        exc=ValueError, match=r"JSON object"),
    Row("qs_json_wrong_dtype_tensor", None, call=lambda: _qs(
        lambda d: d.__setitem__(_packed_key(d), d[_packed_key(d)].float())),
        exc=ValueError, match=r"uint8"),
    Row("qs_bad_quant_type", None, call=lambda: _qs(_json_edit(quant_type="int4")),
        exc=ValueError, match=r"'quant_type'"),
    Row("qs_bad_blocksize", None, call=lambda: _qs(_json_edit(blocksize=100)),
        exc=ValueError, match=r"'blocksize'"),
    Row("qs_bad_shape", None, call=lambda: _qs(_json_edit(shape="8x64")), exc=ValueError,
        match=r"'shape'"),
    Row("qs_missing_dtype", None, call=lambda: _qs(_json_edit(dtype=_DROP)), exc=ValueError,
        match=r"'dtype'"),
    Row("qs_bad_dtype_name", None, call=lambda: _qs(_json_edit(dtype="float128")),
        exc=ValueError, match=r"dtype"),
    Row("qs_unknown_key", None, call=lambda: _qs(_set("bogus", torch.zeros(1))), exc=ValueError,
        match=r"bogus"),
    Row("qs_absmax_not_tensor", None, call=lambda: _qs(_set("absmax", [1.0, 2.0])),
        exc=ValueError, match=r"'absmax' must be a tensor"),
    # load_state_dict: truncated / corrupted
    Row("sd4_missing_weight", None, call=lambda: _load4(_drop("weight")), exc=RuntimeError,
        match=r"Missing key.*weight"),
    Row("sd4_absmax_wrong_shape", None, call=lambda: _load4(_set("weight.absmax",
                                                                 lambda t: t[:-1])),
        exc=RuntimeError, match=r"absmax"),
    Row("sd4_absmax_wrong_dtype", None,
        call=lambda: _load4(_set("weight.absmax", lambda t: t.half()), fresh=True), exc=RuntimeError,
        match=r"absmax"),
    Row("sd4_weight_truncated", None, call=lambda: _load4(_set("weight", lambda t: t[:-3])),
        exc=RuntimeError, match=r"weight"),
    Row("sd4_nested_offset_missing", None,
        call=lambda: _load4(_json_edit(nested_offset=_DROP), compress_statistics=True),
        exc=RuntimeError, match=r"nested_offset"),
    Row("sd4_malformed_json", None,
        call=lambda: _load4(lambda d: d.__setitem__(_packed_key(d), torch.tensor(
            [0xFF, 0xFE], dtype=torch.uint8))),
        exc=RuntimeError, match=r"JSON"),
    Row("sd4_roundtrip_nested_bf16_ok", None, call=_roundtrip4, check=lambda _: None),
    Row("sd8_missing_weight", None, call=lambda: _load8(_drop("weight")), exc=RuntimeError,
        match=r"Missing key.*weight"),
    Row("sd8_SCB_numel", None, call=lambda: _load8(_set("SCB", lambda t: t[:3])),
        exc=RuntimeError, match=r"SCB"),
    Row("sd8_weight_format", None, call=lambda: _load8(_set("weight_format", torch.tensor(7))),
        exc=RuntimeError, match=r"weight_format"),
    Row("sd8_CB_float", None, call=lambda: _load8(_set("weight", lambda t: t.half())),
        exc=RuntimeError, match=r"CB must be int8"),
    Row("sd8_CB_wrong_shape", None, call=lambda: _load8(_set("weight", lambda t: t[:, :32])),
        exc=RuntimeError, match=r"CB must be int8 of shape"),
]

TABLE = OP_ROWS + LAYER_ROWS


def _check_exc(e: BaseException, row: Row, compiled: bool) -> None:
    text = str(e)
    if compiled and isinstance(e, torch._dynamo.exc.TorchDynamoException):
        # Dynamo wraps the fake kernel's exception: "... got ValueError('absmax must ...')".
        assert row.exc.__name__ in text, f"{row.name}: expected {row.exc.__name__}, got {text}"
    else:
        assert isinstance(e, row.exc), f"{row.name}: expected {row.exc.__name__}, got {e!r}"
    assert re.search(row.match, text, re.S), f"{row.name}: {row.match!r} not in {text!r}"


def _to_device(t: Any, device: str) -> Any:
    """A CPU tensor moved to ``device`` with the same sizes, strides and storage offset (the
    whole storage is copied, so non-contiguous and offset views stay such); anything else (a
    tensor on meta, "another device"; non-tensors) unchanged."""
    if isinstance(t, list):  # the Tensor[] / Tensor?[] arguments of linear_4bit_merged
        return [_to_device(x, device) for x in t]
    if device == "cpu" or not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return t
    n = t.untyped_storage().nbytes() // t.element_size()
    base = torch.as_strided(t, (n,), (1,), 0).to(device)
    return base.as_strided(t.size(), t.stride(), t.storage_offset())


def _to_cpu(out: Any) -> Any:
    if isinstance(out, (tuple, list)):
        return type(out)(_to_cpu(o) for o in out)
    return out.cpu() if isinstance(out, torch.Tensor) else out


def _run(row: Row, compiled: bool, device: str = "cpu"):
    if row.op is None:
        return row.call()
    op = getattr(ops, row.op)
    args = tuple(_to_device(a, device) for a in row.args)
    kwargs = {k: _to_device(v, device) for k, v in row.kwargs.items()}
    if not compiled:
        return _to_cpu(op(*args, **kwargs))
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: op(*a, **kwargs), fullgraph=True, backend="aot_eager")
    return _to_cpu(fn(*args))


def _ids(rows):
    return [r.name for r in rows]


def test_table_size():
    names = _ids(TABLE)
    assert len(set(names)) == len(names), "duplicate row names"
    print(f"\nbad-input table: {len(TABLE)} rows ({len(OP_ROWS)} op rows run eager + compiled, "
          f"{len(LAYER_ROWS)} layer/state-dict rows eager): {len(OP_ROWS) * 2 + len(LAYER_ROWS)}"
          " runs")
    assert len(TABLE) >= 70
    assert {r.op for r in OP_ROWS} == set(__import__("opsq._schemas").
                                          _schemas.SCHEMAS), "every op has rows"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("row", OP_ROWS, ids=_ids(OP_ROWS))
def test_op_row(row: Row, compiled: bool, device: str):
    if row.exc is OK:
        out = _run(row, compiled, device)
        row.check(out)
        return
    with pytest.raises(Exception) as info:
        _run(row, compiled, device)
    _check_exc(info.value, row, compiled)


@pytest.mark.parametrize("row", LAYER_ROWS, ids=_ids(LAYER_ROWS))
def test_layer_row(row: Row):
    if row.exc is OK:
        row.check(row.call())
        return
    with pytest.raises(Exception) as info:
        _run(row, False)
    _check_exc(info.value, row, False)


def test_to_device_keeps_strides_and_offsets():
    """The device move of the op rows keeps what the rows test: non-contiguous strides and
    storage offsets ("meta" checks the layout alone; CUDA, where present, the values too)."""
    base = torch.randn(6, 8)
    devices = ("meta",) + (("cuda",) if torch.cuda.is_available() else ())
    for t in (base, _noncontig(base), base[1:, 2:], _offset_view(base.reshape(-1)), base[0, 0]):
        for dev in devices:
            moved = _to_device(t, dev)
            assert moved.device.type == dev
            assert moved.shape == t.shape and moved.stride() == t.stride()
            assert moved.storage_offset() == t.storage_offset()
            assert moved.is_contiguous() == t.is_contiguous()
            if dev == "cuda":
                assert torch.equal(moved.cpu(), t)


def test_passing_checks_skip_torch_check(monkeypatch):
    """The validations of opsq/meta return at once when they pass in eager mode (a plain True;
    torch._check* costs ~1.2 us even then, and a layer call runs ~36 checks): a quantized layer
    call on valid input never reaches torch._check_with, while a failing check still raises
    through it, with its message."""
    calls = []
    real = torch._check_with

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_check_with", counting)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    q4 = Linear4bit.from_float(lin, quant_type="nf4", compress_statistics=True).to("cpu")
    q8 = Linear8bitLt.from_float(nn.Linear(64, 32).half(), threshold=6.0,
                                 has_fp16_weights=False).to("cpu")
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        q4(x)
        q8(x.half())
    assert calls == []
    with pytest.raises(ValueError, match="blocksize must be one of"):
        torch.ops.opsq.quantize_4bit(x, 48, "nf4", torch.uint8)
    assert calls == [ValueError]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_layers_reject_what_a_cast_would_hide(device, compiled):
    """Linear4bit with a compute_dtype casts its input in and the output back: an int, bool or
    complex input would come back truncated; quantized tables indexed from another device
    would read garbage. Both raise, naming the input, in eager and under compile."""
    torch._dynamo.reset()
    lin = Linear4bit(64, 16, compute_dtype=torch.float32).to(device)
    emb = Embedding8bit(10, 64).to(device)

    def run(fn, *a):
        f = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn
        return f(*a)
    for x in (torch.ones(2, 64, dtype=torch.int64, device=device),
              torch.ones(2, 64, dtype=torch.bool, device=device)):
        with pytest.raises((TypeError, torch._dynamo.exc.Unsupported), match="floating-point"):
            run(lin, x)
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="table's device"):
        run(emb, torch.tensor([1, 2], device="meta"))
    torch._dynamo.reset()
