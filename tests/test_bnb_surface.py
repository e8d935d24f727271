"""bitsandbytes 0.4x-0.50 call surface of ``opsq.functional`` / ``opsq.utils`` / ``opsq.autograd``:
the code maps (against float64 derivations and published tables), int8 dequantization, device
helpers, 8-bit ``QuantState`` serialisation, ``matmul_4bit`` with a [K, N] weight, and the
helpers bitsandbytes code calls by name."""
import ctypes
import inspect
import json
import math
import statistics
import sys
import warnings

import pytest
import torch
from torch import nn

import opsq  # noqa: F401
from opsq import functional as Fq
from opsq import utils as Ut
from opsq._constants import FP4_CODE, NF4_CODE, code_table
from opsq._constants import create_dynamic_map as constants_dynamic_map
from opsq._constants import dynamic_map_on
from opsq.autograd import matmul_4bit
from opsq.nn import Linear4bit, Params4bit
from opsq.outlier_tools import OutlierTracer
from opsq.testing import DEVICES

FLOATS = [torch.float16, torch.bfloat16, torch.float32]


def dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gen(device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(torch.seed() % 2**31)


# =============================================================================================
# signatures: every bitsandbytes 0.50 parameter, in order, with its default
# =============================================================================================
_EMPTY = inspect.Parameter.empty
BNB_SIGNATURES = [
    (Fq.create_linear_map, [("signed", True), ("total_bits", 8), ("add_zero", True)]),
    (Fq.create_normal_map, [("offset", 0.9677083), ("use_extra_value", True)]),
    (Fq.create_fp8_map, [("signed", True), ("exponent_bits", 5), ("precision_bits", 2),
                         ("total_bits", 8)]),
    (Fq.create_dynamic_map, [("signed", True), ("max_exponent_bits", 7), ("total_bits", 8)]),
    (Fq.get_4bit_type, [("typename", _EMPTY), ("device", None), ("blocksize", 64)]),
    (Fq.int8_vectorwise_dequant, [("A", _EMPTY), ("stats", _EMPTY)]),
    (Fq.is_on_gpu, [("tensors", _EMPTY)]),
    (Fq.get_ptr, [("A", _EMPTY)]),
    (Fq.fix_4bit_weight_quant_state_from_module, [("module", _EMPTY)]),
    (Ut.outlier_hook, [("module", _EMPTY), ("input", _EMPTY)]),
    (Ut.execute_and_return, [("command_string", _EMPTY)]),
    (matmul_4bit, [("A", _EMPTY), ("B", _EMPTY), ("quant_state", _EMPTY), ("out", None),
                   ("bias", None)]),
    (Fq.quantize_4bit, [("A", _EMPTY), ("absmax", None), ("out", None), ("blocksize", None),
                        ("compress_statistics", False), ("quant_type", "fp4"),
                        ("quant_storage", torch.uint8)]),
    (Fq.quantize_nf4, [("A", _EMPTY), ("absmax", None), ("out", None), ("blocksize", None),
                       ("compress_statistics", False), ("quant_storage", torch.uint8)]),
    (Fq.quantize_fp4, [("A", _EMPTY), ("absmax", None), ("out", None), ("blocksize", None),
                       ("compress_statistics", False), ("quant_storage", torch.uint8)]),
    (Fq.dequantize_4bit, [("A", _EMPTY), ("quant_state", None), ("absmax", None),
                          ("out", None), ("blocksize", None), ("quant_type", "fp4")]),
    (Fq.dequantize_nf4, [("A", _EMPTY), ("quant_state", None), ("absmax", None),
                         ("out", None), ("blocksize", None)]),
    (Fq.dequantize_fp4, [("A", _EMPTY), ("quant_state", None), ("absmax", None),
                         ("out", None), ("blocksize", None)]),
]


def test_4bit_blocksize_none_means_64():
    """bitsandbytes' 4-bit functions default to blocksize=None and read it as 64; an explicit
    None raised a schema error here."""
    A = torch.randn(5, 96)
    want, state = Fq.quantize_4bit(A, blocksize=64, quant_type="nf4")
    for quantize in (lambda: Fq.quantize_4bit(A, blocksize=None, quant_type="nf4"),
                     lambda: Fq.quantize_nf4(A, blocksize=None)):
        got, s = quantize()
        assert s.blocksize == 64 and torch.equal(got, want) and torch.equal(s.absmax, state.absmax)
    out = torch.empty(5, 96)
    by_absmax = Fq.dequantize_4bit(want, absmax=state.absmax, out=out, blocksize=None,
                                   quant_type="nf4")
    assert torch.equal(by_absmax, Fq.dequantize_4bit(want, state))
    assert torch.equal(Fq.dequantize_nf4(want, state, blocksize=None), by_absmax)


@pytest.mark.parametrize("fn,expected", BNB_SIGNATURES, ids=[f.__name__ for f, _ in
                                                                BNB_SIGNATURES])
def test_signature_covers_bitsandbytes(fn, expected):
    params = list(inspect.signature(fn).parameters.values())
    got = [(p.name, p.default) for p in params[:len(expected)]]
    assert got == expected
    for p in params[len(expected):]:  # opsq's extras never make an old call ambiguous
        assert p.default is not _EMPTY or p.kind == p.KEYWORD_ONLY, p.name


def test_names_are_exported():
    for name in ("create_linear_map", "create_normal_map", "create_fp8_map",
                 "create_dynamic_map", "int8_vectorwise_dequant", "is_on_gpu", "get_ptr",
                 "fix_4bit_weight_quant_state_from_module", "get_4bit_type"):
        assert name in Fq.__all__ and callable(getattr(Fq, name))
    assert "outlier_hook" in Ut.__all__ and "execute_and_return" in Ut.__all__


# =============================================================================================
# create_linear_map
# =============================================================================================
@pytest.mark.parametrize("add_zero", [True, False], ids=["zero", "nozero"])
@pytest.mark.parametrize("total_bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_create_linear_map_against_float64(signed, total_bits, add_zero):
    m = Fq.create_linear_map(signed, total_bits, add_zero)
    assert m.shape == (256,) and m.dtype == torch.float32 and m.device.type == "cpu"
    count = 2 ** total_bits - (1 if signed and (add_zero or total_bits < 8) else 0)
    lo = -1.0 if signed else 0.0
    ref = torch.tensor([lo + (1.0 - lo) * j / (count - 1) if count > 1 else lo
                        for j in range(count)], dtype=torch.float64)
    half = count // 2
    grid = torch.cat([m[:half], m[half + 256 - count:]]).double()
    torch.testing.assert_close(grid, ref, rtol=0, atol=2 ** -23)
    assert grid[0] == lo and (count == 1 or grid[-1] == 1.0)  # the end points exactly
    assert (m[half:half + 256 - count] == 0).all()  # the padding sits after the first half
    if signed and count > 1:  # sorted, up to the fp32 linspace midpoint (a few ulp off 0)
        assert (m.diff() >= -1e-7).all()
        assert (m == 0).any() == (count < 256)  # a code for zero unless 256 grid points
    elif not signed:
        assert m.min() == 0


def test_create_linear_map_known_layout():
    m = Fq.create_linear_map()  # signed 8-bit with a zero: 255 linspace values + one 0
    assert m[127] == 0 and m[0] == -1 and m[255] == 1
    assert (m.diff() >= 0).all()
    full = Fq.create_linear_map(signed=True, add_zero=False)  # 256 values, no zero
    assert not (full == 0).any()
    torch.testing.assert_close(full.double(), torch.linspace(-1, 1, 256, dtype=torch.float64),
                               rtol=0, atol=2 ** -23)


@pytest.mark.parametrize("total_bits", [0, 9, 2.0, True, "8"])
def test_create_linear_map_bad_total_bits(total_bits):
    with pytest.raises(ValueError, match="total_bits"):
        Fq.create_linear_map(total_bits=total_bits)


# =============================================================================================
# create_normal_map
# =============================================================================================
def _normal_oracle(offset: float, use_extra_value: bool) -> torch.Tensor:
    """float64 quantiles (stdlib ``NormalDist``) at the fp32 points of the construction."""
    def points(n):
        return torch.linspace(offset, 0.5, n + 1, dtype=torch.float32)[:-1].tolist()
    inv = statistics.NormalDist().inv_cdf
    pos = [inv(p) for p in points(8 if use_extra_value else 7)]
    neg = [-inv(p) for p in points(7)]
    top = max(pos)
    return torch.tensor(sorted(neg + pos), dtype=torch.float64) / top


def test_create_normal_map_default_is_the_nf4_table():
    m = Fq.create_normal_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    nf4 = torch.cat([m[:8], m[-8:]])
    assert torch.equal(nf4, torch.tensor(NF4_CODE, dtype=torch.float32))
    assert torch.equal(nf4, Fq.get_4bit_type("nf4"))
    assert (m[8:-8] == 0).all() and m[7] == 0


@pytest.mark.parametrize("use_extra_value", [True, False], ids=["asym", "sym"])
def test_create_normal_map_against_float64(use_extra_value):
    g = _gen()
    for offset in [0.9677083] + (0.55 + 0.449 * torch.rand(4, generator=g,
                                                            dtype=torch.float64)).tolist():
        m = Fq.create_normal_map(offset, use_extra_value)
        assert m.shape == (256,) and m.dtype == torch.float32
        assert (m.diff() >= 0).all() and m.max() == 1.0
        nonzero = m[m != 0]
        assert nonzero.numel() == (15 if use_extra_value else 14)
        ref = _normal_oracle(offset, use_extra_value)
        levels = nonzero.double()
        torch.testing.assert_close(levels, ref[ref != 0], rtol=4e-7, atol=1e-7)
        if not use_extra_value:
            assert torch.equal(levels, -levels.flip(0))  # symmetric
        assert m.min() == -1.0  # the outermost negative quantile mirrors the largest


def test_create_normal_map_matches_scipy_bit_for_bit():
    stats = pytest.importorskip("scipy.stats")  # bitsandbytes computes the quantiles with scipy
    for offset in (0.9677083, 0.99, 0.8):
        for extra in (True, False):
            def q(n):
                p = torch.linspace(offset, 0.5, n + 1, dtype=torch.float32)[:-1].numpy()
                return torch.from_numpy(stats.norm.ppf(p)).float()
            pos, neg = q(8 if extra else 7), -q(7)
            ref = torch.cat([pos, neg, pos.new_zeros(256 - pos.numel() - neg.numel())])
            ref = ref.sort().values
            ref = ref / ref.max()
            assert torch.equal(Fq.create_normal_map(offset, extra), ref), (offset, extra)


@pytest.mark.parametrize("offset", [0.5, 1.0, 0.3, 1.2, float("nan"), "0.9", True])
def test_create_normal_map_bad_offset(offset):
    with pytest.raises(ValueError, match="offset"):
        Fq.create_normal_map(offset)


# =============================================================================================
# create_fp8_map
# =============================================================================================
def _fp8_oracle(signed, e, p, total):
    """Decode every bit pattern in float64: sign | exponent field | mantissa."""
    bias = 2 ** (e - 1)
    vals = []
    for code in range(2 ** total):
        mant = code & (2 ** p - 1)
        field = (code >> p) & (2 ** e - 1)
        neg = signed and bool(code >> (e + p))
        if field == 0:
            v = math.ldexp(mant, -p - bias)
        else:
            v = math.ldexp(2 ** p + mant, bias + 1 - field - p)
        vals.append(-v if neg else v)
    vals += [0.0] * (256 - len(vals))
    t = torch.tensor(sorted(vals), dtype=torch.float64)
    return t / t.max()


FP8_LAYOUTS = [(True, 5, 2, 8), (True, 4, 3, 8), (True, 2, 1, 4), (True, 3, 0, 4),
               (False, 4, 4, 8), (False, 2, 2, 4), (True, 1, 1, 3), (True, 6, 1, 8)]


@pytest.mark.parametrize("signed,e,p,total", FP8_LAYOUTS,
                         ids=[f"{'s' if s else 'u'}e{e}m{p}" for s, e, p, _ in FP8_LAYOUTS])
def test_create_fp8_map_against_float64(signed, e, p, total):
    m = Fq.create_fp8_map(signed, e, p, total)
    assert m.shape == (256,) and m.dtype == torch.float32
    assert (m.diff() >= 0).all() and m.max() == 1.0
    torch.testing.assert_close(m.double(), _fp8_oracle(signed, e, p, total), rtol=2 ** -24,
                               atol=0)


def test_create_fp8_map_known_values():
    m = Fq.create_fp8_map()  # E5M2, bias 16, largest 1.75 * 2**16
    assert m[:4].tolist() == [-1.0] + [float(torch.tensor(v / 1.75)) for v in (-1.5, -1.25, -1.0)]
    smallest = m[m > 0].min().item()
    assert smallest == float(torch.tensor(0.25 * 2.0 ** -16 / (1.75 * 2.0 ** 16)))
    # E2M1: FP4's levels except the subnormal (1/48 here, 0.0625/12 = 1/192 in FP4)
    fp4 = Fq.create_fp8_map(True, 2, 1, 4)
    levels = set(fp4[fp4 > 0].tolist())
    assert min(levels) == float(torch.tensor(1 / 48))
    fp4_table = {v for v in torch.tensor(FP4_CODE).tolist() if v > 0}
    assert levels - {min(levels)} == fp4_table - {min(fp4_table)}


@pytest.mark.parametrize("kwargs,match", [
    (dict(exponent_bits=5, precision_bits=3, total_bits=8), "total_bits"),
    (dict(signed=False, exponent_bits=5, precision_bits=2, total_bits=8), "total_bits"),
    (dict(exponent_bits=0, precision_bits=7, total_bits=8), "exponent_bits"),
    (dict(exponent_bits=4, precision_bits=-1, total_bits=4), "precision_bits"),
    (dict(exponent_bits=5, precision_bits=4, total_bits=10), "total_bits"),
])
def test_create_fp8_map_bad_bits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fq.create_fp8_map(**kwargs)


# =============================================================================================
# create_dynamic_map
# =============================================================================================
def _dynamic_oracle(signed, m, total):
    """float64 closed form: midpoints ``0.1 + (j + 1/2) * 0.9 / k`` of each level."""
    n = total - 1
    m = min(m, n) if signed else m
    vals = []

    def level(k, scale):
        for j in range(k):
            v = scale * (0.1 + (j + 0.5) * 0.9 / k)
            vals.extend([v, -v] if signed else [v])
    for i in range(m):
        level(2 ** (i + n - m + (0 if signed else 1)), 10.0 ** (i - m + 1))
    if m < n:
        level(2 ** (n - m) - 1, 1.0)
    vals += [0.0, 1.0]
    vals += [0.0] * (256 - len(vals))
    return torch.tensor(sorted(vals), dtype=torch.float64)


def test_create_dynamic_map_default_is_opsq_map_bit_for_bit():
    assert torch.equal(Fq.create_dynamic_map(), constants_dynamic_map())
    assert torch.equal(Fq.create_dynamic_map(True, 7, 8), constants_dynamic_map())


@pytest.mark.parametrize("device", DEVICES)
def test_small_tables_are_new_tensors_each_call(device):
    """code_table / the default dynamic map keep one master per device
    (opsq._constants.table_on): every call must still hand out its own tensor, so a caller
    writing into one (or into a QuantState's code) changes no later table."""
    for make, want in ((lambda: code_table("nf4", device), torch.tensor(NF4_CODE)),
                       (lambda: code_table("fp4", device), torch.tensor(FP4_CODE)),
                       (lambda: dynamic_map_on(device), constants_dynamic_map())):
        first = make()
        assert first.device.type == device and first.dtype == torch.float32
        assert torch.equal(first.cpu(), want)
        first.fill_(float("nan"))
        second = make()
        assert second.data_ptr() != first.data_ptr()
        assert torch.equal(second.cpu(), want)
    W = torch.randn(64, 256, generator=_gen(), dtype=torch.bfloat16).to(device)
    _, qs1 = Fq.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    qs1.code.zero_()
    qs1.state2.code.zero_()
    _, qs2 = Fq.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    assert torch.equal(qs2.code.cpu(), torch.tensor(NF4_CODE))
    assert torch.equal(qs2.state2.code.cpu(), constants_dynamic_map())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_quantize_on_load_never_syncs_once_warm():
    """Quantizing a model layer by layer (nested quantize_4bit, quantize_blockwise and its
    inverse) enqueues work without waiting for the GPU: each call used to copy its code table
    and dynamic map from pageable host memory, a stream sync each."""
    g = _gen("cuda")
    W = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, generator=g)
    A = torch.randn(4096, device="cuda", generator=g)

    def work():
        packed, qs = Fq.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
        q, qb = Fq.quantize_blockwise(A, blocksize=256)
        return packed, qs, Fq.dequantize_blockwise(q, absmax=qb.absmax, blocksize=256)

    packed, qs, back = work()  # warm: builds each device-resident table once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        packed2, qs2, back2 = work()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(packed2, packed) and torch.equal(qs2.absmax, qs.absmax)
    assert torch.equal(back2, back)


DYNAMIC_LAYOUTS = [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 1, 8), (True, 3, 6),
                   (True, 2, 4), (False, 3, 4), (True, 9, 8)]


