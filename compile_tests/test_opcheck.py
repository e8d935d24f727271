"""torch.library.opcheck (schema, autograd_registration, faketensor, aot_dispatch_dynamic) for
every opsq op, on the CPU (and on CUDA when available)."""
import pytest
import torch

import opsq  # noqa: F401
from opsq._constants import create_dynamic_map
from opsq._schemas import SCHEMAS

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
    code = create_dynamic_map().to(device)
    offset = absmax.mean()
    q2, a2 = ops.quantize_blockwise(absmax - offset, code, 256)
    nested = (a2, code, offset.reshape(1), 256)
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
        ],
        "gemv_4bit": [
            ((rn(1, 128, dtype=torch.bfloat16, grad=True), packed, [24, 128], absmax, 64, "nf4",
              rn(24, dtype=torch.bfloat16, grad=True)), {}),
            ((rn(1, 1, 128, dtype=torch.float16), packed, [24, 128], q2, 64, "nf4", None,
              *nested), {}),
        ],
        "linear_4bit": [
            ((rn(3, 5, 128, grad=True), packed, [24, 128], absmax, 64, "nf4",
              rn(24, grad=True)), {}),
            ((rn(4, 128, dtype=torch.bfloat16, grad=True), packed, [24, 128], q2, 64, "nf4",
              None, *nested), {}),
            ((rn(2, 128, dtype=torch.float16, grad=True), packed_bf, [24, 128], absmax_bf, 32,
              "fp4"), {}),
        ],
        "quantize_blockwise": [((rn(300, grad=True), code, 64), {})],
        "dequantize_blockwise": [((q2, a2.clone().requires_grad_(True), code, 256,
                                   torch.float32), {})],
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
    return S


def test_every_op_has_samples():
    assert set(_samples("cpu")) == set(SCHEMAS)


CASES = [(dev, name, i) for dev in DEVICES for name, s in _samples("cpu").items()
         for i in range(len(s))]


@pytest.mark.parametrize("device,name,i", CASES, ids=[f"{d}-{n}-{i}" for d, n, i in CASES])
def test_opcheck(device, name, i):
    args, kwargs = _samples(device)[name][i]
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)
