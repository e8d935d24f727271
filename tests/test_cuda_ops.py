"""CUDA kernels of opsq (``opsq/csrc``) against the pure-PyTorch reference kernels.

Every test is marked ``cuda`` and skips (with the reason) when no CUDA device is present or when
the op has no native CUDA kernel registered (``opsq._extension.has_native_kernel``). Inputs are
fresh random data for every case; quantization codes must equal the reference except at exact
ties (a tiny fraction, neighbouring codes only); dequantized values, int8 codes and statistics
must be bit-identical; matmul outputs are compared within tolerances stated per dtype.
"""
from __future__ import annotations

import pytest
import torch

import opsq  # noqa: F401  (registers the ops and loads opsq._C)
import opsq.nn
from opsq import _extension, _tiled16
from opsq import reference as ref
from opsq._constants import (BLOCKSIZES, BLOCKWISE_BLOCKSIZES, FP4_CODES_ASCENDING,
                             NESTED_BLOCKSIZE, ZERO_CODE, create_dynamic_map)

pytestmark = pytest.mark.cuda

OPS = torch.ops.opsq
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
DEV = "cuda"


def need(op: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if not _extension.has_native_kernel(op):
        err = _extension.extension_error()
        pytest.skip(f"opsq::{op} has no native CUDA kernel"
                    + (f" (opsq._C not loaded: {err})" if err else ""))


def gen(seed: int) -> torch.Generator:
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    return g


def randn(shape, dtype, seed, scale=1.0):
    x = torch.randn(shape, generator=gen(seed), device=DEV, dtype=torch.float32) * scale
    return x.to(dtype)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    raw = packed.reshape(-1).view(torch.uint8).cpu()
    return torch.stack((raw >> 4, raw & 0xF), dim=-1).reshape(-1)[:n].long()


def assert_codes_close(got: torch.Tensor, want: torch.Tensor, order_index: torch.Tensor,
                       max_frac: float = 1e-3) -> int:
    """Codes equal except a tiny fraction of exact ties, which may only pick the neighbouring
    code in value order (``order_index[code]`` = rank of the code's value)."""
    got, want = got.reshape(-1).cpu().long(), want.reshape(-1).cpu().long()
    diff = got != want
    n_diff = int(diff.sum())
    if n_diff:
        rank_gap = (order_index[got[diff]] - order_index[want[diff]]).abs()
        assert int(rank_gap.max()) <= 1, f"non-neighbour code mismatch (max rank gap {rank_gap.max()})"
        assert n_diff <= max(1, max_frac * got.numel()), f"{n_diff} / {got.numel()} codes differ"
    return n_diff


def code_rank(quant_type: str) -> torch.Tensor:
    """Rank of each 4-bit code's value (NF4: the code itself; FP4: signed magnitude order)."""
    if quant_type == "nf4":
        return torch.arange(16)
    rank = torch.zeros(16, dtype=torch.long)
    for i, c in enumerate(FP4_CODES_ASCENDING):
        rank[c] = 8 + i        # +magnitudes ascending
        rank[c | 8] = 7 - i    # -magnitudes descending
    rank[8] = 8  # -0.0 == +0.0
    return rank


def no_new_nan(out: torch.Tensor, inp: torch.Tensor | None = None) -> None:
    if inp is None or not torch.isnan(inp.float()).any():
        assert not torch.isnan(out.float()).any(), "NaN in output for NaN-free input"


# =============================================================================================
# quantize_4bit
# =============================================================================================
SIZES = [1, 7, 64, 1001, 4096 * 3 + 33, 262147]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_4bit_matches_reference(quant_type, blocksize, dtype):
    need("quantize_4bit")
    for i, n in enumerate(SIZES):
        A = randn((n,), dtype, seed=1000 + i + blocksize, scale=3.0)
        for storage in (torch.uint8, torch.bfloat16):
            packed, absmax = OPS.quantize_4bit(A, blocksize, quant_type, storage)
            rp, ra = ref.quantize_4bit(A.cpu(), blocksize, quant_type, storage)
            assert packed.dtype == storage and packed.shape == rp.shape
            assert torch.equal(absmax.cpu(), ra), "absmax differs"
            # every byte, storage padding included
            nb = rp.numel() * rp.element_size()
            assert_codes_close(unpack(packed, 2 * nb), unpack(rp, 2 * nb), code_rank(quant_type))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16,
                                     torch.int32, torch.float32, torch.int64, torch.float64])
def test_quantize_4bit_storage_padding(quant_type, storage):
    need("quantize_4bit")
    for n in (1, 2, 3, 5, 15, 17, 63, 127, 129):
        A = randn((n,), torch.float32, seed=n)
        packed, absmax = OPS.quantize_4bit(A, 64, quant_type, storage)
        rp, ra = ref.quantize_4bit(A.cpu(), 64, quant_type, storage)
        assert packed.shape == rp.shape
        assert torch.equal(packed.view(torch.uint8).cpu(), rp.view(torch.uint8))
        z = ZERO_CODE[quant_type]
        raw = unpack(packed, 2 * rp.numel() * rp.element_size())
        assert bool((raw[n:] == z).all()), "padding must hold the zero code"