@pytest.mark.parametrize("signed,m,total", DYNAMIC_LAYOUTS,
                         ids=[f"{'s' if s else 'u'}m{m}b{t}" for s, m, t in DYNAMIC_LAYOUTS])
def test_create_dynamic_map_against_float64(signed, m, total):
    d = Fq.create_dynamic_map(signed, m, total)
    assert d.shape == (256,) and d.dtype == torch.float32
    assert (d.diff() >= 0).all() and d.max() == 1.0
    assert (d != 0).sum() == 2 ** total - 1  # every code but the zero carries a value
    torch.testing.assert_close(d.double(), _dynamic_oracle(signed, m, total), rtol=3e-7,
                               atol=1e-12)


# First and last three non-zero values (fp32, hex) and sum |x| of bitsandbytes 0.50's maps.
BNB_DYNAMIC = {
    (True, 4, 8): (["-0x1.fc66660000000p-1", "-0x1.f533340000000p-1", "-0x1.ee00000000000p-1",
                    "0x1.f533340000000p-1", "0x1.fc66660000000p-1", "0x1.0000000000000p+0"],
                   82.80479997067596),
    (True, 3, 6): (["-0x1.f1999a0000000p-1", "-0x1.d4cccc0000000p-1", "-0x1.b800000000000p-1",
                    "0x1.d4cccc0000000p-1", "0x1.f1999a0000000p-1", "0x1.0000000000000p+0"],
                   22.824000055436045),
    (False, 7, 8): (["0x1.5cf7540000000p-22", "0x1.a013300000000p-21", "0x1.1d36700000000p-19",
                     "0x1.fa99980000000p-1", "0x1.fe33340000000p-1", "0x1.0000000000000p+0"],
                    75.1052632433869),
}


