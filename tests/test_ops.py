"""Op-level tests on the CPU: shape/dtype contract, float64 math, error bounds, bad input."""
import math

import pytest
import torch

import opsq  # noqa: F401
from opsq._constants import BLOCKSIZES, BLOCKWISE_BLOCKSIZES, code_table, create_dynamic_map
from opsq.reference.fourbit import unpack_codes

ops = torch.ops.opsq
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _rand(shape, dtype, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.int32])
def test_quantize_dequantize_4bit_against_float64(quant_type, blocksize, dtype, storage):
    A = _rand((37, 129), dtype)  # odd size, tail block, odd element count
    n = A.numel()
    packed, absmax = ops.quantize_4bit(A, blocksize, quant_type, storage)
    assert packed.dtype == storage and packed.dim() == 2 and packed.shape[1] == 1
    assert packed.numel() * packed.element_size() == math.ceil(math.ceil(n / 2) / packed.element_size()) * packed.element_size()
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(n / blocksize),)
    # float64 oracle of the format: absmax = block max |x|, code = nearest table entry.
    x = torch.nn.functional.pad(A.double().reshape(-1), (0, absmax.numel() * blocksize - n))
    ref_absmax = x.view(-1, blocksize).abs().amax(1)
    torch.testing.assert_close(absmax.double(), ref_absmax, rtol=0, atol=0)
    table = code_table(quant_type).double()
    normed = (x.view(-1, blocksize) / ref_absmax[:, None]).reshape(-1)[:n]
    dist = (normed[:, None] - table[None, :]).abs()
    codes = unpack_codes(packed, n).long()
    chosen = dist.gather(1, codes[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 1e-6).all(), "a code is not the nearest table entry"
    out = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, list(A.shape), dtype)
    assert out.shape == A.shape and out.dtype == dtype
    # error bound: half the widest gap of the table times the block absmax (+ output rounding)
    gap = (table[table.argsort()].diff().max() / 2).item()
    err = (out.double() - A.double()).abs().reshape(-1)
    bound = gap * ref_absmax.repeat_interleave(blocksize)[:n] * (1 + 1e-2) + 1e-6
    assert (err <= bound).all()


def test_quantize_4bit_odd_tail_padding_is_zero_code():
    A = _rand((3, 5), torch.float32)  # 15 elements -> 8 bytes, last low nibble is padding
    for qt, zero in (("nf4", 7), ("fp4", 0)):
        packed, _ = ops.quantize_4bit(A, 64, qt, torch.uint8)
        assert packed.shape == (8, 1)
        assert (packed[-1, 0] & 0xF).item() == zero


def test_all_zero_block_has_zero_absmax_and_zero_code():
    A = _rand((2, 64), torch.float32)
    A[1] = 0
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    assert absmax[1] == 0
    assert (unpack_codes(packed, 128)[64:] == 7).all()
    out = ops.dequantize_4bit(packed, absmax, 64, "nf4", [2, 64], torch.float32)
    assert (out[1] == 0).all()


