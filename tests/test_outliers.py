"""Outlier tooling: find_outlier_dims, OutlierTracer, GlobalOutlierPooler, OutlierAwareLinear."""
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import opsq
from opsq.nn import Linear4bit, OutlierAwareLinear
from opsq.utils import OutlierTracer, find_outlier_dims


def _weight_with_outlier_cols(cols, n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, cols] *= 25.0
    return w


def test_find_outlier_dims_modes():
    w = _weight_with_outlier_cols([5, 40])
    assert torch.equal(find_outlier_dims(w), torch.tensor([5, 40]))
    assert torch.equal(find_outlier_dims(w, topk=2), torch.tensor([5, 40]))
    assert find_outlier_dims(w, topk=5).shape == (5,)
    # Along the other dimension: rows (here none stands out far enough).
    assert find_outlier_dims(w.t().contiguous(), reduction_dim=1).tolist() == [5, 40]
    assert find_outlier_dims(torch.randn(32, 32), zscore=50.0).numel() == 0
    g = torch.Generator().manual_seed(3)
    rnd = find_outlier_dims(w, topk=10, rdm=True, generator=g)
    assert rnd.numel() == 10 and rnd.unique().numel() == 10 and bool((rnd < 64).all())
    assert torch.equal(rnd, rnd.sort().values)
    assert find_outlier_dims(w.half()).tolist() == [5, 40]


