"""Reliability of the CUDA kernels: several streams and threads at once, determinism, NaN/Inf
containment, fp16 overflow; every op on fresh random data compared with its own serial run or
with the reference kernels."""
import threading

import pytest
import torch

import opsq  # noqa: F401
from opsq._constants import create_dynamic_map

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ops = torch.ops.opsq


def _calls(seed: int):
    """One call of every op on fresh data (all inputs made up front, on the current device)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rn(*s, dtype=torch.bfloat16):
        return (torch.randn(*s, generator=g, device="cuda") * 3).to(dtype)

    W = rn(96, 256)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    code = create_dynamic_map().cuda()
    q8, a8 = ops.quantize_blockwise(rn(1000), code, 256)
    CB, SCB, _ = ops.vectorwise_quant(W, 0.0)
    CA = torch.randint(-127, 128, (40, 256), generator=g, device="cuda", dtype=torch.int8)
    C32 = ops.igemmlt(CA, CB)
    rows = torch.randint(-128, 128, (40, 72), generator=g, device="cuda", dtype=torch.int8)
    x = rn(3, 256)
    x40 = rn(40, 256)
    return [
        lambda: ops.quantize_4bit(W, 64, "fp4", torch.uint8),
        lambda: ops.dequantize_4bit(packed, absmax, 64, "nf4", [96, 256], torch.bfloat16),
        lambda: ops.gemv_4bit(x[:1], packed, [96, 256], absmax, 64, "nf4"),
        lambda: ops.linear_4bit(x40, packed, [96, 256], absmax, 64, "nf4"),
        lambda: ops.quantize_blockwise(W, code, 64),
        lambda: ops.dequantize_blockwise(q8, a8, code, 256, torch.float32),
        lambda: ops.vectorwise_quant(W, 4.0),
        lambda: ops.double_quant(W, 4.0),
        lambda: ops.igemmlt(CA, CB),
        lambda: ops.mm_dequant(C32, SCB[:40].abs() + 1, SCB, None, torch.float16),
        lambda: ops.int8_linear(x, CB, SCB, None, 4.0),
        lambda: ops.transform(rows, "row", "col_ampere", [40, 72]),
    ]


def _flat(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach().clone() for o in outs]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_op_deterministic_on_cuda():
    for f in _calls(1):
        first, second = _flat(f()), _flat(f())
        assert _equal(first, second)


def test_ops_on_two_streams_at_once_match_serial():
    calls_a, calls_b = _calls(2), _calls(3)
    serial_a = [_flat(f()) for f in calls_a]
    serial_b = [_flat(f()) for f in calls_b]
    torch.cuda.synchronize()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    res_a, res_b = [], []
    for _ in range(3):
        with torch.cuda.stream(s1):
            res_a = [_flat(f()) for f in calls_a]
        with torch.cuda.stream(s2):
            res_b = [_flat(f()) for f in calls_b]
    torch.cuda.synchronize()
    for want, got in zip(serial_a + serial_b, res_a + res_b):
        assert _equal(want, got)


def test_ops_from_several_threads_match_serial():
    seeds = [10, 11, 12, 13]
    calls = {s: _calls(s) for s in seeds}
    serial = {s: [_flat(f()) for f in calls[s]] for s in seeds}
    torch.cuda.synchronize()
    results, errors = {}, []

    def work(s):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                out = [[_flat(f()) for f in calls[s]] for _ in range(5)][-1]
            stream.synchronize()
            results[s] = out
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for s in seeds:
        for want, got in zip(serial[s], results[s]):
            assert _equal(want, got)


def test_nan_inf_contained_to_their_block_on_cuda():
    A = torch.randn(8, 256, device="cuda")
    A[2, 5] = float("nan")
    A[5, 100] = float("inf")
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    out = ops.dequantize_4bit(packed, absmax, 64, "nf4", [8, 256], torch.float32)
    blocks_bad = torch.zeros(8, 4, dtype=torch.bool, device="cuda")
    blocks_bad[2, 0] = blocks_bad[5, 1] = True
    finite = torch.isfinite(out).view(8, 4, 64).all(-1)
    assert finite[~blocks_bad].all()
    ref_p, ref_a = ops.quantize_4bit(A.cpu(), 64, "nf4", torch.uint8)
    good = ~blocks_bad.flatten().cpu()
    assert torch.equal(absmax.cpu()[good], ref_a[good])
    CA, SCA, _ = ops.vectorwise_quant(A.half(), 0.0)
    ok_rows = torch.ones(8, dtype=torch.bool)
    ok_rows[[2, 5]] = False
    ref_CA, ref_SCA, _ = ops.vectorwise_quant(A.half().cpu(), 0.0)
    assert torch.equal(CA.cpu()[ok_rows], ref_CA[ok_rows])
    assert torch.equal(SCA.cpu()[ok_rows], ref_SCA[ok_rows])


def test_mm_dequant_fp16_overflow_matches_reference():
    C = torch.full((2, 3), 2**30, dtype=torch.int32)
    rs, cs = torch.full((2,), 100.0), torch.full((3,), 100.0)
    ref = ops.mm_dequant(C, rs, cs, None, torch.float16)
    out = ops.mm_dequant(C.cuda(), rs.cuda(), cs.cuda(), None, torch.float16)
    assert torch.equal(out.cpu(), ref)
    assert torch.isinf(ref).all()