@pytest.mark.parametrize("args", list(BNB_DYNAMIC), ids=str)
def test_create_dynamic_map_bitsandbytes_values(args):
    d = Fq.create_dynamic_map(*args)
    ends, abs_sum = BNB_DYNAMIC[args]
    nz = d[d != 0].tolist()
    assert [v.hex() for v in nz[:3] + nz[-3:]] == ends
    assert d.double().abs().sum().item() == abs_sum


@pytest.mark.parametrize("kwargs,match", [
    (dict(signed=False, max_exponent_bits=4), "max_exponent_bits"),
    (dict(max_exponent_bits=0), "max_exponent_bits"),
    (dict(total_bits=9), "total_bits"),
    (dict(total_bits=0), "total_bits"),
])
def test_create_dynamic_map_bad_bits(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fq.create_dynamic_map(**kwargs)


# =============================================================================================
# get_4bit_type
# =============================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_get_4bit_type_tables(device):
    for t in ("nf4", "fp4"):
        table = Fq.get_4bit_type(t, device=device)
        assert table.device.type == device and table.dtype == torch.float32
        assert torch.equal(table.cpu(), code_table(t))
    int4 = Fq.get_4bit_type("int4", device=device).cpu()
    ref = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7],
                       dtype=torch.float64) / 7
    torch.testing.assert_close(int4.double(), ref, rtol=2 ** -24, atol=0)
    af4 = Fq.get_4bit_type("af4", device, blocksize=64).cpu()
    assert af4[0] == 1 and af4[-1] == -1 and af4[8] == 0 and (af4.diff() < 0).all()
    torch.testing.assert_close(af4[1].double(), torch.tensor(0.72424863, dtype=torch.float64))
    # FP4's published values: 0, 0.0625, 8, 12, 4, 6, 2, 3 over 12 (bitsandbytes)
    fp4 = Fq.get_4bit_type("fp4", device).cpu()
    torch.testing.assert_close(fp4[:8].double(), torch.tensor(
        [0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float64) / 12, rtol=2 ** -24, atol=0)


def test_get_4bit_type_bad_input():
    with pytest.raises(ValueError, match="typename"):
        Fq.get_4bit_type("nf5")
    with pytest.raises(ValueError, match="blocksize"):
        Fq.get_4bit_type("af4", blocksize=128)


# =============================================================================================
# int8_vectorwise_dequant
# =============================================================================================
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 16), (1, 1)], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_int8_vectorwise_dequant_against_float64(device, shape):
    g = _gen(device)
    A = torch.randint(-127, 128, shape, dtype=torch.int8, device=device, generator=g)
    rows = math.prod(shape[:-1])
    stats = torch.rand(rows, device=device, generator=g) * 10 + 1e-3
    out = Fq.int8_vectorwise_dequant(A, stats)
    assert out.shape == A.shape and out.dtype == torch.float32 and out.device == A.device
    ref = A.double() * stats.double().reshape(*shape[:-1], 1) / 127
    # two fp32 products and fp32(1/127): at most ~3 fp32 roundings
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -22, atol=0)


