"""Legacy cuBLASLt int8 layouts at the op and tensor level, against NVIDIA's own output
(shared/fixtures/cublaslt/layouts.pt), and legacy Linear8bitLt checkpoints."""
import os
import functools
from pathlib import Path

import pytest
import torch
from torch import nn

import opsq
from opsq import _layouts
from opsq.layout_utils import TILE_SIZES, maybe_rearrange_weight
from opsq.nn import Linear8bitLt
from opsq.utils import (INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING,
                        LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING)

LAYOUTS = Path(os.environ.get("OPSQ_FIXTURES") or Path(__file__).resolve().parents[2] / "shared"
               / "fixtures") / "cublaslt" / "layouts.pt"
TILED = ("col32", "col_turing", "col_ampere")
ops = torch.ops.opsq


@functools.lru_cache(maxsize=1)
def _fixture():
    if not LAYOUTS.is_file():
        pytest.skip(f"cuBLASLt layout fixture not found at {LAYOUTS}")
    return torch.load(LAYOUTS, weights_only=True)


CASES = ["public_40x72", "public_64x64"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", TILED)
def test_transform_op_matches_cublaslt_both_ways(case, order):
    d = _fixture()
    A, ref = d[f"{case}.row"], d[f"{case}.{order}"]
    shape = list(A.shape)
    assert torch.equal(ops.transform(A, "row", order, shape), ref)
    assert torch.equal(ops.transform(ref, order, "row", shape), A)
    for other in TILED:  # tiled -> tiled goes through row-major exactly
        assert torch.equal(ops.transform(ref, order, other, shape), d[f"{case}.{other}"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("order", TILED)
def test_undo_layout_with_tile_inds_matches_cublaslt(case, order):
    d = _fixture()
    A, ref = d[f"{case}.row"], d[f"{case}.{order}"]
    rows_p, cols_p = _layouts.padded_shape(order, *A.shape)
    inds = opsq.get_tile_inds(order)
    assert inds.shape == TILE_SIZES[order] and inds.dtype == torch.int64
    back = opsq.undo_layout(ref.reshape(rows_p, cols_p), inds)
    expected = torch.zeros(rows_p, cols_p, dtype=torch.int8)
    expected[: A.shape[0], : A.shape[1]] = A
    assert torch.equal(back, expected)


@pytest.mark.parametrize("order", TILED)
def test_tile_inds_agree_with_layout_formulas(order):
    tr, tc = TILE_SIZES[order]
    offsets = _layouts.tile_offsets(order, tr, tc).reshape(-1)  # position of each element
    inds = opsq.get_tile_inds(order).reshape(-1)  # element at each position
    assert torch.equal(inds[offsets], torch.arange(tr * tc))


def test_get_inverse_transform_indices_on_custom_permutations():
    # A transpose of a 3x300 tile needs two base-256 digits per position.
    inds = opsq.get_inverse_transform_indices(lambda t: t.t().contiguous(), (3, 300))
    assert torch.equal(inds.reshape(-1), torch.arange(900).reshape(3, 300).t().reshape(-1))
    with pytest.raises(ValueError, match="not a permutation"):
        opsq.get_inverse_transform_indices(lambda t: torch.zeros_like(t), (2, 4))
    with pytest.raises(ValueError, match="elements"):
        opsq.get_inverse_transform_indices(lambda t: t[:1], (2, 4))
    with pytest.raises(ValueError, match="tile_size"):
        opsq.get_inverse_transform_indices(lambda t: t, (0, 4))


def test_undo_layout_and_tile_inds_errors():
    inds = opsq.get_tile_inds("col_turing")
    with pytest.raises(ValueError, match="whole number"):
        opsq.undo_layout(torch.zeros(9, 32, dtype=torch.int8), inds)
    with pytest.raises(ValueError, match="2-D"):
        opsq.undo_layout(torch.zeros(256, dtype=torch.int8), inds)
    with pytest.raises(ValueError, match="format"):
        opsq.get_tile_inds("col64")


def _legacy_state_dict(order, rows=40, cols=70, padded_2d=True):
    torch.manual_seed(7)
    lin = nn.Linear(cols, rows).half()
    q = Linear8bitLt.from_float(lin, threshold=0.0)
    sd = q.state_dict()
    flat = ops.transform(sd["weight"], "row", order, [rows, cols])
    sd["weight"] = flat.reshape(_layouts.padded_shape(order, rows, cols)) if padded_2d else flat
    sd["weight_format"] = torch.tensor(LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING[order],
                                       dtype=torch.uint8)
    return q, sd


@pytest.mark.parametrize("order", TILED)
def test_linear8bitlt_loads_bnb_shaped_legacy_checkpoint(order):
    q, sd = _legacy_state_dict(order)  # 2-D padded, as bitsandbytes stored it
    layer = Linear8bitLt(70, 40, has_fp16_weights=False).half()
    layer.load_state_dict(sd)
    x = torch.randn(3, 70, dtype=torch.float16)
    torch.testing.assert_close(layer(x), q(x), rtol=0, atol=0)
    assert layer.state_dict()["weight_format"].item() == 0


@pytest.mark.parametrize("order", TILED)
@pytest.mark.parametrize("padded_2d", [True, False])
def test_maybe_rearrange_weight(order, padded_2d):
    q, sd = _legacy_state_dict(order, padded_2d=padded_2d)
    maybe_rearrange_weight(sd, "", shape=(40, 70))
    assert torch.equal(sd["weight"], q.state_dict()["weight"])
    assert sd["weight_format"].item() == 0
    if padded_2d:  # without shape: the padded row-major matrix
        _, sd2 = _legacy_state_dict(order)
        maybe_rearrange_weight(sd2, "")
        assert torch.equal(sd2["weight"][:40, :70], q.state_dict()["weight"])
    # As a load_state_dict pre-hook of a plain module holding the int8 matrix.
    _, sd3 = _legacy_state_dict(order, padded_2d=padded_2d)
    holder = nn.Module()
    holder.register_buffer("weight", torch.zeros(40, 70, dtype=torch.int8))
    holder.register_buffer("weight_format", torch.tensor(0, dtype=torch.uint8))
    holder._register_load_state_dict_pre_hook(
        functools.partial(maybe_rearrange_weight, shape=(40, 70)))
    holder.load_state_dict({k: v for k, v in sd3.items() if k.startswith("weight")})
    assert torch.equal(holder.weight, q.state_dict()["weight"])


def test_maybe_rearrange_weight_errors_and_no_ops():
    sd = {"weight": torch.zeros(40, 70, dtype=torch.int8), "weight_format": torch.tensor(9)}
    with pytest.raises(ValueError, match="weight_format"):
        maybe_rearrange_weight(sd, "")
    sd = {"weight": torch.zeros(2560, dtype=torch.int8), "weight_format": "col32"}
    with pytest.raises(ValueError, match="shape"):
        maybe_rearrange_weight(sd, "")
    row = {"weight": torch.ones(4, 4, dtype=torch.int8)}
    maybe_rearrange_weight(row, "")  # no weight_format: untouched
    assert set(row) == {"weight"}


def test_format_mappings_are_inverse():
    assert LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING == {"row": 0, "col32": 1, "col_turing": 2,
                                                  "col_ampere": 3}
    assert {v: k for k, v in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.items()} == \
        INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING


def test_supports_igemmlt():
    assert opsq.supports_igemmlt(torch.device("cpu")) is True
    assert opsq.supports_igemmlt("cuda:0") is True  # reference fallback where no native kernel
    assert opsq.supports_igemmlt(None) is True
    with pytest.raises(TypeError, match="device"):
        opsq.supports_igemmlt(3.5)
    with pytest.raises(ValueError, match="device"):
        opsq.supports_igemmlt("not-a-device")
