"""opsq.nn.parametrize: any parameter (2-D, 3-D MoE experts, N-D) in 4 bit, bitsandbytes 0.48+'s
``replace_parameter_4bit``. Values against opsq.functional and a float64 decoding of the format,
bitsandbytes' state-dict keys (and its own checkpoints), load round trips, functional_call,
torch.compile(fullgraph=True), bad input."""
import copy
import json

import pytest
import torch
import torch.nn.utils.parametrize as P
from torch import nn

from opsq import functional as F
from opsq._constants import code_table, create_dynamic_map
from opsq.nn import replace_parameter_4bit
from opsq.nn.parametrize import Bnb4bitParametrization, replace_parameter_4bit_prequantized
from opsq.reference.fourbit import unpack_codes

from fixture_utils import fixture_cases, load_fixture, quant_meta
from module_state import assert_unchanged, snapshot
from opsq.testing import DEVICES

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# 2-D, 3-D MoE experts (E, N, K), an odd element count (padded tail), 4-D with a partial block.
SHAPES = [(48, 96), (4, 24, 40), (3, 5, 7), (2, 3, 4, 33)]
FOURBIT = fixture_cases("4bit") or ["nf4_bs64_bf16"]


def _name(x) -> str:
    return str(x).replace("torch.", "") if isinstance(x, torch.dtype) else "x".join(map(str, x))


def _rand(shape, dtype, device, scale=2.0):
    seed = torch.seed() % 2**31  # fresh per run; shown in failures through the return value
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device), seed


