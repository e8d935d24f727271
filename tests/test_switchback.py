"""SwitchBack layers against a float64 emulation of the algorithm (Wortsman et al., 2023)."""
import pytest
import torch
import torch.nn.functional as F

from opsq.nn import (Linear8bitLt, StandardLinear, SwitchBackLinear, SwitchBackLinearBnb,
                     SwitchBackLinearGlobal, SwitchBackLinearGlobalMemEfficient,
                     SwitchBackLinearVectorwise)


def _quant_rows(A: torch.Tensor):
    """Row-wise int8 codes and absmax, rounded in fp32 like the kernels; codes as float64."""
    A = A.float()
    s = A.abs().amax(1, keepdim=True)
    return torch.round(A * (127.0 / s)).clamp(-127, 127).double(), s.double()


def _int8_product(A: torch.Tensor, B: torch.Tensor, per_row_B: bool) -> torch.Tensor:
    """float64 emulation of ``A @ B.T`` with A row-wise and B row-wise (or tensor-wise) int8."""
    CA, sa = _quant_rows(A)
    CB, sb = _quant_rows(B if per_row_B else B.reshape(1, -1))
    CB = CB.reshape(B.shape)
    return (CA @ CB.t()) * sa * (sb.t() if per_row_B else sb) / 127 ** 2


VARIANTS = [(SwitchBackLinearGlobal, False, False), (SwitchBackLinearVectorwise, True, False),
            (SwitchBackLinearGlobalMemEfficient, False, True)]