@pytest.mark.parametrize("dtype", FLOATS, ids=dname)
@pytest.mark.parametrize("device", DEVICES)
def test_int8_vectorwise_roundtrip(device, dtype):
    g = _gen(device)
    X = (torch.randn(9, 40, device=device, generator=g) * 3).to(dtype)
    CA, SCA, _ = Fq.int8_vectorwise_quant(X)
    back = Fq.int8_vectorwise_dequant(CA, SCA)
    absmax = X.double().abs().amax(1, keepdim=True)
    torch.testing.assert_close(SCA.double(), absmax.squeeze(1), rtol=0, atol=0)
    err = (back.double() - X.double()).abs()
    assert (err <= absmax / 254 * (1 + 1e-5) + 1e-12).all()  # half an int8 step per row


def test_int8_vectorwise_dequant_bad_input():
    A = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TypeError, match="A must be an int8"):
        Fq.int8_vectorwise_dequant(A.float(), torch.ones(4))
    with pytest.raises(TypeError, match="stats"):
        Fq.int8_vectorwise_dequant(A, torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="stats must have one value per row"):
        Fq.int8_vectorwise_dequant(A, torch.ones(5))
    with pytest.raises(ValueError, match="stats must be on A's device"):
        Fq.int8_vectorwise_dequant(A, torch.ones(4, device="meta"))


