"""Determinism (issue 8): every op, run twice on the same inputs, returns identical bytes."""
from __future__ import annotations

import pytest
import torch

from opsq._constants import create_dynamic_map
from opsq._schemas import SCHEMAS

ops = torch.ops.opsq


def _cases(device):
    g = torch.Generator().manual_seed(0)
    A = (torch.randn(6, 200, generator=g) * 2).to(device)
    A[0, 3] = 9.0  # an outlier column for threshold > 0
    code = create_dynamic_map().to(device)
    q, am = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    nq, nam = ops.quantize_blockwise(am - am.mean(), code, 256)
    nested = dict(nested_absmax=nam, nested_code=code, offset=am.mean().reshape(1))
    W = torch.randn(5, 200, generator=g).to(device)
    qw, amw = ops.quantize_4bit(W, 64, "fp4", torch.bfloat16)
    CB, SCB, _ = ops.vectorwise_quant(W)
    CA, SCA, _ = ops.vectorwise_quant(A)
    bias = torch.randn(5, generator=g).to(device)
    return {
        "quantize_4bit": lambda: ops.quantize_4bit(A, 64, "fp4", torch.int32),
        "dequantize_4bit": lambda: ops.dequantize_4bit(q, nq, 64, "nf4", [6, 200],
                                                       torch.bfloat16, **nested),
        "gemv_4bit": lambda: ops.gemv_4bit(A[:1].half(), qw, [5, 200], amw, 64, "fp4", bias),
        "linear_4bit": lambda: ops.linear_4bit(A, qw, [5, 200], amw, 64, "fp4", bias),
        "linear_4bit_merged": lambda: ops.linear_4bit_merged(
            A[:, :192], [q[:288], q[:96]], [3, 1], [am[:9], am[:3]], 64, "nf4", [None, bias[:1]],
            [None, None], [None, None], [None, None]),
        "quantize_blockwise": lambda: ops.quantize_blockwise(A, code, 128),
        "dequantize_blockwise": lambda: ops.dequantize_blockwise(nq, nam, code, 256,
                                                                 torch.float16),
        "vectorwise_quant": lambda: ops.vectorwise_quant(A, 3.0),
        "double_quant": lambda: ops.double_quant(A, 3.0),
        "igemmlt": lambda: ops.igemmlt(CA, CB),
        "mm_dequant": lambda: ops.mm_dequant(ops.igemmlt(CA, CB), SCA, SCB, bias),
        "int8_linear": lambda: ops.int8_linear(A, CB, SCB, bias, 3.0),
        "transform": lambda: ops.transform(CB, "row", "col_ampere", [5, 200]),
    }


def _bytes(out):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [bytes(t.detach().cpu().contiguous().view(-1).view(torch.uint8).tolist())
            for t in outs]


def _check(device):
    cases = _cases(device)
    assert set(cases) == set(SCHEMAS)
    for name, fn in cases.items():
        assert _bytes(fn()) == _bytes(fn()), f"{name} is not deterministic on {device}"


def test_every_op_deterministic_cpu():
    _check("cpu")


@pytest.mark.cuda
def test_every_op_deterministic_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check("cuda")