class Holder(nn.Module):
    """A module whose weight is no nn.Linear: ``w`` of any shape plus a float ``scale``."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.scale = nn.Parameter(torch.ones((), dtype=w.dtype, device=w.device))

    def forward(self, x):
        return self.w * x * self.scale


class Experts(nn.Module):
    """Mixtral-style experts: ``w`` is ``(E, N, K)``; token t uses expert ``idx[t]``."""

    def __init__(self, E, N, K, dtype=torch.float32, device=None):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, N, K, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.randn(E, N, dtype=dtype, device=device))

    def forward(self, x, idx):
        w = self.w  # one read: one dequantization
        return torch.einsum("tk,tnk->tn", x, w[idx]) + self.bias[idx]


def _float64_decode(packed, absmax, shape, blocksize, quant_type, nested=None):
    """The format decoded in float64 from first principles: code table[code] * block absmax,
    the absmax itself being dynamic-map[code] * nested absmax + offset when nested."""
    n = 1
    for s in shape:
        n *= s
    codes = unpack_codes(packed.cpu(), n).long()
    am = absmax.cpu()
    if nested is not None:
        nested_absmax, offset = nested
        scale = nested_absmax.cpu().double().repeat_interleave(256)[: am.numel()]
        am = create_dynamic_map().double()[am.long()] * scale + offset
    am = am.double().repeat_interleave(blocksize)[:n]
    return (code_table(quant_type).double()[codes] * am).reshape(shape)


# ---- values --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [None, 32, 4096])
def test_dequantized_parameter_matches_functional_and_float64(device, shape, dtype, quant_type,
                                                              nested, blocksize):
    w, seed = _rand(shape, dtype, device)
    m = Holder(w)
    replace_parameter_4bit(m, "w", compress_statistics=nested, quant_type=quant_type,
                           blocksize=blocksize)
    bs = 64 if blocksize is None else blocksize  # bitsandbytes' default
    assert P.is_parametrized(m, "w") and not P.is_parametrized(m, "scale")
    out = m.w
    assert out.shape == shape and out.dtype == dtype and out.device == w.device
    assert not out.requires_grad

    # opsq.functional on the original parameter: the same codes, statistics and values
    packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested,
                                    quant_type=quant_type)
    orig = m.parametrizations.w.original
    assert orig.dtype == torch.uint8 and orig.shape == packed.shape and not orig.requires_grad
    assert torch.equal(orig, packed), f"seed {seed}"
    p = m.parametrizations.w[0]
    assert isinstance(p, Bnb4bitParametrization) and p.nested == nested
    assert torch.equal(p.absmax, state.absmax)
    assert torch.equal(out, F.dequantize_4bit(packed, state)), f"seed {seed}"
    assert p.quant_state == state

    # float64 decoding of the stored format
    ref = _float64_decode(orig, p.absmax, shape, bs, quant_type,
                          (p.nested_absmax, p.offset.item()) if nested else None)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref.to(w.device), rtol=2 * eps, atol=1e-6,
                               msg=lambda msg: f"seed {seed}: {msg}")

    # and the quantization error against the original, in float64
    x = w.double().reshape(-1)
    n = x.numel()
    blocks = -(-n // bs)
    true_absmax = torch.nn.functional.pad(x.abs(), (0, blocks * bs - n)).view(blocks, bs).amax(1)
    err = (out.double().reshape(-1) - x).abs()
    table = code_table(quant_type).double()
    gap = (table.sort().values.diff().max() / 2).item()
    absmax_err = 0.0
    if nested:  # the stored absmax is off by up to half the widest dynamic-map gap (scaled)
        dyn_gap = (create_dynamic_map().double().sort().values.diff().max() / 2).item()
        absmax_err = dyn_gap * p.nested_absmax.double().max().item()
    # half a code gap of the (stored) absmax, the absmax's own error where values clamp at it,
    # and the output's rounding to its dtype (half an ulp: <= eps/2 relative)
    bound = gap * (true_absmax.repeat_interleave(bs)[:n] + absmax_err) + absmax_err
    bound = bound + eps / 2 * out.double().abs().reshape(-1)
    assert (err <= bound * (1 + 2 * eps) + 1e-6).all(), f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_module_forward_uses_dequantized_weight_and_moves(device):
    m = Experts(4, 24, 40).to(device)
    w0 = m.w.detach().clone()
    replace_parameter_4bit(m, "w", quant_type="fp4")
    x = torch.randn(6, 40, device=device)
    idx = torch.tensor([0, 3, 1, 1, 2, 0], device=device)
    wq = F.dequantize_4bit(*F.quantize_4bit(w0, quant_type="fp4"))
    ref = torch.einsum("tk,tnk->tn", x.double(), wq.double()[idx]) + m.bias.double()[idx]
    torch.testing.assert_close(m(x, idx).double(), ref, rtol=1e-5, atol=1e-5)
    # float casts leave the packed codes and the fp32 statistics alone
    codes = m.parametrizations.w.original.detach().clone()
    absmax = m.parametrizations.w[0].absmax.clone()
    m.half()
    assert m.bias.dtype == torch.float16
    assert torch.equal(m.parametrizations.w.original, codes)
    assert m.parametrizations.w[0].absmax.dtype == torch.float32
    assert torch.equal(m.parametrizations.w[0].absmax, absmax)
    assert torch.equal(m.w, wq)
    # device moves carry codes and statistics together
    m.float().cpu()
    assert torch.equal(m.w, wq.cpu())


# ---- state dict ----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_uses_bitsandbytes_keys(device, nested, quant_type):
    outer = nn.Module()
    outer.experts = Experts(3, 16, 24, dtype=torch.bfloat16, device=device)
    w0 = outer.experts.w.detach().clone()
    replace_parameter_4bit(outer.experts, "w", compress_statistics=nested,
                           quant_type=quant_type, blocksize=128)
    sd = outer.state_dict()
    packed, state = F.quantize_4bit(w0, blocksize=128, compress_statistics=nested,
                                    quant_type=quant_type)
    expected = {"experts.w": packed, "experts.bias": outer.experts.bias.detach()}
    expected.update({f"experts.w.{k}": v for k, v in state.as_dict(packed=True).items()})
    assert list(sd) == ["experts.bias"] + [k for k in expected if k != "experts.bias"]
    for k, v in expected.items():
        assert sd[k].dtype == v.dtype and sd[k].device == v.device, k
        assert torch.equal(sd[k], v), k
    assert sd["experts.w"].shape == (3 * 16 * 24 // 2, 1)
    meta = json.loads(bytes(sd[f"experts.w.quant_state.bitsandbytes__{quant_type}"].tolist()))
    assert meta["shape"] == [3, 16, 24] and meta["dtype"] == "bfloat16"
    assert meta["blocksize"] == 128 and meta["quant_type"] == quant_type
    assert ("nested_offset" in meta) == nested
    assert not any("parametrizations" in k for k in sd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("fresh_nested", [False, True], ids=["into-plain", "into-nested"])
def test_state_dict_roundtrip_bit_exact(device, nested, fresh_nested):
    src = nn.Sequential(Experts(4, 8, 32, device=device))
    replace_parameter_4bit(src[0], "w", compress_statistics=nested, blocksize=32)
    sd = src.state_dict()
    # a fresh module with other random values and maybe another layout: the checkpoint wins
    dst = nn.Sequential(Experts(4, 8, 32, device=device))
    replace_parameter_4bit(dst[0], "w", compress_statistics=fresh_nested, quant_type="fp4")
    original = dst[0].parametrizations.w.original
    dst.load_state_dict(sd)
    p = dst[0].parametrizations.w[0]
    assert p.blocksize == 32 and p.quant_type == "nf4" and p.nested == nested
    assert dst[0].parametrizations.w.original is original  # loaded in place
    back = dst.state_dict()
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    assert torch.equal(dst[0].w, src[0].w)
    x = torch.randn(5, 32, device=device)
    idx = torch.tensor([3, 0, 2, 2, 1], device=device)
    assert torch.equal(dst[0](x, idx), src[0](x, idx))


@pytest.mark.parametrize("device", DEVICES)
def test_load_state_dict_assign_into_meta_module(device):
    src = Experts(2, 8, 64, device=device)
    replace_parameter_4bit(src, "w", compress_statistics=True)
    with torch.device("meta"):
        dst = Experts(2, 8, 64)
    replace_parameter_4bit(dst, "w", compress_statistics=True)
    assert dst.parametrizations.w.original.device.type == "meta"
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.w.device == src.w.device and torch.equal(dst.w, src.w)


@pytest.mark.parametrize("device", DEVICES)
def test_float_state_dict_is_quantized_with_module_settings(device):
    m = Holder(torch.randn(6, 64, device=device))
    replace_parameter_4bit(m, "w", compress_statistics=True, quant_type="fp4", blocksize=32)
    w_new, seed = _rand((6, 64), torch.float16, device)
    m.load_state_dict({"w": w_new, "scale": torch.ones((), device=device)})
    packed, state = F.quantize_4bit(w_new, blocksize=32, compress_statistics=True,
                                    quant_type="fp4")
    assert m.w.dtype == torch.float16
    assert torch.equal(m.w, F.dequantize_4bit(packed, state)), f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", FOURBIT)
def test_reads_bitsandbytes_checkpoint(device, case):
    """bitsandbytes 0.50.2's own 4-bit state (fixtures): the keys its parametrize writes."""
    d = load_fixture(case)
    meta = quant_meta(d)
    m = Holder(torch.zeros(d["A"].shape, dtype=d["A"].dtype, device=device))
    replace_parameter_4bit(m, "w")  # nf4, bs 64, plain: the checkpoint's settings must win
    sd = {"w": d["packed"], "scale": torch.ones((), dtype=d["A"].dtype)}
    sd.update({f"w.{k[3:]}": v for k, v in d.items() if k.startswith("qs.")})
    m.load_state_dict(sd)
    p = m.parametrizations.w[0]
    assert (p.quant_type, p.blocksize, p.nested) == (meta["quant_type"], meta["blocksize"],
                                                     "nested_offset" in meta)
    assert m.w.device.type == torch.device(device).type
    assert torch.equal(m.w.cpu(), d["dequant"])
    back = m.state_dict()
    assert set(back) == set(sd)
    assert torch.equal(back["w"].cpu(), d["packed"].reshape(-1).view(torch.uint8).reshape(-1, 1))
    for k in sd:
        if k not in ("w", "scale"):
            assert torch.equal(back[k].cpu(), sd[k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_load_rejects_bad_checkpoints(device):
    src = Holder(torch.randn(8, 64, device=device))
    replace_parameter_4bit(src, "w")
    good = src.state_dict()

    def fresh(shape=(8, 64)):
        m = Holder(torch.randn(shape, device=device))
        replace_parameter_4bit(m, "w")
        return m

    with pytest.raises(RuntimeError, match=r"While loading w: .*shape \(8, 64\).*\(4, 128\)"):
        fresh((4, 128)).load_state_dict(good)
    bad = dict(good, **{"w.absmax": good["w.absmax"][:-1]})
    with pytest.raises(RuntimeError, match="While loading w: .*absmax must have 8 elements"):
        fresh().load_state_dict(bad)
    bad = {k: v for k, v in good.items() if k in ("w", "scale")}
    with pytest.raises(RuntimeError, match="While loading w: w holds packed torch.uint8 codes"):
        fresh().load_state_dict(bad)
    bad = dict(good, **{"w.quant_map": code_table("fp4", device)})
    with pytest.raises(RuntimeError, match="While loading w: w.quant_map is not the nf4"):
        fresh().load_state_dict(bad)
    bad = dict(good, **{"w": good["w"][:-1]})
    with pytest.raises(RuntimeError, match="While loading w: .*A must have 256 elements"):
        fresh().load_state_dict(bad)


# ---- functional_call, copies, pre-quantized ------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_functional_call(device, nested):
    m = Experts(3, 16, 64, device=device)
    replace_parameter_4bit(m, "w", compress_statistics=nested)
    x = torch.randn(4, 64, device=device)
    idx = torch.tensor([2, 0, 1, 2], device=device)
    tensors = {**dict(m.named_parameters()), **dict(m.named_buffers())}
    assert "parametrizations.w.original" in tensors and "parametrizations.w.0.absmax" in tensors
    snap = snapshot(m)
    out = torch.func.functional_call(m, tensors, (x, idx))
    assert torch.equal(out, m(x, idx))
    # substituted tensors reach the dequantization: doubled bias, zeroed codes, other absmax
    zero_code = 7  # NF4's 0.0, in both nibbles
    subs = {"bias": m.bias * 2,
            "parametrizations.w.original": torch.full_like(m.parametrizations.w.original,
                                                           zero_code * 17)}
    out = torch.func.functional_call(m, subs, (x, idx))
    torch.testing.assert_close(out, 2 * m.bias[idx], rtol=0, atol=0)
    if not nested:
        out = torch.func.functional_call(
            m, {"parametrizations.w.0.absmax": m.parametrizations.w[0].absmax * 2}, (x, idx))
        torch.testing.assert_close(out - m.bias[idx], 2 * (m(x, idx) - m.bias[idx]),
                                   rtol=1e-5, atol=1e-5)
    assert_unchanged(m, snap)


def test_deepcopy_keeps_format():
    m = Experts(2, 8, 32)
    replace_parameter_4bit(m, "w", compress_statistics=True)
    c = copy.deepcopy(m)
    assert torch.equal(c.w, m.w)
    sd, sdc = m.state_dict(), c.state_dict()
    assert list(sd) == list(sdc) and all(torch.equal(sd[k], sdc[k]) for k in sd)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=_name)
@pytest.mark.parametrize("shape", [(4, 6, 32), (3, 5, 7)], ids=_name)  # 53 bytes: 1 padding
def test_replace_parameter_4bit_prequantized(device, storage, shape):
    w, seed = _rand(shape, torch.bfloat16, device)
    packed, state = F.quantize_4bit(w, compress_statistics=True, quant_type="nf4",
                                    quant_storage=storage)
    m = Holder(torch.empty(0, device=device))
    m.w = nn.Parameter(packed, requires_grad=False)
    qs = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()}
    replace_parameter_4bit_prequantized(m, "w", qs, device=torch.device(device))
    assert m.w.shape == w.shape and m.w.dtype == torch.bfloat16
    assert torch.equal(m.w, F.dequantize_4bit(packed, state)), f"seed {seed}"
    assert m.parametrizations.w.original.dtype == torch.uint8
    bad = dict(qs, **{"w.absmax": state.absmax[:1]})
    m2 = Holder(torch.empty(0, device=device))
    m2.w = nn.Parameter(packed, requires_grad=False)
    with pytest.raises(RuntimeError, match="absmax must have"):
        replace_parameter_4bit_prequantized(m2, "w", bad, device=torch.device(device))
    assert not P.is_parametrized(m2)


