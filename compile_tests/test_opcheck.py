"""torch.library.opcheck (schema, autograd_registration, faketensor, aot_dispatch_dynamic) for
every opsq op, on the CPU (and on CUDA when available)."""
import pytest
import torch

import opsq  # noqa: F401
from opsq import _tiled16
from opsq._constants import create_dynamic_map
from opsq._schemas import OPTIMIZER_SCHEMAS, SCHEMAS
from opsq.optim import unsigned_dynamic_map

ops = torch.ops.opsq
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _samples(device):
    g = torch.Generator().manual_seed(1234)

    def rn(*shape, dtype=torch.float32, grad=False):
        t = (torch.randn(*shape, generator=g) * 3).to(dtype).to(device)
        return t.requires_grad_(grad)

    W = rn(24, 128)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    packed_bf, absmax_bf = ops.quantize_4bit(W, 32, "fp4", torch.bfloat16)
    # a tiled16 weight (opsq._tiled16: blocksize 64, N % 16 == 0, K % 256 == 0), plain and
    # nested statistics
    W16 = rn(32, 256)
    packed16, absmax16 = ops.quantize_4bit(W16, 64, "fp4", torch.uint8)
    tiled16, tabsmax16 = _tiled16.repack(packed16, absmax16, [32, 256])
    code = create_dynamic_map().to(device)
    offset = absmax.mean()
    q2, a2 = ops.quantize_blockwise(absmax - offset, code, 256)
    nested = (a2, code, offset.reshape(1), 256)
    offset16 = absmax16.mean()
    q16, n16 = ops.quantize_blockwise(absmax16 - offset16, code, 256)
    q8k, a8k = ops.quantize_blockwise(rn(9000), code, 8192)  # a blockwise-only blocksize
    CB, SCB, _ = ops.vectorwise_quant(W, 0.0)
    CA = torch.randint(-127, 128, (5, 128), generator=g, dtype=torch.int8).to(device)
    C32 = ops.igemmlt(CA, CB)
    row8 = torch.randint(-128, 128, (40, 72), generator=g, dtype=torch.int8).to(device)
    tiled = ops.transform(row8, "row", "col_turing", [40, 72])
    S = {
        "quantize_4bit": [
            ((rn(7, 33, dtype=torch.bfloat16, grad=True), 64, "nf4", torch.uint8), {}),
            ((rn(16, 16, dtype=torch.float16), 32, "fp4", torch.bfloat16), {}),
        ],
        "dequantize_4bit": [
            ((packed, absmax.clone().requires_grad_(True), 64, "nf4", [24, 128],
              torch.bfloat16), {}),
            ((packed_bf, absmax_bf, 32, "fp4", [24, 128], torch.float32), {}),
            ((packed, q2, 64, "nf4", [24, 128], torch.float16, a2.clone().requires_grad_(True),
              code, offset.reshape(1).clone().requires_grad_(True), 256), {}),
            # a tiled16 weight read in place: plain (absmax grad in tiled order), nested
            # (positional layout), and the default spelled out
            ((tiled16, tabsmax16.clone().requires_grad_(True), 64, "fp4", [32, 256],
              torch.bfloat16), {"layout": "tiled16"}),
            ((tiled16, _tiled16.repack_absmax(q16, [32, 256]), 64, "fp4", [32, 256],
              torch.float32, n16.clone().requires_grad_(True), code,
              offset16.reshape(1).clone().requires_grad_(True), 256, "tiled16"), {}),
            ((packed16, absmax16, 64, "fp4", [32, 256], torch.float16), {"layout": "packed"}),
        ],
        "gemv_4bit": [
            ((rn(1, 128, dtype=torch.bfloat16, grad=True), packed, [24, 128], absmax, 64, "nf4",
              rn(24, dtype=torch.bfloat16, grad=True)), {}),
            ((rn(1, 1, 128, dtype=torch.float16), packed, [24, 128], q2, 64, "nf4", None,
              *nested), {}),
            ((rn(1, 256, dtype=torch.bfloat16, grad=True), tiled16, [32, 256],
              tabsmax16.clone().requires_grad_(True), 64, "fp4",
              rn(32, dtype=torch.bfloat16, grad=True)), {"layout": "tiled16"}),
        ],
        "linear_4bit": [
            ((rn(3, 5, 128, grad=True), packed, [24, 128], absmax, 64, "nf4",
              rn(24, grad=True)), {}),
            ((rn(4, 128, dtype=torch.bfloat16, grad=True), packed, [24, 128], q2, 64, "nf4",
              None, *nested), {}),
            ((rn(2, 128, dtype=torch.float16, grad=True), packed_bf, [24, 128], absmax_bf, 32,
              "fp4"), {}),
            ((rn(3, 256, dtype=torch.float16, grad=True), tiled16, [32, 256],
              tabsmax16.clone().requires_grad_(True), 64, "fp4", rn(32, dtype=torch.float16),
              None, None, None, 256, "tiled16"), {}),
            ((rn(12, 256, dtype=torch.bfloat16, grad=True), tiled16, [32, 256],
              _tiled16.repack_absmax(q16, [32, 256]), 64, "fp4", None,
              n16.clone().requires_grad_(True), code, offset16.reshape(1), 256, "tiled16"), {}),
            ((rn(2, 256, grad=True), tiled16, [32, 256], tabsmax16, 64, "fp4"),
             {"layout": "tiled16"}),
        ],
        "linear_4bit_merged": [
            ((rn(3, 128, grad=True), [packed, packed[:384]], [24, 6], [absmax, absmax[:12]], 64,
              "nf4", [rn(24), None], [None, None], [None, None], [None, None]), {}),
            ((rn(1, 128, dtype=torch.bfloat16), [packed], [24], [q2], 64, "nf4", [None],
              [nested[0]], [nested[1]], [nested[2]]), {}),
            ((rn(2, 256, dtype=torch.float16, grad=True), [tiled16, tiled16], [32, 32],
              [tabsmax16, tabsmax16], 64, "fp4", [None, rn(32, dtype=torch.float16)],
              [None, None], [None, None], [None, None]), {"layout": "tiled16"}),
        ],
        "quantize_blockwise": [((rn(300, grad=True), code, 64), {}),
                               ((rn(9000, dtype=torch.bfloat16), code, 8192), {})],
        "dequantize_blockwise": [((q2, a2.clone().requires_grad_(True), code, 256,
                                   torch.float32), {}),
                                 ((q8k, a8k.clone().requires_grad_(True), code, 8192,
                                   torch.float16), {})],
        "vectorwise_quant": [((rn(6, 128, dtype=torch.float16, grad=True), 0.0), {}),
                             ((rn(2, 3, 128), 4.0), {})],
        "double_quant": [((rn(6, 128, dtype=torch.bfloat16, grad=True), 4.0), {}),
                         ((rn(6, 128), 0.0), {})],
        "igemmlt": [((CA, CB), {}), ((CA.view(1, 5, 128), CB), {})],
        "mm_dequant": [
            ((C32, rn(5).abs(), SCB, rn(24, dtype=torch.float16, grad=True), torch.float16), {}),
            ((C32, rn(5).abs(), SCB), {}),
        ],
        "int8_linear": [
            ((rn(5, 128, dtype=torch.float16, grad=True), CB, SCB,
              rn(24, dtype=torch.float16, grad=True), 0.0), {}),
            ((rn(2, 3, 128, grad=True), CB, SCB, None, 4.0), {}),
            ((rn(5, 128, dtype=torch.bfloat16, grad=True), rn(24, 128, dtype=torch.bfloat16,
                                                              grad=True), None, None, 4.0), {}),
        ],
        "transform": [((row8, "row", "col32", [40, 72]), {}),
                      ((tiled, "col_turing", "row", [40, 72]), {}),
                      ((tiled, "col_turing", "col_ampere", [40, 72]), {})],
    }
    S.update(_optimizer_samples(rn, code, device))
    return S


