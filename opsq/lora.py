"""LoRA adapters on (quantized) linear layers: the QLoRA recipe (Dettmers et al., "QLoRA:
Efficient Finetuning of Quantized LLMs", 2023) on top of Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", 2021.

``LoRALinear(base)`` computes ``base(x) + dropout(x) @ lora_A.T @ lora_B.T * alpha / r``. The
base layer (an :class:`~opsq.nn.Linear4bit`, :class:`~opsq.nn.Linear8bitLt` or any
``nn.Linear``) stays frozen; only ``lora_A`` ``(r, K)`` and ``lora_B`` ``(N, r)`` train, in their
own dtype (fp32 by default, as PEFT keeps them) whatever the base's compute dtype. ``lora_B``
starts at zero, so a freshly wrapped model computes exactly what the base computes.

Everything is plain modules and opsq ops: a model with adapters compiles with
``torch.compile(fullgraph=True)``, forward and backward, and works with
``torch.utils.checkpoint``. This module is deliberately small; use PEFT for the full feature
set (it wraps opsq's layers the same way it wraps bitsandbytes').
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "add_lora", "mark_only_lora_trainable", "lora_parameters",
           "lora_state_dict"]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base: the layer to adapt; needs ``in_features`` and ``out_features`` (every
            ``nn.Linear`` subclass, hence opsq's quantized layers). Its parameters are set to
            ``requires_grad=False``.
        r: rank (> 0).
        alpha: scaling numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input.
        dtype: dtype of the adapter weights (default float32).
    Shapes:
        input ``(..., K)`` → output ``(..., N)`` in the base layer's output dtype.
    Raises:
        ValueError: ``r`` < 1 or ``dropout`` outside ``[0, 1)``.
        TypeError: ``base`` has no ``in_features``/``out_features``.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"r (the LoRA rank) must be an int >= 1, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise TypeError(f"base must be a linear layer with in_features/out_features, got "
                            f"{type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        z = self.dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(z, self.lora_A), self.lora_B) * self.scaling
        return y + update.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


def _device_of(module: nn.Module) -> Optional[torch.device]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Optional[Iterable[str]] = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap linear layers of ``model`` in :class:`LoRALinear`, in place.

    Args:
        model: any module tree.
        r, alpha, dropout, dtype: as for :class:`LoRALinear`.
        target_modules: wrap only layers whose qualified name ends with one of these names
            (PEFT's convention, e.g. ``["q_proj", "v_proj"]``); None wraps every ``nn.Linear``
            (opsq's quantized layers are ``nn.Linear`` subclasses).
    Returns:
        ``model``, with the wrapped layers' base parameters frozen (call
        :func:`mark_only_lora_trainable` to freeze everything else too).
    Raises:
        ValueError: ``target_modules`` matched nothing.
    """
    targets = None if target_modules is None else tuple(target_modules)
    chosen = [name for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name
              and (targets is None or any(name == t or name.endswith("." + t) for t in targets))]
    if not chosen:
        raise ValueError(f"add_lora: no nn.Linear matched target_modules={targets}")
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, dtype))
    return model


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The adapter weights (``lora_A``, ``lora_B``) of every :class:`LoRALinear` in ``model``."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            yield m.lora_A
            yield m.lora_B


def mark_only_lora_trainable(model: nn.Module, also: Iterable[str] = ()) -> nn.Module:
    """Freeze every parameter except the adapters and those whose qualified name starts with
    one of ``also`` (e.g. ``["embed", "norm"]``, PEFT's ``modules_to_save``)."""
    also = tuple(also)
    adapters = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in adapters or any(name.startswith(a) for a in also))
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights of ``model``'s state dict (what a QLoRA run saves)."""
    return {k: v for k, v in model.state_dict().items()
            if k.endswith(".lora_A") or k.endswith(".lora_B")}