# ---- torch.compile -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_compile_fullgraph_aot_eager(device, nested):
    from torch._dynamo.backends.registry import lookup_backend
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = Experts(4, 16, 64, dtype=torch.bfloat16, device=device)
    replace_parameter_4bit(m, "w", compress_statistics=nested)
    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(m, fullgraph=True, backend=counter)
    for i, T in enumerate((5, 9, 3)):
        x = torch.randn(T, 64, dtype=torch.bfloat16, device=device)
        idx = torch.randint(0, 4, (T,), device=device)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
            torch._dynamo.mark_dynamic(idx, 0)
        snap = snapshot(m)
        torch.testing.assert_close(compiled(x, idx), m(x, idx), rtol=0, atol=0)
        assert_unchanged(m, snap)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} graphs"
    calls = [n for n in graphs[0].graph.nodes
             if n.op == "call_function" and "opsq.dequantize_4bit" in str(n.target)]
    assert len(calls) == 1, graphs[0].code


@pytest.mark.slow
def test_compile_inductor():
    torch._dynamo.reset()
    m = Experts(2, 16, 64)
    replace_parameter_4bit(m, "w", compress_statistics=True, quant_type="fp4")
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(7, 64)
    idx = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    torch.testing.assert_close(compiled(x, idx), m(x, idx), rtol=1e-5, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------
class _WithBuffer(Holder):
    def __init__(self, w):
        super().__init__(w)
        self.register_buffer("running", torch.zeros(3))
        self.register_parameter("absent", None)
        self.codes = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
        self.wide = nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))