def _optimizer_samples(rn, code, device):
    """The in-place updates: states after one update (non-zero), odd sizes (a partial last block
    of 256), every optimizer, bf16 / fp16 / fp32 parameters, max_unorm and skip_zeros."""
    ucode = unsigned_dynamic_map().to(device)
    n = 300
    blocks = 2

    def f32(*shape):
        return rn(*shape).abs() * 0.01

    def q8(count):
        return (torch.arange(count, dtype=torch.int64) % 256).to(torch.uint8).to(device)

    def b32(name, dtype, max_unorm=0.0, skip=False):
        two, double = name in ("adam", "ademamix"), name == "ademamix"
        return ((name, rn(n, dtype=dtype), rn(n, dtype=dtype), rn(2 * n if double else n),
                 f32(n) if two else None, f32(1) if max_unorm > 0 else None, max_unorm, 0.0,
                 0.9, 0.99, 0.999 if double else 0.0, 5.0 if double else 0.0, 1e-8, 0.01, 3,
                 1e-3, 1.0, skip), {})

    def b8(name, dtype, skip=False):
        two, double = name in ("adam", "ademamix"), name == "ademamix"
        return ((name, rn(n, dtype=dtype), rn(n, dtype=dtype), q8(2 * n if double else n),
                 q8(n) if two else None, 0.9, 0.99, 0.999 if double else 0.0,
                 5.0 if double else 0.0, 1e-8, 3, 1e-3, code, ucode if two else None,
                 f32(2 * blocks if double else blocks), f32(blocks) if two else None, 0.01, 1.0,
                 skip), {})

    return {
        "optimizer_update_32bit": [
            b32("adam", torch.float32), b32("adam", torch.bfloat16, max_unorm=1.0),
            b32("ademamix", torch.float16), b32("lion", torch.float32, max_unorm=0.1),
            b32("momentum", torch.bfloat16, skip=True), b32("rmsprop", torch.float32)],
        "optimizer_update_8bit_blockwise": [
            b8("adam", torch.float32), b8("adam", torch.bfloat16, skip=True),
            b8("ademamix", torch.float32), b8("lion", torch.float16),
            b8("momentum", torch.float32), b8("rmsprop", torch.bfloat16)],
    }


def test_every_op_has_samples():
    assert set(_samples("cpu")) == set(SCHEMAS) | set(OPTIMIZER_SCHEMAS)


CASES = [(dev, name, i) for dev in DEVICES for name, s in _samples("cpu").items()
         for i in range(len(s))]


@pytest.mark.parametrize("device,name,i", CASES, ids=[f"{d}-{n}-{i}" for d, n, i in CASES])
def test_opcheck(device, name, i):
    args, kwargs = _samples(device)[name][i]
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)