@pytest.mark.parametrize("cls,vectorwise,mem_efficient", VARIANTS,
                         ids=[v[0].__name__ for v in VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switchback_forward_backward_match_emulation(cls, vectorwise, mem_efficient, dtype):
    torch.manual_seed(hash(cls.__name__) % 1000)
    layer = cls(96, 40, dtype=dtype)
    assert layer.vector_wise_quantization == vectorwise and layer.mem_efficient == mem_efficient
    x = (torch.randn(3, 7, 96) * torch.rand(3, 7, 1) * 4).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.shape == (3, 7, 40) and y.dtype == dtype
    X, W, b = x.detach().reshape(-1, 96), layer.weight.detach(), layer.bias.detach().double()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    y_ref = _int8_product(X, W, vectorwise) + b
    torch.testing.assert_close(y.double().reshape(-1, 40), y_ref.to(dtype).double(), **tol)
    # And close to the float product: int8 error only.
    y_fp = X.double() @ W.double().t() + b
    assert (y.double().reshape(-1, 40) - y_fp).norm() / y_fp.norm() < 0.02

    g = torch.randn(3, 7, 40).to(dtype)
    y.backward(g)
    G = g.reshape(-1, 40)
    # grad_x = G @ W with G row-wise int8 and W.T row-wise (vector-wise) or global int8.
    gx_ref = _int8_product(G, W.t().contiguous(), vectorwise)
    torch.testing.assert_close(x.grad.double().reshape(-1, 96), gx_ref.to(dtype).double(), **tol)
    # grad_W = G.T @ X in 16 bit (X dequantized from int8 when memory-efficient).
    Xs = X.double()
    if mem_efficient:
        CX, sx = _quant_rows(X)
        Xs = (CX * sx / 127).to(dtype).double()
    gw_ref = G.double().t() @ Xs
    wtol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=0.5)
    torch.testing.assert_close(layer.weight.grad.double(), gw_ref.to(dtype).double(), **wtol)
    torch.testing.assert_close(layer.bias.grad.double(), G.double().sum(0).to(dtype).double(),
                               **wtol)


def test_global_and_vectorwise_differ():
    torch.manual_seed(0)
    a, b = SwitchBackLinearGlobal(64, 16), SwitchBackLinearVectorwise(64, 16)
    with torch.no_grad():
        w = torch.randn(16, 64) * torch.logspace(-2, 0, 16)[:, None]  # rows of very unequal scale
        a.weight.copy_(w)
        b.weight.copy_(w)
        b.bias.copy_(a.bias)
    x = torch.randn(5, 64)
    ref = F.linear(x, w, a.bias).double()[:, :4]  # the outputs of the four smallest rows

    def err(layer):
        return ((layer(x).double()[:, :4] - ref).norm() / ref.norm()).item()

    assert err(b) < 0.05 < 0.3 < err(a)  # a global scale flattens small rows to a few codes


def test_prepare_for_eval_and_no_state_mutation():
    torch.manual_seed(1)
    layer = SwitchBackLinearVectorwise(32, 24)
    x = torch.randn(6, 32)
    train_out = layer(x)
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(layer(x), train_out)  # eval without prepare: same per-call path
        layer.prepare_for_eval()
        assert layer.W_int8.dtype == torch.int8 and layer.state_W.shape == (24,)
        assert torch.equal(layer(x), train_out)
        ids = [id(t) for t in layer.buffers()]
        layer(x)
        assert ids == [id(t) for t in layer.buffers()]
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    layer.train()  # a stale cache is never used for training
    assert layer.W_int8 is None and layer.state_W is None


def test_switchback_bad_input():
    with pytest.raises(ValueError, match="mem_efficient"):
        SwitchBackLinear(8, 8, vector_wise_quantization=True, mem_efficient=True)
    layer = SwitchBackLinearGlobal(8, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 8\)"):
        layer(torch.randn(2, 9))
    with pytest.raises(TypeError, match="x must have dtype"):
        layer(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must have dtype"):
        StandardLinear(8, 4)(torch.ones(2, 8, dtype=torch.int64))


def test_standard_linear_is_f_linear():
    torch.manual_seed(2)
    layer = StandardLinear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_switchback_bnb_int8_forward_16bit_backward(threshold):
    torch.manual_seed(3)
    layer = SwitchBackLinearBnb(64, 32, has_fp16_weights=True, threshold=threshold)
    ref = Linear8bitLt(64, 32, has_fp16_weights=True, threshold=threshold)
    ref.load_state_dict(layer.state_dict())
    x = (torch.randn(4, 64) * 3).requires_grad_(True)
    x[0, 5].data.fill_(20.0)  # an outlier column
    y = layer(x)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    W = layer.weight.detach().double()
    y_fp = x.detach().double() @ W.t() + layer.bias.detach().double()
    assert (y.double() - y_fp).norm() / y_fp.norm() < 0.02
    g = torch.randn(4, 32)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).backward(g)  # the gradients are int8_linear's autograd rule
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    gx = g.double() @ W
    assert (x.grad.double() - gx).norm() / gx.norm() < 0.02  # at most int8 weight rounding
    # The weight gradient is the 16-bit product grad.T @ x.
    torch.testing.assert_close(layer.weight.grad.double(), g.double().t() @ x.detach().double(),
                               rtol=1e-5, atol=1e-5)
    frozen = SwitchBackLinearBnb(64, 32, has_fp16_weights=False, threshold=threshold)
    frozen.load_state_dict(layer.state_dict())
    frozen = frozen.to("cpu")
    assert frozen.is_quantized and frozen.weight.dtype == torch.int8
    torch.testing.assert_close(frozen(x.detach()), y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [SwitchBackLinearGlobal, SwitchBackLinearVectorwise])
@pytest.mark.parametrize("conv", ["half", "bfloat16", "to_fp16_cpu", "double"])
def test_prepared_switchback_survives_dtype_conversion(cls, conv):
    """A layer prepared for eval keeps working after a dtype conversion of the model: its fp32
    state_W and int8 W_int8 follow device moves only (a cast state_W made forward raise an
    internal op's dtype error)."""
    import copy
    torch.manual_seed(0)
    m = cls(32, 16).eval().prepare_for_eval()
    ref = copy.deepcopy(m)
    state = m.state_W.clone()
    if conv == "half":
        m, dt = m.half(), torch.float16
    elif conv == "bfloat16":
        m, dt = m.to(torch.bfloat16), torch.bfloat16
    elif conv == "to_fp16_cpu":
        m, dt = m.to("cpu", torch.float16), torch.float16
    else:
        m, dt = m.double(), None
    assert m.state_W.dtype == torch.float32 and torch.equal(m.state_W, state)
    assert m.W_int8.dtype == torch.int8
    if dt is None:
        return  # fp64 activations are not an int8 op input
    x = torch.randn(5, 32).to(dt)
    y = m(x)
    assert y.dtype == dt
    # same int8 weight and scales as before the conversion; only the bias was cast
    ref.bias.data = m.bias.data.float()
    torch.testing.assert_close(y.float(), ref(x.float()), rtol=2e-2, atol=2e-2)
