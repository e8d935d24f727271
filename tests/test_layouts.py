"""Tests for opsq._layouts: legacy cuBLASLt int8 tile layouts."""

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_layouts():
    try:
        from opsq import _layouts  # noqa: PLC0415
        return _layouts
    except Exception:  # not importable yet, or opsq/__init__.py fails for unrelated reasons
        pass
    if str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))
        try:
            from opsq import _layouts  # noqa: PLC0415
            return _layouts
        except Exception:
            pass
    # opsq/__init__.py may fail to import (extension not built): load the file directly.
    spec = importlib.util.spec_from_file_location("opsq_layouts_standalone", _REPO / "opsq" / "_layouts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


L = _load_layouts()

FIXTURES = pathlib.Path(os.environ.get("OPSQ_FIXTURES") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures")
LAYOUTS_PT = FIXTURES / "cublaslt" / "layouts.pt"
TILED = ("col32", "col_turing", "col_ampere")


def _fixture():
    if not LAYOUTS_PT.is_file():
        pytest.skip(f"cuBLASLt layout fixtures not found at {LAYOUTS_PT}")
    return torch.load(LAYOUTS_PT, weights_only=True)


def _cases():
    if not LAYOUTS_PT.is_file():
        return []
    d = torch.load(LAYOUTS_PT, weights_only=True)
    return sorted(k[: -len(".row")] for k in d if k.endswith(".row"))


_CASES = _cases()


@pytest.mark.skipif(not _CASES, reason=f"cuBLASLt layout fixtures not found at {LAYOUTS_PT}")
@pytest.mark.parametrize("case", _CASES or ["none"])
@pytest.mark.parametrize("order", TILED)
def test_matches_cublaslt(case, order):
    d = _fixture()
    A = d[f"{case}.row"]
    ref = d[f"{case}.{order}"]
    rows, cols = A.shape
    assert L.tiled_numel(order, rows, cols) == ref.numel()
    got = L.row_to_tiled(A, order)
    assert got.dtype == ref.dtype and got.shape == ref.reshape(-1).shape
    assert torch.equal(got, ref.reshape(-1))
    back = L.tiled_to_row(ref, order, rows, cols)
    assert back.is_contiguous()
    assert torch.equal(back, A)


SIZES = [(1, 1), (7, 33), (65, 31), (100, 100), (8, 32), (32, 64), (33, 1), (1, 97), (0, 5), (5, 0), (0, 0)]


@pytest.mark.parametrize("order", L.ORDERS)
@pytest.mark.parametrize("rows,cols", SIZES)
def test_round_trip_padding_bijection(order, rows, cols):
    g = torch.Generator().manual_seed(1000 * rows + cols)
    A = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=g)
    n = L.tiled_numel(order, rows, cols)
    rp, cp = L.padded_shape(order, rows, cols)
    assert n == rp * cp
    B = L.row_to_tiled(A, order)
    assert B.shape == (n,) and B.dtype == torch.int8
    assert torch.equal(L.tiled_to_row(B, order, rows, cols), A)

    off = L.tile_offsets(order, rows, cols)
    assert off.dtype == torch.int64 and off.shape == (rows, cols)
    flat = off.reshape(-1)
    assert flat.unique().numel() == rows * cols  # injective
    if flat.numel():
        assert int(flat.min()) >= 0 and int(flat.max()) < n
    pad = torch.ones(n, dtype=torch.bool)
    pad[flat] = False
    assert int((~pad).sum()) == rows * cols
    assert torch.all(B[pad] == 0)
    # B is exactly A scattered through the offsets
    assert torch.equal(B[flat], A.reshape(-1))


def test_row_order_identity():
    A = torch.arange(12, dtype=torch.int8).reshape(3, 4)
    assert torch.equal(L.tile_offsets("row", 3, 4), torch.arange(12).reshape(3, 4))
    assert torch.equal(L.row_to_tiled(A, "row"), A.reshape(-1))
    assert L.padded_shape("row", 3, 5) == (3, 5)


def test_padded_shapes():
    assert L.padded_shape("col32", 7, 33) == (7, 64)
    assert L.padded_shape("col_turing", 7, 33) == (8, 64)
    assert L.padded_shape("col_ampere", 7, 33) == (32, 64)
    assert L.tiled_numel("col_ampere", 0, 10) == 0


def test_non_contiguous_and_other_dtypes():
    A = torch.randn(40, 70).t()  # (70, 40), non-contiguous, float32
    for order in L.ORDERS:
        B = L.row_to_tiled(A, order)
        assert B.dtype == torch.float32
        assert torch.equal(L.tiled_to_row(B.reshape(-1, 2), order, 70, 40), A)


def test_errors():
    with pytest.raises(ValueError, match="order"):
        L.padded_shape("col64", 2, 2)
    with pytest.raises(ValueError, match="order"):
        L.tile_offsets("nope", 2, 2)
    with pytest.raises(ValueError, match="rows"):
        L.tiled_numel("col32", -1, 2)
    with pytest.raises(ValueError, match="cols"):
        L.tile_offsets("col32", 1, -3)
    with pytest.raises(ValueError, match="B"):
        L.tiled_to_row(torch.zeros(10, dtype=torch.int8), "col32", 1, 1)
    with pytest.raises(ValueError, match="A"):
        L.row_to_tiled(torch.zeros(4, dtype=torch.int8), "col32")
    with pytest.raises(ValueError, match="order"):
        L.row_to_tiled(torch.zeros(2, 2, dtype=torch.int8), "COL32")
    with pytest.raises(ValueError, match="rows"):
        L.tiled_to_row(torch.zeros(0), "col32", -1, 0)