BAD = [
    (dict(param_name="nope"), AttributeError,
     r"param_name must name a parameter of _WithBuffer \(one of \['w', 'scale', 'codes', "
     r"'wide'\]\), got 'nope'"),
    (dict(param_name="absent"), AttributeError, "param_name must name a parameter .* 'absent'"),
    (dict(param_name="running"), TypeError, "param_name 'running' of _WithBuffer must name an "
     "nn.Parameter, got a Tensor"),
    (dict(param_name="codes"), TypeError, r"param_name 'codes' must be a parameter with dtype in "
     r"\[torch.float16, torch.bfloat16, torch.float32\], got torch.int8"),
    (dict(param_name="wide"), TypeError, "param_name 'wide' .* got torch.float64"),
    (dict(param_name=3), TypeError, "param_name must be a str, got int"),
    (dict(quant_type="int4"), ValueError,
     r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'"),
    (dict(blocksize=48), ValueError, r"blocksize must be one of \(32, .*4096\), got 48"),
    (dict(blocksize=8192), ValueError, "blocksize must be one of .* got 8192"),
    (dict(compress_statistics="yes"), TypeError, "compress_statistics must be a bool, got str"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_names_the_argument(device, kwargs, exc, match):
    m = _WithBuffer(torch.randn(4, 64, device=device))
    kwargs = dict(dict(param_name="w"), **kwargs)
    with pytest.raises(exc, match=match):
        replace_parameter_4bit(m, **kwargs)
    assert not P.is_parametrized(m) and type(m) is _WithBuffer  # left untouched


def test_bad_module_and_double_replace():
    with pytest.raises(TypeError, match="module must be an nn.Module, got Tensor"):
        replace_parameter_4bit(torch.zeros(3), "w")
    m = Holder(torch.randn(4, 64))
    replace_parameter_4bit(m, "w")
    with pytest.raises(ValueError, match=r"param_name 'w' of Holder is already parametrized "
                                         r"\(\['Bnb4bitParametrization'\]\)"):
        replace_parameter_4bit(m, "w")
