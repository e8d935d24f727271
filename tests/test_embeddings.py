"""Embedding layers: float (Embedding, StableEmbedding), 4-bit and 8-bit tables, and the
GlobalOptimManager registry they use."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import opsq
from opsq.nn import (Embedding, Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4,
                     StableEmbedding)
from opsq.optim import GlobalOptimManager

#: Half the largest gap between neighbouring code values: the worst rounding error per unit absmax.
HALF_GAP = {t: torch.sort(opsq.functional.get_4bit_type(t).double()).values.diff().max().item() / 2
            for t in ("nf4", "fp4")}

CASES = [  # quant_type, embedding_dim, blocksize, nested, quant_storage
    ("nf4", 64, 64, False, torch.uint8),     # block-aligned rows
    ("fp4", 128, 64, True, torch.uint8),     # two blocks per row, nested absmax
    ("nf4", 48, 64, False, torch.bfloat16),  # rows straddle blocks, bf16 storage
    ("fp4", 70, 32, True, torch.int32),      # straddling, nested, 4-byte storage
    ("nf4", 33, 128, True, torch.uint8),     # odd dim: rows split bytes
]


def _table(n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(n, d, dtype=dtype)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g) * 3)
    return emb


@pytest.mark.parametrize("qt,D,bs,nested,storage", CASES,
                         ids=[f"{c[0]}-D{c[1]}-bs{c[2]}-nested{c[3]}-{str(c[4])[6:]}"
                              for c in CASES])
def test_embedding4bit_lookup_matches_full_dequantization(qt, D, bs, nested, storage):
    N = 203
    emb = _table(N, D, seed=D)
    q = Embedding4bit.from_float(emb, quant_type=qt, blocksize=bs, compress_statistics=nested,
                                 quant_storage=storage)
    assert q.weight.dtype == storage and q.quant_state.nested == nested
    full = opsq.functional.dequantize_4bit(q.weight, q.quant_state)  # reference: whole table
    idx = torch.randint(0, N, (4, 9), generator=torch.Generator().manual_seed(D))
    idx[0, :3] = torch.tensor([N - 1, 0, N - 1])
    out = q(idx)
    assert out.shape == (4, 9, D) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(idx, full))
    assert torch.equal(q(idx.to(torch.int32)), out)
    # Quantization error within half a code step of the block's stored absmax (plus that
    # absmax's own error when it is nested, i.e. itself 8-bit quantized): fp64 oracle.
    w64 = emb.weight.detach().double()
    flat = torch.nn.functional.pad(w64.reshape(-1).abs(), (0, -(N * D) % bs))
    true = flat.view(-1, bs).amax(1)
    state = q.quant_state
    used = state.absmax.double() if not nested else (
        opsq.functional.dequantize_blockwise(state.absmax, state.state2).double() + state.offset)
    bound = (used * HALF_GAP[qt] + (used - true).abs()).repeat_interleave(bs)[: N * D]
    err = (out.double() - w64[idx]).abs()
    assert (err <= bound.view(N, D)[idx] + 1e-6).all()


def test_embedding4bit_construction_state_dict_and_dtype():
    emb = _table(50, 64)
    q = EmbeddingNF4(50, 64)
    q.load_state_dict(emb.state_dict())  # float table into an unquantized layer
    assert not q.is_quantized
    with pytest.raises(RuntimeError, match="not quantized"):
        q(torch.tensor([1]))
    q = q.to("cpu")  # quantized on the first move
    assert q.is_quantized and q.weight.dtype == torch.uint8
    ref = Embedding4bit.from_float(emb, quant_type="nf4")
    idx = torch.arange(50)
    assert torch.equal(q(idx), ref(idx))
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map",
                       "weight.quant_state.bitsandbytes__nf4"}
    fresh = EmbeddingNF4(50, 64, device="meta")
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(idx), q(idx))
    again = EmbeddingNF4(50, 64).to("cpu")  # quantized layer + float table: re-quantized
    again.load_state_dict(emb.state_dict())
    assert torch.equal(again(idx), q(idx))
    packed = q.weight.clone()
    h = q.half()  # output dtype follows; packed bytes and statistics untouched
    assert h(idx).dtype == torch.float16 and torch.equal(h.weight, packed)
    assert h.weight_absmax.dtype == torch.float32
    torch.testing.assert_close(h(idx), ref(idx).half(), rtol=0, atol=0)
    assert q(torch.empty(0, dtype=torch.int64)).shape == (0, 64)


def test_embedding4bit_forward_mutates_nothing():
    q = Embedding4bit.from_float(_table(40, 48), quant_type="fp4", compress_statistics=True)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    tensors = [id(t) for t in list(q.parameters()) + list(q.buffers())]
    q(torch.randint(0, 40, (3, 5)))
    assert tensors == [id(t) for t in list(q.parameters()) + list(q.buffers())]
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_embedding4bit_bad_input():
    with pytest.raises(ValueError, match="quant_type"):
        Embedding4bit(10, 8, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        Embedding4bit(10, 8, blocksize=100)
    with pytest.raises(ValueError, match="EmbeddingNF4 stores nf4"):
        EmbeddingNF4.from_float(nn.Embedding(4, 8), quant_type="fp4")
    with pytest.raises(TypeError, match="nn.Embedding"):
        Embedding4bit.from_float(nn.Linear(4, 8))
    q = EmbeddingFP4.from_float(_table(10, 64))
    with pytest.raises(TypeError, match="input must be int32 or int64"):
        q(torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="outside"):
        q(torch.tensor([10]))
    with pytest.raises(RuntimeError, match="outside"):
        q(torch.tensor([-1]))
    sd = q.state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:3]
    with pytest.raises(RuntimeError, match="absmax must have 10 entries"):
        EmbeddingFP4(10, 64, device="meta").load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding8bit(dtype):
    emb = _table(60, 24, dtype=dtype, seed=3)
    q = Embedding8bit.from_float(emb)
    assert q.weight.dtype == torch.int8 and q.SCB.shape == (60,)
    idx = torch.randint(0, 60, (2, 11), generator=torch.Generator().manual_seed(1))
    out = q(idx)
    assert out.shape == (2, 11, 24) and out.dtype == dtype
    exact = q.weight.double() * q.SCB.double()[:, None] / 127  # fp64 dequantization oracle
    torch.testing.assert_close(out.double(), exact[idx].to(dtype).double(), rtol=1e-2 if
                               dtype == torch.bfloat16 else 1e-6, atol=0)
    # bitsandbytes' own arithmetic on CUDA, bit for bit: CB * (SCB / 127) in fp32, then the
    # dtype, where torch's CUDA division by a scalar multiplies by fp32(1 / 127)
    inv127 = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(127.0, dtype=torch.float32)
    bnb = (q.weight[idx].float() * (q.SCB[idx].unsqueeze(-1) * inv127)).to(dtype)
    assert torch.equal(out, bnb)
    w = emb.weight.detach().double()
    half_step = w.abs().amax(1, keepdim=True) / 127 / 2  # int8 rounding, per row
    rounding = w.abs().amax() * 2 ** -8 if dtype == torch.bfloat16 else 0.0  # output cast
    assert ((out.double() - w[idx]).abs() <= half_step[idx] * 1.001 + rounding).all()
    sd = q.state_dict()
    assert set(sd) == {"weight", "SCB"}
    fresh = Embedding8bit(60, 24, dtype=dtype, device="meta")
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(idx), out)
    lazy = Embedding8bit(60, 24, dtype=dtype)
    lazy.load_state_dict(emb.state_dict())
    assert torch.equal(lazy.to("cpu")(idx), out)
    with pytest.raises(RuntimeError, match="SCB"):
        Embedding8bit.from_float(emb).load_state_dict({"weight": sd["weight"]})
    with pytest.raises(RuntimeError, match="outside"):
        q(torch.tensor([60]))


def test_embedding_and_max_norm():
    torch.manual_seed(0)
    e = Embedding(30, 16, padding_idx=0)
    assert torch.equal(e.weight[0], torch.zeros(16))
    idx = torch.randint(0, 30, (4, 6))
    assert torch.equal(e(idx), F.embedding(idx, e.weight))
    capped = Embedding(30, 16, max_norm=0.5)
    w_before = capped.weight.detach().clone()
    torch_ref = nn.Embedding(30, 16, max_norm=0.5, _weight=w_before.clone())
    out = capped(idx)
    torch.testing.assert_close(out, torch_ref(idx), rtol=1e-6, atol=1e-7)
    assert torch.equal(capped.weight, w_before)  # never renormalised in place
    assert (out.norm(dim=-1) <= 0.5 + 1e-5).all()
    # the weight's gradient is nn.Embedding's: the rows' upstream gradient, not rescaled
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * G).sum().backward()
    fresh = nn.Embedding(30, 16, max_norm=0.5, _weight=w_before.clone())
    (fresh(idx) * G).sum().backward()
    torch.testing.assert_close(capped.weight.grad, fresh.weight.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stable_embedding_layer_norm_in_fp32(dtype):
    torch.manual_seed(1)
    s = StableEmbedding(40, 32, dtype=dtype)
    assert s.norm.weight.dtype == torch.float32
    with torch.no_grad():
        s.norm.weight.uniform_(0.5, 1.5)
        s.norm.bias.uniform_(-0.5, 0.5)
    idx = torch.randint(0, 40, (3, 7))
    out = s(idx)
    assert out.dtype == dtype
    rows = s.weight.detach().double()[idx]
    ref = (rows - rows.mean(-1, keepdim=True)) / torch.sqrt(rows.var(-1, unbiased=False,
                                                                 keepdim=True) + 1e-5)
    ref = ref * s.norm.weight.double() + s.norm.bias.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=tol, atol=tol)
    out.float().square().sum().backward()
    assert s.weight.grad is not None and s.norm.weight.grad is not None


def test_global_optim_manager_registry():
    mng = GlobalOptimManager.get_instance()
    mng.initialize()
    with pytest.raises(RuntimeError, match="get_instance"):
        GlobalOptimManager()
    e = StableEmbedding(10, 4)
    lin = nn.Linear(4, 4)
    assert mng.get_config(e.weight) == {"optim_bits": 32}
    assert mng.get_config(e.norm.weight) is None
    e.weight = nn.Parameter(torch.randn(10, 4))  # follows the module's current parameter
    assert mng.get_config(e.weight) == {"optim_bits": 32}
    mng.override_config(lin.weight, "lr", 1e-3)
    mng.override_config([lin.weight, lin.bias], key_value_dict={"betas": (0.9, 0.95)})
    assert mng.get_config(lin.weight) == {"lr": 1e-3, "betas": (0.9, 0.95)}
    groups = [{"params": [lin.bias, e.norm.weight]}, {"params": [e.weight, lin.weight]}]
    got = mng.register_parameters(groups)
    assert got == {(0, 0): {"betas": (0.9, 0.95)}, (1, 0): {"optim_bits": 32},
                   (1, 1): {"lr": 1e-3, "betas": (0.9, 0.95)}}
    with pytest.raises(ValueError, match="key_value_dict"):
        mng.override_config(lin.weight)
    with pytest.raises(TypeError, match="tensors"):
        mng.override_config(["w"], "lr", 1)
    with pytest.raises(TypeError, match="nn.Module"):
        mng.register_module_override("emb", "weight", {})
    ref = weakref.ref(e)  # the registry keeps no module alive
    del e, groups
    gc.collect()
    assert ref() is None
    mng.initialize()


@pytest.mark.parametrize("cls", [Embedding4bit, Embedding8bit])
def test_quantized_table_output_dtype_follows_every_conversion(cls):
    """The output dtype follows the module's dtype conversions as nn.Embedding's does: alone
    (.half()), together with a move (.to("cpu", dtype), .to(device=..., dtype=...), .to(tensor)),
    before or after quantization, and .double() (Embedding4bit dequantizes in fp32 then casts);
    a state-dict load keeps the module's dtype. The bytes stay those of the fp32 lookup, cast."""
    idx = torch.tensor([[1, 7, 3], [0, 59, 7]])
    emb = _table(60, 24, dtype=torch.float32, seed=11)
    base = cls.from_float(emb)
    want = base(idx)
    for moves, convert in ((False, lambda m: m.half()),
                           (True, lambda m: m.to("cpu", torch.float16)),
                           (True, lambda m: m.to(device="cpu", dtype=torch.float16)),
                           (True, lambda m: m.to(torch.empty(0, dtype=torch.float16)))):
        m = convert(copy.deepcopy(base))
        assert m.dtype == torch.float16 and torch.equal(m(idx), want.half())
        if moves:
            fresh = convert(cls(60, 24))  # quantized by this move
            assert fresh.is_quantized and fresh(idx).dtype == torch.float16
    m = copy.deepcopy(base).double()
    assert m(idx).dtype == torch.float64 and torch.equal(m(idx), want.double())
    m = copy.deepcopy(base).half()
    m.load_state_dict(base.state_dict())  # an fp32 table's checkpoint
    assert m(idx).dtype == torch.float16 and torch.equal(m(idx), want.half())


