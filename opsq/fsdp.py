"""FSDP helpers for opsq's quantized layers.

opsq stores packed weights and their statistics as parameters of non-floating dtypes (uint8 /
int8 codes, fp32 statistics as int32 bit patterns), so FSDP2's ``fully_shard`` shards them and
its mixed precision never casts them. PyTorch releases before 2.12 cannot hold such parameters
in FSDP2: ``FSDPParam`` wraps every shard in ``nn.Parameter(dtensor)`` with the default
``requires_grad=True``, which raises "only Tensors of floating point dtype can require
gradients" for integer tensors (later releases pass ``requires_grad=param.requires_grad``), and
its ``MixedPrecisionPolicy(param_dtype=...)`` casts integer parameters too (later releases
leave non-floating parameters alone). :func:`enable_fsdp2_integer_params` brings those two
behaviours of the later releases to the older ones.
"""
from __future__ import annotations

import inspect

import torch

__all__ = ["fsdp2_supports_integer_params", "enable_fsdp2_integer_params"]

_PATCHED = False


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters and
    gradients); False where torch has no distributed package."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _needs(_fsdp_param) -> tuple[bool, bool]:
    """(parameter creation needs the fix, mixed-precision dtypes need the fix)."""
    shard_src = inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param)
    dtype_src = inspect.getsource(_fsdp_param.FSDPParam.init_dtype_attrs)
    return ("requires_grad=param.requires_grad" not in shard_src,
            "is_floating_point" not in dtype_src)


def fsdp2_supports_integer_params() -> bool:
    """Whether this torch's FSDP2 shards integer parameters and leaves them out of mixed
    precision without :func:`enable_fsdp2_integer_params`."""
    if _PATCHED:
        return True
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:
        return False
    return not any(_needs(_fsdp_param))


class _FrozenAwareNN:
    """Stands in for ``torch.nn`` inside FSDP2's ``_fsdp_param`` module: identical, except that
    ``Parameter(t)`` of a non-floating tensor is created with ``requires_grad=False``."""

    def __getattr__(self, name):
        return getattr(torch.nn, name)

    @staticmethod
    def Parameter(data=None, requires_grad=True):  # noqa: N802 (mirrors torch.nn.Parameter)
        if data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return torch.nn.Parameter(data, requires_grad=requires_grad)


def enable_fsdp2_integer_params() -> bool:
    """On torch releases whose FSDP2 cannot hold integer parameters, make its ``nn.Parameter``
    calls create integer parameters with ``requires_grad=False`` (nothing else changes).
    Idempotent; a no-op where FSDP2 already supports them. Returns True if a change was made.

    Raises:
        ImportError: torch was built without distributed support.
    """
    global _PATCHED
    if fsdp2_supports_integer_params():
        return False
    from torch.distributed.fsdp._fully_shard import _fsdp_param
    fix_params, fix_dtypes = _needs(_fsdp_param)
    if fix_params:
        _fsdp_param.nn = _FrozenAwareNN()
    if fix_dtypes:
        original = _fsdp_param.FSDPParam.init_dtype_attrs

        def init_dtype_attrs(self, mp_policy):
            original(self, mp_policy)
            if not self.orig_dtype.is_floating_point:  # mixed precision is for floats only
                self.param_dtype = None
                self.reduce_dtype = None

        _fsdp_param.FSDPParam.init_dtype_attrs = init_dtype_attrs
    _PATCHED = True
    return True