def assert_quantize_4bit_exact(A: torch.Tensor, blocksize: int, quant_type: str):
    """quantize_4bit of A on the device: absmax (NaN where the reference's is) and every code
    equal to the reference's."""
    packed, absmax = OPS.quantize_4bit(A, blocksize, quant_type, torch.uint8)
    rp, ra = ref.quantize_4bit(A.cpu(), blocksize, quant_type, torch.uint8)
    assert torch.equal(absmax.cpu().isnan(), ra.isnan())
    assert torch.equal(absmax.cpu().nan_to_num(), ra.nan_to_num())
    got, want = unpack(packed, A.numel()), unpack(rp, A.numel())
    assert torch.equal(got, want), f"{int((got != want).sum())} codes differ"
    return absmax


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_exact_boundaries_and_specials(quant_type):
    """Values exactly at the decision boundaries (and one ulp either side), zero blocks,
    subnormals, inf and NaN: codes must equal the reference bit for bit."""
    need("quantize_4bit")
    from opsq._constants import FP4_THRESHOLDS, NF4_CODE
    t = torch.tensor(NF4_CODE, dtype=torch.float64)
    bounds = ((t[1:] + t[:-1]) / 2).float() if quant_type == "nf4" else \
        torch.tensor(FP4_THRESHOLDS, dtype=torch.float32)
    b = torch.cat([bounds, -bounds])
    vals = torch.cat([b, torch.nextafter(b, torch.full_like(b, 2.0)),
                      torch.nextafter(b, torch.full_like(b, -2.0))])
    blocks = []
    for v in vals.tolist():  # block of 32: absmax 1 (first element), then the probe value
        blk = torch.zeros(32)
        blk[0], blk[1], blk[2] = 1.0, v, -v
        blocks.append(blk)
    blocks.append(torch.zeros(32))                                   # all-zero block
    blocks.append(torch.full((32,), 1e-40))                          # subnormal block
    blocks.append(torch.randn(32) * 1e-39)                           # mixed subnormals
    for specials in ({3: float("inf")}, {5: float("nan")}, {7: float("-inf"), 9: float("nan")}):
        blk = torch.randn(32)
        for k, v in specials.items():
            blk[k] = v
        blocks.append(blk)
    absmax = assert_quantize_4bit_exact(torch.cat(blocks).to(DEV), 32, quant_type)
    # NaN/Inf never corrupt neighbouring blocks
    nb = len(blocks)
    assert bool(torch.isfinite(absmax[: nb - 3]).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_4bit_values_at_absmax(quant_type, dtype):
    """Blocks whose elements are mostly +-absmax (x * rn(1 / absmax) lands one ulp either side
    of +-1 for most absmax values), at blocksize 64 (the 16-bit kernels' fast path, whose look-up
    has no clamp) and 128, with absmax near the top of bf16's range (a subnormal reciprocal):
    codes and absmax equal the reference's exactly (no tie is possible at +-1)."""
    need("quantize_4bit")
    g = torch.Generator().manual_seed(77)
    nb = 257
    top = 3.0e38 if dtype != torch.float16 else 6.0e4
    mags = torch.cat([torch.rand(nb - 8, generator=g) * 20 + 1e-3,
                      torch.linspace(0.5, 1.0, 8) * top]).to(dtype).float()
    for bs in (64, 128):
        signs = torch.randint(0, 2, (nb, bs), generator=g).float() * 2 - 1
        A = mags[:, None] * signs
        # a fifth of each block random below absmax
        mask = torch.rand(nb, bs, generator=g) < 0.2
        A = torch.where(mask, A * torch.rand(nb, bs, generator=g), A).to(dtype)
        assert_quantize_4bit_exact(A.reshape(-1).to(DEV), bs, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_4bit_specials_blocksize64_16bit(quant_type, dtype):
    """The 16-bit, blocksize-64 kernel (raw words, packed u16x2 max): blocks with NaN, +-inf,
    all zeros, -0.0, subnormals of the dtype, and a ragged tail, aligned and at an odd element
    offset (the scalar-load path): codes and absmax equal the reference's exactly."""
    need("quantize_4bit")
    g = torch.Generator().manual_seed(31)
    tiny = torch.finfo(dtype).tiny  # smallest normal; subnormals below it
    blocks = [torch.randn(64, generator=g) for _ in range(6)]
    blocks[0][5] = float("nan")
    blocks[1][7], blocks[1][9] = float("inf"), float("-inf")
    blocks[2] = torch.zeros(64)
    blocks[3] = torch.full((64,), -0.0)
    blocks[4] = torch.rand(64, generator=g) * tiny * 0.5        # subnormal block
    blocks[5][::3] = tiny * 0.25                                 # subnormals among normals
    body = torch.cat(blocks + [torch.randn(64 * 40 + 37, generator=g) * 3]).to(dtype)
    padded = torch.cat([torch.zeros(1, dtype=dtype), body]).to(DEV)
    for A in (body.to(DEV), padded[1:]):  # the second starts 2 bytes off 16-byte alignment
        assert_quantize_4bit_exact(A, 64, quant_type)


def test_quantize_4bit_2d_and_empty():
    need("quantize_4bit")
    A = randn((37, 129), torch.bfloat16, seed=5)
    packed, absmax = OPS.quantize_4bit(A, 128, "nf4", torch.uint8)
    rp, ra = ref.quantize_4bit(A.cpu(), 128, "nf4", torch.uint8)
    assert torch.equal(packed.cpu(), rp) and torch.equal(absmax.cpu(), ra)
    E = torch.empty((0, 5), device=DEV)
    p, a = OPS.quantize_4bit(E, 64, "fp4", torch.uint8)
    assert p.shape == (0, 1) and a.shape == (0,)


def test_quantize_4bit_non_contiguous_and_unaligned():
    need("quantize_4bit")
    base = randn((300, 130), torch.float16, seed=9)
    for A in (base.t(), base[:, 1:], base.reshape(-1)[3:3 + 5000]):
        packed, absmax = OPS.quantize_4bit(A, 64, "nf4", torch.uint8)
        rp, ra = ref.quantize_4bit(A.cpu(), 64, "nf4", torch.uint8)
        assert torch.equal(packed.cpu(), rp) and torch.equal(absmax.cpu(), ra)


# =============================================================================================
# dequantize_4bit
# =============================================================================================
def random_packed(n, seed, storage=torch.uint8):
    itemsize = torch.empty((), dtype=storage).element_size()
    nbytes = -(-(-(-n // 2)) // itemsize) * itemsize
    raw = torch.randint(0, 256, (nbytes,), generator=gen(seed), device=DEV, dtype=torch.int32)
    return raw.to(torch.uint8).view(storage).reshape(-1, 1)


def random_absmax(blocks, seed):
    return torch.rand(blocks, generator=gen(seed), device=DEV) * 4 + 0.01


def nested_stats(blocks, seed):
    q = torch.randint(0, 256, (blocks,), generator=gen(seed), device=DEV,
                      dtype=torch.int32).to(torch.uint8)
    nabs = torch.rand(-(-blocks // NESTED_BLOCKSIZE), generator=gen(seed + 1), device=DEV) + 0.5
    code = create_dynamic_map().to(DEV)
    offset = torch.rand(1, generator=gen(seed + 2), device=DEV) + 1.0
    return q, nabs, code, offset


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit_matches_reference(quant_type, blocksize, dtype, nested):
    need("dequantize_4bit")
    for i, shape in enumerate([(1,), (7,), (33, 3), (1001,), (129, 257), (4096 * 5 + 17,)]):
        n = 1
        for s in shape:
            n *= s
        blocks = -(-n // blocksize)
        for storage in (torch.uint8, torch.bfloat16):
            A = random_packed(n, seed=i + blocksize, storage=storage)
            if nested:
                q, nabs, code, off = nested_stats(blocks, seed=7 * i + 1)
                args = (A, q, blocksize, quant_type, list(shape), dtype, nabs, code, off,
                        NESTED_BLOCKSIZE)
            else:
                args = (A, random_absmax(blocks, seed=3 * i), blocksize, quant_type,
                        list(shape), dtype)
            out = OPS.dequantize_4bit(*args)
            want = ref.dequantize_4bit(*[a.cpu() if isinstance(a, torch.Tensor) else a
                                         for a in args])
            assert out.shape == want.shape and out.dtype == dtype
            assert torch.equal(out.cpu(), want), \
                f"max abs diff {(out.cpu().float() - want.float()).abs().max()}"
            no_new_nan(out)


@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_4bit_unaligned_codes_and_empty(dtype):
    need("dequantize_4bit")
    n = 4099
    big = random_packed(n + 6, seed=1)
    A = big.reshape(-1)[1:1 + -(-n // 2)].reshape(-1, 1)  # storage offset 1: not word-aligned
    am = random_absmax(-(-n // 64), seed=2)
    out = OPS.dequantize_4bit(A, am, 64, "nf4", [n], dtype)
    want = ref.dequantize_4bit(A.cpu(), am.cpu(), 64, "nf4", [n], dtype)
    assert torch.equal(out.cpu(), want)
    E = OPS.dequantize_4bit(torch.empty((0, 1), dtype=torch.uint8, device=DEV),
                            torch.empty(0, device=DEV), 64, "fp4", [0, 7], dtype)
    assert E.shape == (0, 7) and E.dtype == dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_roundtrip_quantize_dequantize(quant_type):
    need("quantize_4bit"); need("dequantize_4bit")
    A = randn((513, 67), torch.bfloat16, seed=11)
    p, am = OPS.quantize_4bit(A, 64, quant_type, torch.uint8)
    out = OPS.dequantize_4bit(p, am, 64, quant_type, list(A.shape), torch.bfloat16)
    want = ref.dequantize_4bit(*ref.quantize_4bit(A.cpu(), 64, quant_type, torch.uint8), 64,
                               quant_type, list(A.shape), torch.bfloat16)
    assert torch.equal(out.cpu(), want)
    err = (out.float() - A.float()).abs().max() / A.float().abs().max()
    assert err < 0.3


def test_errors_name_the_argument():
    need("dequantize_4bit"); need("quantize_4bit")
    A = random_packed(256, seed=0)
    am = random_absmax(4, seed=0)
    with pytest.raises(RuntimeError, match="absmax"):
        OPS.dequantize_4bit(A, am[:3], 64, "nf4", [256], torch.float16)
    with pytest.raises(ValueError, match="blocksize"):
        OPS.dequantize_4bit(A, am, 48, "nf4", [256], torch.float16)
    with pytest.raises(ValueError, match="quant_type"):
        OPS.quantize_4bit(torch.randn(64, device=DEV), 64, "nf5", torch.uint8)
    with pytest.raises(TypeError, match="A"):
        OPS.quantize_4bit(torch.ones(64, device=DEV, dtype=torch.int32), 64, "nf4", torch.uint8)
    with pytest.raises(ValueError, match="device"):
        OPS.dequantize_4bit(A, am.cpu(), 64, "nf4", [256], torch.float16)


def test_errors_every_family():
    """Messages carrying numbers and shapes, from every kernel family (each must raise the
    Python exception type of opsq.meta, never crash the process)."""
    need("quantize_4bit"); need("linear_4bit"); need("mm_dequant"); need("igemmlt")
    need("vectorwise_quant"); need("dequantize_blockwise")
    x = torch.randn(4, 64, device=DEV)
    with pytest.raises(ValueError, match="blocksize must be one of .* got 48"):
        OPS.quantize_4bit(x, 48, "nf4", torch.uint8)
    p, am = OPS.quantize_4bit(torch.randn(8, 64, device=DEV), 64, "nf4", torch.uint8)
    with pytest.raises(RuntimeError, match=r"A's last dimension \(32\) must equal shapeB\[1\]"):
        OPS.linear_4bit(torch.randn(2, 32, device=DEV), p, [8, 64], am, 64, "nf4")
    with pytest.raises(RuntimeError, match=r"B must have 512 elements .*got 256 \(shape \(256, 1\)\)"):
        OPS.linear_4bit(torch.randn(2, 64, device=DEV), p, [16, 64], am, 64, "nf4")
    with pytest.raises(RuntimeError, match=r"row_stats must have 4 elements.*got 3 \(shape \(3,\)\)"):
        OPS.mm_dequant(torch.ones(4, 8, dtype=torch.int32, device=DEV),
                       torch.ones(3, device=DEV), torch.ones(8, device=DEV))
    with pytest.raises(RuntimeError, match="B's K"):
        OPS.igemmlt(torch.ones(2, 8, dtype=torch.int8, device=DEV),
                    torch.ones(3, 9, dtype=torch.int8, device=DEV))
    with pytest.raises(ValueError, match="threshold"):
        OPS.vectorwise_quant(x, -1.0)
    with pytest.raises(RuntimeError, match="absmax must have 1 elements"):
        OPS.dequantize_blockwise(torch.zeros(64, dtype=torch.uint8, device=DEV),
                                 torch.ones(2, device=DEV), create_dynamic_map().to(DEV), 64,
                                 torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        OPS.dequantize_4bit(p, am, 64, "nf4", [8, 64], torch.int32)


# =============================================================================================
# gemv_4bit / linear_4bit
# =============================================================================================
TOL = {torch.float16: (4e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2), torch.float32: (1e-4, 1e-5)}


def assert_matmul_close(out, want, dtype):
    rtol, atol_rel = TOL[dtype]
    scale = max(float(want.float().abs().max()), 1e-6)
    torch.testing.assert_close(out.float(), want.float(), rtol=rtol, atol=atol_rel * scale)


@pytest.mark.parametrize("op", ["gemv_4bit", "linear_4bit"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nested", [False, True])
def test_linear_4bit_matches_reference(op, quant_type, dtype, nested):
    need(op)
    cases = [((1, 64), 1, 64), ((1, 4096), 1000, 64), ((3, 96), 17, 32), ((8, 512), 129, 128),
             ((2, 5, 256), 48, 256), ((33, 128), 40, 64), ((4, 100), 21, 64), ((300,), 7, 32),
             ((1, 8192), 3000, 4096), ((17, 1024), 64, 2048),
             # K < 2 N: the 4-warp CTAs (the others up to 16 rows: 8 warps, kGemvWideWarps)
             ((1, 256), 200, 64), ((5, 512), 300, 128), ((2, 96), 70, 32)]
    for i, (ashape, N, bs) in enumerate(cases):
        K = ashape[-1]
        A = randn(ashape, dtype, seed=100 + i)
        W = randn((N, K), torch.float32, seed=200 + i, scale=0.05)
        packed, absmax = OPS.quantize_4bit(W, bs, quant_type, torch.uint8)
        extra = ()
        if nested:
            offset = absmax.mean().reshape(1)
            q, nabs = ref.quantize_blockwise(absmax - offset, create_dynamic_map().to(DEV),
                                             NESTED_BLOCKSIZE)
            absmax = q
            extra = (nabs, create_dynamic_map().to(DEV), offset, NESTED_BLOCKSIZE)
        for bias in (None, randn((N,), dtype, seed=300 + i), randn((N,), torch.float32, seed=4)):
            out = getattr(OPS, op)(A, packed, [N, K], absmax, bs, quant_type, bias, *extra)
            want = ref.linear_4bit(A, packed, [N, K], absmax, bs, quant_type, bias, *extra)
            assert out.shape == want.shape and out.dtype == dtype
            assert_matmul_close(out, want, dtype)
            no_new_nan(out)


def test_linear_4bit_unaligned_and_empty():
    need("linear_4bit")
    N, K = 33, 128
    W = randn((N, K), torch.float32, seed=1, scale=0.1)
    packed, absmax = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
    big = torch.cat([torch.zeros(1, 1, dtype=torch.uint8, device=DEV), packed])
    shifted = big[1:]  # same bytes at storage offset 1 (falls back from the fused kernel)
    A = randn((2, K), torch.bfloat16, seed=2)
    out = OPS.linear_4bit(A, shifted, [N, K], absmax, 64, "nf4")
    want = ref.linear_4bit(A, packed, [N, K], absmax, 64, "nf4")
    assert_matmul_close(out, want, torch.bfloat16)
    E = OPS.linear_4bit(A[:0], packed, [N, K], absmax, 64, "nf4")
    assert E.shape == (0, N)


# ---- the tiled16 layout (opsq/_tiled16.py; gemv4_tiled16_kernel) ------------------------------
def need_tiled16_device() -> None:
    """Skip unless weights on this CUDA device take the tiled16 layout (sm_90 code)."""
    need("linear_4bit")
    if not _tiled16.device_supports_tiled16(DEV):
        pytest.skip("the tiled16 kernel has no sm_90 code running on this device (weights stay "
                    "packed there)")


# (N, K): one tile and one step; steps fewer than the kernel's 8 warps; more tiles than the
# persistent grid (2 CTAs an SM) with an odd step count; the decode shapes' two orientations
TILED16_SHAPES = [(16, 256), (48, 768), (6144, 1280), (1024, 4096), (4096, 1024)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nested", [False, True])
def test_linear_4bit_tiled16_matches_reference(quant_type, dtype, nested):
    """The op on a tiled16 weight: the kernel for fp16/bf16 up to 16 rows (8 a launch), the
    tiled16 dequantize + cuBLAS otherwise (fp32, more rows); against the reference on the packed
    bytes, within the gemv tolerance. Runs on any CUDA device the extension serves."""
    need("linear_4bit")
    for i, (N, K) in enumerate(TILED16_SHAPES):
        W = randn((N, K), torch.float32, seed=500 + i, scale=0.05)
        packed, absmax = OPS.quantize_4bit(W, 64, quant_type, torch.uint8)
        extra = ()
        if nested:
            offset = absmax.mean().reshape(1)
            absmax, nabs = ref.quantize_blockwise(absmax - offset, create_dynamic_map().to(DEV),
                                                  NESTED_BLOCKSIZE)
            extra = (nabs, create_dynamic_map().to(DEV), offset, NESTED_BLOCKSIZE)
        tB, tA = _tiled16.repack(packed, absmax, [N, K])
        rows = list(range(1, 9)) + [12, 17, 40] if N * K <= 1 << 22 else [1, 3, 8, 16, 40]
        for M in rows:
            A = randn((M, K), dtype, seed=600 + 7 * i + M)
            for bias in (None, randn((N,), dtype, seed=700 + i)):
                out = OPS.linear_4bit(A, tB, [N, K], tA, 64, quant_type, bias, *extra,
                                      layout="tiled16")
                want = ref.linear_4bit(A, packed, [N, K], absmax, 64, quant_type, bias, *extra)
                assert out.shape == want.shape and out.dtype == dtype
                assert_matmul_close(out, want, dtype)
                no_new_nan(out)
        # the gemv alias, a 3-D input and a float32 bias
        A = randn((1, 1, K), dtype, seed=800 + i)
        bias = randn((N,), torch.float32, seed=801 + i)
        out = OPS.gemv_4bit(A, tB, [N, K], tA, 64, quant_type, bias, *extra, layout="tiled16")
        want = ref.linear_4bit(A, packed, [N, K], absmax, 64, quant_type, bias, *extra)
        assert out.shape == (1, 1, N)
        assert_matmul_close(out, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_linear_4bit_merged_equals_single_calls(dtype, nested):
    """linear_4bit_merged over tiled16 weights (one launch, each weight on its share of the
    CTAs) gives every weight's linear_4bit bytes: q/k/v-like and gate/up-like groups, one
    weight smaller than a CTA share, five weights (two launches), 1-16 rows, with and without
    bias; packed weights (one call each) too. Outputs are compared byte for byte."""
    need_tiled16_device()
    K = 1024
    code = create_dynamic_map().to(DEV)
    for group, rows_list in (((512, 128, 128), (1, 3, 8, 9, 16)), ((2048, 2048), (1, 5)),
                             ((16, 4096), (1, 2)), ((64, 16, 32, 16, 48), (1, 8))):
        weights = []
        for i, N in enumerate(group):
            W = randn((N, K), torch.float32, seed=900 + 13 * i + N, scale=0.05)
            packed, absmax = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
            extra = (None, None, None)
            if nested:
                offset = absmax.mean().reshape(1)
                absmax, nabs = ref.quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE)
                extra = (nabs, code, offset)
            bias = randn((N,), dtype, seed=950 + i) if i % 2 else None
            weights.append((packed, absmax, bias, extra))
        for layout in ("tiled16", "packed"):
            Bs, As = [], []
            for packed, absmax, _, _ in weights:
                if layout == "tiled16":
                    packed, absmax = _tiled16.repack(packed, absmax, [packed.numel() * 2 // K, K])
                Bs.append(packed)
                As.append(absmax)
            for M in rows_list:
                A = randn((M, K), dtype, seed=990 + M)
                outs = OPS.linear_4bit_merged(
                    A, Bs, list(group), As, 64, "nf4", [w[2] for w in weights],
                    [w[3][0] for w in weights], [w[3][1] for w in weights],
                    [w[3][2] for w in weights], NESTED_BLOCKSIZE, layout)
                assert len(outs) == len(group)
                for g, N in enumerate(group):
                    want = OPS.linear_4bit(A, Bs[g], [N, K], As[g], 64, "nf4", weights[g][2],
                                           *weights[g][3], NESTED_BLOCKSIZE, layout)
                    assert outs[g].shape == (M, N) and outs[g].dtype == dtype
                    assert torch.equal(outs[g], want), (group, layout, M, g)


def test_linear_4bit_merged_first_call_of_a_process():
    """Five weights (two launches, the second of one weight) as the first tiled16 call of a
    fresh process: every kernel instance the op launches is made ready by the op itself."""
    need_tiled16_device()
    import subprocess
    import sys
    code = """
import torch, opsq
from opsq import _tiled16
ops = torch.ops.opsq
torch.manual_seed(0)
K, Ns = 512, [64, 16, 32, 16, 48]
A = torch.randn(2, K, device="cuda", dtype=torch.bfloat16)
Bs, As = [], []
for N in Ns:
    q, am = ops.quantize_4bit(torch.randn(N, K, device="cuda") * 0.05, 64, "nf4", torch.uint8)
    q, am = _tiled16.repack(q, am, [N, K])
    Bs.append(q); As.append(am)
outs = ops.linear_4bit_merged(A, Bs, Ns, As, 64, "nf4", [None] * 5, [None] * 5, [None] * 5,
                              [None] * 5, 256, "tiled16")
for g, N in enumerate(Ns):
    assert torch.equal(outs[g], ops.linear_4bit(A, Bs[g], [N, K], As[g], 64, "nf4",
                                                layout="tiled16")), g
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def _tiled16_layer(N, K, dtype, nested, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, dtype=dtype)
    layer = opsq.nn.Linear4bit(K, N, quant_type="nf4", compress_statistics=nested).to(dtype)
    layer.weight = opsq.nn.Params4bit(lin.weight.detach().clone(), quant_type="nf4",
                                      compress_statistics=nested)
    layer.bias = torch.nn.Parameter(lin.bias.detach().clone())
    return layer.to(DEV), lin.weight.detach().to(DEV)


@pytest.mark.parametrize("nested", [False, True])
def test_gemv_tiled16_reads_what_the_kernel_before_wrote(nested):
    """The tiled16 gemv is a programmatic dependent launch: its prologue overlaps the kernel
    before it. Each round rewrites the weight codes, the statistics and the activation with
    kernels issued right before the gemv (no synchronisation between), then checks the gemv
    against the same call made after a synchronisation: a read ahead of griddepcontrol.wait
    would see the previous round's values."""
    need("linear_4bit")
    N, K = 4096, 1024
    codes, stats, xs = [], [], []
    for r in range(4):
        W = randn((N, K), torch.float32, seed=900 + r, scale=0.05)
        packed, absmax = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
        extra = ()
        if nested:
            offset = torch.zeros(1, device=DEV)
            absmax, nabs = ref.quantize_blockwise(absmax, create_dynamic_map().to(DEV),
                                                  NESTED_BLOCKSIZE)
            extra = (nabs, create_dynamic_map().to(DEV), offset, NESTED_BLOCKSIZE)
        tB, tA = _tiled16.repack(packed, absmax, [N, K])
        codes.append(tB)
        stats.append((tA, extra))
        xs.append(randn((1, K), torch.bfloat16, seed=950 + r))
    B = torch.empty_like(codes[0])
    S = torch.empty_like(stats[0][0])
    X = torch.empty_like(xs[0])
    for round_ in range(40):
        r = round_ % 4
        tA, extra = stats[r]
        B.copy_(codes[r])
        S.copy_(tA)
        X.copy_(xs[r] * 1.0)  # written by a kernel, not a host copy
        got = OPS.gemv_4bit(X, B, [N, K], S, 64, "nf4", None, *extra, layout="tiled16")
        torch.cuda.synchronize()
        want = OPS.gemv_4bit(xs[r], codes[r], [N, K], tA, 64, "nf4", None, *extra,
                             layout="tiled16")
        assert torch.equal(got, want), f"round {round_}: a read saw the previous values"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
def test_linear4bit_tiled16_layer_state_and_decode(dtype, nested):
    """A layer moved to an eligible GPU takes tiled16; its bytes out (state_dict, as_dict,
    dequantize_4bit, .cpu()) equal a never-tiled quantization's; eager, CUDA-graph and
    compiled (reduce-overhead, fullgraph) decode steps agree."""
    need_tiled16_device()
    N, K = 2048, 1024
    layer, W = _tiled16_layer(N, K, dtype, nested, seed=11)
    assert layer.layout == "tiled16" and layer.quant_state.layout == "tiled16"
    packed, state = opsq.functional.quantize_4bit(W, blocksize=64, compress_statistics=nested,
                                                  quant_type="nf4")
    sd = layer.state_dict()
    assert torch.equal(sd["weight"], packed)
    for k, v in state.as_dict(packed=True).items():
        assert torch.equal(sd["weight." + k], v), k
    assert torch.equal(opsq.functional.dequantize_4bit(layer.weight, layer.quant_state),
                       opsq.functional.dequantize_4bit(packed, state))
    x = randn((1, K), dtype, seed=12)
    y = layer(x)
    want = ref.linear_4bit(x, packed, [N, K], state.absmax, 64, "nf4", layer.bias,
                           *state.nested_args())
    assert_matmul_close(y, want, dtype)
    # CUDA graph of a decode step
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = layer(static_x)
    x2 = randn((1, K), dtype, seed=13)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        assert torch.equal(static_y, layer(x2))
    # compiled, fullgraph, reduce-overhead: zero graph breaks, same bytes as eager
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for s in (14, 15, 16):
            xs = randn((1, K), dtype, seed=s)
            assert torch.equal(step(xs), layer(xs))
    assert sum(counters["graph_break"].values()) == 0
    # leaving the GPU gives bitsandbytes' bytes
    cpu = layer.cpu()
    assert cpu.layout == "packed" and torch.equal(cpu.weight.data, packed.cpu())


# dequantize_4bit(layout="tiled16"): dequant4_tiled16_kernel reads the tiled bytes in place.
# (N, K): one run; 3 runs (odd, one CTA's 2 runs and a partial trip); the shapes above (more runs
# than the grid's 16 CTAs an SM: the grid-stride loop)
TILED16_DQ_SHAPES = [(16, 256), (16, 768)] + TILED16_SHAPES


def _tiled16_weight(N, K, nested, seed, nested_blocksize=NESTED_BLOCKSIZE,
                    storage=torch.uint8):
    """Random codes (every byte value) and statistics of a [N, K] weight, packed and tiled16:
    (packed, tiled, absmax, tiled absmax, nested args)."""
    packed = random_packed(N * K, seed=seed, storage=storage)
    blocks = N * K // 64
    if nested:
        q = torch.randint(0, 256, (blocks,), generator=gen(seed + 1), device=DEV,
                          dtype=torch.int32).to(torch.uint8)
        nabs = torch.rand(-(-blocks // nested_blocksize), generator=gen(seed + 2),
                          device=DEV) + 0.5
        offset = torch.rand(1, generator=gen(seed + 3), device=DEV) + 1.0
        absmax, extra = q, (nabs, create_dynamic_map().to(DEV), offset, nested_blocksize)
    else:
        absmax, extra = random_absmax(blocks, seed=seed + 1), ()
    tB, tA = _tiled16.repack(packed, absmax, [N, K])
    return packed, tB, absmax, tA, extra


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_4bit_tiled16_equals_packed(quant_type, dtype, nested):
    """dequantize_4bit(layout="tiled16") of the tiled bytes equals dequantize_4bit of the packed
    bytes bit for bit (same code table, products and rounding): every shape, uint8 and bf16
    storage, nested blocksizes 256 and 32 (nested_absmax in block order), codes at storage
    offsets 1 and 4 (the kernel's byte-load path), the .out overload."""
    need("dequantize_4bit")
    for i, (N, K) in enumerate(TILED16_DQ_SHAPES):
        for storage in (torch.uint8, torch.bfloat16):
            for nbs in ((NESTED_BLOCKSIZE, 32) if nested else (NESTED_BLOCKSIZE,)):
                packed, tB, absmax, tA, extra = _tiled16_weight(N, K, nested, 900 + 13 * i,
                                                                nbs, storage)
                if nested:
                    extra = extra[:3] + (nbs,)
                want = OPS.dequantize_4bit(packed, absmax, 64, quant_type, [N, K], dtype, *extra)
                got = OPS.dequantize_4bit(tB, tA, 64, quant_type, [N, K], dtype, *extra,
                                          layout="tiled16")
                assert got.shape == (N, K) and got.dtype == dtype
                assert torch.equal(got, want), (N, K, storage, nbs)
        # unaligned codes: the same bytes at storage offsets 1 and 4 (not 8-byte aligned)
        packed, tB, absmax, tA, extra = _tiled16_weight(N, K, nested, 950 + i)
        want = OPS.dequantize_4bit(packed, absmax, 64, quant_type, [N, K], dtype, *extra)
        for shift in (1, 4):
            big = torch.empty(N * K // 2 + 8, dtype=torch.uint8, device=DEV)
            view = big[shift:shift + N * K // 2]
            view.copy_(tB.reshape(-1))
            got = OPS.dequantize_4bit(view.reshape(-1, 1), tA, 64, quant_type, [N, K], dtype,
                                      *extra, layout="tiled16")
            assert torch.equal(got, want), (N, K, shift)
        out = torch.empty(N, K, dtype=dtype, device=DEV)
        OPS.dequantize_4bit.out(tB, tA, 64, quant_type, [N, K], dtype, *extra, layout="tiled16",
                                out=out)
        assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("nested", [False, True])
def test_linear_4bit_tiled16_prefill_equals_packed(dtype, nested):
    """linear_4bit on a tiled16 weight beyond the decode kernel (M 17, 64, 300; fp32; unaligned
    activations) dequantizes straight from the tiled layout and multiplies as the packed path
    does: the same bytes as the packed-layout call, with and without bias."""
    need("linear_4bit")
    for i, (N, K) in enumerate([(48, 768), (1024, 4096), (4096, 1024)]):
        packed, tB, absmax, tA, extra = _tiled16_weight(N, K, nested, 1000 + 17 * i)
        absmax = absmax * 0.02 if not nested else absmax  # keep the products finite
        tA = tA * 0.02 if not nested else tA
        cases = [(M, False) for M in (17, 64, 300)] + [(3, True)]
        if dtype == torch.float32:
            cases.append((2, False))  # fp32 never takes the decode kernels
        for M, shifted in cases:
            A = randn((M * K + (8 if shifted else 0),), dtype, seed=1100 + M + i, scale=0.5)
            A = (A[1:1 + M * K] if shifted else A).reshape(M, K)  # shifted: not 16-byte aligned
            for bias in (None, randn((N,), dtype, seed=1200 + i)):
                want = OPS.linear_4bit(A, packed, [N, K], absmax, 64, "nf4", bias, *extra)
                got = OPS.linear_4bit(A, tB, [N, K], tA, 64, "nf4", bias, *extra,
                                      layout="tiled16")
                assert got.shape == (M, N) and got.dtype == dtype
                assert torch.equal(got, want), (N, K, M, shifted, bias is None)


@pytest.mark.parametrize("nested", [False, True])
def test_linear_4bit_tiled16_unaligned_statistics(nested):
    """The decode kernel copies statistics 16 bytes at a time: tiled16 statistics 8 bytes (plain)
    or 4 bytes (nested codes) off 16-byte alignment take the dequantize + cuBLAS route for few
    rows, the same bytes as that computation, and the aligned copy takes the kernel (matching
    the reference)."""
    need("linear_4bit")
    dtype = torch.bfloat16
    N, K = 256, 1024
    packed, tB, absmax, tA, extra = _tiled16_weight(N, K, nested, 1300)
    shift = 4 if nested else 2  # elements: 4 bytes of uint8 codes, 8 bytes of fp32
    room = torch.empty(tA.numel() + shift, dtype=tA.dtype, device=DEV)
    room[shift:] = tA
    tA_off = room[shift:]
    assert tA_off.data_ptr() % 16 != 0 and torch.equal(tA_off, tA)
    for M in (1, 5, 16):
        A = randn((M, K), dtype, seed=1310 + M, scale=0.5)
        got = OPS.linear_4bit(A, tB, [N, K], tA_off, 64, "nf4", None, *extra, layout="tiled16")
        W = OPS.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], dtype, *extra)
        assert torch.equal(got, torch.nn.functional.linear(A, W)), M
        kernel = OPS.linear_4bit(A, tB, [N, K], tA, 64, "nf4", None, *extra, layout="tiled16")
        want = ref.linear_4bit(A, packed, [N, K], absmax, 64, "nf4", None, *extra)
        assert_matmul_close(kernel, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nbs", [NESTED_BLOCKSIZE, 32])
def test_linear_4bit_tiled16_nested_equals_plain_of_decoded(dtype, nbs):
    """The decode kernel on nested statistics gives the bytes it gives on plain statistics equal
    to their decoded values (code[q] * nested_absmax, then + offset: two fp32 roundings): every
    block's absmax reaches the same products. nested_absmax random per nested block, and shapes
    whose 16-row tiles span several nested blocks, so a statistic decoded with another row's or
    chunk's nested_absmax changes bytes."""
    need_tiled16_device()
    for i, (N, K) in enumerate([(1024, 4096), (6144, 1280), (48, 768), (256, 16384)]):
        packed, tB, q, tq, extra = _tiled16_weight(N, K, True, 1400 + 11 * i, nbs)
        nabs, code, offset, _ = extra
        blocks = N * K // 64
        decoded = code[q.long()] * nabs.repeat_interleave(nbs)[:blocks] + offset
        _, tA = _tiled16.repack(packed, decoded, [N, K])
        for M in (1, 3, 8):
            A = randn((M, K), dtype, seed=1450 + M + i, scale=0.5)
            got = OPS.linear_4bit(A, tB, [N, K], tq, 64, "nf4", None, *extra, layout="tiled16")
            want = OPS.linear_4bit(A, tB, [N, K], tA, 64, "nf4", None, layout="tiled16")
            assert torch.equal(got, want), (N, K, M)


# =============================================================================================
# 8-bit blockwise
# =============================================================================================
# every blockwise blocksize (up to 16384); the (2 * 16384 + 4101,) shape ends in a partial
# block for each of them
@pytest.mark.parametrize("blocksize", BLOCKWISE_BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_blockwise_matches_reference(blocksize, dtype):
    need("quantize_blockwise")
    code = create_dynamic_map().to(DEV)
    rank = torch.empty(256, dtype=torch.long)
    rank[torch.sort(code.cpu()).indices] = torch.arange(256)
    for i, shape in enumerate([(1,), (5, 3), (1000,), (4096 * 3 + 7,), (257, 129),
                               (2 * 16384 + 4101,)]):
        A = randn(shape, dtype, seed=50 + i + blocksize, scale=2.0)
        q, absmax = OPS.quantize_blockwise(A, code, blocksize)
        rq, ra = ref.quantize_blockwise(A.cpu(), code.cpu(), blocksize)
        assert q.shape == rq.shape and q.dtype == torch.uint8
        assert torch.equal(absmax.cpu(), ra)
        assert_codes_close(q, rq, rank)


@pytest.mark.parametrize("blocksize", BLOCKWISE_BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_dequantize_blockwise_matches_reference(blocksize, dtype):
    need("dequantize_blockwise")
    code = create_dynamic_map().to(DEV)
    for i, shape in enumerate([(1,), (5, 3), (1001,), (4096 * 3 + 7,), (257, 129),
                               (2 * 16384 + 4101,)]):
        n = 1
        for s in shape:
            n *= s
        A = torch.randint(0, 256, shape, generator=gen(i), device=DEV,
                          dtype=torch.int32).to(torch.uint8)
        am = random_absmax(-(-n // blocksize), seed=i)
        out = OPS.dequantize_blockwise(A, am, code, blocksize, dtype)
        want = ref.dequantize_blockwise(A.cpu(), am.cpu(), code.cpu(), blocksize, dtype)
        assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("blocksize", [4096, 8192, 16384])
@pytest.mark.parametrize("dtype", FLOATS)
def test_blockwise_large_blocksizes_unaligned(blocksize, dtype):
    """The blocksizes with one quantization block per CTA on an input that is not 16-byte
    aligned (the scalar load path), ending in a partial block, and their CUDA checks."""
    need("quantize_blockwise"); need("dequantize_blockwise")
    code = create_dynamic_map().to(DEV)
    rank = torch.empty(256, dtype=torch.long)
    rank[torch.sort(code.cpu()).indices] = torch.arange(256)
    A = randn((3 * blocksize + 1000,), dtype, seed=blocksize + 7, scale=3.0)[1:]
    q, absmax = OPS.quantize_blockwise(A, code, blocksize)
    rq, ra = ref.quantize_blockwise(A.cpu(), code.cpu(), blocksize)
    assert absmax.shape == (4,) and torch.equal(absmax.cpu(), ra)
    assert_codes_close(q, rq, rank)
    qu = torch.cat([torch.zeros(1, dtype=torch.uint8, device=DEV), q])[1:]  # odd address
    out = OPS.dequantize_blockwise(qu, absmax, code, blocksize, dtype)
    assert torch.equal(out.cpu(), ref.dequantize_blockwise(q.cpu(), ra, code.cpu(), blocksize,
                                                           dtype))
    for bad in (3000, 32768):
        with pytest.raises(ValueError, match=rf"blocksize must be one of \(32, .*, 16384\), "
                                             rf"got {bad}"):
            OPS.quantize_blockwise(A, code, bad)
        with pytest.raises(ValueError, match=rf"blocksize must be one of .* got {bad}"):
            OPS.dequantize_blockwise(q, absmax, code, bad, dtype)
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, .*, 4096\), got 8192"):
        OPS.quantize_4bit(A, 8192, "nf4", torch.uint8)


def test_blockwise_specials():
    need("quantize_blockwise")
    code = create_dynamic_map().to(DEV)
    x = torch.randn(64 * 6)
    x[64:128] = 0
    x[130] = float("nan")
    x[200] = float("inf")
    x[300:310] = 1e-40
    A = x.to(DEV)
    q, am = OPS.quantize_blockwise(A, code, 64)
    rq, ra = ref.quantize_blockwise(x, code.cpu(), 64)
    assert torch.equal(am.cpu().nan_to_num(), ra.nan_to_num())
    assert torch.equal(q.cpu(), rq)


# =============================================================================================
# LLM.int8
# =============================================================================================
INT8_SHAPES = [(1, 1), (7, 13), (64, 4096), (3, 5, 64), (130, 1000), (1, 8192), (300, 24)]


def with_outliers(shape, dtype, seed):
    x = randn(shape, torch.float32, seed=seed)
    g = gen(seed + 1)
    hot = torch.rand(shape, generator=g, device=DEV) < 0.002
    x = torch.where(hot, x.sign() * 8.0 + x, x)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_vectorwise_quant_matches_reference(dtype, threshold):
    need("vectorwise_quant")
    for i, shape in enumerate(INT8_SHAPES):
        A = with_outliers(shape, dtype, seed=i)
        got = OPS.vectorwise_quant(A, threshold)
        want = ref.vectorwise_quant(A.cpu(), threshold)
        for g, w, name in zip(got, want, ("CA", "SCA", "outlier_cols")):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            assert torch.equal(g.cpu(), w), f"{name} differs for shape {shape}"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("threshold", [0.0, 3.0])
def test_double_quant_matches_reference(dtype, threshold):
    need("double_quant")
    for i, shape in enumerate(INT8_SHAPES):
        A = with_outliers(shape, dtype, seed=20 + i)
        got = OPS.double_quant(A, threshold)
        want = ref.double_quant(A.cpu(), threshold)
        for g, w, name in zip(got, want, ("out_row", "out_col", "row_stats", "col_stats",
                                           "outlier_cols")):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            assert torch.equal(g.cpu(), w), f"{name} differs for shape {shape}"


def big_int8_input(kind, rows, K, dtype, seed):
    """Large inputs for the single-pass int8 quantizers' outlier bookkeeping: "dense" (N(0, 2):
    outliers at t=6 in nearly every column), "sparse" (a few hot columns + scattered elements)."""
    x = randn((rows, K), torch.float32, seed=seed) * (2.0 if kind == "dense" else 1.0)
    if kind == "sparse":
        g = gen(seed + 1)
        cols = torch.randperm(K, generator=torch.Generator().manual_seed(seed))[:13].to(DEV)
        x[:, cols] += 20.0
        hot = torch.rand((rows, K), generator=g, device=DEV) < 1e-5
        x = torch.where(hot, x + 9.0, x)
    return x.to(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("kind,rows,K,dtype", [
    ("dense", 8192, 8192, torch.float16), ("sparse", 8192, 8192, torch.float16),
    ("sparse", 4096, 8192, torch.bfloat16), ("sparse", 6000, 2048, torch.float16),
    ("dense", 3000, 1024, torch.bfloat16), ("sparse", 2048, 16384, torch.bfloat16)])
def test_int8_quantizers_large_outliers(kind, rows, K, dtype):
    """vectorwise_quant / double_quant at t=6 on large inputs equal the reference byte for byte,
    and a second run gives the same bytes (the outlier-column bookkeeping across CTAs)."""
    need("vectorwise_quant"); need("double_quant")
    A = big_int8_input(kind, rows, K, dtype, seed=rows + K)
    for op, names in (("vectorwise_quant", ("CA", "SCA", "outlier_cols")),
                      ("double_quant", ("out_row", "out_col", "row_stats", "col_stats",
                                        "outlier_cols"))):
        got = getattr(OPS, op)(A, 6.0)
        again = getattr(OPS, op)(A, 6.0)
        want = getattr(ref, op)(A, 6.0)
        for g, a, w, name in zip(got, again, want, names):
            assert torch.equal(g, w), f"{op} {name} differs ({kind}, {rows}x{K})"
            assert torch.equal(g, a), f"{op} {name} not reproducible ({kind}, {rows}x{K})"


def test_int8_quant_empty():
    need("double_quant")
    for shape in [(0, 8), (0, 3, 5)]:
        A = torch.empty(shape, device=DEV)
        for g, w in zip(OPS.double_quant(A, 0.0), ref.double_quant(A.cpu(), 0.0)):
            assert g.shape == w.shape and torch.equal(g.cpu(), w)


@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.float32])
def test_mm_dequant_matches_reference(out_dtype, bias_dtype):
    need("mm_dequant")
    for i, shape in enumerate([(1, 1), (5, 7), (64, 4096), (2, 3, 40)]):
        N = shape[-1]
        A = torch.randint(-2**20, 2**20, shape, generator=gen(i), device=DEV, dtype=torch.int32)
        rows = A.numel() // N
        rs = torch.rand(rows, generator=gen(i + 1), device=DEV) * 10
        cs = torch.rand(N, generator=gen(i + 2), device=DEV) * 10
        bias = None if bias_dtype is None else randn((N,), bias_dtype, seed=i)
        got = OPS.mm_dequant(A, rs, cs, bias, out_dtype)
        want = ref.mm_dequant(A.cpu(), rs.cpu(), cs.cpu(),
                              None if bias is None else bias.cpu(), out_dtype)
        assert got.dtype == want.dtype and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("shape", [(1, 64, 32), (16, 72, 40), (17, 64, 48), (33, 72, 8),
                                   (5, 13, 7), (64, 4096, 1024), (2, 3, 96, 24), (1, 8192, 333),
                                   (16, 1024, 1000), (3, 4096, 130), (17, 64, 44)])
def test_igemmlt_matches_reference(shape):
    """Every route: torch._int_mm (M > 16, K and N multiples of 8), the small-M tensor-core
    kernel (M <= 16, K % 16 == 0: several CTAs, N tails), the dp4a kernel with 16-byte loads
    (17 x 64 -> 44) and without (K % 16 != 0)."""
    need("igemmlt")
    *lead, K, N = shape
    A = torch.randint(-127, 128, (*lead, K), generator=gen(K), device=DEV,
                      dtype=torch.int32).to(torch.int8)
    B = torch.randint(-127, 128, (N, K), generator=gen(N), device=DEV,
                      dtype=torch.int32).to(torch.int8)
    got = OPS.igemmlt(A, B)
    want = ref.igemmlt(A.cpu(), B.cpu())
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("int8_weight", [True, False])
def test_int8_linear_matches_reference(dtype, threshold, int8_weight):
    need("int8_linear")
    for i, (ashape, N) in enumerate([((1, 64), 32), ((3, 7, 128), 72), ((40, 256), 200)]):
        K = ashape[-1]
        A = with_outliers(ashape, dtype, seed=i)
        Wf = randn((N, K), dtype, seed=10 + i, scale=0.1)
        if int8_weight:
            CB, SCB, _ = ref.vectorwise_quant(Wf, 0.0)
            B, scb = CB, SCB
        else:
            B, scb = Wf, None
        bias = randn((N,), dtype, seed=5)
        got = OPS.int8_linear(A, B, scb, bias, threshold)
        want = ref.int8_linear(A, B, scb, bias, threshold)
        assert got.shape == want.shape and got.dtype == dtype
        assert_matmul_close(got, want, dtype if dtype != torch.float32 else torch.float16)


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_linear_threshold0_bit_exact(dtype):
    """Threshold 0: one epilogue straight to A.dtype with the bias fused equals the reference's
    fp32 mm_dequant + fp32 bias + one rounding, byte for byte (float and int8 weights)."""
    need("int8_linear")
    for i, (rows, K, N) in enumerate([(40, 256, 200), (17, 64, 33), (300, 1024, 4096)]):
        A = randn((rows, K), dtype, seed=60 + i)
        W = randn((N, K), dtype, seed=70 + i, scale=0.1)
        CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
        for bias in (None, randn((N,), dtype, seed=1), randn((N,), torch.float32, seed=2)):
            for B, scb in ((CB, SCB), (W, None)):
                got = OPS.int8_linear(A, B, scb, bias, 0.0)
                want = ref.int8_linear(A, B, scb, bias, 0.0)
                assert torch.equal(got, want), (rows, K, N, bias is None, scb is None)


@pytest.mark.parametrize("n_out", [0, 1, 5, 64, 65, 130, 1000])
def test_int8_linear_outlier_column_counts(n_out):
    """Threshold 6 with exactly n_out outlier columns: the fused outlier term (first 64 columns
    gathered, the rest from the transposed tail, outlier_tail_kernel) matches the reference; one
    column is exact. Every row of an outlier column is an outlier, so the first 16 rows alone
    have the same mask: their bytes equal the small-M kernel's, an independent implementation
    of the same arithmetic. N = 300 takes the 4-byte tail loads, N = 75 the byte loads."""
    need("int8_linear")
    rows, K = 70, 1024
    A = randn((rows, K), torch.float16, seed=n_out) * 0.5
    cols = torch.randperm(K, generator=torch.Generator().manual_seed(n_out))[:n_out].to(DEV)
    A[:, cols] = (A[:, cols].float() + 9.0).half()
    _, _, mask = OPS.vectorwise_quant(A, 6.0)
    assert int(mask.sum()) == n_out
    for N in (300, 75):
        W = randn((N, K), torch.float16, seed=3 + N, scale=0.1)
        CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
        bias = randn((N,), torch.float16, seed=4)
        out = torch.full((rows, N), float("nan"), dtype=torch.float16, device=DEV)
        out.copy_(OPS.int8_linear(A, CB, SCB, bias, 6.0))
        want = ref.int8_linear(A, CB, SCB, bias, 6.0)
        if n_out <= 1:
            assert torch.equal(out, want)
        assert_matmul_close(out, want, torch.float16)
        assert torch.equal(out, OPS.int8_linear(A, CB, SCB, bias, 6.0))  # deterministic
        assert same_bytes(out[:16], OPS.int8_linear(A[:16], CB, SCB, bias, 6.0)), (N, n_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_outlier_tail_signed_zero(dtype):
    """65 outlier columns (a tail of one, padded to a group of 4) and a negative SCB: in a row
    whose only outlier-column value is tiny, the outlier sum underflows to -0 and the int32 sum
    is 0, so the output's sign of zero depends on the padding terms being exactly +0. Bytes equal
    the small-M kernel's (it pads with fma(0, 0, s)) on the first 16 rows."""
    need("int8_linear")
    rows, K, N = 17, 128, 40
    A = randn((rows, K), torch.float32, seed=31) * 0.5
    A[0, :65] = 10.0  # the outlier columns 0..64 (row 0 only)
    A[1] = 0.0
    A[1, 64] = 1e-30  # row 1: one tiny value in an outlier column, nothing else
    A = A.to(dtype)
    CB = torch.randint(1, 128, (N, K), dtype=torch.int8,
                       generator=torch.Generator().manual_seed(32)).to(DEV)
    SCB = -torch.rand(N, generator=torch.Generator().manual_seed(33)).to(DEV) * 1e-20
    _, _, mask = OPS.vectorwise_quant(A, 6.0)
    assert int(mask.sum()) == 65
    out = torch.full((rows, N), float("nan"), dtype=dtype, device=DEV)
    out.copy_(OPS.int8_linear(A, CB, SCB, None, 6.0))
    assert same_bytes(out[:16], OPS.int8_linear(A[:16], CB, SCB, None, 6.0))
    want = ref.int8_linear(A, CB, SCB, None, 6.0)
    assert_matmul_close(out, want, dtype if dtype != torch.float32 else torch.float16)
    assert not torch.signbit(out[1]).any() and not torch.signbit(want[1]).any()  # +0, as the reference


# ---- int8_linear's small-M kernel (int8_small_m.cu): <= 16 rows, int8 weight, K % 16 == 0 ----
def same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    itype = {2: torch.int16, 4: torch.int32}[x.element_size()]
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(itype), y.view(itype))


def small_m_input(ashape, dtype, seed, n_out=0):
    """N(0, 1) activations with n_out outlier columns: one element of each set to ±(6.5 .. 9.5)
    (an outlier at threshold 6; the column's other rows keep their small values)."""
    A = randn(ashape, torch.float32, seed=seed)
    K = ashape[-1]
    A2 = A.reshape(-1, K)
    if n_out:
        g = torch.Generator().manual_seed(seed)
        cols = torch.randperm(K, generator=g)[:n_out]
        rws = torch.randint(0, A2.shape[0], (n_out,), generator=g)
        mag = 6.5 + 3.0 * torch.rand(n_out, generator=g)
        sign = torch.where(torch.rand(n_out, generator=g) < 0.5, -1.0, 1.0)
        A2[rws.to(DEV), cols.to(DEV)] = (sign * mag).to(DEV)
    return A2.reshape(ashape).to(dtype)


def int8_linear_two_kernel(A, CB, SCB, bias, threshold):
    """The same op through igemmlt + the epilogue kernels: A's rows repeated up to 17 rows (the
    small-M path takes <= 16). Repeats change neither the outlier columns nor any row's values."""
    K = A.shape[-1]
    a = A.reshape(-1, K)
    rows = a.shape[0]
    big = a[torch.arange(17, device=DEV) % rows]
    return OPS.int8_linear(big, CB, SCB, bias, threshold)[:rows].reshape(*A.shape[:-1], -1)


SMALL_M_CASES = [((1, 256), 72), ((3, 256), 72), ((16, 256), 72), ((2, 3, 128), 40),
                 ((16, 4096), 1024)]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_small_m_matches_reference(dtype, threshold):
    """1..16 rows with an int8 weight (tail columns: N = 72, 40): bytes equal to the two-kernel
    path; at threshold 0 equal to the reference byte for byte, at 6 (5 outlier columns) within
    the matmul tolerance (the reference sums the outlier columns in another order)."""
    need("int8_linear")
    for i, (ashape, N) in enumerate(SMALL_M_CASES):
        K = ashape[-1]
        A = small_m_input(ashape, dtype, seed=80 + i, n_out=5)
        W = randn((N, K), dtype, seed=90 + i, scale=0.1)
        CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
        for bias in (None, randn((N,), dtype, seed=1), randn((N,), torch.float32, seed=2)):
            got = OPS.int8_linear(A, CB, SCB, bias, threshold)
            want = ref.int8_linear(A, CB, SCB, bias, threshold)
            assert got.shape == want.shape and got.dtype == dtype
            assert same_bytes(got, int8_linear_two_kernel(A, CB, SCB, bias, threshold)), \
                (ashape, N, bias is None)
            if threshold == 0.0:
                assert torch.equal(got, want), (ashape, N, bias is None)
            else:
                assert_matmul_close(got, want, dtype if dtype != torch.float32 else torch.float16)
            no_new_nan(got)


@pytest.mark.parametrize("n_out", [0, 1, 5, 64, 70])
def test_int8_linear_small_m_outlier_column_counts(n_out):
    """Threshold 6, 4 rows, exactly n_out outlier columns (more than one chunk of 64; counts
    that are not multiples of 4): bytes equal to the two-kernel path, deterministic; one column
    equals the reference."""
    need("int8_linear")
    rows, K, N = 4, 1024, 136
    A = small_m_input((rows, K), torch.bfloat16, seed=n_out, n_out=n_out)
    W = randn((N, K), torch.bfloat16, seed=3, scale=0.1)
    CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
    bias = randn((N,), torch.bfloat16, seed=4)
    _, _, mask = OPS.vectorwise_quant(A, 6.0)
    assert int(mask.sum()) == n_out
    out = OPS.int8_linear(A, CB, SCB, bias, 6.0)
    want = ref.int8_linear(A, CB, SCB, bias, 6.0)
    assert same_bytes(out, int8_linear_two_kernel(A, CB, SCB, bias, 6.0))
    if n_out <= 1:
        assert torch.equal(out, want)
    assert_matmul_close(out, want, torch.bfloat16)
    assert same_bytes(out, OPS.int8_linear(A, CB, SCB, bias, 6.0))  # deterministic


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_small_m_non_finite(threshold):
    """A NaN and an inf in A, an inf and a NaN in SCB: the same bytes as the two-kernel path
    and the reference's NaN / inf positions (a NaN row; a non-finite SCB column)."""
    need("int8_linear")
    rows, K, N = 5, 256, 72
    A = small_m_input((rows, K), torch.float16, seed=7, n_out=3)
    A[1, 17] = float("nan")
    A[3, 40] = float("inf")
    W = randn((N, K), torch.float16, seed=8, scale=0.1)
    CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
    SCB = SCB.clone()
    SCB[3] = float("inf")
    SCB[10] = float("nan")
    bias = randn((N,), torch.float16, seed=9)
    got = OPS.int8_linear(A, CB, SCB, bias, threshold)
    want = ref.int8_linear(A, CB, SCB, bias, threshold)
    assert same_bytes(got, int8_linear_two_kernel(A, CB, SCB, bias, threshold))
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.isinf(), want.isinf())
    fin = torch.isfinite(want)
    assert bool(got[1].isnan().all()) and bool(got[:, 10].isnan().all())
    if threshold == 0.0:
        assert torch.equal(got[fin], want[fin])
    else:
        assert_matmul_close(got[fin], want[fin], torch.float16)


def cuda_kernel_names(fn) -> set:
    """Names of the CUDA kernels ``fn()`` launches (torch.profiler)."""
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", FLOATS)
def test_int8_linear_small_m_outlier_prologue(dtype):
    """Threshold 6: A's quantization and the outlier compaction in one launch
    (int8_quant.cu's small_outliers_kernel, a cluster of 8 CTAs, one strip of K each), at the
    shapes that exercise its corners: rows that share a warp and strips left empty (K = 272: 9
    bitset words over 8 CTAs; K = 16: one word), more items a CTA than threads with a row
    length that does not divide the thread count (K = 9200), a compaction of 3000 columns
    across the strips, every column an outlier, 16 rows at the widest K it takes (65536), a row
    of subnormal values (its statistic subnormal in fp32 and bf16: quant_int8's division path;
    0 in fp16), and the routes around it (K > 65536; A not 16-byte aligned). Bytes equal to the
    two-kernel path (rowreg_kernel, its fix-up and outlier_compact_kernel), close to the
    reference; on sm_90 the profiler must see the kernel (a build without sm_90 code falls
    back)."""
    need("int8_linear")
    cases = [((5, 272), 24, 3), ((2, 40960), 16, 3000), ((3, 64), 16, 64), ((2, 16), 8, 1),
             ((16, 65536), 8, 40), ((4, 512), 24, 2), ((2, 65552), 8, 9), ((16, 9200), 24, 20)]
    for i, (ashape, N, n_out) in enumerate(cases):
        K = ashape[-1]
        A = small_m_input(ashape, dtype, seed=300 + i, n_out=n_out)
        if ashape == (4, 512):
            A[3] = (A[3].float() * 1e-39).to(dtype)  # the outliers are in rows 2 and 0
        W = randn((N, K), dtype, seed=310 + i, scale=0.1)
        CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
        bias = randn((N,), dtype, seed=320 + i)
        _, _, mask = OPS.vectorwise_quant(A, 6.0)
        assert int(mask.sum()) == n_out
        got = OPS.int8_linear(A, CB, SCB, bias, 6.0)
        assert same_bytes(got, int8_linear_two_kernel(A, CB, SCB, bias, 6.0)), (ashape, n_out)
        assert_matmul_close(got, ref.int8_linear(A, CB, SCB, bias, 6.0),
                            dtype if dtype != torch.float32 else torch.float16)
    A = small_m_input((3, 256), dtype, seed=330, n_out=4)
    flat = torch.zeros(A.numel() + 1, dtype=dtype, device=DEV)
    flat[1:] = A.reshape(-1)
    shifted = flat[1:].view(A.shape)  # storage offset of one element
    W = randn((40, 256), dtype, seed=331, scale=0.1)
    CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
    assert same_bytes(OPS.int8_linear(shifted, CB, SCB, None, 6.0),
                      OPS.int8_linear(A, CB, SCB, None, 6.0))
    names = cuda_kernel_names(lambda: OPS.int8_linear(A, CB, SCB, None, 6.0))
    # (no names at all: the profiler could not attach, e.g. under compute-sanitizer)
    if torch.cuda.get_device_capability()[0] >= 9 and names:
        assert any("small_outliers_kernel" in n for n in names), sorted(names)
        assert not any("outlier_fixup_kernel" in n for n in names), sorted(names)


def test_int8_linear_small_m_fallbacks():
    """Shapes the small-M kernel does not take run the two-kernel path: K % 16 != 0, a weight
    not 16-byte aligned; results as the reference (threshold 0: byte for byte)."""
    need("int8_linear")
    A = randn((3, 200), torch.float16, seed=11)
    W = randn((40, 200), torch.float16, seed=12, scale=0.1)
    CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
    assert torch.equal(OPS.int8_linear(A, CB, SCB, None, 0.0),
                       ref.int8_linear(A, CB, SCB, None, 0.0))
    A = randn((3, 256), torch.float16, seed=13)
    W = randn((40, 256), torch.float16, seed=14, scale=0.1)
    CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
    flat = torch.zeros(CB.numel() + 1, dtype=torch.int8, device=DEV)
    flat[1:] = CB.reshape(-1)
    shifted = flat[1:].view(CB.shape)  # storage offset 1
    got = OPS.int8_linear(A, shifted, SCB, None, 0.0)
    assert torch.equal(got, ref.int8_linear(A, CB, SCB, None, 0.0))
    assert torch.equal(got, OPS.int8_linear(A, CB, SCB, None, 0.0))


@pytest.mark.parametrize("K,thr", [(256, 6.0), (256, 0.0), (65552, 6.0)])
def test_int8_linear_small_m_cuda_graph(K, thr):
    """The small-M path captured in a CUDA graph and replayed on new activations with other
    outliers, behind each of A's quantizers (the fused kernel is a programmatic dependent launch
    of the kernel before it): threshold 6 (small_outliers_kernel, the outlier count read on the
    device), threshold 0 (rowreg_kernel) and K > 65536 (the row quantizer, then
    outlier_compact_kernel)."""
    need("int8_linear")
    W = randn((72, K), torch.float16, seed=21, scale=0.1)
    CB, SCB, _ = OPS.vectorwise_quant(W, 0.0)
    bias = randn((72,), torch.float16, seed=22)
    static = small_m_input((4, K), torch.float16, seed=23, n_out=2)
    fresh = small_m_input((4, K), torch.float16, seed=24, n_out=7)
    graph_check(lambda a: OPS.int8_linear(a, CB, SCB, bias, thr), (static,), (fresh,))


# =============================================================================================
# transform (legacy cuBLASLt tile orders)
# =============================================================================================
ORDERS = ["row", "col32", "col_turing", "col_ampere"]


@pytest.mark.parametrize("to", ORDERS)
@pytest.mark.parametrize("frm", ORDERS)
def test_transform_matches_reference(frm, to):
    """Every order pair, odd shapes (partial tiles, padding), an unaligned source: the CUDA
    kernel's bytes equal the reference's, padding bytes included (compared whole), and the
    inverse transform gives the source back."""
    need("transform")
    shapes = [(1, 1), (7, 33), (33, 65), (40, 100), (64, 64), (257, 31), (96, 288), (8, 4096)]
    for i, (rows, cols) in enumerate(shapes):
        X = torch.randint(-127, 128, (rows, cols), generator=gen(50 + i), device=DEV,
                          dtype=torch.int8)
        src = X if frm == "row" else ref.transform(X, "row", frm, [rows, cols])
        got = OPS.transform(src, frm, to, [rows, cols])
        want = ref.transform(src, frm, to, [rows, cols])
        assert got.shape == want.shape and got.dtype == torch.int8
        assert torch.equal(got, want), (frm, to, rows, cols)
        back = OPS.transform(got, to, frm, [rows, cols])
        assert torch.equal(back, src), (frm, to, rows, cols)
        # the same bytes at storage offset 1 (no 16-byte alignment)
        flat = src.reshape(-1)
        big = torch.empty(flat.numel() + 1, dtype=torch.int8, device=DEV)
        big[1:] = flat
        shifted = big[1:].view(src.shape)
        assert torch.equal(OPS.transform(shifted, frm, to, [rows, cols]), want)


# =============================================================================================
# > 2**31 elements (64-bit indexing)
# =============================================================================================
@pytest.mark.slow
def test_4bit_beyond_int32_elements():
    need("quantize_4bit"); need("dequantize_4bit")
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    tail = 64 * 3 + 5  # the last blocks, starting at a block boundary past 2**31
    n = 2**31 + tail
    A = torch.empty(n, device=DEV, dtype=torch.bfloat16)
    A.normal_(generator=gen(0))
    packed, absmax = OPS.quantize_4bit(A, 64, "nf4", torch.uint8)
    start = n - tail
    rp, ra = ref.quantize_4bit(A[start:].cpu(), 64, "nf4", torch.uint8)
    assert torch.equal(absmax[start // 64:].cpu(), ra)
    assert torch.equal(packed.reshape(-1)[start // 2:].cpu(), rp.reshape(-1))
    out = OPS.dequantize_4bit(packed, absmax, 64, "nf4", [n], torch.bfloat16)
    want = ref.dequantize_4bit(rp, ra, 64, "nf4", [tail], torch.bfloat16)
    assert torch.equal(out[start:].cpu(), want)
    del out, packed, A


# =============================================================================================
# CUDA graphs: capture once, copy new data into the static inputs, replay
# =============================================================================================
def graph_check(fn, static_inputs, fresh_inputs, exact=True):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = fn(*static_inputs)
    for st, fr in zip(static_inputs, fresh_inputs):
        if isinstance(st, torch.Tensor):
            st.copy_(fr)
    g.replay()
    torch.cuda.synchronize()
    eager = fn(*fresh_inputs)
    outs = static_out if isinstance(static_out, (tuple, list)) else (static_out,)
    eagers = eager if isinstance(eager, (tuple, list)) else (eager,)
    for o, e in zip(outs, eagers):
        if exact:
            assert torch.equal(o.view(torch.uint8) if o.dtype == torch.bfloat16 else o,
                               e.view(torch.uint8) if e.dtype == torch.bfloat16 else e)
        else:  # cuBLAS inside: the graph may pick another algorithm than the eager call
            torch.testing.assert_close(o, e, rtol=4e-3, atol=1e-3 * float(e.abs().max()))


def _packed_weight(N, K, seed, quant_type="nf4"):
    W = randn((N, K), torch.float32, seed=seed, scale=0.05)
    return OPS.quantize_4bit(W, 64, quant_type, torch.uint8)


GRAPH_CASES = {
    "quantize_4bit": lambda s: ((randn((4099,), torch.bfloat16, s), 64, "nf4", torch.uint8),
                                OPS.quantize_4bit),
    "dequantize_4bit": lambda s: ((random_packed(4099, s), random_absmax(65, s), 64, "fp4",
                                   [4099], torch.float16), OPS.dequantize_4bit),
    "gemv_4bit": lambda s: ((randn((1, 256), torch.bfloat16, s), *_packed_weight(96, 256, s),
                             64, "nf4"),
                            lambda A, B, am, bs, qt: OPS.gemv_4bit(A, B, [96, 256], am, bs, qt)),
    "linear_4bit": lambda s: ((randn((40, 256), torch.float16, s), *_packed_weight(96, 256, s),
                               64, "fp4"),
                              lambda A, B, am, bs, qt: OPS.linear_4bit(A, B, [96, 256], am, bs,
                                                                       qt)),
    "quantize_blockwise": lambda s: ((randn((5000,), torch.float32, s),
                                      create_dynamic_map().to(DEV), 256),
                                     OPS.quantize_blockwise),
    "dequantize_blockwise": lambda s: ((torch.randint(0, 256, (5000,), generator=gen(s),
                                                      device=DEV, dtype=torch.int32).to(
                                            torch.uint8),
                                        random_absmax(20, s), create_dynamic_map().to(DEV), 256,
                                        torch.bfloat16), OPS.dequantize_blockwise),
    "vectorwise_quant": lambda s: ((with_outliers((33, 256), torch.float16, s), 3.0),
                                   OPS.vectorwise_quant),
    "double_quant": lambda s: ((with_outliers((33, 256), torch.bfloat16, s), 3.0),
                               OPS.double_quant),
    "igemmlt": lambda s: ((torch.randint(-127, 128, (40, 64), generator=gen(s), device=DEV,
                                         dtype=torch.int32).to(torch.int8),
                           torch.randint(-127, 128, (24, 64), generator=gen(s + 1), device=DEV,
                                         dtype=torch.int32).to(torch.int8)), OPS.igemmlt),
    "mm_dequant": lambda s: ((torch.randint(-1000, 1000, (33, 40), generator=gen(s), device=DEV,
                                            dtype=torch.int32),
                              torch.rand(33, generator=gen(s), device=DEV),
                              torch.rand(40, generator=gen(s + 1), device=DEV)),
                             OPS.mm_dequant),
    "int8_linear": lambda s: ((with_outliers((20, 128), torch.float16, s),
                               randn((48, 128), torch.float16, s + 1), None, None, 6.0),
                              OPS.int8_linear),
}


@pytest.mark.parametrize("op", sorted(GRAPH_CASES))
def test_cuda_graph_capture_replay(op):
    need(op)
    static, fn = GRAPH_CASES[op](1)
    fresh, _ = GRAPH_CASES[op](2)
    graph_check(fn, static, fresh, exact=op not in ("linear_4bit", "int8_linear"))