@pytest.mark.parametrize("cls", [Embedding4bit, Embedding8bit])
def test_table_weight_written_into_parameters_is_adopted(cls):
    """Another table's quantized weight written straight into ``_parameters`` brings its
    statistics at the next move (the table used to pair it with its own, 1.2 off); the 4-bit
    table also takes bitsandbytes' in-place swap (``weight.data = ...; weight.quant_state =
    ...``) at once."""
    idx = torch.tensor([[1, 7, 3], [0, 59, 7]])
    a = cls.from_float(_table(60, 24, seed=21))
    b = cls.from_float(_table(60, 24, seed=22))
    b._parameters["weight"] = a.weight
    b.to("cpu")
    assert torch.equal(b(idx), a(idx))
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())
    if cls is Embedding4bit:
        c = cls.from_float(_table(60, 24, seed=23))
        c.weight.data = a.weight.data.clone()
        c.weight.quant_state = a.weight.quant_state
        assert torch.equal(c(idx), a(idx))


@pytest.mark.parametrize("nested", [False, True])
def test_embedding4bit_get_model_state_dict(nested):
    """torch.distributed.checkpoint's get_model_state_dict resolves Embedding4bit's dotted
    bitsandbytes keys (weight.absmax, weight.quant_state.bitsandbytes__*) as Linear4bit's: it
    raised AttributeError ('QuantState' object has no attribute 'bitsandbytes__fp4')."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    m = nn.Sequential(Embedding4bit(100, 64, compress_statistics=nested)).to("cpu")
    sd = get_model_state_dict(m)
    want = m.state_dict()
    assert set(sd) == set(want)
    assert all(torch.equal(sd[k], want[k]) for k in want)


@pytest.mark.parametrize("how", ["fresh", "deepcopy", "pickle"])
@pytest.mark.parametrize("quantized", [True, False])
def test_embedding4bit_copy_keeps_weight_bound(how, quantized):
    """After copy.deepcopy / pickle the table's weight is bound to it again, so that
    bitsandbytes' in-place swap (weight.data = codes; weight.quant_state = state) is adopted at
    once, as for a fresh table and for Linear4bit (a copied table paired the new codes with the
    old absmax)."""
    import pickle
    import opsq.functional
    g = torch.Generator().manual_seed(0)
    W1, W2 = torch.randn(20, 128, generator=g), torch.randn(20, 128, generator=g)
    e = (EmbeddingNF4.from_float(nn.Embedding(20, 128, _weight=W1)) if quantized
         else EmbeddingNF4(20, 128))
    if how == "deepcopy":
        e = copy.deepcopy(e)
    elif how == "pickle":
        e = pickle.loads(pickle.dumps(e))
    assert e.weight.module is e
    if not quantized:
        e = e.to("cpu")
    codes, state = opsq.functional.quantize_4bit(W2, quant_type="nf4")
    e.weight.data = codes
    e.weight.quant_state = state
    idx = torch.tensor([0, 5, 19])
    want = opsq.functional.dequantize_4bit(codes, state)[idx]
    torch.testing.assert_close(e(idx), want, rtol=0, atol=0)