# =============================================================================================
# is_on_gpu / get_ptr
# =============================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_is_on_gpu(device):
    a, b = torch.zeros(2, device=device), torch.ones(3, device=device)
    assert Fq.is_on_gpu([a, None, b]) is True
    assert Fq.is_on_gpu([]) is True and Fq.is_on_gpu(iter([a])) is True
    other = torch.zeros(1, device="meta")  # a second device on any machine
    with pytest.raises(RuntimeError, match=r"same .*tensors\[2\]"):
        Fq.is_on_gpu([a, None, other])
    paged = torch.zeros(1, device="meta")
    paged.is_paged = True  # bitsandbytes' paged buffers are reachable from any device
    assert Fq.is_on_gpu([a, paged])
    if device == "cuda":
        with pytest.raises(RuntimeError, match="same device"):
            Fq.is_on_gpu([a, torch.zeros(1)])
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        Fq.is_on_gpu([a, [1.0]])
    with pytest.raises(TypeError, match="tensors must be an iterable"):
        Fq.is_on_gpu(3)


@pytest.mark.parametrize("device", DEVICES)
def test_get_ptr(device):
    assert Fq.get_ptr(None) is None
    t = torch.arange(10, dtype=torch.float32, device=device)
    p = Fq.get_ptr(t)
    assert isinstance(p, ctypes.c_void_p) and p.value == t.data_ptr()
    assert Fq.get_ptr(t[3:]).value == p.value + 3 * 4
    with pytest.raises(TypeError, match="A must be"):
        Fq.get_ptr([1, 2])


# =============================================================================================
# QuantState of 8-bit blockwise quantization
# =============================================================================================
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dname)
@pytest.mark.parametrize("device", DEVICES)
def test_quant_state_8bit_roundtrip(device, dtype, nested, packed):
    g = _gen(device)
    A = (torch.randn(3000, device=device, generator=g) * 4).to(dtype)
    q, qs = Fq.quantize_blockwise(A, blocksize=256, nested=nested)
    assert qs.quant_type is None and qs.shape is None and qs.dtype == dtype
    d = qs.as_dict(packed=packed)
    # what bitsandbytes 0.50 writes for a quant_type=None state: the unpacked fields, also
    # for packed=True (its packed key needs a 4-bit type)
    keys = {"quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"}
    if nested:
        keys |= {"nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype",
                 "nested_offset"}
    assert set(d) == keys
    assert d["quant_type"] is None and d["shape"] is None and d["blocksize"] == 256
    assert d["dtype"] == dname(dtype)
    plain = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
    assert json.loads(json.dumps(plain)) == plain  # JSON-able, as bitsandbytes' fields
    if nested:
        assert d["nested_dtype"] == "float32" and isinstance(d["nested_offset"], float)
        assert d["nested_offset"] == qs.offset.item()
    back = Fq.QuantState.from_dict(dict(d), device=device)
    assert back == qs
    assert back.quant_type is None and back.shape is None and back.dtype == dtype
    assert back.nested == nested and back.absmax.device.type == device
    ref = Fq.dequantize_blockwise(q, qs)
    assert ref.dtype == dtype
    assert torch.equal(Fq.dequantize_blockwise(q, back), ref)
    # the reload also works with a key prefix, as in a module's state dict
    prefixed = {"state." + k: v for k, v in d.items()}
    assert Fq.QuantState.from_dict(prefixed, device=device) == qs
    # the dequantized values: within half a map step (<= 1/2 * 0.0667 of absmax) per block
    err = (ref.double() - A.double()).abs().reshape(-1, 1)
    amax = torch.nn.functional.pad(A.double().abs(), (0, 3072 - 3000)).reshape(-1, 256).amax(1)
    bound = amax.repeat_interleave(256)[:3000].reshape(-1, 1) * 0.04 + 1e-3
    assert (err <= bound).all()


