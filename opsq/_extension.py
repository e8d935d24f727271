"""Loading of the optional CUDA extension (``opsq._C``) and backend reporting."""
from __future__ import annotations

import importlib
import os

import torch

from ._schemas import ALIASES, OPTIMIZER_SCHEMAS, SCHEMAS

_EXT = None
_EXT_ERROR: str | None = None


def load_extension():
    """Import ``opsq._C`` if it was built; it registers CUDA kernels with
    ``TORCH_LIBRARY_IMPL(opsq, CUDA, m)``. Returns the module or None (the error is kept in
    :func:`extension_error`). ``OPSQ_DISABLE_CUDA_EXT=1`` skips it (reference kernels only)."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    if os.environ.get("OPSQ_DISABLE_CUDA_EXT", "0") == "1":
        _EXT_ERROR = "disabled by OPSQ_DISABLE_CUDA_EXT=1"
        return None
    try:
        _EXT = importlib.import_module("opsq._C")
    except ImportError as e:  # not built (CPU-only install) or ABI mismatch
        _EXT_ERROR = str(e)
        return None
    from ._autograd import install_native_callbacks
    install_native_callbacks(_EXT)
    return _EXT


def extension_error() -> str | None:
    return _EXT_ERROR


def has_native_kernel(name: str, dispatch_key: str = "CUDA") -> bool:
    """Whether op ``opsq::name`` (or, for an alias, the op it calls) has a kernel registered
    directly for ``dispatch_key``."""
    name = ALIASES.get(name, name)
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"opsq::{name}", dispatch_key)


def backends() -> dict[str, dict[str, str]]:
    """For every op: which kernel serves each device ("cuda-native", "reference")."""
    out = {}
    for name in [*SCHEMAS, *OPTIMIZER_SCHEMAS]:
        note = f" (alias of {ALIASES[name]})" if name in ALIASES else ""
        out[name] = {
            "cpu": "reference" + note,
            "cuda": ("cuda-native" if has_native_kernel(name, "CUDA") else "reference") + note,
            "meta": "fake" + note,
        }
    return out
