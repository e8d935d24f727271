"""Validation primitives shared by the fake kernels and the reference kernels.

Every check goes through ``torch._check_*`` so it raises a Python exception in eager mode and
under ``torch.compile`` (fake tensors, symbolic shapes) alike. Messages name the argument and show
the expected and the received value. Exceptions: ``TypeError`` for a wrong dtype, ``ValueError``
for a bad value (blocksize, quant_type, threshold, order, device) and ``RuntimeError`` from
``torch._check`` for shape mismatches.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .._constants import BLOCKSIZES, FLOAT_DTYPES, QUANT_STORAGE_DTYPES, QUANT_TYPES


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    torch._check_type(t.dtype in allowed,
                      lambda: f"{name} must have dtype in {list(allowed)}, got {t.dtype}")


def check_float_dtype(name: str, dtype: torch.dtype) -> None:
    torch._check_type(dtype in FLOAT_DTYPES,
                      lambda: f"{name} must be one of {list(FLOAT_DTYPES)}, got {dtype}")


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    torch._check_value(blocksize in BLOCKSIZES,
                       lambda: f"{name} must be one of {BLOCKSIZES}, got {blocksize}")


def check_quant_type(quant_type: str) -> None:
    torch._check_value(quant_type in QUANT_TYPES,
                       lambda: f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_quant_storage(quant_storage: torch.dtype) -> None:
    torch._check_type(
        quant_storage in QUANT_STORAGE_DTYPES,
        lambda: f"quant_storage must be one of {list(QUANT_STORAGE_DTYPES)}, got {quant_storage}")


def check_threshold(threshold: float) -> None:
    torch._check_value(
        isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0.0,
        lambda: f"threshold must be a finite number >= 0 (0 disables outliers), got {threshold}")


def check_same_device(main_name: str, main: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        torch._check_value(
            t.device == main.device,
            lambda: f"{name} must be on the same device as {main_name} ({main.device}), "
                    f"got {t.device}")


def check_numel(name: str, t: torch.Tensor, expected, what: str = "") -> None:
    torch._check(t.numel() == expected,
                 lambda: f"{name} must have {expected} elements{what}, got {t.numel()} "
                         f"(shape {tuple(t.shape)})")


def check_dim(name: str, t: torch.Tensor, ndim: int) -> None:
    torch._check(t.dim() == ndim,
                 lambda: f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_min_dim(name: str, t: torch.Tensor, ndim: int) -> None:
    torch._check(t.dim() >= ndim,
                 lambda: f"{name} must have at least {ndim} dimension(s), got shape "
                         f"{tuple(t.shape)}")


def check_shape_arg(name: str, shape: Sequence) -> None:
    torch._check_value(len(shape) >= 1, lambda: f"{name} must not be empty, got {list(shape)}")
    for s in shape:
        torch._check(s >= 0, lambda: f"{name} must have non-negative sizes, got {list(shape)}")


def numel_of(shape: Sequence):
    n = 1
    for s in shape:
        n = n * s
    return n


def ceil_div(a, b):
    return (a + b - 1) // b