def test_quant_state_8bit_from_dict_bad_input():
    A = torch.randn(512)
    _, qs = Fq.quantize_blockwise(A, blocksize=256)
    d = qs.as_dict()
    with pytest.raises(ValueError, match="'shape'"):
        Fq.QuantState.from_dict(dict(d, shape="512"), device="cpu")
    with pytest.raises(ValueError, match="'quant_type'"):
        Fq.QuantState.from_dict(dict(d, quant_type="int8"), device="cpu")
    # a packed entry always names a 4-bit type
    plain = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
    bad = {"absmax": d["absmax"], "quant_map": d["quant_map"],
           "quant_state.bitsandbytes__nf4": Fq.pack_dict_to_tensor(plain)}
    with pytest.raises(ValueError, match="'quant_type'"):
        Fq.QuantState.from_dict(bad, device="cpu")
    # a 4-bit state still needs its shape
    _, qs4 = Fq.quantize_4bit(torch.randn(8, 64), quant_type="nf4")
    d4 = qs4.as_dict()
    with pytest.raises(ValueError, match="'shape'"):
        Fq.QuantState.from_dict(dict(d4, shape=None), device="cpu")


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [8192, 16384])
@pytest.mark.parametrize("device", DEVICES)
def test_quant_state_8bit_large_blocksizes(device, blocksize, nested):
    """bitsandbytes 0.50's largest 8-bit blocksizes through functional and the QuantState dict
    (2.3 blocks: the last one partial)."""
    g = _gen(device)
    n = 2 * blocksize + 5 * blocksize // 16 + 3
    A = (torch.randn(n, device=device, generator=g) * 3).to(torch.bfloat16)
    q, qs = Fq.quantize_blockwise(A, blocksize=blocksize, nested=nested)
    assert q.shape == A.shape and qs.blocksize == blocksize and qs.absmax.numel() == 3
    assert qs.nested == nested and (not nested or qs.state2.blocksize == blocksize)
    out = Fq.dequantize_blockwise(q, qs)
    assert out.dtype == torch.bfloat16 and out.shape == A.shape
    amax = torch.nn.functional.pad(A.double().abs(), (0, 3 * blocksize - n)).reshape(3, -1)
    bound = amax.amax(1).repeat_interleave(blocksize)[:n] * 0.04 + 1e-2
    assert ((out.double() - A.double()).abs() <= bound).all()
    d = qs.as_dict()
    assert d["blocksize"] == blocksize
    back = Fq.QuantState.from_dict(dict(d), device=device)
    assert back == qs and torch.equal(Fq.dequantize_blockwise(q, back), out)
    # without a state: absmax and blocksize given
    if not nested:
        plain = Fq.dequantize_blockwise(q, absmax=qs.absmax, blocksize=blocksize)
        assert plain.dtype == torch.float32 and torch.equal(plain.to(torch.bfloat16), out)
    for bad in (3000, 32768):
        with pytest.raises(ValueError, match=rf"blocksize must be one of .*16384\), got {bad}"):
            Fq.quantize_blockwise(A, blocksize=bad)
        with pytest.raises(ValueError, match="'blocksize' must be one of .*16384"):
            Fq.QuantState.from_dict(dict(d, blocksize=bad), device=device)


def test_quant_state_4bit_keeps_4096_limit():
    _, qs = Fq.quantize_4bit(torch.randn(16, 512), blocksize=4096, quant_type="nf4")
    d = qs.as_dict()
    with pytest.raises(ValueError, match=r"'blocksize' must be one of \(32, .*, 4096\), got 8192"):
        Fq.QuantState.from_dict(dict(d, blocksize=8192), device="cpu")
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, .*, 4096\), got 8192"):
        Fq.quantize_4bit(torch.randn(16, 512), blocksize=8192, quant_type="nf4")


def test_quant_state_4bit_packed_unchanged():
    _, qs = Fq.quantize_4bit(torch.randn(16, 64), quant_type="fp4", compress_statistics=True)
    d = qs.as_dict(packed=True)
    assert all(isinstance(v, torch.Tensor) for v in d.values())
    assert "quant_state.bitsandbytes__fp4" in d
    assert Fq.QuantState.from_dict(d, device="cpu") == qs


