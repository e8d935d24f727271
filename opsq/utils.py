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
    attribute name is in ``skip_modules``.

    Args:
        copy_weights: copy the float weight and bias into the new module (they are quantized on
            its first move to a device).
        post_processing_function: name of a method to call on each new module.
    Returns:
        ``model``.
    """
    skip = set(skip_modules)
    for name, module in list(model.named_children()):
        if len(list(module.children())) > 0:
            replace_linear(module, linear_replacement, skip, copy_weights,
                           post_processing_function)
        if isinstance(module, nn.Linear) and name not in skip:
            new = linear_replacement(module.in_features, module.out_features,
                                     module.bias is not None)
            if copy_weights:
                new.weight.data = module.weight.data.clone()
                if module.bias is not None:
                    new.bias = nn.Parameter(module.bias.detach().clone())
            if post_processing_function is not None:
                getattr(new, post_processing_function)()
            setattr(model, name, new)
    return model


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
            "find_outlier_dims"]
