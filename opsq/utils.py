"""Utilities with bitsandbytes' names."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ._constants import LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING  # noqa: F401
from .functional import pack_dict_to_tensor, unpack_tensor_to_dict  # noqa: F401

__all__ = ["replace_linear", "pack_dict_to_tensor", "unpack_tensor_to_dict", "sync_gpu",
           "LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING"]


def replace_linear(model: nn.Module, linear_replacement: Callable[..., nn.Module],
                   skip_modules: Iterable[str] = ("lm_head",), copy_weights: bool = False,
                   post_processing_function: Optional[str] = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place, recursively) by
    ``linear_replacement(in_features, out_features, bias is not None)``, except modules whose
    attribute name is in ``skip_modules`` (an iterable of names, or one name as a str).

    Args:
        copy_weights: copy the float weight and bias into the new module (they are quantized on
            its first move to a device; a frozen weight or bias stays frozen). An opsq layer that
            is quantized already passes its quantized weight on (with its statistics).
        post_processing_function: name of a method to call on each new module.
    Returns:
        ``model``.
    """
    # A lone name (bitsandbytes' ``name not in skip_modules`` skips it); set("lm_head") would be
    # its characters, so lm_head was converted.
    skip = {skip_modules} if isinstance(skip_modules, str) else set(skip_modules)
    for name, module in list(model.named_children()):
        if len(list(module.children())) > 0:
            replace_linear(module, linear_replacement, skip, copy_weights,
                           post_processing_function)
        if isinstance(module, nn.Linear) and name not in skip:
            new = linear_replacement(module.in_features, module.out_features,
                                     module.bias is not None)
            if copy_weights:
                _copy_weights(module, new)
            if post_processing_function is not None:
                getattr(new, post_processing_function)()
            setattr(model, name, new)
    return model


def _copy_weights(old: nn.Module, new: nn.Module) -> None:
    """``replace_linear(copy_weights=True)``: ``old``'s weight and bias into ``new``. A float
    weight is copied into ``new``'s own weight (quantized on its first move); an opsq layer that
    is quantized already hands over its quantized weight, which ``new`` adopts with its statistics
    (bitsandbytes shares the parameter); a frozen weight / bias stays frozen."""
    weight = old.weight
    if getattr(old, "is_quantized", False):
        new.weight = weight
    else:
        new.weight.data = weight.data.clone()
        if not weight.requires_grad:
            new.weight.requires_grad_(False)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=old.bias.requires_grad)


def sync_gpu(t: torch.Tensor) -> None:
    """Synchronize ``t``'s device (CUDA / XPU); no-op on the CPU."""
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    elif t.device.type == "xpu":
        torch.xpu.synchronize(t.device)


from ._constants import INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING  # noqa: E402,F401
from .execute import execute_and_return  # noqa: E402
from .outlier_tools import OutlierTracer, find_outlier_dims  # noqa: E402

__all__ += ["INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING", "execute_and_return", "OutlierTracer",
            "find_outlier_dims", "outlier_hook"]


def outlier_hook(module: nn.Module, input) -> None:
    """Forward-pre-hook that traces ``module``'s outlier dimensions into the singleton
    :class:`OutlierTracer` (bitsandbytes 0.50 ``bitsandbytes.utils.outlier_hook``), for code
    that registers it by hand: ``layer.register_forward_pre_hook(outlier_hook)`` after
    ``OutlierTracer.get_instance().initialize(model)``.

    The first layer traced gets its outliers from its input activations, later layers from
    their weight (the tracer's rules and thresholds, see :class:`OutlierTracer`). When the
    weight was traced already (the model runs a second time, or a tied weight), tracing is
    over: every hook the tracer installed is removed, as in bitsandbytes. A bare hook does not
    know the module's name, so :attr:`OutlierTracer.outliers_by_name` records it as
    ``"<ClassName>@0x<id>"``; use :meth:`OutlierTracer.get_outliers` with the weight instead.

    Args:
        module: a module with a tensor ``weight`` (bitsandbytes requires ``nn.Linear``).
        input: the positional inputs of the forward call (a tuple), or one tensor.
    Raises:
        RuntimeError: the tracer was not initialized.
        TypeError: ``module`` is not an ``nn.Module`` with a tensor ``weight``.
    """
    tracer = OutlierTracer.get_instance()
    if not tracer.is_initialized():
        raise RuntimeError("outlier_hook: OutlierTracer is not initialized: call "
                           "OutlierTracer.get_instance().initialize(model) first")
    if not isinstance(module, nn.Module) or not isinstance(getattr(module, "weight", None),
                                                           torch.Tensor):
        raise TypeError(f"module must be an nn.Module with a tensor weight, got "
                        f"{type(module).__name__}")
    if tracer.get_outliers(module.weight) is not None:
        tracer.remove_hooks()
        return
    x = input[0] if isinstance(input, (tuple, list)) and input else input
    x = x if isinstance(x, torch.Tensor) else None
    with torch.no_grad():
        tracer._trace(f"{type(module).__name__}@{id(module):#x}", module, x)