# =============================================================================================
# matmul_4bit with a weight quantized in [K, N] orientation (bitsandbytes' deprecated path)
# =============================================================================================
def _tol(dtype):
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-6}[dtype]


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOATS, ids=dname)
@pytest.mark.parametrize("device", DEVICES)
def test_matmul_4bit_kn_weight(device, dtype, quant_type, nested):
    g = _gen(device)
    K, N = 96, 40
    W = torch.randn(K, N, device=device, generator=g).to(dtype)  # [K, N]: A @ W
    B, qs = Fq.quantize_4bit(W, quant_type=quant_type, compress_statistics=nested)
    assert tuple(qs.shape) == (K, N)
    Wq = Fq.dequantize_4bit(B, qs).double()  # the weight the result must use
    A = torch.randn(2, 3, K, device=device, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(N, device=device, generator=g).to(dtype).requires_grad_()
    with pytest.warns(DeprecationWarning, match=r"\[K, N\]"):
        y = matmul_4bit(A, B, qs, bias=bias)
    assert y.shape == (2, 3, N) and y.dtype == dtype and y.device == A.device
    ref = A.double() @ Wq + bias.double()
    scale = A.double().abs() @ Wq.abs() + bias.double().abs()
    assert ((y.double() - ref).abs() <= _tol(dtype) * scale + 1e-6).all()
    # gradients reach A and bias
    G = torch.randn_like(y)
    y.backward(G)
    gref = G.double() @ Wq.t()
    gscale = G.double().abs() @ Wq.abs().t()
    assert ((A.grad.double() - gref).abs() <= _tol(dtype) * gscale + 1e-6).all()
    torch.testing.assert_close(bias.grad.double(), G.double().sum((0, 1)),
                               rtol=_tol(dtype) * 4, atol=_tol(dtype) * 4)
    # out= and the transposed packed view are accepted as on the usual path
    out = torch.empty(2, 3, N, dtype=dtype, device=device)
    with pytest.warns(DeprecationWarning):
        res = matmul_4bit(A.detach(), B.t(), qs, out=out, bias=bias.detach())
    assert res is out and torch.equal(out, y.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_4bit_usual_and_square_paths_do_not_warn(device):
    g = _gen(device)
    for N, K in ((40, 96), (64, 64)):  # [N, K], and a square weight: always read as [N, K]
        W = torch.randn(N, K, device=device, generator=g)
        B, qs = Fq.quantize_4bit(W, quant_type="nf4")
        A = torch.randn(5, K, device=device, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = matmul_4bit(A, B.t(), qs)
        ref = A.double() @ Fq.dequantize_4bit(B, qs).double().t()
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_4bit_bad_input(device):
    B, qs = Fq.quantize_4bit(torch.randn(40, 96, device=device), quant_type="nf4")
    with pytest.raises(RuntimeError, match=r"shapeB\[1\]"):  # neither K nor N
        matmul_4bit(torch.randn(3, 50, device=device), B, qs)
    with pytest.raises(ValueError, match="quant_state"):
        matmul_4bit(torch.randn(3, 96, device=device), B, None)
    bad = Fq.QuantState(absmax=qs.absmax, shape=(2, 20, 96), code=qs.code, blocksize=64,
                        quant_type="nf4", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"quant_state.shape must be \[N, K\]"):
        matmul_4bit(torch.randn(3, 40, device=device), B, bad)


# =============================================================================================
# fix_4bit_weight_quant_state_from_module
# =============================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_fix_4bit_weight_quant_state_from_module(device):
    torch.manual_seed(torch.seed() % 2**31)
    layer = Linear4bit(64, 24, quant_type="nf4").to(device)
    x = torch.randn(3, 64, device=device)
    expected = layer(x)
    healthy = layer.weight
    Fq.fix_4bit_weight_quant_state_from_module(layer)  # nothing to do
    assert layer.weight is healthy
    # a wrapper re-wrapped the parameter and lost its attributes (FSDP-style)
    data_ptr = layer.weight.data_ptr()
    layer._parameters["weight"] = nn.Parameter(layer.weight.data, requires_grad=False)
    assert getattr(layer.weight, "quant_state", None) is None
    Fq.fix_4bit_weight_quant_state_from_module(layer)
    assert isinstance(layer.weight, Params4bit) and layer.weight.bnb_quantized
    assert layer.weight.data_ptr() == data_ptr and not layer.weight.requires_grad
    assert layer.weight.quant_state == layer.quant_state
    assert layer.weight.quant_state.quant_type == "nf4"
    assert torch.equal(layer(x), expected)
    # a Params4bit whose state was dropped gets it back in place
    layer.weight.quant_state = None
    kept = layer.weight
    Fq.fix_4bit_weight_quant_state_from_module(layer)
    assert layer.weight is kept and kept.quant_state == layer.quant_state


def test_fix_4bit_weight_quant_state_bad_input():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        Fq.fix_4bit_weight_quant_state_from_module(torch.zeros(3))
    with pytest.raises(TypeError, match="module.weight"):
        Fq.fix_4bit_weight_quant_state_from_module(nn.ReLU())
    with pytest.warns(UserWarning, match="not quantized yet"):
        Fq.fix_4bit_weight_quant_state_from_module(Linear4bit(64, 8))  # still float
    odd = nn.Linear(4, 4)
    odd.quant_state = object()
    with pytest.raises(ValueError, match=r"\(k, 1\)"):
        Fq.fix_4bit_weight_quant_state_from_module(odd)


# =============================================================================================
# outlier_hook, execute_and_return
# =============================================================================================
@pytest.mark.parametrize("device", DEVICES)
def test_outlier_hook(device):
    g = _gen(device)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(device)
    with torch.no_grad():
        model[2].weight.normal_(0, 0.02, generator=g)
        model[2].weight[:, 5] *= 200  # input feature 5 of the second layer has a wide spread
    tracer = OutlierTracer.get_instance().initialize(nn.Module())  # no automatic hooks
    handles = [model[i].register_forward_pre_hook(Ut.outlier_hook) for i in (0, 2)]
    try:
        x = torch.randn(4, 7, 16, device=device, generator=g)
        x[..., 3] = 20.0  # > 6: an activation outlier of the first layer
        model(x)
        first = tracer.get_outliers(model[0].weight)
        second = tracer.get_outliers(model[2].weight)
        assert first is not None and 3 in first.tolist()
        assert second is not None and second.tolist() == [5]
        assert len(tracer.outliers) == 2
        model(x)  # a weight seen again: tracing is over, nothing new is recorded
        assert len(tracer.outliers) == 2
        with pytest.raises(TypeError, match="module must be an nn.Module"):
            Ut.outlier_hook(nn.ReLU(), (x,))
    finally:
        for h in handles:
            h.remove()


def test_execute_and_return_bnb_call():
    out, err = Ut.execute_and_return(command_string=f"{sys.executable} -c 'print(3)'")
    assert (out, err) == ("3", "")


# ---- the remaining functional names: igemm, batched_igemm, the optimizer updates, paging --------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_igemm_and_batched_igemm_match_int64_matmul(device, ta, tb):
    g = torch.Generator().manual_seed(3)
    A = torch.randint(-127, 128, (3, 5, 40), generator=g, dtype=torch.int8)
    B = torch.randint(-127, 128, (3, 40, 24), generator=g, dtype=torch.int8)
    want = A.long() @ B.long()
    a = (A.mT.contiguous() if ta else A).to(device)
    b = (B.mT.contiguous() if tb else B).to(device)
    got = Fq.batched_igemm(a, b, transposed_A=ta, transposed_B=tb)
    assert got.dtype == torch.int32 and torch.equal(got.cpu().long(), want)
    one = Fq.igemm(a[1], b[1], transposed_A=ta, transposed_B=tb)
    assert torch.equal(one.cpu().long(), want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_functional_optimizer_updates_call_the_ops(device):
    from opsq.optim import unsigned_dynamic_map
    g = torch.Generator().manual_seed(4)
    p = torch.randn(600, generator=g).to(device)
    grad = torch.randn(600, generator=g).to(device)
    s1, s2 = torch.zeros(600, device=device), torch.zeros(600, device=device)
    p32 = p.clone()
    Fq.optimizer_update_32bit("adam", grad, p32, s1, 0.9, 1e-8, 1, 1e-2, state2=s2, beta2=0.999)
    # Adam's first step moves every element by lr (sign of the gradient) up to eps
    torch.testing.assert_close(p32, p - 1e-2 * torch.sign(grad), rtol=0, atol=1e-5)
    c1, c2 = (torch.zeros(600, dtype=torch.uint8, device=device) for _ in range(2))
    a1, a2 = torch.zeros(3, device=device), torch.zeros(3, device=device)
    p8 = p.clone()
    Fq.optimizer_update_8bit_blockwise("adam", grad, p8, c1, c2, 0.9, 0.999, 0.0, 0.0, 1e-8, 1,
                                       1e-2, Fq.create_dynamic_map().to(device),
                                       unsigned_dynamic_map().to(device), a1, a2)
    torch.testing.assert_close(p8, p32, rtol=0, atol=1e-4)
    assert (a1 > 0).all() and (a2 > 0).all()


def test_get_paged_needs_cuda_or_pages():
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            Fq.get_paged(4, 4)
        return
    t = Fq.get_paged(64, 32, dtype=torch.uint8)
    assert t.is_paged and t.shape == (64, 32) and t.dtype == torch.uint8 and not t.any()
    Fq.prefetch_tensor(t, to_cpu=True)
    Fq.prefetch_tensor(t)
    t += 3
    assert (t == 3).all()
    with pytest.raises(ValueError, match="paged"):
        Fq.prefetch_tensor(torch.zeros(4, device="cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_dequantize_4bit_of_transposed_codes_comes_back_transposed(device):
    """bitsandbytes' dequantize_4bit shim: codes passed as ``weight.t()`` (one row) give the
    result transposed, so ``dequantize_4bit(w.t(), state).t()`` is the weight again; a square
    weight would otherwise come back silently transposed."""
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(5)).to(device)
    packed, state = Fq.quantize_4bit(W, quant_type="nf4")
    want = Fq.dequantize_4bit(packed, state)
    assert packed.shape[1] == 1
    got = Fq.dequantize_4bit(packed.t(), state)
    assert torch.equal(got, want.t())
    assert torch.equal(Fq.dequantize_4bit(packed.t(), state).t(), want)
    out = torch.empty_like(want)
    assert torch.equal(Fq.dequantize_4bit(packed.t(), state, out=out), want.t())


def test_dequantize_4bit_of_a_one_byte_weight_is_not_transposed():
    """Codes of shape (1, 1) are the packed form of a weight of <= 2 codes, not transposed
    codes: opsq's own dequantizations (PEFT merge, transformers' dequantize) go through here."""
    W = torch.randn(1, 2, generator=torch.Generator().manual_seed(6))
    packed, state = Fq.quantize_4bit(W, blocksize=64, quant_type="nf4")
    assert packed.shape == (1, 1)
    assert Fq.dequantize_4bit(packed, state).shape == (1, 2)


def test_quantize_blockwise_state_owns_its_map_and_holds_the_absmax_buffer():
    """bitsandbytes' quantize_blockwise stores a copy of ``code`` (a caller's later change of
    the map does not reach the state) and, given ``absmax=``, that buffer itself."""
    A = torch.randn(5000, generator=torch.Generator().manual_seed(8))
    code = Fq.create_dynamic_map()
    buf = torch.empty(2)
    q, state = Fq.quantize_blockwise(A, code=code, absmax=buf)
    want = Fq.dequantize_blockwise(q, state)
    assert state.absmax is buf and state.code is not code
    code.mul_(-1.0)  # the caller reuses its map
    assert torch.equal(Fq.dequantize_blockwise(q, state), want)
