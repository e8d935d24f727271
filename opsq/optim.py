"""Per-parameter optimizer overrides, bitsandbytes' ``GlobalOptimManager``.

Source: Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022), Section 4:
embedding layers are unstable with 8-bit optimizer state, so their weights keep 32-bit state
(``{"optim_bits": 32}``) while the rest of the model uses 8-bit state. :class:`opsq.nn.Embedding`
and :class:`opsq.nn.StableEmbedding` register that override here; an optimizer (opsq ships none)
asks :meth:`GlobalOptimManager.get_config` or :meth:`GlobalOptimManager.register_parameters` for
the overrides of its parameters.

Unlike bitsandbytes, entries never keep a module or a parameter alive (weak references), a
module override follows the module's *current* parameter (so ``.to()``, FSDP or re-assignment do
not lose it), and parameters are keyed by identity, so a recycled ``id()`` cannot inherit another
tensor's config.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ._singleton import Singleton

__all__ = ["GlobalOptimManager"]


class GlobalOptimManager(Singleton):
    """Singleton registry of per-parameter optimizer config overrides.

    Use ``GlobalOptimManager.get_instance()``; calling the class raises.

    Attributes:
        index2config: ``{(group_index, param_index): config}`` filled by
            :meth:`register_parameters`, the form bitsandbytes' optimizers consume.
        uses_config_override: whether any override was registered.
    """

    def initialize(self) -> None:
        """Forget every override."""
        self._param_configs: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._module_overrides: list[tuple[weakref.ref, str, dict]] = []
        self.index2config: dict[tuple[int, int], dict] = {}
        self.uses_config_override = False

    _setup = initialize

    # ---- registration --------------------------------------------------------------------------
    def override_config(self, parameters: Union[torch.Tensor, Iterable[torch.Tensor]],
                        key: Optional[str] = None, value: Any = None,
                        key_value_dict: Optional[dict] = None) -> None:
        """Override optimizer hyperparameters of ``parameters`` (e.g. ``key="optim_bits",
        value=32`` or ``key_value_dict={"lr": 1e-4, "betas": (0.9, 0.95)}``); later calls update
        earlier ones key by key.

        Raises:
            TypeError: ``parameters`` holds something other than tensors.
            ValueError: neither or both of ``key``/``value`` and ``key_value_dict`` given.
        """
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        parameters = list(parameters)
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
        if (key is None) == (key_value_dict is None):
            raise ValueError("override_config: pass either key and value, or key_value_dict")
        if key is not None:
            if not isinstance(key, str):
                raise TypeError(f"key must be a str, got {type(key).__name__}")
            key_value_dict = {key: value}
        if not isinstance(key_value_dict, dict):
            raise TypeError(f"key_value_dict must be a dict, got {type(key_value_dict).__name__}")
        for p in parameters:
            self._param_configs.setdefault(p, {}).update(key_value_dict)
        self.uses_config_override = True

    def register_module_override(self, module: nn.Module, param_name: str,
                                 config: dict) -> None:
        """Override the config of ``getattr(module, param_name)``, whatever parameter object
        the module holds when an optimizer asks (e.g. ``Embedding`` registers
        ``(self, "weight", {"optim_bits": 32})``).

        Raises:
            TypeError: ``module`` not an ``nn.Module``, ``param_name`` not a str, ``config`` not
                a dict.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if not isinstance(param_name, str):
            raise TypeError(f"param_name must be a str, got {type(param_name).__name__}")
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        self._module_overrides = [e for e in self._module_overrides if e[0]() is not None]
        self._module_overrides.append((weakref.ref(module), param_name, dict(config)))
        self.uses_config_override = True

    # ---- queries ------------------------------------------------------------------------------
    def get_config(self, p: torch.Tensor) -> Optional[dict]:
        """The merged override of parameter ``p`` (module overrides first, then
        :meth:`override_config` entries), or None."""
        merged: dict = {}
        found = False
        for ref, name, config in self._module_overrides:
            module = ref()
            if module is not None and getattr(module, name, None) is p:
                merged.update(config)
                found = True
        if p in self._param_configs:
            merged.update(self._param_configs[p])
            found = True
        return merged if found else None

    def register_parameters(self, params) -> dict[tuple[int, int], dict]:
        """Resolve the overrides of an optimizer's parameters by position.

        Args:
            params: what an optimizer receives: an iterable of tensors or of param-group dicts
                with a ``"params"`` entry.
        Returns:
            (and stores in :attr:`index2config`) ``{(group_index, param_index): config}`` for the
            parameters that have an override.
        Raises:
            TypeError: a group without ``"params"``.
        """
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gi, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"param group {gi} must be a dict with a 'params' entry")
            members = group["params"]
            members = [members] if isinstance(members, torch.Tensor) else list(members)
            for pi, p in enumerate(members):
                config = self.get_config(p)
                if config is not None:
                    self.index2config[(gi, pi)] = config
        return self.index2config