def test_nan_is_contained_to_its_block():
    A = _rand((4, 64), torch.float32)
    A[1, 3] = float("nan")
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    out = ops.dequantize_4bit(packed, absmax, 64, "nf4", [4, 64], torch.float32)
    clean = torch.ones(4, dtype=torch.bool)
    clean[1] = False
    assert torch.isfinite(out[clean]).all()


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_blockwise_8bit_roundtrip(blocksize):
    A = _rand((1000,), torch.float32)
    code = create_dynamic_map()
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == A.shape
    out = ops.dequantize_blockwise(q, absmax, code, blocksize, torch.float32)
    # nearest-code choice, checked in float64
    x = torch.nn.functional.pad(A.double(), (0, absmax.numel() * blocksize - 1000))
    normed = (x.view(-1, blocksize) / absmax.double()[:, None]).reshape(-1)[:1000]
    dist = (normed[:, None] - code.double()[None, :]).abs()
    chosen = dist.gather(1, q.long()[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 1e-6).all()
    assert (out - A).abs().max() < 0.05 * A.abs().max()


@pytest.mark.parametrize("blocksize", [8192, 16384])
@pytest.mark.parametrize("dtype", DTYPES)
def test_blockwise_8bit_large_blocksizes_against_float64(blocksize, dtype):
    # bitsandbytes 0.50's two largest 8-bit blocksizes; 2.4 blocks, the last one partial
    n = 2 * blocksize + 3 * blocksize // 8 + 11
    A = _rand((n,), dtype)
    code = create_dynamic_map()
    q, absmax = ops.quantize_blockwise(A, code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == A.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (3,)
    x = torch.nn.functional.pad(A.double(), (0, 3 * blocksize - n)).view(3, blocksize)
    assert torch.equal(absmax.double(), x.abs().amax(1))
    # nearest map entry of x / absmax, in float64
    normed = (x / x.abs().amax(1, keepdim=True)).reshape(-1)[:n]
    dist = (normed[:, None] - code.double()[None, :]).abs()
    chosen = dist.gather(1, q.long()[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 1e-6).all()
    out = ops.dequantize_blockwise(q, absmax, code, blocksize, dtype)
    assert out.dtype == dtype and out.shape == A.shape
    want = code.double()[q.long()] * absmax.double().repeat_interleave(blocksize)[:n]
    assert torch.equal(out, want.float().to(dtype))
    # within half the widest map step (1/2 * 0.0667) of each block's absmax, plus rounding
    err = (out.double() - A.double()).abs()
    bound = absmax.double().repeat_interleave(blocksize)[:n] * 0.04 + 1e-3
    assert (err <= bound).all()


def test_blockwise_blocksize_rule():
    """The 8-bit blockwise ops take 32..16384, the 4-bit ops still 32..4096."""
    assert BLOCKWISE_BLOCKSIZES == BLOCKSIZES + (8192, 16384)
    A = torch.randn(5000)
    code = create_dynamic_map()
    q, absmax = ops.quantize_blockwise(A, code, 256)
    for bad in (3000, 32768):
        want = rf"blocksize must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, " \
               rf"16384\), got {bad}$"
        with pytest.raises(ValueError, match=want):
            ops.quantize_blockwise(A, code, bad)
        with pytest.raises(ValueError, match=want):
            ops.dequantize_blockwise(q, absmax, code, bad, torch.float32)
    four = r"blocksize must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\), got 8192$"
    with pytest.raises(ValueError, match=four):
        ops.quantize_4bit(A, 8192, "nf4", torch.uint8)
    packed, am = ops.quantize_4bit(A, 4096, "nf4", torch.uint8)
    with pytest.raises(ValueError, match=four):
        ops.dequantize_4bit(packed, am, 8192, "nf4", [5000], torch.float32)
    with pytest.raises(ValueError, match=four.replace("blocksize", "nested_blocksize")):
        ops.dequantize_4bit(packed, q[:2], 4096, "nf4", [5000], torch.float32, absmax, code,
                            torch.zeros(1), 8192)


def test_blockwise_large_blocksize_under_compile():
    def f(x, code):
        q, absmax = ops.quantize_blockwise(x, code, 16384)
        return ops.dequantize_blockwise(q, absmax, code, 16384, torch.float32)

    A = _rand((20000,), torch.float32)
    code = create_dynamic_map()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(A, code)
    assert torch.equal(got, f(A, code))


def test_nested_dequantize_equals_two_step():
    A = _rand((64, 256), torch.bfloat16)
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    offset = absmax.mean()
    code = create_dynamic_map()
    q2, a2 = ops.quantize_blockwise(absmax - offset, code, 256)
    direct = ops.dequantize_4bit(packed, absmax, 64, "nf4", [64, 256], torch.float32)
    nested = ops.dequantize_4bit(packed, q2, 64, "nf4", [64, 256], torch.float32, a2, code,
                                 offset.reshape(1), 256)
    absmax_hat = ops.dequantize_blockwise(q2, a2, code, 256, torch.float32) + offset
    two_step = ops.dequantize_4bit(packed, absmax_hat, 64, "nf4", [64, 256], torch.float32)
    assert torch.equal(nested, two_step)
    assert (nested - direct).abs().max() < 0.02 * A.float().abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_linear_4bit_against_float64(dtype, rows):
    W = _rand((48, 96), torch.float32)
    x = _rand((rows, 96), dtype)
    bias = _rand((48,), dtype)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    Wq = ops.dequantize_4bit(packed, absmax, 64, "nf4", [48, 96], dtype).double()
    ref = x.double() @ Wq.t() + bias.double()
    for op in (ops.linear_4bit, ops.gemv_4bit):
        y = op(x, packed, [48, 96], absmax, 64, "nf4", bias)
        assert y.dtype == dtype and y.shape == (rows, 48)
        tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("thr", [0.0, 3.0])
def test_int8_linear_against_float64(thr):
    A = _rand((6, 64), torch.float16)
    W = _rand((32, 64), torch.float16) / 4
    bias = _rand((32,), torch.float16)
    CB, SCB, _ = ops.vectorwise_quant(W, 0.0)
    y = ops.int8_linear(A, CB, SCB, bias, thr)
    assert y.dtype == torch.float16 and y.shape == (6, 32)
    ref = A.double() @ W.double().t() + bias.double()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 0.03
    # the float-weight form quantizes per call and gives the same numbers
    torch.testing.assert_close(ops.int8_linear(A, W, None, bias, thr), y)


def test_int8_linear_outliers_are_exact_in_16bit():
    A = _rand((4, 64), torch.float32) / 10
    A[:, 7] = 50.0  # one outlier column dominates
    W = _rand((16, 64), torch.float32)
    CB, SCB, _ = ops.vectorwise_quant(W, 0.0)
    Wd = CB.double() * SCB.double()[:, None] / 127
    ref = A.double() @ Wd.t()
    err_thr = (ops.int8_linear(A, CB, SCB, None, 6.0).double() - ref).abs().max()
    err_plain = (ops.int8_linear(A, CB, SCB, None, 0.0).double() - ref).abs().max()
    assert err_thr < err_plain / 5


def test_igemmlt_exact_and_mm_dequant():
    A = torch.randint(-127, 128, (33, 70), dtype=torch.int8)
    B = torch.randint(-127, 128, (17, 70), dtype=torch.int8)
    C = ops.igemmlt(A, B)
    assert C.dtype == torch.int32 and C.shape == (33, 17)
    assert torch.equal(C.long(), A.long() @ B.long().t())
    rs, cs = torch.rand(33) + 0.5, torch.rand(17) + 0.5
    bias = torch.randn(17)
    out = ops.mm_dequant(C, rs, cs, bias, torch.float32)
    ref = C.double() * rs.double()[:, None] * cs.double()[None, :] / 127**2 + bias.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert ops.mm_dequant(C, rs, cs).dtype == torch.float16


@pytest.mark.parametrize("order", ["col32", "col_turing", "col_ampere"])
def test_transform_roundtrip(order):
    A = torch.randint(-128, 128, (45, 70), dtype=torch.int8)
    t = ops.transform(A, "row", order, [45, 70])
    back = ops.transform(t, order, "row", [45, 70])
    assert torch.equal(back, A)


def test_empty_tensors_are_handled():
    A = torch.empty(0, 64)
    packed, absmax = ops.quantize_4bit(A, 64, "nf4", torch.uint8)
    assert packed.shape == (0, 1) and absmax.shape == (0,)
    out = ops.dequantize_4bit(packed, absmax, 64, "nf4", [0, 64], torch.float16)
    assert out.shape == (0, 64)
    CA, SCA, mask = ops.vectorwise_quant(torch.empty(0, 8), 6.0)
    assert CA.shape == (0, 8) and SCA.shape == (0,) and mask.shape == (8,)


# ---- bad input: clear exceptions naming the argument ----------------------------------------
A32 = torch.randn(8, 64)
P, AM = ops.quantize_4bit(A32, 64, "nf4", torch.uint8)
BAD = [
    ("quantize_4bit int A", lambda: ops.quantize_4bit(A32.int(), 64, "nf4", torch.uint8),
     TypeError, "A must have dtype"),
    ("quantize_4bit blocksize", lambda: ops.quantize_4bit(A32, 100, "nf4", torch.uint8),
     ValueError, "blocksize must be one of"),
    ("quantize_4bit quant_type", lambda: ops.quantize_4bit(A32, 64, "int4", torch.uint8),
     ValueError, "quant_type must be one of"),
    ("quantize_4bit storage", lambda: ops.quantize_4bit(A32, 64, "nf4", torch.bool),
     TypeError, "quant_storage"),
    ("dequantize_4bit absmax len", lambda: ops.dequantize_4bit(P, AM[:-1], 64, "nf4", [8, 64],
                                                               torch.float16),
     RuntimeError, "absmax must have 8 elements"),
    ("dequantize_4bit shape", lambda: ops.dequantize_4bit(P, AM, 64, "nf4", [8, 65],
                                                          torch.float16),
     RuntimeError, "A must have"),
    ("dequantize_4bit dtype", lambda: ops.dequantize_4bit(P, AM, 64, "nf4", [8, 64],
                                                          torch.int32),
     TypeError, "dtype must be one of"),
    ("dequantize_4bit nested missing", lambda: ops.dequantize_4bit(P, AM.to(torch.uint8), 64,
                                                                   "nf4", [8, 64], torch.float16),
     ValueError, "nested_absmax, nested_code and offset"),
    ("linear_4bit K mismatch", lambda: ops.linear_4bit(torch.randn(2, 63), P, [8, 64], AM, 64,
                                                       "nf4"),
     RuntimeError, "must equal shapeB[1]"),
    ("linear_4bit bias len", lambda: ops.linear_4bit(torch.randn(2, 64), P, [8, 64], AM, 64,
                                                     "nf4", torch.randn(7)),
     RuntimeError, "bias must have 8 elements"),
    ("vectorwise_quant threshold", lambda: ops.vectorwise_quant(A32, -1.0), ValueError,
     "threshold must be"),
    ("vectorwise_quant nan threshold", lambda: ops.vectorwise_quant(A32, float("nan")),
     ValueError, "threshold must be"),
    ("igemmlt dtype", lambda: ops.igemmlt(A32, A32), TypeError, "A must have dtype"),
    ("igemmlt K", lambda: ops.igemmlt(torch.zeros(2, 3, dtype=torch.int8),
                                      torch.zeros(4, 5, dtype=torch.int8)),
     RuntimeError, "must equal B's K"),
    ("mm_dequant row_stats", lambda: ops.mm_dequant(torch.zeros(2, 3, dtype=torch.int32),
                                                    torch.ones(3), torch.ones(3)),
     RuntimeError, "row_stats must have 2 elements"),
    ("int8_linear no SCB", lambda: ops.int8_linear(A32, torch.zeros(4, 64, dtype=torch.int8)),
     ValueError, "SCB"),
    ("transform order", lambda: ops.transform(torch.zeros(4, 4, dtype=torch.int8), "row",
                                              "col64", [4, 4]),
     ValueError, "to_order must be one of"),
    ("quantize_blockwise code", lambda: ops.quantize_blockwise(A32, torch.zeros(10), 64),
     RuntimeError, "code must have 256 elements"),
]


@pytest.mark.parametrize("name,call,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_error(name, call, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call()


def test_bad_input_under_compile_raises():
    def f(x):
        return ops.quantize_4bit(x, 100, "nf4", torch.uint8)

    with pytest.raises(Exception, match="blocksize must be one of"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(A32)
