"""The composite ops (bitsandbytes' gemm_4bit, int8_scaled_mm) and the .out overloads:
torch.library.opcheck, the same numbers as the ops they call, clear errors for a wrong ``out``,
and fullgraph compiles (aot_eager)."""
import pytest
import torch

import opsq  # noqa: F401
from opsq._constants import create_dynamic_map
from opsq._schemas import COMPOSITES, OUT_OVERLOADS

ops = torch.ops.opsq
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _data(device):
    g = torch.Generator().manual_seed(99)
    rn = lambda *s, dtype=torch.float32: (torch.randn(*s, generator=g) * 2).to(dtype).to(device)  # noqa: E731
    W = rn(24, 128)
    packed, absmax = ops.quantize_4bit(W, 64, "nf4", torch.uint8)
    code = create_dynamic_map().to(device)
    offset = absmax.mean()
    q2, a2 = ops.quantize_blockwise(absmax - offset, code, 256)
    CB, SCB, _ = ops.vectorwise_quant(W, 0.0)
    CA, SCA, _ = ops.vectorwise_quant(rn(5, 128), 0.0)
    return dict(rn=rn, packed=packed, absmax=absmax, code=code, offset=offset, q2=q2, a2=a2,
                CB=CB, SCB=SCB, CA=CA, SCA=SCA)


def _composite_cases(d):
    rn = d["rn"]
    return {
        "gemm_4bit": [
            (rn(3, 128, dtype=torch.bfloat16), d["packed"], [24, 128], d["absmax"], 64, "nf4",
             rn(24, dtype=torch.bfloat16)),
            (rn(1, 128, dtype=torch.float16), d["packed"], [24, 128], d["a2"], 64, "nf4", None,
             d["q2"], d["code"], d["offset"].reshape(())),
        ],
        "int8_scaled_mm": [(d["CA"], d["CB"], d["SCA"], d["SCB"], rn(24, dtype=torch.float16),
                            torch.float16),
                           (d["CA"].view(1, 5, 128), d["CB"], d["SCA"], d["SCB"])],
    }


def _out_cases(d):
    rn = d["rn"]
    A = rn(300)
    q, am = ops.quantize_blockwise(A, d["code"], 64)
    x = rn(2, 128, dtype=torch.bfloat16)
    return {
        "igemmlt": ((d["CA"], d["CB"]), ops.igemmlt(d["CA"], d["CB"])),
        "dequantize_4bit": ((d["packed"], d["absmax"], 64, "nf4", [24, 128], torch.bfloat16),
                            None),
        "gemv_4bit": ((x, d["packed"], [24, 128], d["q2"], 64, "nf4", None, d["a2"], d["code"],
                       d["offset"].reshape(1), 256), None),
        "quantize_blockwise": ((A, d["code"], 64), (q, am)),
        "dequantize_blockwise": ((q, am, d["code"], 64, torch.float32), None),
    }


def test_every_composite_and_out_overload_has_cases():
    d = _data("cpu")
    assert set(_composite_cases(d)) == set(COMPOSITES)
    assert set(_out_cases(d)) == set(OUT_OVERLOADS)


@pytest.mark.parametrize("device", DEVICES)
def test_composites_equal_the_ops_they_call(device):
    d = _data(device)
    plain, nested = _composite_cases(d)["gemm_4bit"]
    assert torch.equal(ops.gemm_4bit(*plain), ops.linear_4bit(*plain))
    want = ops.linear_4bit(nested[0], d["packed"], [24, 128], d["q2"], 64, "nf4", None, d["a2"],
                           d["code"], d["offset"].reshape(1), 256)
    assert torch.equal(ops.gemm_4bit(*nested), want)
    # and the nested statistics are the plain ones to within their 8-bit quantization
    torch.testing.assert_close(ops.gemm_4bit(*nested).float(),
                               ops.linear_4bit(nested[0], *plain[1:6]).float(),
                               rtol=0.05, atol=0.05 * float(want.abs().max()))
    for args in _composite_cases(d)["int8_scaled_mm"]:
        want = ops.mm_dequant(ops.igemmlt(args[0], args[1]), *args[2:])
        assert torch.equal(ops.int8_scaled_mm(*args), want)
    with pytest.raises(ValueError, match="absmax_8bit needs absmax_code"):
        ops.gemm_4bit(*nested[:8], None, nested[9])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(OUT_OVERLOADS))
def test_out_overload_writes_the_result(device, name):
    d = _data(device)
    args, _ = _out_cases(d)[name]
    want = getattr(ops, name)(*args)
    if name == "quantize_blockwise":
        out = torch.full_like(want[0], 77)
        absmax_out = torch.full_like(want[1], float("nan"))  # poisoned
        res = ops.quantize_blockwise.out(*args, out=out, absmax_out=absmax_out)
        assert res[0] is out and res[1] is absmax_out
        assert torch.equal(out, want[0]) and torch.equal(absmax_out, want[1])
        return
    out = torch.full_like(want, 77) if not want.is_floating_point() else \
        torch.full_like(want, float("nan"))
    res = getattr(ops, name).out(*args, out=out)
    assert res is out and torch.equal(out, want)
    with pytest.raises(ValueError, match="out must have shape"):
        getattr(ops, name).out(*args, out=out.reshape(-1)[:-1])
    with pytest.raises(TypeError, match="out must have dtype"):
        getattr(ops, name).out(*args, out=torch.empty(want.shape, dtype=torch.float64,
                                                       device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    d = _data(device)
    for name, cases in _composite_cases(d).items():
        for args in cases:
            torch.library.opcheck(getattr(ops, name).default, args)
    for name, (args, want) in _out_cases(d).items():
        res = getattr(ops, name)(*args)
        if name == "quantize_blockwise":
            kwargs = dict(out=torch.empty_like(res[0]), absmax_out=torch.empty_like(res[1]))
        else:
            kwargs = dict(out=torch.empty_like(res))
        torch.library.opcheck(getattr(ops, name).out, args, kwargs)


def test_fullgraph_compile():
    d = _data("cpu")
    torch._dynamo.reset()
    plain = _composite_cases(d)["gemm_4bit"][0]

    def f(x, out):
        y = ops.gemm_4bit(x, *plain[1:])
        ops.dequantize_4bit.out(d["packed"], d["absmax"], 64, "nf4", [24, 128], torch.bfloat16,
                                out=out)
        return y
    out = torch.empty(24, 128, dtype=torch.bfloat16)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(plain[0], out)
    assert torch.equal(got, ops.linear_4bit(*plain))
    assert torch.equal(out, ops.dequantize_4bit(d["packed"], d["absmax"], 64, "nf4", [24, 128],
                                                torch.bfloat16))
