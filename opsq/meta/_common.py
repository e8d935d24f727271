"""Validation primitives shared by the fake kernels and the reference kernels.

Every check goes through ``torch._check_*`` (via :data:`check`, :data:`check_value` and
:data:`check_type`, which return at once on a plain ``True``) so it raises a Python exception
in eager mode and under ``torch.compile`` (fake tensors, symbolic shapes) alike. Messages name
the argument and show the expected and the received value. Exceptions: ``TypeError`` for a
wrong dtype, ``ValueError`` for a bad value (blocksize, quant_type, threshold, order, device)
and ``RuntimeError`` from ``torch._check`` for shape mismatches.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Iterable, Sequence

import torch

from .._constants import (BLOCKSIZES, BLOCKWISE_BLOCKSIZES, FLOAT_DTYPES, LAYOUTS_4BIT,
                          QUANT_STORAGE_DTYPES, QUANT_TYPES)


def _passing_fast(torch_check: Callable, name: str) -> Callable:
    """``torch_check`` (``torch._check`` / ``_check_value`` / ``_check_type``) returning at
    once when the condition is the plain ``True`` of an eager call; anything else (``False``, a
    ``SymBool`` while tracing) goes to ``torch_check`` itself. ``torch._check*`` costs ~1.2 us
    even when it passes, and a 4-bit op runs ~36 checks a call."""
    def passing_fast(cond, message=None):
        if cond is True:
            return
        torch_check(cond, message)
    passing_fast.__name__ = passing_fast.__qualname__ = name
    passing_fast.__doc__ = (f"``torch.{torch_check.__name__}(cond, message)``, returning at once "
                            "when ``cond is True``.")
    return passing_fast


#: ``torch._check`` (RuntimeError), ``torch._check_value`` (ValueError) and
#: ``torch._check_type`` (TypeError) with the fast pass of :func:`_passing_fast`; every
#: validation of opsq/meta goes through these.
check = _passing_fast(torch._check, "check")
check_value = _passing_fast(torch._check_value, "check_value")
check_type = _passing_fast(torch._check_type, "check_type")


@functools.lru_cache(maxsize=None)
def _tensor_args(op: str) -> tuple[tuple[int, str, bool], ...]:
    """``(position, name, optional)`` of every Tensor argument of ``opsq::op``."""
    out = []
    for i, a in enumerate(getattr(torch.ops.opsq, op).default._schema.arguments):
        t = a.type
        optional = isinstance(t, torch._C.OptionalType)
        inner = t.getElementType() if optional else t
        if isinstance(inner, torch._C.TensorType):
            out.append((i, a.name, optional))
    return tuple(out)


def check_tensor_args(op: str, args: Sequence, kwargs: dict | None = None) -> None:
    """TypeError naming the first Tensor argument of ``opsq::op`` that is not a tensor (None for
    a required one, or any other object), before any check reads ``.dtype`` from it."""
    kwargs = kwargs or {}
    for i, name, optional in _tensor_args(op):
        value = args[i] if i < len(args) else kwargs.get(name)
        if value is None and optional:
            continue
        check_type(isinstance(value, torch.Tensor),
                   lambda: f"{name} must be a Tensor, got {type(value).__name__}")


def with_tensor_args_checked(op: str, fn: Callable) -> Callable:
    """``fn`` (a fake or reference kernel of ``opsq::op``) preceded by
    :func:`check_tensor_args`."""
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        check_tensor_args(op, args, kwargs)
        return fn(*args, **kwargs)
    return checked


def register_fake(qualname: str) -> Callable:
    """``torch.library.register_fake(qualname)`` with :func:`check_tensor_args` first."""
    def deco(fn: Callable) -> Callable:
        torch.library.register_fake(qualname)(
            with_tensor_args_checked(qualname.split("::")[1], fn))
        return fn
    return deco


def check_dtype(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    check_type(t.dtype in allowed,
               lambda: f"{name} must have dtype in {list(allowed)}, got {t.dtype}")


def check_float_dtype(name: str, dtype: torch.dtype) -> None:
    check_type(dtype in FLOAT_DTYPES,
               lambda: f"{name} must be one of {list(FLOAT_DTYPES)}, got {dtype}")


def _check_one_of_blocksizes(blocksize: int, name: str, allowed: tuple[int, ...]) -> None:
    check_value(blocksize in allowed,
                lambda: f"{name} must be one of {allowed}, got {blocksize}")


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    """A blocksize of the 4-bit ops (and of their nested absmax): one of ``BLOCKSIZES``."""
    _check_one_of_blocksizes(blocksize, name, BLOCKSIZES)


def check_blockwise_blocksize(blocksize: int, name: str = "blocksize") -> None:
    """A blocksize of the 8-bit blockwise ops: one of ``BLOCKWISE_BLOCKSIZES``."""
    _check_one_of_blocksizes(blocksize, name, BLOCKWISE_BLOCKSIZES)


def check_quant_type(quant_type: str) -> None:
    check_value(quant_type in QUANT_TYPES,
                lambda: f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_layout(layout: str) -> None:
    """A 4-bit weight layout: one of ``LAYOUTS_4BIT``."""
    check_value(layout in LAYOUTS_4BIT,
                lambda: f"layout must be one of {LAYOUTS_4BIT}, got {layout!r}")


def check_quant_storage(quant_storage: torch.dtype) -> None:
    check_type(
        quant_storage in QUANT_STORAGE_DTYPES,
        lambda: f"quant_storage must be one of {list(QUANT_STORAGE_DTYPES)}, got {quant_storage}")


def check_threshold(threshold: float) -> None:
    check_value(
        isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0.0,
        lambda: f"threshold must be a finite number >= 0 (0 disables outliers), got {threshold}")


def check_same_device(main_name: str, main: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        check_value(
            t.device == main.device,
            lambda: f"{name} must be on the same device as {main_name} ({main.device}), "
                    f"got {t.device}")


def check_numel(name: str, t: torch.Tensor, expected, what: str = "") -> None:
    check(t.numel() == expected,
          lambda: f"{name} must have {expected} elements{what}, got {t.numel()} "
                  f"(shape {tuple(t.shape)})")


def check_dim(name: str, t: torch.Tensor, ndim: int) -> None:
    check(t.dim() == ndim,
          lambda: f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_min_dim(name: str, t: torch.Tensor, ndim: int) -> None:
    check(t.dim() >= ndim,
          lambda: f"{name} must have at least {ndim} dimension(s), got shape "
                  f"{tuple(t.shape)}")


def check_shape_arg(name: str, shape: Sequence) -> None:
    check_value(len(shape) >= 1, lambda: f"{name} must not be empty, got {list(shape)}")
    for s in shape:
        check(s >= 0, lambda: f"{name} must have non-negative sizes, got {list(shape)}")


def numel_of(shape: Sequence):
    n = 1
    for s in shape:
        n = n * s
    return n


def ceil_div(a, b):
    return (a + b - 1) // b
