"""Property tests (hypothesis, derandomized): quantize/dequantize error bounds, nearest-code,
transform round trips, LLM.int8 bounds and outlier masks, state_dict round trips, and (CUDA only)
CUDA == reference. Shrunk failures are kept as ``@example`` rows."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import opsq.reference as ref
from opsq._constants import (BLOCKSIZES, BLOCKWISE_BLOCKSIZES, FP4_CODE, NF4_CODE, ORDERS,
                             QUANT_STORAGE_DTYPES, create_dynamic_map)
from opsq.nn import Linear4bit, Linear8bitLt

ops = torch.ops.opsq
FUZZ = settings(max_examples=150, deadline=None, derandomize=True)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
DYN = create_dynamic_map()
#: Relative rounding of a value stored in each dtype (half an ulp at 1.0).
EPS = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def _half_widest_gap(values) -> float:
    v = sorted(set(float(x) for x in values))
    return max(b - a for a, b in zip(v, v[1:])) / 2


shapes = st.one_of(
    st.tuples(st.integers(0, 3), st.integers(0, 300)),
    st.tuples(st.just(1), st.just(1)),
    st.tuples(st.integers(1, 9), st.integers(1, 70)))
layouts = st.sampled_from(["contiguous", "transposed", "sliced"])


def _make(shape, dtype, layout, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    r, c = shape
    if layout == "transposed":
        x = (torch.randn(c, r, generator=g) * scale).to(dtype).t()
    elif layout == "sliced":
        x = (torch.randn(r, 2 * c + 1, generator=g) * scale).to(dtype)[:, 1::2]
    else:
        x = (torch.randn(r, c, generator=g) * scale).to(dtype)
    assert tuple(x.shape) == (r, c)
    return x


def _block_absmax_per_elem(x32: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x32.reshape(-1)
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat.abs(), (0, blocks * blocksize - n))
    return padded.view(blocks, blocksize).amax(1).repeat_interleave(blocksize)[:n]


@FUZZ
@given(shape=shapes, dtype=st.sampled_from(DTYPES), blocksize=st.sampled_from(BLOCKSIZES),
       quant_type=st.sampled_from(["nf4", "fp4"]),
       storage=st.sampled_from(QUANT_STORAGE_DTYPES), layout=layouts,
       seed=st.integers(0, 2 ** 16))
@example(shape=(1, 1), dtype=torch.float16, blocksize=32, quant_type="fp4",
         storage=torch.float64, layout="transposed", seed=0)
@example(shape=(0, 7), dtype=torch.bfloat16, blocksize=4096, quant_type="nf4",
         storage=torch.int64, layout="sliced", seed=1)
def test_4bit_roundtrip_bound_and_nearest_code(shape, dtype, blocksize, quant_type, storage,
                                                layout, seed):
    x = _make(shape, dtype, layout, seed)
    q, absmax = ops.quantize_4bit(x, blocksize, quant_type, storage)
    assert q.dtype == storage and absmax.numel() == -(-x.numel() // blocksize)
    deq = ops.dequantize_4bit(q, absmax, blocksize, quant_type, list(shape), dtype)
    x32 = x.float().reshape(-1)
    am = _block_absmax_per_elem(x32, blocksize)
    bound = am * (_half_widest_gap(CODES[quant_type]) + 1e-6) + am * EPS[dtype]
    assert ((deq.float().reshape(-1) - x32).abs() <= bound).all()
    # nearest code, checked in float64 (FP4's bitsandbytes thresholds sit ~5e-7 off midpoints)
    codes = ref.fourbit.unpack_codes(q, x.numel()).long()
    table = torch.tensor(CODES[quant_type], dtype=torch.float64)
    normed = torch.where(am > 0, x32.double() / am.double(), torch.zeros_like(am).double())
    dist = (normed[:, None] - table[None, :]).abs()
    chosen = dist.gather(1, codes[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 1e-6).all()


@FUZZ
@given(shape=shapes, dtype=st.sampled_from(DTYPES),
       blocksize=st.sampled_from(BLOCKWISE_BLOCKSIZES), layout=layouts,
       seed=st.integers(0, 2 ** 16))
@example(shape=(1, 1), dtype=torch.float32, blocksize=32, layout="contiguous", seed=0)
@example(shape=(3, 300), dtype=torch.bfloat16, blocksize=16384, layout="sliced", seed=2)
def test_blockwise_roundtrip_bound_and_nearest_code(shape, dtype, blocksize, layout, seed):
    x = _make(shape, dtype, layout, seed)
    q, absmax = ops.quantize_blockwise(x, DYN, blocksize)
    deq = ops.dequantize_blockwise(q, absmax, DYN, blocksize, dtype)
    x32 = x.float().reshape(-1)
    am = _block_absmax_per_elem(x32, blocksize)
    bound = am * (_half_widest_gap(DYN.tolist()) + 1e-6) + am * EPS[dtype]
    assert ((deq.float().reshape(-1) - x32).abs() <= bound).all()
    normed = torch.where(am > 0, x32.double() / am.double(), torch.zeros_like(am).double())
    dist = (normed[:, None] - DYN.double()[None, :]).abs()
    chosen = dist.gather(1, q.reshape(-1).long()[:, None]).squeeze(1)
    assert (chosen <= dist.min(1).values + 1e-6).all()


@FUZZ
@given(rows=st.integers(0, 70), cols=st.integers(0, 80), frm=st.sampled_from(ORDERS),
       to=st.sampled_from(ORDERS), seed=st.integers(0, 2 ** 16))
@example(rows=1, cols=1, frm="col_ampere", to="col_turing", seed=0)
def test_transform_inverse_is_identity(rows, cols, frm, to, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (rows, cols), generator=g, dtype=torch.int8)
    a = ops.transform(x, "row", frm, [rows, cols])
    b = ops.transform(a, frm, to, [rows, cols])
    back = ops.transform(ops.transform(b, to, frm, [rows, cols]), frm, "row", [rows, cols])
    assert torch.equal(back, x)
    assert torch.equal(ops.transform(b, to, "row", [rows, cols]), x)


@FUZZ
@given(shape=st.tuples(st.integers(0, 9), st.integers(0, 90)), dtype=st.sampled_from(DTYPES),
       layout=layouts, threshold=st.sampled_from([0.0, 0.5, 2.0, 5.0]),
       seed=st.integers(0, 2 ** 16))
@example(shape=(1, 1), dtype=torch.float16, layout="contiguous", threshold=0.5, seed=0)
@example(shape=(2, 1), dtype=torch.float32, layout="contiguous", threshold=0.5, seed=0)  # shrunk
def test_int8_vectorwise_and_double_quant_bounds(shape, dtype, layout, threshold, seed):
    x = _make(shape, dtype, layout, seed, scale=1.5)
    CA, SCA, mask = ops.vectorwise_quant(x, threshold)
    rowq, colq, rs, cs, mask2 = ops.double_quant(x, threshold)
    assert torch.equal(CA, rowq) and torch.equal(SCA, rs) and torch.equal(mask, mask2)
    x32 = x.float()
    out = (x32.abs() >= threshold) if threshold > 0 else torch.zeros_like(x32, dtype=torch.bool)
    assert torch.equal(mask, out.any(0))                       # outlier columns, static (K,)
    assert (CA[:, mask] == 0).all()                             # zeroed in the int8 part
    assert CA.abs().max().item() <= 127 if CA.numel() else True
    assert colq.abs().max().item() <= 127 if colq.numel() else True
    inl = x32.masked_fill(out, 0.0)
    assert torch.equal(SCA, inl.abs().amax(1) if inl.shape[1] else torch.zeros(shape[0]))
    # outlier columns are zeroed whole (every row) in CA: the bound holds on the others
    err = (CA.float() * SCA[:, None] / 127 - inl).abs()[:, ~mask]
    assert (err <= SCA[:, None] / 254 * (1 + 1e-5) + 1e-30).all()
    cerr = (colq.float() * cs[None, :] / 127 - inl).abs()
    assert (cerr <= cs[None, :] / 254 * (1 + 1e-5) + 1e-30).all()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), k=st.sampled_from([32, 64, 100, 130]),
       quant_type=st.sampled_from(["nf4", "fp4"]), nested=st.booleans(),
       storage=st.sampled_from([torch.uint8, torch.bfloat16, torch.float32, torch.int64]),
       blocksize=st.sampled_from([32, 64, 256]), seed=st.integers(0, 2 ** 16))
def test_linear4bit_state_dict_roundtrip_bytes(n, k, quant_type, nested, storage, blocksize, seed):
    torch.manual_seed(seed)
    a = Linear4bit.from_float(nn.Linear(k, n), quant_type=quant_type, blocksize=blocksize,
                              compress_statistics=nested, quant_storage=storage)
    sd = a.state_dict()
    b = Linear4bit(k, n, quant_type=quant_type, compress_statistics=nested, blocksize=blocksize,
                   quant_storage=storage)
    b.load_state_dict(sd)
    sd2 = b.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        assert sd[key].dtype == sd2[key].dtype and sd[key].shape == sd2[key].shape, key
        assert sd[key].view(-1).view(torch.uint8).tolist() == \
            sd2[key].reshape(-1).view(torch.uint8).tolist() if sd[key].numel() else True, key
    x = torch.randn(2, k)
    assert torch.equal(a(x), b(x))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 5), k=st.integers(1, 70), threshold=st.sampled_from([0.0, 1.0, 6.0]),
       seed=st.integers(0, 2 ** 16))
def test_linear8bitlt_state_dict_roundtrip_bytes(n, k, threshold, seed):
    torch.manual_seed(seed)
    a = Linear8bitLt.from_float(nn.Linear(k, n), threshold=threshold)
    sd = a.state_dict()
    b = Linear8bitLt(k, n, has_fp16_weights=False, threshold=threshold)
    b.load_state_dict(sd)
    sd2 = b.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        assert sd[key].dtype == sd2[key].dtype and torch.equal(sd[key], sd2[key]), key
    x = torch.randn(3, k)
    assert torch.equal(a(x), b(x))


# ---- CUDA == reference ------------------------------------------------------------------------
def _ties_only(codes_a, codes_b, x, absmax_per_elem, table):
    """Codes differ only where the normalised value is (nearly) equidistant from both codes."""
    diff = codes_a != codes_b
    if not diff.any():
        return True
    normed = (x.double() / absmax_per_elem.double())[diff]
    da = (normed - table.double()[codes_a[diff].long()]).abs()
    db = (normed - table.double()[codes_b[diff].long()]).abs()
    return bool(((da - db).abs() <= 1e-6).all())


@pytest.mark.cuda
@settings(max_examples=40, deadline=None, derandomize=True)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), blocksize=st.sampled_from(BLOCKSIZES),
       quant_type=st.sampled_from(["nf4", "fp4"]), layout=layouts, seed=st.integers(0, 2 ** 16))
def test_cuda_matches_reference(shape, dtype, blocksize, quant_type, layout, seed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x = _make(shape, dtype, layout, seed)
    xc = x.cuda()
    q, am = ops.quantize_4bit(xc, blocksize, quant_type, torch.uint8)
    rq, ram = ref.quantize_4bit(x, blocksize, quant_type, torch.uint8)
    torch.testing.assert_close(am.cpu(), ram, rtol=0, atol=0)
    n = x.numel()
    ca, cb = ref.fourbit.unpack_codes(q.cpu(), n), ref.fourbit.unpack_codes(rq, n)
    per = _block_absmax_per_elem(x.float().reshape(-1), blocksize)
    assert _ties_only(ca, cb, x.float().reshape(-1), per,
                      torch.tensor(CODES[quant_type]))
    deq = ops.dequantize_4bit(q, am, blocksize, quant_type, list(shape), dtype)
    rdeq = ref.dequantize_4bit(q.cpu(), am.cpu(), blocksize, quant_type, list(shape), dtype)
    torch.testing.assert_close(deq.cpu(), rdeq, rtol=0, atol=0)
    bq, bam = ops.quantize_blockwise(xc, DYN.cuda(), blocksize)
    rbq, rbam = ref.quantize_blockwise(x, DYN, blocksize)
    torch.testing.assert_close(bam.cpu(), rbam, rtol=0, atol=0)
    assert _ties_only(bq.cpu().reshape(-1), rbq.reshape(-1), x.float().reshape(-1), per, DYN)
    if x.numel():
        CA, SCA, mask = ops.vectorwise_quant(xc, 1.0)
        rCA, rSCA, rmask = ref.vectorwise_quant(x, 1.0)
        assert torch.equal(SCA.cpu(), rSCA) and torch.equal(mask.cpu(), rmask)
        assert (CA.cpu().int() - rCA.int()).abs().max() <= 1   # round-half ties only
