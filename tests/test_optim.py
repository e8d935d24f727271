"""bitsandbytes' optimizers (issue 18): the registered update ops and the opsq.optim classes.

Oracles: torch.optim (Adam, AdamW, SGD with momentum, RMSprop), float64 re-implementations of the
published formulas (Lion, AdEMAMix, one 8-bit step from the same dequantized states), the 32-bit
optimizer for its 8-bit counterpart, and bitsandbytes itself for the state-dict layout when its
source tree (.peers/bitsandbytes) imports.
"""
from __future__ import annotations

import gc
import io
import math
import os
import sys

import pytest
import torch

import opsq
from opsq import optim
from opsq._constants import create_dynamic_map
from opsq.optim import GlobalOptimManager, unsigned_dynamic_map
from opsq.testing import DEVICES

ops = torch.ops.opsq


@pytest.fixture(autouse=True)
def _fresh_manager():
    """The manager is a process-wide singleton: no override of another test may leak in."""
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def _params(device, dtype=torch.float32, seed=0, shapes=((40, 130), (130,))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(device, dtype)) for s in shapes]


def _grads(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params]
            for _ in range(steps)]


def _run(opt_cls, params, grads, **kw):
    opt = opt_cls(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return opt


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ---- 32-bit against torch.optim ----------------------------------------------------------------
TORCH_PAIRS = [
    ("Adam", optim.Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6)),
    ("AdamW", optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", optim.SGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=1e-2)),
    ("RMSprop", optim.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, alpha=0.9, weight_decay=1e-2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,ours,theirs,kw", TORCH_PAIRS, ids=[t[0] for t in TORCH_PAIRS])
def test_32bit_matches_torch_optim(device, name, ours, theirs, kw):
    params = _params(device)
    ref = _clone(params)
    grads = _grads(params, 6)
    opt = _run(ours, params, grads, **kw)
    _run(theirs, ref, grads, **kw)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert all(opt.state[p]["state1"].dtype == torch.float32 for p in params)


def _lion64(p, grads, lr, b1, b2, wd):
    p, m = p.double(), torch.zeros_like(p, dtype=torch.float64)
    for g in grads:
        g = g.double()
        p = p * (1 - lr * wd) - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    return p


def _ademamix64(p, grads, lr, b1, b2, b3, alpha, eps, wd):
    p = p.double()
    m1 = torch.zeros_like(p)
    m2 = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g.double()
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3 * m2 + (1 - b3) * g
        v = b2 * v + (1 - b2) * g * g
        upd = (m1 / (1 - b1 ** t) + alpha * m2) / (v.sqrt() / math.sqrt(1 - b2 ** t) + eps)
        p = p * (1 - lr * wd) - lr * upd
    return p


@pytest.mark.parametrize("device", DEVICES)
def test_lion_and_ademamix_32bit_match_float64_formulas(device):
    params = _params(device)
    grads = _grads(params, 6)
    start = [p.detach().clone() for p in params]
    _run(optim.Lion, params, grads, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for i, p in enumerate(params):
        want = _lion64(start[i], [g[i] for g in grads], 1e-3, 0.9, 0.95, 0.1)
        torch.testing.assert_close(p.double(), want, rtol=0, atol=1e-6)
    params = [torch.nn.Parameter(s.clone()) for s in start]
    _run(optim.AdEMAMix, params, grads, lr=1e-3, alpha=5.0, weight_decay=0.1)
    for i, p in enumerate(params):
        want = _ademamix64(start[i], [g[i] for g in grads], 1e-3, 0.9, 0.999, 0.9999, 5.0, 1e-8,
                           0.1)
        torch.testing.assert_close(p.double(), want, rtol=0, atol=2e-6)


# ---- 8-bit against 32-bit and against one float64 step ------------------------------------------
EIGHT = [("AdamW8bit", optim.AdamW8bit, optim.AdamW, dict(lr=1e-3)),
         ("Adam8bit", optim.Adam8bit, optim.Adam, dict(lr=1e-3)),
         ("Lion8bit", optim.Lion8bit, optim.Lion, dict(lr=1e-4, weight_decay=0.1)),
         ("SGD8bit", optim.SGD8bit, optim.SGD, dict(lr=1e-3, momentum=0.9)),
         ("RMSprop8bit", optim.RMSprop8bit, optim.RMSprop, dict(lr=1e-4)),
         ("AdEMAMix8bit", optim.AdEMAMix8bit, optim.AdEMAMix, dict(lr=1e-3))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,eight,full,kw", EIGHT, ids=[t[0] for t in EIGHT])
def test_8bit_close_to_32bit(device, name, eight, full, kw):
    """Bound: the dynamic map's top decade ([0.1, 1] x block absmax) has 64 (signed) / 128
    (unsigned) intervals, so a state within one decade of its block's max is stored to <= 7 %
    (first moment) / 3.5 % (second moment) and the update m / sqrt(v) to ~ 9 %; entries two or
    more decades below the block max move the parameter negligibly; averaged over the entries
    (RMS) the error is a fraction of that worst case (measured: 0.6-1.2 %). Bound: 5 % of the
    32-bit displacement. Lion's sign flips single entries where b1 m + (1-b1) g is near 0
    (each flip moves an entry by 2 lr; measured 5 %): bound 10 %."""
    params = _params(device)
    ref = _clone(params)
    start = [p.detach().clone() for p in params]
    grads = _grads(params, 8)
    opt8 = _run(eight, params, grads, min_8bit_size=0, **kw)
    _run(full, ref, grads, **kw)
    assert opt8.state[params[0]]["state1"].dtype == torch.uint8
    for p, r, s in zip(params, ref, start):
        d8, d32 = (p - s).double(), (r - s).double()
        rel = (d8 - d32).norm() / d32.norm()
        assert rel < (0.1 if name == "Lion8bit" else 0.05), (name, rel.item())


def _dequant(state, key):
    codes, absmax, qmap = state[f"state{key}"], state[f"absmax{key}"], state[f"qmap{key}"]
    if absmax.dim() == 2:  # ademamix: two EMAs, one row of absmax each
        return torch.stack([ops.dequantize_blockwise(codes[i].reshape(-1), absmax[i], qmap, 256,
                                                     torch.float32) for i in range(2)])
    return ops.dequantize_blockwise(codes.reshape(-1), absmax, qmap, 256, torch.float32)


def _step64(name, p, g, s1, s2, t, lr, b1, b2, b3, alpha, eps, wd):
    p, g = p.double().reshape(-1), g.double().reshape(-1)
    s1 = s1.double()
    s2 = s2.double() if s2 is not None else None
    if name in ("adam", "ademamix", "lion"):
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    if name == "adam":
        s1 = b1 * s1 + (1 - b1) * g
        s2 = b2 * s2 + (1 - b2) * g * g
        p = p - lr / (1 - b1 ** t) * s1 / (s2.sqrt() / math.sqrt(1 - b2 ** t) + eps)
    elif name == "ademamix":
        m1 = b1 * s1[0] + (1 - b1) * g
        m2 = b3 * s1[1] + (1 - b3) * g
        s2 = b2 * s2 + (1 - b2) * g * g
        p = p - lr * (m1 / (1 - b1 ** t) + alpha * m2) / (s2.sqrt() / math.sqrt(1 - b2 ** t) +
                                                          eps)
        s1 = torch.stack([m1, m2])
    elif name == "lion":
        p = p - lr * torch.sign(b1 * s1 + (1 - b1) * g)
        s1 = b2 * s1 + (1 - b2) * g
    elif name == "momentum":
        s1 = b1 * s1 + g
        p = p - lr * s1
    else:
        s1 = b1 * s1 + (1 - b1) * g * g
        p = p - lr * g / (s1.sqrt() + eps)
    return p, s1, s2


def _half_gap(qmap):
    """The largest distance from a point of [-1, 1] (signed map) or [0, 1] (unsigned) to its
    nearest map entry: half the widest gap, or the distance from an end the map lacks (the
    signed map has +1 but not -1)."""
    q = qmap.double().sort().values
    low = -1.0 if q[0] < 0 else 0.0
    return float(max(q.diff().max() / 2, q[0] - low, 1.0 - q[-1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,eight,full,kw", EIGHT, ids=[t[0] for t in EIGHT])
def test_8bit_step_matches_float64_from_same_states(device, name, eight, full, kw):
    """One 8-bit step = the float64 formula applied to the dequantized states (parameter to fp32
    rounding), and the stored new states = that result to within half a map interval of the
    block's absmax (the nearest-entry quantization; -absmax itself is 0.7 % off, as the signed
    map ends at -0.993)."""
    params = _params(device, shapes=((40, 130),))
    grads = _grads(params, 4)
    opt = _run(eight, params, grads[:3], min_8bit_size=0, **kw)
    p = params[0]
    st = opt.state[p]
    s1, s2 = _dequant(st, 1), _dequant(st, 2) if "state2" in st else None
    before = p.detach().clone()
    group = opt.param_groups[0]
    b = group["betas"]
    p.grad = grads[3][0].clone()
    opt.step()
    want_p, want_s1, want_s2 = _step64(
        opt.optimizer_name, before, grads[3][0], s1, s2, 4, group["lr"], b[0], b[1],
        b[2] if len(b) > 2 else 0.0, group.get("alpha", 0.0), group["eps"],
        group["weight_decay"])
    torch.testing.assert_close(p.double().reshape(-1), want_p, rtol=1e-6, atol=1e-7)
    for key, want in ((1, want_s1), (2, want_s2)):
        if want is None:
            continue
        got = _dequant(st, key).double()
        absmax = st[f"absmax{key}"].double()
        per = absmax.reshape(-1, 1).expand(-1, 256).reshape(absmax.shape[:-1] + (-1,))
        per = per[..., :got.shape[-1]]
        bound = (_half_gap(st[f"qmap{key}"]) + 1e-6) * per + 1e-12  # + fp32 rounding
        assert ((got - want).abs() <= bound).all(), (name, key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bits", [32, 8])
def test_half_precision_params_update_in_fp32_and_round_once(dtype, bits):
    params = _params("cpu", dtype, shapes=((300,),))
    p = params[0]
    p32 = torch.nn.Parameter(p.detach().float())
    grads = _grads(params, 1)
    opt = _run(optim.AdamW, params, grads, lr=1e-2, optim_bits=bits, min_8bit_size=0)
    _run(optim.AdamW, [p32], [[grads[0][0].float()]], lr=1e-2, optim_bits=bits,
         min_8bit_size=0)
    assert p.dtype == dtype and opt.state[p]["state1"].dtype == (torch.uint8 if bits == 8
                                                                  else torch.float32)
    assert torch.equal(p, p32.detach().to(dtype))


# ---- memory, convergence -------------------------------------------------------------------------
def _state_bytes(opt):
    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


@pytest.mark.parametrize("cls,limit", [(optim.AdamW8bit, 2.1), (optim.Lion8bit, 1.1),
                                       (optim.PagedAdamW8bit, 2.1), (optim.AdamW, 8.0)])
def test_state_bytes_per_parameter(cls, limit):
    p = torch.nn.Parameter(torch.randn(512, 512))
    _run(cls, [p], _grads([p], 1))
    per = _state_bytes(_run(cls, [p], _grads([p], 1))) / p.numel()
    assert per <= limit, per


def test_adamw8bit_converges_like_adamw():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    y = torch.tanh(X @ torch.randn(64, 1, generator=g)) + 0.05 * torch.randn(512, 1, generator=g)
    losses = {}
    for cls in (optim.AdamW, optim.AdamW8bit):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 1))
        opt = cls(model.parameters(), lr=3e-3, min_8bit_size=0)
        for _ in range(200):
            loss = torch.nn.functional.mse_loss(model(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[cls.__name__] = loss.item()
    first = torch.nn.functional.mse_loss(torch.zeros_like(y), y).item()
    assert losses["AdamW"] < 0.1 * first
    assert abs(losses["AdamW8bit"] - losses["AdamW"]) <= 0.05 * losses["AdamW"] + 1e-4, losses


# ---- state dicts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [optim.AdamW8bit, optim.Lion8bit, optim.AdEMAMix8bit,
                                 optim.AdamW])
def test_state_dict_round_trip(cls):
    params = _params("cpu", torch.bfloat16)
    grads = _grads(params, 5)
    a = _run(cls, params, grads[:3], min_8bit_size=0)
    sd = a.state_dict()
    s0 = sd["state"][0]
    assert set(s0) == {"step", "__bnb_optimizer_quant_state__"} and s0["step"] == 3
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    params_b = _clone(params)
    b = cls(params_b, min_8bit_size=0)
    b.load_state_dict(torch.load(buf))
    for p, q in zip(params, params_b):
        sa, sb = a.state[p], b.state[q]
        assert set(sa) == set(sb)
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for opt, ps in ((a, params), (b, params_b)):
        for gs in grads[3:]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(params, params_b):
        assert torch.equal(p, q)


def _import_bitsandbytes():
    peers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".peers")
    if os.path.isdir(os.path.join(peers, "bitsandbytes")) and peers not in sys.path:
        sys.path.append(peers)
    try:
        import bitsandbytes
        bitsandbytes.optim.AdamW8bit
    except Exception as e:  # noqa: BLE001  (absent or not importable here)
        pytest.skip(f"bitsandbytes is not importable: {e}")
    return bitsandbytes


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit", "AdamW"])
def test_bitsandbytes_checkpoint_loads_and_vice_versa(name):
    bnb = _import_bitsandbytes()
    assert torch.equal(bnb.functional.create_dynamic_map(signed=False), unsigned_dynamic_map())
    params = _params("cpu")
    grads = _grads(params, 5)
    theirs = _run(getattr(bnb.optim, name), params, grads[:3], min_8bit_size=0)
    ours_params = _clone(params)
    ours = getattr(optim, name)(ours_params, min_8bit_size=0)
    ours.load_state_dict(theirs.state_dict())
    back_params = _clone(params)
    back = getattr(bnb.optim, name)(back_params, min_8bit_size=0)
    back.load_state_dict(ours.state_dict())
    for p, q, r in zip(params, ours_params, back_params):
        for k, v in theirs.state[p].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, ours.state[q][k]) and torch.equal(v, back.state[r][k])
            else:
                assert v == ours.state[q][k] == back.state[r][k]
    # and the loaded optimizer goes on like bitsandbytes' (8-bit codes may differ by a step
    # of the map where the two quantizers round a tie differently)
    for opt, ps in ((theirs, params), (ours, ours_params)):
        for gs in grads[3:]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
    for p, q in zip(params, ours_params):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-4)


# ---- min_8bit_size and GlobalOptimManager --------------------------------------------------------
def test_min_8bit_size():
    small, large = _params("cpu", shapes=((50, 80), (64, 64)))  # 4000 and 4096 elements
    opt = _run(optim.AdamW8bit, [small, large], _grads([small, large], 1))
    assert opt.state[small]["state1"].dtype == torch.float32 and "qmap1" not in opt.state[small]
    assert opt.state[large]["state1"].dtype == torch.uint8
    assert opt.state[large]["absmax1"].shape == (16,)


def test_global_optim_manager_overrides():
    emb = opsq.nn.StableEmbedding(100, 64)  # registers {"optim_bits": 32} for its weight
    lin = torch.nn.Linear(64, 64)
    mng = GlobalOptimManager.get_instance()
    params = [emb.weight, lin.weight, lin.bias]
    opt = optim.AdamW8bit(params, lr=1e-3, min_8bit_size=0)
    # bitsandbytes' documented order: overrides after the optimizer is made, before its step
    mng.override_config(lin.bias, key_value_dict={"optim_bits": 32, "lr": 0.0})
    for p in params:
        p.grad = torch.ones_like(p)
    bias = lin.bias.detach().clone()
    opt.step()
    assert opt.state[emb.weight]["state1"].dtype == torch.float32
    assert opt.state[lin.weight]["state1"].dtype == torch.uint8
    assert opt.state[lin.bias]["state1"].dtype == torch.float32
    assert torch.equal(lin.bias.detach(), bias)  # lr 0 from the override
    # register_parameters' positional entries count too
    mng.initialize()
    mng.register_parameters([lin.weight])
    mng.override_config(lin.weight, "optim_bits", 32)
    opt = _run(optim.Adam8bit, [lin.weight], [[torch.ones(64, 64)]], min_8bit_size=0)
    assert opt.state[lin.weight]["state1"].dtype == torch.float32


def test_override_changed_after_the_first_step_counts():
    """bitsandbytes reads the manager at every step: an override set or changed mid-run (lr 0
    to freeze a tensor, new betas) applies from the next eager step."""
    GlobalOptimManager.get_instance().initialize()
    mng = GlobalOptimManager.get_instance()
    torch.manual_seed(5)
    w, b = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))
    opt = optim.AdamW8bit([w, b], lr=1e-2, min_8bit_size=0)

    def step():
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
        opt.step()
    step()
    mng.override_config(w, "lr", 0.0)  # after the state exists
    before = w.detach().clone()
    step()
    assert torch.equal(w.detach(), before) and opt.get_config(0, 0, opt.param_groups[0])["lr"] == 0
    mng.override_config(w, "lr", 1e-2)
    step()
    assert not torch.equal(w.detach(), before)
    mng.initialize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", ["AdamW8bit", "AdEMAMix8bit"])
def test_nonfinite_gradient_in_8bit_two_state_update_is_skipped(cls, device):
    """bitsandbytes' 8-bit blockwise Adam/AdEMAMix kernel skips an element whose gradient is
    inf or NaN: its parameter stays (no decay either), its states become 0. Without that, one
    bad element turns its block's absmax, and so its 256 parameters, into NaN for good."""
    bad = [17, 300]  # in blocks 0 and 1 of 256

    def run(poison):
        params = _params(device, shapes=((4096,),))
        grads = _grads(params, 3)
        grads[1][0][bad[0]] = float("inf") if poison else 0.0
        grads[1][0][bad[1]] = float("nan") if poison else 0.0
        opt = getattr(optim, cls)(params, min_8bit_size=0, weight_decay=0.1)
        trail = []
        for gs in grads:
            params[0].grad = gs[0].clone()
            opt.step()
            trail.append(params[0].detach().clone())
        return trail, opt.state[params[0]]
    trail, state = run(True)
    assert torch.isfinite(trail[-1]).all()
    for k in ("absmax1", "absmax2"):
        assert torch.isfinite(state[k]).all(), k
    assert torch.equal(trail[1][bad], trail[0][bad])  # step 2 left them alone
    # blocks without a bad element are those of a run with finite gradients there
    clean, _ = run(False)
    assert torch.equal(trail[-1][512:], clean[-1][512:])


# ---- torch.compile -----------------------------------------------------------------------------
def test_compiled_step_fullgraph_no_graph_breaks():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    params = _params("cpu")
    ref = _clone(params)
    grads = _grads(params, 4)
    opt = optim.AdamW8bit(params, min_8bit_size=0)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        step()
    eager = _run(optim.AdamW8bit, ref, grads, min_8bit_size=0)
    assert sum(counters["graph_break"].values()) == 0
    for p, r in zip(params, ref):
        assert torch.equal(p, r)
        for k, v in opt.state[p].items():
            assert (torch.equal(v, eager.state[r][k]) if isinstance(v, torch.Tensor)
                    else v == eager.state[r][k]), k
    torch._dynamo.reset()


# ---- the ops directly: in-place contract, bad input ----------------------------------------------
def _op8_args(n=300, name="adam"):
    p = torch.randn(n)
    blocks = -(-n // 256)
    two = name in ("adam", "ademamix")
    return dict(optimizer_name=name, g=torch.randn(n), p=p,
                state1=torch.zeros(2 * n if name == "ademamix" else n, dtype=torch.uint8),
                state2=torch.zeros(n, dtype=torch.uint8) if two else None,
                beta1=0.9, beta2=0.999, beta3=0.9999 if name == "ademamix" else 0.0,
                alpha=5.0 if name == "ademamix" else 0.0, eps=1e-8, step=1, lr=1e-3,
                qmap1=create_dynamic_map(), qmap2=unsigned_dynamic_map() if two else None,
                absmax1=torch.zeros(2 * blocks if name == "ademamix" else blocks),
                absmax2=torch.zeros(blocks) if two else None)


BAD = [
    ("optimizer_name", dict(optimizer_name="adagrad"), ValueError),
    ("state2", dict(state2=None), ValueError),
    ("absmax1", dict(absmax1=torch.zeros(3)), RuntimeError),
    ("qmap1", dict(qmap1=torch.zeros(255)), RuntimeError),
    ("state1", dict(state1=torch.zeros(300)), TypeError),
    ("g", dict(g=torch.randn(300, dtype=torch.float64)), TypeError),
    ("beta1", dict(beta1=1.0), ValueError),
    ("step", dict(step=0), ValueError),
]


@pytest.mark.parametrize("arg,change,exc", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bad_input_names_the_argument(arg, change, exc, compiled):
    kw = {**_op8_args(), **change}
    fn = ops.optimizer_update_8bit_blockwise
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(lambda **k: ops.optimizer_update_8bit_blockwise(**k),
                           fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=arg) as info:
        fn(**kw)
    if not compiled:
        assert isinstance(info.value, exc)


def test_ops_write_in_place_refuse_grad_and_bump_versions():
    kw = _op8_args()
    p = kw["p"]
    v0 = p._version
    before = p.clone()
    ops.optimizer_update_8bit_blockwise(**kw)
    assert p._version > v0 and not torch.equal(p, before)
    assert kw["absmax1"].gt(0).all() and kw["state1"].ne(0).any()
    leaf = torch.nn.Parameter(torch.randn(300))
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.optimizer_update_32bit("lion", torch.randn(300), leaf, torch.zeros(300), None, None,
                                   0.0, 0.0, 0.9, 0.99, 0.0, 0.0, 0.0, 0.0, 1, 1e-3)
    with torch.no_grad():
        ops.optimizer_update_32bit("lion", torch.randn(300), leaf, torch.zeros(300), None, None,
                                   0.0, 0.0, 0.9, 0.99, 0.0, 0.0, 0.0, 0.0, 1, 1e-3)


def test_max_unorm_and_skip_zeros():
    p = torch.randn(1000)
    g = torch.randn(1000)
    g[:100] = 0
    s1, s2, unorm = torch.zeros(1000), torch.zeros(1000), torch.zeros(1)
    before = p.clone()
    ops.optimizer_update_32bit("adam", g, p, s1, s2, unorm, 1e-3, 0.0, 0.9, 0.999, 0.0, 0.0,
                               1e-8, 0.0, 1, 1.0, 1.0, True)
    # the step is scaled to lr * max_unorm * ||p|| ...
    moved = (p - before).norm()
    torch.testing.assert_close(moved, 1e-3 * before.norm(), rtol=1e-4, atol=0)
    assert unorm.item() > 0
    # ... and entries with a zero gradient keep their parameter and states
    assert torch.equal(p[:100], before[:100]) and s1[:100].eq(0).all()


def test_paged_and_variant_signatures_follow_bitsandbytes():
    import inspect
    assert "is_paged" not in inspect.signature(optim.PagedAdamW8bit).parameters
    assert "optim_bits" not in inspect.signature(optim.Lion8bit).parameters
    p = torch.nn.Parameter(torch.randn(10))
    assert optim.PagedAdamW8bit([p]).is_paged and optim.PagedAdamW8bit([p]).optim_bits == 8
    assert "unified memory" in optim.PagedAdamW8bit.__doc__
    with pytest.raises(ValueError, match="optim_bits"):
        optim.Adam8bit([p], optim_bits=8)
    with pytest.raises(ValueError, match="amsgrad"):
        optim.AdamW([p], amsgrad=True)
    with pytest.raises(NotImplementedError):
        optim.SGD8bit([p], lr=0.1)


# ---- continuing a run bitsandbytes recorded on CUDA ----------------------------------------------
BNB_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bnb_optim_cuda.pt")


def _bnb_run():
    if not os.path.exists(BNB_RUN):
        pytest.skip(f"{BNB_RUN} is absent (scripts/make_optim_fixture.py writes it)")
    return torch.load(BNB_RUN)


def _bnb_run_names():
    return list(torch.load(BNB_RUN)["runs"]) if os.path.exists(BNB_RUN) else ["absent"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", _bnb_run_names())
def test_continues_a_bitsandbytes_cuda_run(device, name):
    """bitsandbytes 0.50.2 ran ``name`` on CUDA (scripts/make_optim_fixture.py); opsq loads its
    state_dict mid-run and takes the remaining steps with the same gradients: the parameters and
    the states must land where bitsandbytes' did.

    AdEMAMix8bit is compared on whole-block tensors only: bitsandbytes 0.50.2's CUDA kernel
    stores the slow EMA's absmax of block ``b`` at flat index ``b + n // 256`` of ``absmax1``,
    which is opsq's (and its own CPU path's) ``[1, b]`` only when ``n % 256 == 0``; otherwise it
    overwrites the fast EMA's last absmax."""
    data = _bnb_run()
    run = data["runs"][name]
    params = [torch.nn.Parameter(p.to(device, copy=True)) for p in run["params_before"]]
    opt = getattr(optim, name)(params, **run["kwargs"])
    opt.load_state_dict(run["state_before"])
    g = torch.Generator().manual_seed(data["grad_seed"])
    grads = [[torch.randn(*s, generator=g) for s in data["shapes"]]
             for _ in range(data["steps_before"] + data["steps_after"])]
    for gs in grads[data["steps_before"]:]:
        for p, gr in zip(params, gs):
            p.grad = gr.to(device)
        opt.step()
    # where the two quantizers break a tie differently a state code sits one map entry apart,
    # which moves that element's parameter by a fraction of lr (Lion: a flipped sign, 2 lr a step)
    lr = run["kwargs"]["lr"]
    comparable = [not (name.startswith("AdEMAMix") and p.numel() >= 4096 and p.numel() % 256)
                  for p in params]
    for p, before, want, ok in zip(params, run["params_before"], run["params_after"], comparable):
        if not ok:
            continue
        diff = (p.detach().cpu() - want).abs()
        assert (want - before).abs().max() > 10 * lr * 0.1  # the steps moved it
        assert (diff > 1e-5).float().mean() < 0.01 and diff.max() <= 4 * lr, diff.max()
    ours = opt.state_dict()["state"]
    for i, want in run["state_after"]["state"].items():
        assert ours[i]["step"] == want["step"]
        if not comparable[i]:
            continue
        got_q = ours[i].get("__bnb_optimizer_quant_state__", ours[i])
        want_q = want.get("__bnb_optimizer_quant_state__", want)
        for key, w in want_q.items():
            if not isinstance(w, torch.Tensor) or key.startswith("absmax"):
                continue
            v = got_q[key].cpu()
            if w.dtype != torch.uint8:  # 32-bit states and the maps
                torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-7)
                continue
            # 8-bit: compare the dequantized states; one entry of the dynamic map apart at most
            # (its widest gap is 1/64 of the block's absmax)
            n = "1" if key == "state1" else "2"
            qmap, a_w, a_v = want_q["qmap" + n], want_q["absmax" + n], got_q["absmax" + n].cpu()
            torch.testing.assert_close(a_v, a_w, rtol=1e-5, atol=1e-7)
            rows = a_w.shape[0] if a_w.dim() == 2 else 1  # AdEMAMix: two EMAs, blocked apiece

            def normalized(codes):
                vals = qmap[codes.reshape(rows, -1).long()]
                return torch.nn.functional.pad(vals, (0, (-vals.shape[1]) % 256)).reshape(-1, 256)
            gap = (normalized(v) - normalized(w)).abs()
            assert (gap <= 1 / 64).all() and (gap > 0).float().mean() < 0.02, key


# ---- the CUDA kernels against the reference kernels ----------------------------------------------
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
KERNEL_CASES = [(name, bits, dtype, n)
                for name in ("adam", "ademamix", "lion", "momentum", "rmsprop")
                for bits in (8, 32)
                for dtype in (torch.float32, torch.bfloat16, torch.float16)
                for n in (300, 4100, 2048, 301)]


def _op_args(name, bits, dtype, n, seed, step):
    """Random states (8-bit: codes and absmax from quantizing random fp32 values) and arguments
    of one update, on the CPU."""
    from opsq.reference.blockwise import quantize_blockwise
    g = torch.Generator().manual_seed(seed)
    two = name in ("adam", "ademamix")
    rows = 2 if name == "ademamix" else 1
    grad = torch.randn(n, generator=g).to(dtype)
    grad[::7] = 0  # skip_zeros has something to skip
    s1 = torch.randn(rows, n, generator=g) * 0.1
    if name == "rmsprop":  # a second moment: not negative
        s1 = s1.abs() * 0.1
    s2 = torch.rand(n, generator=g) * 0.01 if two else None
    kw = dict(optimizer_name=name, g=grad, p=torch.randn(n, generator=g).to(dtype),
              beta1=0.9, beta2=0.99 if name != "lion" else 0.98,
              beta3=0.999 if name == "ademamix" else 0.0,
              alpha=5.0 if name == "ademamix" else 0.0, eps=1e-6, step=step, lr=1e-2,
              weight_decay=0.05, gnorm_scale=0.5, skip_zeros=bool(seed % 2))
    if bits == 32:
        kw.update(state1=s1.reshape(-1) if rows == 1 else s1, state2=s2,
                  unorm_vec=torch.zeros(1) if name != "ademamix" else None,
                  max_unorm=0.02 if name != "ademamix" and seed % 2 else 0.0, param_norm=0.0)
        return kw
    qs = [quantize_blockwise(s1[r].contiguous(), create_dynamic_map(), 256) for r in range(rows)]
    kw.update(state1=torch.stack([q for q, _ in qs]).reshape(s1.shape if rows == 2 else (n,)),
              absmax1=torch.stack([a for _, a in qs]) if rows == 2 else qs[0][1],
              qmap1=create_dynamic_map(), qmap2=unsigned_dynamic_map() if two else None,
              state2=None, absmax2=None)
    if two:
        q2, a2 = quantize_blockwise(s2, unsigned_dynamic_map(), 256)
        kw.update(state2=q2, absmax2=a2)
    return kw


@CUDA_ONLY
@pytest.mark.cuda
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,bits,dtype,n", KERNEL_CASES,
                         ids=[f"{c[0]}-{c[1]}-{str(c[2])[6:]}-{c[3]}" for c in KERNEL_CASES])
def test_cuda_kernel_matches_reference(name, bits, dtype, n, seed):
    """Each CUDA update against the reference kernel on the same inputs: every fp32 operation is
    the reference's, so parameters and 32-bit states agree to rounding (the clipping norm is a
    sum in another order) and 8-bit codes differ at most by one map entry, rarely."""
    from opsq.reference import optim as ref
    kw = _op_args(name, bits, dtype, n, seed, step=3)
    cpu = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if bits == 32:
        ref.optimizer_update_32bit(**cpu)
        ops.optimizer_update_32bit(**gpu)
        keys = ["p", "state1", "state2", "unorm_vec"]
    else:
        ref.optimizer_update_8bit_blockwise(**cpu)
        ops.optimizer_update_8bit_blockwise(**gpu)
        keys = ["p", "state1", "state2", "absmax1", "absmax2"]
    assert not torch.equal(cpu["p"], kw["p"])  # it moved
    for k in keys:
        want, got = cpu[k], gpu[k]
        if want is None:
            continue
        got = got.cpu()
        if want.dtype == torch.uint8:
            diff = (got.int() - want.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.002, (k, diff.max())
        elif k == "p" and dtype != torch.float32:
            # one rounding to half precision; a neighbouring 8-bit state code moves a value by
            # far less than its half-precision step
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)
            assert (got != want).float().mean() <= 0.01, k
        else:
            torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


BAD_ON_DEVICES = [*BAD, ("lr", dict(lr=-1.0), ValueError), ("eps", dict(eps=-0.5), ValueError),
                  ("p", dict(p=torch.randn(300, dtype=torch.float64)), TypeError)]


@CUDA_ONLY
@pytest.mark.cuda
@pytest.mark.parametrize("arg,change,exc", BAD_ON_DEVICES, ids=[b[0] for b in BAD_ON_DEVICES])
def test_cuda_kernel_rejects_bad_input_as_the_cpu_does(arg, change, exc):
    """The C++ checks of optim.cu against the Python ones: same exception type, same message."""
    kw = {**_op8_args(), **change}
    errors = []
    for device in ("cpu", "cuda"):
        args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        with pytest.raises(exc) as info:
            ops.optimizer_update_8bit_blockwise(**args)
        errors.append(str(info.value).split("\n")[0])
    assert arg in errors[0]
    assert errors[0] == errors[1]


# ---- paged states --------------------------------------------------------------------------------
def _ext():
    from opsq._extension import load_extension
    ext = load_extension()
    if ext is None:
        pytest.skip("opsq's CUDA extension is not built")
    return ext


@CUDA_ONLY
@pytest.mark.cuda
def test_paged_states_live_in_unified_memory_and_update_like_unpaged():
    ext = _ext()
    params = _params("cuda", shapes=((300, 70), (130,)))
    twin = _clone(params)
    grads = _grads(params, 3)
    paged = _run(optim.PagedAdamW8bit, params, grads)
    plain = _run(optim.AdamW8bit, twin, grads)
    big = paged.state[params[0]]
    assert ext.is_managed(big["state1"]) and ext.is_managed(big["state2"])
    assert not ext.is_managed(plain.state[twin[0]]["state1"])
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
    # a loaded state dict is paged too, and goes on identically
    again = _clone(params)
    loaded = optim.PagedAdamW8bit(again)
    loaded.load_state_dict(paged.state_dict())
    assert ext.is_managed(loaded.state[again[0]]["state1"])
    for opt, ps in ((paged, params), (loaded, again)):
        for p, g in zip(ps, grads[0]):
            p.grad = g.clone()
        opt.step()
    for p, q in zip(params, again):
        assert torch.equal(p, q)


@CUDA_ONLY
@pytest.mark.cuda
def test_paged_states_do_not_fail_under_a_process_memory_limit():
    """With the process limited (torch.cuda.set_per_process_memory_fraction) to what it already
    holds plus 32 MiB, AdamW8bit cannot allocate the 128 MiB of states of a 64M-element
    parameter; PagedAdamW8bit's unified-memory states are not counted against that limit and
    the step gives the same parameter as an unlimited AdamW8bit."""
    _ext()
    torch.cuda.empty_cache()
    n = 64 * 1024 * 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, device="cuda", generator=g))
    p.grad = torch.randn(n, device="cuda", generator=g)
    want = torch.nn.Parameter(p.detach().clone())
    want.grad = p.grad.clone()
    optim.AdamW8bit([want]).step()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()  # its freed states must not stay reserved inside the limit
    total = torch.cuda.get_device_properties(0).total_memory
    limit = torch.cuda.memory_reserved() + 32 * 2 ** 20
    torch.cuda.set_per_process_memory_fraction(limit / total)
    try:
        other = torch.nn.Parameter(p.detach())
        other.grad = p.grad
        with pytest.raises(torch.OutOfMemoryError):
            optim.AdamW8bit([other]).step()
        paged = optim.PagedAdamW8bit([p])
        paged.step()
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.equal(p, want)