def test_find_outlier_dims_errors():
    with pytest.raises(TypeError, match="weight"):
        find_outlier_dims(torch.ones(4, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D"):
        find_outlier_dims(torch.ones(4))
    with pytest.raises(ValueError, match="reduction_dim"):
        find_outlier_dims(torch.ones(4, 4), reduction_dim=2)
    with pytest.raises(ValueError, match="topk"):
        find_outlier_dims(torch.ones(4, 4), topk=5)
    with pytest.raises(ValueError, match="rdm"):
        find_outlier_dims(torch.ones(4, 4), rdm=True)
    with pytest.raises(ValueError, match="zscore"):
        find_outlier_dims(torch.ones(4, 4), zscore=-1.0)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        m[2].weight.copy_(_weight_with_outlier_cols([7, 33], n=8, k=64))
    return m


def test_outlier_tracer_traces_once_and_removes_hooks():
    tracer = OutlierTracer.get_instance()
    with pytest.raises(RuntimeError, match="get_instance"):
        OutlierTracer()
    m = _model()
    tracer.initialize(m, magnitude_threshold=6.0, input_zscore=3.0, weight_zscore=2.0)
    assert len(tracer.hooks) == 2
    x = torch.randn(32, 16)
    x[:, 3] *= 2.0
    x[4, 11] = 9.0  # a magnitude outlier in feature 11
    m(x)
    assert tracer.hooks == [] and not m[0]._forward_pre_hooks and not m[2]._forward_pre_hooks
    first = tracer.get_outliers(m[0].weight)  # from the activations
    assert 11 in first.tolist()
    assert tracer.get_outliers(m[2].weight).tolist() == [7, 33]  # from the weight
    assert tracer.get_outliers(m[2].weight.data).tolist() == [7, 33]  # same memory, new object
    assert tracer.get_outliers(nn.Linear(4, 4).weight) is None
    assert list(tracer.outliers_by_name) == ["0", "2"] and len(tracer.outliers) == 2
    m(x)  # hooks are gone: nothing changes
    assert len(tracer.outliers) == 2


def test_outlier_tracer_reinitialise_and_errors():
    tracer = OutlierTracer.get_instance()
    m = _model()
    tracer.initialize(m)
    tracer.initialize(m)  # the first hooks are removed, not doubled
    assert len(m[0]._forward_pre_hooks) == 1
    tracer.remove_hooks()
    assert not m[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="magnitude_threshold"):
        tracer.initialize(m, magnitude_threshold=float("nan"))
    with pytest.raises(TypeError, match="model"):
        tracer.initialize("model")


def test_outlier_tracer_forgets_freed_weights_and_handles_packed_layers():
    tracer = OutlierTracer.get_instance()
    lin = nn.Linear(8, 8)
    q = Linear4bit.from_float(nn.Linear(16, 8), quant_type="nf4")  # packed weight: from input
    model = nn.Sequential(q, nn.ReLU(), lin)
    tracer.initialize(model, magnitude_threshold=3.0)
    x = torch.randn(4, 16) * 0.1
    x[0, 2] = 5.0
    model(x)
    assert tracer.get_outliers(q.weight).tolist() == [2]
    w = lin.weight
    assert tracer.get_outliers(w) is not None
    lin.weight = nn.Parameter(torch.randn(8, 8))
    del w
    gc.collect()  # the traced tensor is gone: its record must not match recycled memory
    assert all(tracer.get_outliers(p) is None for p in lin.parameters())


def test_global_outlier_pooler():
    pool = opsq.GlobalOutlierPooler.get_instance()
    pool.initialize()
    with pytest.raises(RuntimeError, match="no outliers"):
        pool.get_current_outlier_mask()
    assert pool.add_outliers(torch.tensor([5, 1]), 16)
    assert pool.add_outliers([1, 9], 16)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[12] = True
    assert pool.add_outliers(mask, 16)
    assert not pool.add_outliers(torch.tensor([40]), 64)  # another dimension: ignored
    assert pool.get_current_outlier_idx().tolist() == [1, 5, 9, 12]
    assert pool.get_current_outlier_mask().nonzero().reshape(-1).tolist() == [1, 5, 9, 12]
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pool.add_outliers([16], 16)
    with pytest.raises(ValueError, match="mask"):
        pool.add_outliers(torch.ones(3, dtype=torch.bool), 16)
    with pytest.raises(TypeError, match="integer"):
        pool.add_outliers(torch.tensor([1.0]), 16)
    with pytest.raises(RuntimeError, match="get_instance"):
        opsq.GlobalOutlierPooler()
    pool.initialize()


class MixedInt8Linear(OutlierAwareLinear):
    """Test subclass: int8 row-wise fake quantization of the inlier columns; outlier columns of
    the weight are kept exact."""

    def quantize_weight(self, w, outlier_idx):
        mask = torch.zeros(w.shape[1], dtype=torch.bool)
        mask[outlier_idx] = True
        CB, SCB, _ = opsq.functional.int8_vectorwise_quant(w.masked_fill(mask, 0.0))
        return torch.where(mask, w, CB.float() * SCB[:, None] / 127)

    def forward_with_outliers(self, x, outlier_idx):
        return F.linear(x, self.weight, self.bias)


def test_outlier_aware_linear_subclass():
    torch.manual_seed(4)
    layer = MixedInt8Linear(64, 24)
    with torch.no_grad():
        layer.weight[:, [3, 50]] *= 40.0
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, w0, layer.bias), rtol=0, atol=0)
    tracer = OutlierTracer.get_instance()
    model = nn.Sequential(nn.Linear(8, 64), layer)
    tracer.initialize(model, weight_zscore=3.0)
    model(torch.randn(5, 8))
    layer.prepare()
    assert layer.is_quantized and layer.outlier_dim.tolist() == [3, 50]
    w = layer.weight.detach()
    assert torch.equal(w[:, [3, 50]], w0[:, [3, 50]])  # outlier columns kept exactly
    inl = torch.ones(64, dtype=torch.bool)
    inl[[3, 50]] = False
    step = w0[:, inl].abs().amax(1, keepdim=True) / 127
    assert ((w[:, inl] - w0[:, inl]).abs() <= step / 2 * 1.001).all()
    ref = x.double() @ w.double().t() + layer.bias.detach().double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    before = [t.clone() for t in layer.state_dict().values()]
    layer(x)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.state_dict().values()))


def test_outlier_aware_linear_errors():
    base = OutlierAwareLinear(8, 4)
    with pytest.raises(NotImplementedError, match="quantize_weight"):
        base.prepare(torch.tensor([1]))
    layer = MixedInt8Linear(8, 4)
    with pytest.raises(ValueError, match="in_features=8"):
        layer.prepare(torch.tensor([8]))
    with pytest.raises(ValueError, match="1-D integer"):
        layer.prepare(torch.tensor([1.0]))
    OutlierTracer.get_instance().initialize(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="no outliers were traced"):
        layer.prepare()

    class Bad(MixedInt8Linear):
        def quantize_weight(self, w, outlier_idx):
            return w[:, :2]

    with pytest.raises(ValueError, match="shape"):
        Bad(8, 4).prepare(torch.tensor([0]))
