"""The tiled16 layout of 4-bit weights (opsq/_tiled16.py) on the CPU: the pure-PyTorch repack
against an independent loop implementation of benchmarks/gemv_lab.cu's ``tile16_repack``, the
op's ``layout`` argument, and every way bytes leave a ``Linear4bit`` / ``Params4bit`` (state
dict, ``as_dict``, pickle, deepcopy, ``.to``, ``dequantize_4bit``) compared with a layer that
never took the layout. The CPU is made "eligible" by patching
``opsq._tiled16.device_supports_tiled16`` (the real answer is CUDA with sm_90 code only); the CUDA
kernel's tests are in test_cuda_ops.py (``-k tiled16``)."""
from __future__ import annotations

import copy
import io
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import opsq
from opsq import _tiled16
from opsq import functional as Fq
from opsq.nn import Linear4bit, Params4bit

sys.path.insert(0, os.path.dirname(__file__))
from fixture_utils import fixture_cases, linear4bit_fixture  # noqa: E402

OPS = torch.ops.opsq


def lab_tile16_repack(w: np.ndarray, a: np.ndarray, N: int, K: int):
    """benchmarks/gemv_lab.cu's tile16_repack, loop for loop (bytes w, absmax a)."""
    steps = K // 256
    wt = np.zeros_like(w)
    at = np.zeros_like(a)
    for b in range(N // 16):
        for s in range(steps):
            run = b * steps + s
            for c in range(4):
                for lane in range(32):
                    g, q = lane >> 2, lane & 3
                    for h in range(2):
                        row = b * 16 + g + 8 * h
                        dst = run * 2048 + (c * 32 + lane) * 16 + h * 8
                        src = row * (K // 2) + s * 128 + c * 32 + q * 8
                        wt[dst:dst + 8] = w[src:src + 8]
                        at[run * 64 + c * 16 + 2 * g + h] = a[row * (K // 64) + s * 4 + c]
    return wt, at


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _shapes(seed: int, count: int):
    rng = np.random.default_rng(seed)
    return [(16 * int(rng.integers(1, 5)), 256 * int(rng.integers(1, 4))) for _ in range(count)]


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.int32, torch.float32])
def test_repack_matches_lab_loops_and_round_trips(storage):
    rng = np.random.default_rng()  # fresh inputs every run
    for N, K in _shapes(int(rng.integers(1 << 30)), 4):
        w = rng.integers(0, 256, N * K // 2, dtype=np.uint8)
        a = rng.random(N * K // 64, dtype=np.float32)
        B = torch.from_numpy(w.copy()).view(storage).reshape(-1, 1)
        absmax = torch.from_numpy(a.copy())
        tB, tA = _tiled16.repack(B, absmax, [N, K])
        assert tB.dtype == storage and tB.shape == B.shape and tA.shape == absmax.shape
        wt, at = lab_tile16_repack(w, a, N, K)
        assert np.array_equal(tB.reshape(-1).view(torch.uint8).numpy(), wt), (N, K)
        assert np.array_equal(tA.numpy(), at), (N, K)
        uB, uA = _tiled16.unpack(tB, tA, [N, K])
        assert torch.equal(_raw(uB), _raw(B)) and torch.equal(uA, absmax)  # bytes: NaN patterns
        # nested codes and int32 bit patterns take the absmax permutation
        q = torch.from_numpy(rng.integers(0, 256, N * K // 64, dtype=np.uint8))
        assert np.array_equal(_tiled16.repack_absmax(q, [N, K]).numpy(),
                              lab_tile16_repack(w, q.numpy(), N, K)[1])
        bits = absmax.view(torch.int32)
        assert torch.equal(_tiled16.repack_absmax(bits, [N, K]).view(torch.float32), tA)


def test_a_repack_is_not_the_identity():
    B = torch.arange(16 * 256 // 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(-1, 1)
    assert not torch.equal(_tiled16.repack_codes(B, [16, 256]), B)


def test_fits_rule():
    assert _tiled16.tiled16_fits([16, 256], 64)
    assert not _tiled16.tiled16_fits([16, 256], 128)
    assert not _tiled16.tiled16_fits([24, 256], 64)
    assert not _tiled16.tiled16_fits([16, 320], 64)
    assert not _tiled16.tiled16_fits([0, 256], 64)
    assert not _tiled16.device_supports_tiled16("cpu")


def _quantized(N, K, nested, quant_type="nf4", seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 30, ())))
    W = torch.randn(N, K, generator=g) * 0.1
    packed, state = Fq.quantize_4bit(W, blocksize=64, compress_statistics=nested,
                                     quant_type=quant_type)
    return packed, state, g


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_layout_equals_packed(nested, dtype):
    N, K = 48, 512
    packed, state, g = _quantized(N, K, nested)
    tB, tA = _tiled16.repack(packed, state.absmax, [N, K])
    bias = torch.randn(N, generator=g).to(dtype)
    for M in (1, 3, 8, 20):
        A = torch.randn(M, K, generator=g).to(dtype)
        want = OPS.linear_4bit(A, packed, [N, K], state.absmax, 64, "nf4", bias,
                               *state.nested_args())
        got = OPS.linear_4bit(A, tB, [N, K], tA, 64, "nf4", bias, *state.nested_args(),
                              "tiled16")
        assert torch.equal(got, want)
        got = OPS.gemv_4bit(A, tB, [N, K], tA, 64, "nf4", bias, *state.nested_args(),
                            layout="tiled16")
        assert torch.equal(got, want)


def test_op_layout_errors():
    N, K = 32, 256
    packed, state, _ = _quantized(N, K, False)
    A = torch.randn(1, K)
    with pytest.raises(ValueError, match="layout must be one of"):
        OPS.linear_4bit(A, packed, [N, K], state.absmax, 64, "nf4", None, layout="tiled")
    p2, s2 = Fq.quantize_4bit(torch.randn(24, 256), blocksize=64)
    with pytest.raises(ValueError, match=r"N % 16 == 0, got 24"):
        OPS.linear_4bit(A, p2, [24, 256], s2.absmax, 64, "fp4", None, layout="tiled16")
    p3, s3 = Fq.quantize_4bit(torch.randn(32, 256), blocksize=128)
    with pytest.raises(ValueError, match="blocksize 64, got 128"):
        OPS.linear_4bit(A, p3, [32, 256], s3.absmax, 128, "fp4", None, layout="tiled16")
    p4, s4 = Fq.quantize_4bit(torch.randn(32, 320), blocksize=64)
    with pytest.raises(ValueError, match=r"K % 256 == 0, got 320"):
        OPS.linear_4bit(torch.randn(1, 320), p4, [32, 320], s4.absmax, 64, "fp4", None,
                        layout="tiled16")
    # the fake kernel gives the same errors
    with pytest.raises(ValueError, match="layout must be one of"):
        OPS.linear_4bit(A.to("meta"), packed.to("meta"), [N, K], state.absmax.to("meta"), 64,
                        "nf4", None, layout="x")


def test_autograd_through_tiled_layout():
    N, K = 32, 256
    packed, state, g = _quantized(N, K, False)
    tB, tA = _tiled16.repack(packed, state.absmax, [N, K])
    A = torch.randn(3, K, generator=g)
    grads = []
    for B, absmax, layout in ((packed, state.absmax, "packed"), (tB, tA, "tiled16")):
        a = A.clone().requires_grad_(True)
        am = absmax.clone().requires_grad_(True)
        OPS.linear_4bit(a, B, [N, K], am, 64, "nf4", None, layout=layout).square().sum().backward()
        grads.append((a.grad, am.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(_tiled16.repack_absmax(grads[0][1], [N, K]), grads[1][1])


# ---- dequantize_4bit(layout="tiled16"): the CUDA kernel's index math, the op on CPU / meta ------
def _nested_stats(absmax: torch.Tensor, seed: int):
    """Nested statistics of fp32 ``absmax`` (packed order): uint8 codes, nested_absmax, the map,
    the offset (as QuantState holds them)."""
    from opsq._constants import create_dynamic_map
    code = create_dynamic_map()
    offset = absmax.mean().reshape(1)
    q, nabs = OPS.quantize_blockwise(absmax - offset, code, 256)
    return q, nabs, code, offset


def emulate_dequant4_tiled16(codes: torch.Tensor, absmax: torch.Tensor, N: int, K: int,
                             quant_type: str, nested=None) -> torch.Tensor:
    """dequant4_tiled16_kernel (opsq/csrc/fourbit.cu) in PyTorch, its index arithmetic written
    as the kernel's: thread t of 256 takes the 8 bytes at run * 2048 + 8 t of every run; c =
    t >> 6, l = (t >> 1) & 31, h = t & 1, g = l >> 2, q = l & 3; run = b S + s; outputs row
    16 b + g + 8 h, columns 256 s + 64 c + 16 q .. + 15; absmax entry run * 64 + 16 c + 2 g + h,
    nested_absmax of packed block row K / 64 + 4 s + c. Returns fp32 (N, K); asserts every
    output is written exactly once."""
    from opsq._constants import code_table
    S = K // 256
    runs = (N // 16) * S
    t = torch.arange(256)
    c, l, h = t >> 6, (t >> 1) & 31, t & 1
    g, q = l >> 2, l & 3
    tile_row, step_col, am_in_run = g + 8 * h, 64 * c + 16 * q, 16 * c + 2 * g + h
    run = torch.arange(runs).reshape(-1, 1)
    b = run // S
    s = run - b * S
    row = 16 * b + tile_row                                     # (runs, 256)
    o = row * K + 256 * s + step_col
    pieces = codes.reshape(-1).view(torch.uint8).reshape(runs, 256, 8).long()
    at = run * 64 + am_in_run
    blk = row * (K // 64) + 4 * s + c
    if nested is None:
        scale = absmax[at]
    else:
        nabs, ncode, offset, nbs = nested
        scale = ncode[absmax[at].long()] * nabs[blk // nbs] + offset.reshape(())
    nib = torch.stack((pieces >> 4, pieces & 0xF), dim=-1).reshape(runs, 256, 16)
    vals = code_table(quant_type, "cpu")[nib] * scale.unsqueeze(-1)
    idx = (o.unsqueeze(-1) + torch.arange(16)).reshape(-1)
    assert torch.equal(torch.bincount(idx, minlength=N * K), torch.ones(N * K, dtype=torch.long))
    out = torch.empty(N * K)
    out[idx] = vals.reshape(-1)
    return out.reshape(N, K)


def test_kernel_index_math_covers_every_run_once():
    """The kernel's grid-stride loop (kDqTiledRuns = 2 runs a CTA trip) visits every run once
    for any grid, including the launcher's grid_for(runs, 2) capped at 16 CTAs an SM."""
    R = 2
    for runs in (1, 2, 3, 7, 64, 257):
        for grid in {1, 3, (runs + R - 1) // R, min((runs + R - 1) // R, 5)}:
            seen = [r0 + j for bid in range(grid) for r0 in range(bid * R, runs, grid * R)
                    for j in range(R) if r0 + j < runs]
            assert sorted(seen) == list(range(runs)), (runs, grid)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_index_math_matches_unpack(nested, quant_type):
    """The emulated kernel on tiled bytes equals the reference dequantize of the packed bytes
    (fp32, bit for bit) on fresh random shapes; nested statistics included (codes read at the
    tiled index, nested_absmax at the packed block)."""
    rng = np.random.default_rng()
    for N, K in _shapes(int(rng.integers(1 << 30)), 4) + [(16, 256), (64, 1024)]:
        packed, state, _ = _quantized(N, K, False, quant_type, seed=int(rng.integers(1 << 30)))
        absmax = state.absmax
        nested_args = (None, None, None, 256)
        if nested:
            q, nabs, code, offset = _nested_stats(absmax, 0)
            absmax, nested_args = q, (nabs, code, offset, 256)
        tB, tA = _tiled16.repack(packed, absmax, [N, K])
        assert torch.equal(_tiled16.unpack_codes(tB, [N, K]), packed)
        got = emulate_dequant4_tiled16(tB, tA, N, K, quant_type,
                                       nested_args if nested else None)
        want = OPS.dequantize_4bit(packed, absmax, 64, quant_type, [N, K], torch.float32,
                                   *nested_args)
        assert torch.equal(got, want), (N, K)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_layout_equals_packed(nested, dtype):
    """The op's layout="tiled16" (reference kernel; the CUDA kernel has the same contract) equals
    dequantize of the packed bytes bit for bit, keyword or positional; the .out overload too;
    meta gives the shape and dtype."""
    N, K = 48, 768
    packed, state, _ = _quantized(N, K, nested, "fp4")
    tB, tA = _tiled16.repack(packed, state.absmax, [N, K])
    want = OPS.dequantize_4bit(packed, state.absmax, 64, "fp4", [N, K], dtype,
                               *state.nested_args())
    got = OPS.dequantize_4bit(tB, tA, 64, "fp4", [N, K], dtype, *state.nested_args(),
                              layout="tiled16")
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(OPS.dequantize_4bit(tB, tA, 64, "fp4", [N, K], dtype,
                                           *state.nested_args(), "tiled16"), want)
    out = torch.empty(N, K, dtype=dtype)
    OPS.dequantize_4bit.out(tB, tA, 64, "fp4", [N, K], dtype, *state.nested_args(),
                            "tiled16", out=out)
    assert torch.equal(out, want)
    # the default reads the packed bytes, as before the argument existed
    assert torch.equal(OPS.dequantize_4bit(packed, state.absmax, 64, "fp4", [N, K], dtype,
                                           *state.nested_args(), "packed"), want)
    meta = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in state.nested_args()]
    m = OPS.dequantize_4bit(tB.to("meta"), tA.to("meta"), 64, "fp4", [N, K], dtype, *meta,
                            layout="tiled16")
    assert m.shape == (N, K) and m.dtype == dtype and m.device.type == "meta"


def test_dequantize_layout_errors_same_on_cpu_and_meta():
    N, K = 32, 256
    packed, state, _ = _quantized(N, K, False)
    p24, s24 = Fq.quantize_4bit(torch.randn(24, 256), blocksize=64)
    p320, s320 = Fq.quantize_4bit(torch.randn(32, 320), blocksize=64)
    p128, s128 = Fq.quantize_4bit(torch.randn(32, 256), blocksize=128)
    cases = [
        ((packed, state.absmax, 64, "nf4", [N, K], torch.float16), "tiled",
         r"layout must be one of \('packed', 'tiled16'\), got 'tiled'"),
        ((packed, state.absmax, 64, "nf4", [N, K], torch.float16), "Tiled16",
         "layout must be one of"),
        ((packed, state.absmax, 64, "nf4", [N, K], torch.float16), "",
         "layout must be one of"),
        ((packed, state.absmax, 64, "nf4", [N * K], torch.float16), "tiled16",
         r"layout 'tiled16' needs shape = \[N, K\], got \[8192\]"),
        ((packed, state.absmax, 64, "nf4", [2, N // 2, K], torch.float16), "tiled16",
         r"needs shape = \[N, K\]"),
        ((p24, s24.absmax, 64, "fp4", [24, 256], torch.float32), "tiled16",
         r"layout 'tiled16' needs shape\[0\] = N % 16 == 0, got 24"),
        ((p320, s320.absmax, 64, "fp4", [32, 320], torch.float32), "tiled16",
         r"layout 'tiled16' needs shape\[1\] = K % 256 == 0, got 320"),
        ((p128, s128.absmax, 128, "fp4", [32, 256], torch.float32), "tiled16",
         "layout 'tiled16' needs blocksize 64, got 128"),
    ]
    for args, layout, pattern in cases:
        msgs = []
        for device in ("cpu", "meta"):
            a = [x.to(device) if isinstance(x, torch.Tensor) else x for x in args]
            with pytest.raises(ValueError, match=pattern) as e:
                OPS.dequantize_4bit(*a, layout=layout)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1], msgs


def test_dequantize_autograd_through_tiled_layout():
    """absmax (plain: in tiled order) and nested statistics' gradients of dequantize_4bit on a
    tiled16 weight equal those of the packed weight."""
    N, K = 32, 512
    packed, state, g = _quantized(N, K, False)
    tB, tA = _tiled16.repack(packed, state.absmax, [N, K])
    G = torch.randn(N, K, generator=g)
    grads = []
    for B, absmax, layout in ((packed, state.absmax, "packed"), (tB, tA, "tiled16")):
        am = absmax.clone().requires_grad_(True)
        (OPS.dequantize_4bit(B, am, 64, "nf4", [N, K], torch.float32, layout=layout) * G).sum() \
            .backward()
        grads.append(am.grad)
    assert torch.equal(_tiled16.repack_absmax(grads[0], [N, K]), grads[1])
    q, nabs, code, offset = _nested_stats(state.absmax, 0)
    tq = _tiled16.repack_absmax(q, [N, K])
    grads = []
    for B, qa, layout in ((packed, q, "packed"), (tB, tq, "tiled16")):
        na = nabs.clone().requires_grad_(True)
        off = offset.clone().requires_grad_(True)
        (OPS.dequantize_4bit(B, qa, 64, "nf4", [N, K], torch.float32, na, code, off, 256,
                             layout) * G).sum().backward()
        grads.append((na.grad, off.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_backward_and_functional_read_tiled_in_place(monkeypatch):
    """linear_4bit's backward (A's gradient) and the functional dequantize_4bit of a tiled16
    weight un-pack nothing themselves: they call the dequantize_4bit op with layout "tiled16"
    (on the CPU its reference kernel un-packs inside the op; the CUDA kernel reads in place)."""
    N, K = 32, 256
    packed, state, g = _quantized(N, K, True)
    tB, tA = _tiled16.repack(packed, state.absmax, [N, K])
    A = torch.randn(4, K, generator=g)
    a0 = A.clone().requires_grad_(True)
    OPS.linear_4bit(a0, packed, [N, K], state.absmax, 64, "nf4", None,
                    *state.nested_args()).sum().backward()
    want_dq = Fq.dequantize_4bit(packed, state)
    tstate = copy.copy(state)
    tstate.absmax, tstate.layout = tA, "tiled16"
    a1 = A.clone().requires_grad_(True)
    y = OPS.linear_4bit(a1, tB, [N, K], tA, 64, "nf4", None, *state.nested_args(), "tiled16")

    from torch.utils._python_dispatch import TorchDispatchMode
    seen, inside = [], [0]
    real = OPS.dequantize_4bit

    class Spy(TorchDispatchMode):  # sees each op once; the ops' own insides run unseen
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is real.default:
                seen.append(kwargs.get("layout", args[10] if len(args) > 10 else "packed"))
            inside[0] += 1
            try:
                return func(*args, **kwargs)
            finally:
                inside[0] -= 1

    permute = _tiled16._permute_codes

    def guarded(*args, **kwargs):
        if not inside[0]:
            raise AssertionError("un-packed the codes outside an op")
        return permute(*args, **kwargs)
    monkeypatch.setattr(_tiled16, "_permute_codes", guarded)
    with pytest.raises(AssertionError, match="un-packed"):  # the guard itself works
        _tiled16.unpack_codes(tB, [N, K])
    with Spy():
        y.sum().backward()
    assert torch.equal(a1.grad, a0.grad)
    assert seen == ["tiled16"], seen
    seen.clear()
    with Spy():
        got = Fq.dequantize_4bit(tB, tstate)
    assert torch.equal(got, want_dq) and seen == ["tiled16"], seen


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.int32])
def test_permute_words_equal_bytes(storage):
    """The int64 path of the code permutation (storage offset a multiple of 8) gives the bytes
    of the uint8 path; an unaligned view takes the byte path and round-trips."""
    rng = np.random.default_rng()
    for N, K in _shapes(int(rng.integers(1 << 30)), 3):
        w = torch.from_numpy(rng.integers(0, 256, N * K // 2 + 8, dtype=np.uint8))
        B = w[: N * K // 2].view(storage).reshape(-1, 1)
        for to_tiled in (True, False):
            a = _tiled16._permute_codes(B, [N, K], to_tiled, words=True)
            b = _tiled16._permute_codes(B, [N, K], to_tiled, words=False)
            assert a.dtype == storage and a.shape == B.shape
            assert torch.equal(_raw(a), _raw(b)), (N, K, to_tiled)
        # a byte view at storage offset 1 (not a multiple of 8): the byte path
        shifted = w[1: 1 + N * K // 2]
        assert shifted.storage_offset() == 1
        t = _tiled16.repack_codes(shifted, [N, K])
        assert torch.equal(t, _tiled16._permute_codes(shifted.clone(), [N, K], True))
        assert torch.equal(_tiled16.unpack_codes(t, [N, K]), shifted)


# ---- layers: the CPU made eligible ---------------------------------------------------------
@pytest.fixture
def cpu_eligible(monkeypatch):
    """Make CPU tensors eligible for tiled16 while ``flag["on"]``."""
    flag = {"on": True}
    real = _tiled16.device_supports_tiled16
    monkeypatch.setattr(_tiled16, "device_supports_tiled16",
                        lambda d: (flag["on"] and torch.device(d).type == "cpu") or real(d))
    return flag


def _layers(N, K, nested, storage, quant_type, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    made = []
    for _ in range(2):
        layer = Linear4bit(K, N, quant_type=quant_type, compress_statistics=nested,
                           quant_storage=storage)
        layer.weight = Params4bit(lin.weight.detach().clone(), quant_type=quant_type,
                                  compress_statistics=nested, quant_storage=storage)
        layer.bias = torch.nn.Parameter(lin.bias.detach().clone())
        made.append(layer)
    return made


def _assert_same_dict(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and va.shape == vb.shape, k
            assert torch.equal(_raw(va.contiguous()), _raw(vb.contiguous())), k  # bytes
        else:
            assert va == vb, k


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_layer_bytes_leave_as_bitsandbytes(cpu_eligible, nested, storage):
    seed = int(torch.randint(1 << 30, ()))
    N, K = 32, 512
    cpu_eligible["on"] = False
    plain, tiled = _layers(N, K, nested, storage, "nf4", seed)
    plain = plain.to("cpu")
    cpu_eligible["on"] = True
    tiled = tiled.to("cpu")
    assert plain.layout == "packed" and tiled.layout == "tiled16"
    assert tiled.quant_state.layout == "tiled16" and tiled.weight.quant_state.layout == "tiled16"
    assert not torch.equal(_raw(tiled.weight.data), _raw(plain.weight.data))  # really permuted
    # forward: the reference un-packs, so bit for bit
    x = torch.randn(3, K)
    assert torch.equal(tiled(x), plain(x))
    # state_dict, as_dict, the functional dequantize
    _assert_same_dict(tiled.state_dict(), plain.state_dict())
    _assert_same_dict(tiled.quant_state.as_dict(packed=True), plain.quant_state.as_dict(packed=True))
    _assert_same_dict(tiled.quant_state.as_dict(), plain.quant_state.as_dict())
    assert torch.equal(Fq.dequantize_4bit(tiled.weight, tiled.quant_state),
                       Fq.dequantize_4bit(plain.weight, plain.quant_state))
    # torch.save of the state dict: the same bytes
    bufs = []
    for layer in (tiled, plain):
        buf = io.BytesIO()
        torch.save(layer.state_dict(), buf)
        bufs.append(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    _assert_same_dict(*bufs)
    # pickling the layer: packed bytes in the pickle, tiled again where it lands eligible
    blob = pickle.dumps(tiled)
    cpu_eligible["on"] = False
    back = pickle.loads(blob)
    assert back.layout == "packed" and torch.equal(_raw(back.weight.data), _raw(plain.weight.data))
    cpu_eligible["on"] = True
    back = pickle.loads(blob)
    assert back.layout == "tiled16" and torch.equal(_raw(back.weight.data), _raw(tiled.weight.data))
    twin = copy.deepcopy(tiled)
    assert twin.layout == "tiled16" and torch.equal(twin(x), plain(x))
    _assert_same_dict(twin.state_dict(), plain.state_dict())
    # moving to a device that is not eligible un-packs
    cpu_eligible["on"] = False
    tiled = tiled.to("cpu")
    assert tiled.layout == "packed" and torch.equal(_raw(tiled.weight.data), _raw(plain.weight.data))
    assert torch.equal(Fq.QuantState.as_dict(tiled.quant_state)["absmax"],
                       plain.quant_state.as_dict()["absmax"])


def test_layer_load_into_tiled_keeps_identity(cpu_eligible):
    N, K = 48, 256
    seed = int(torch.randint(1 << 30, ()))
    src, dst = _layers(N, K, True, torch.uint8, "fp4", seed)
    cpu_eligible["on"] = False
    src = src.to("cpu")
    with torch.no_grad():
        src.bias.add_(1.0)
    cpu_eligible["on"] = True
    torch.manual_seed(seed + 1)
    dst = Linear4bit(K, N, quant_type="fp4", compress_statistics=True).to("cpu")
    assert dst.layout == "tiled16"
    w_id, a_id = id(dst.weight), id(dst.weight_absmax)
    dst.load_state_dict(src.state_dict())
    assert dst.layout == "tiled16" and id(dst.weight) == w_id and id(dst.weight_absmax) == a_id
    x = torch.randn(2, K)
    assert torch.equal(dst(x), src(x))
    _assert_same_dict(dst.state_dict(), src.state_dict())


def test_params4bit_free_standing(cpu_eligible):
    N, K = 32, 256
    W = torch.randn(N, K)
    cpu_eligible["on"] = False
    plain = Params4bit(W.clone(), quant_type="nf4").to("cpu")
    cpu_eligible["on"] = True
    tiled = Params4bit(W.clone(), quant_type="nf4").to("cpu")
    assert plain.quant_state.layout == "packed" and tiled.quant_state.layout == "tiled16"
    assert torch.equal(Fq.dequantize_4bit(tiled, tiled.quant_state),
                       Fq.dequantize_4bit(plain, plain.quant_state))
    x = torch.randn(1, K)
    assert torch.equal(opsq.matmul_4bit(x, tiled.t(), tiled.quant_state),
                       opsq.matmul_4bit(x, plain.t(), plain.quant_state))
    # the same statistics whatever their order (QuantState.__eq__ reads bitsandbytes' order)
    assert not torch.equal(tiled.quant_state.absmax, plain.quant_state.absmax)
    assert tiled.quant_state == plain.quant_state and plain.quant_state == tiled.quant_state
    other = Params4bit(torch.randn(N, K), quant_type="nf4").to("cpu")
    assert tiled.quant_state != other.quant_state
    # pickled bytes are bitsandbytes'
    cpu_eligible["on"] = False
    back = pickle.loads(pickle.dumps(tiled))
    assert back.quant_state.layout == "packed" and torch.equal(back.data, plain.data)
    assert torch.equal(back.quant_state.absmax, plain.quant_state.absmax)
    # assigned to a layer: the layer takes it over (here: not eligible, so packed)
    layer = Linear4bit(K, N, bias=False, quant_type="nf4")
    layer.weight = tiled
    assert layer.layout == "packed" and torch.equal(layer.weight.data, plain.data)
    cpu_eligible["on"] = True
    layer = Linear4bit(K, N, bias=False, quant_type="nf4")
    layer.weight = tiled
    # (against the never-tiled weight: layer.to("cpu") returns the layer itself)
    assert layer.layout == "tiled16"
    assert torch.equal(layer(x), opsq.matmul_4bit(x, plain.t(), plain.quant_state))


@pytest.mark.parametrize("case", fixture_cases("linear4bit_state_dict") or ["linear4bit_fp4"])
def test_fixture_through_tiled_layer(cpu_eligible, case):
    d, sd, layer = linear4bit_fixture(case)
    if "bias" in sd:
        layer = layer.to(sd["bias"].dtype)
    layer.load_state_dict(sd)
    layer = layer.to("cpu")  # arrives at an eligible device
    assert layer.layout == "tiled16"
    y = layer(d["x"])
    torch.testing.assert_close(y.float(), d["y"].float(), rtol=8e-3, atol=8e-3)
    back = layer.state_dict()
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_compiled_tiled_layer_fullgraph(cpu_eligible):
    from torch._dynamo.utils import counters
    N, K = 32, 256
    layer = Linear4bit(K, N, quant_type="nf4").to("cpu")
    assert layer.layout == "tiled16"
    x = torch.randn(2, K)
    want = layer(x)
    torch._dynamo.reset()
    counters.clear()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, want)
    assert sum(counters["graph_break"].values()) == 0


def test_pickle_tiled_layer_with_plain_weight_parameter(cpu_eligible):
    """A tiled layer whose weight is a plain nn.Parameter over the tiled bytes (FSDP1 views,
    opsq.hf's loading hand-over) pickles bitsandbytes' bytes too (it said layout "packed" over
    tiled bytes before)."""
    N, K = 32, 512
    torch.manual_seed(3)
    layer = Linear4bit(K, N, quant_type="nf4").to("cpu")
    x = torch.randn(2, K)
    want = layer(x)
    layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
    assert layer.layout == "tiled16" and torch.equal(layer(x), want)
    assert torch.equal(copy.deepcopy(layer)(x), want)
    cpu_eligible["on"] = False
    back = pickle.loads(pickle.dumps(layer))
    assert back.layout == "packed" and torch.equal(back(x), want)
