"""bitsandbytes' optimizers on opsq's registered update ops, and ``GlobalOptimManager``.

Source: Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022); the update
formulas, state names, defaults and state-dict layout of bitsandbytes 0.50.

* Classes with bitsandbytes' names and arguments: ``Adam``, ``AdamW``, ``Lion``, ``SGD``,
  ``RMSprop``, ``AdEMAMix`` (``optim_bits`` 32 or 8), their ``...8bit`` / ``...32bit`` variants
  and the paged names (``PagedAdamW8bit``, ``PagedLion8bit``, ...). A step is one call per
  parameter of ``torch.ops.opsq.optimizer_update_32bit`` or
  ``torch.ops.opsq.optimizer_update_8bit_blockwise`` (registered ops with declared in-place
  writes, so ``torch.compile(opt.step, fullgraph=True)`` traces them).
* 8-bit states: uint8 codes of the signed (first moment) and unsigned (second moment) 8-bit
  dynamic maps with one fp32 absmax per block of 256: ~2 bytes per parameter for two states.
  Parameters with fewer than ``min_8bit_size`` elements (default 4096) keep fp32 states.
* Paged optimizers (``is_paged=True``, the ``Paged...`` classes): on CUDA, with opsq's CUDA
  extension, ``state1``/``state2`` live in CUDA unified memory (``cudaMallocManaged``, owned and
  freed by the tensor), prefetched to the GPU before each update. Under GPU memory pressure the
  driver pages them out to host memory instead of failing; they are outside torch's caching
  allocator (so ``torch.cuda.set_per_process_memory_fraction`` does not count them). States
  created inside ``torch.compile`` (a compiled first step) and states on the CPU are ordinary
  memory, and a compiled step does not prefetch (pages migrate on first touch): take the first
  step eagerly to get paged states.
* ``state_dict()`` / ``load_state_dict()`` use bitsandbytes' layout: per parameter ``step`` (an
  int) and, wrapped under ``"__bnb_optimizer_quant_state__"``, ``state1``/``state2`` and, for
  8-bit states, ``qmap1``/``qmap2``/``absmax1``/``absmax2`` (``unorm_vec`` with ``max_unorm``):
  a bitsandbytes checkpoint loads here and the other way round.
* ``max_unorm`` and ``skip_zeros`` as bitsandbytes' base classes take them.
  ``percentile_clipping`` and ``block_wise=False`` (gone from bitsandbytes 0.50's optimizer
  classes) are not offered.

Per-parameter overrides: embedding layers are unstable with 8-bit optimizer state (Section 4 of
the paper), so their weights keep 32-bit state (``{"optim_bits": 32}``).
:class:`opsq.nn.Embedding` and :class:`opsq.nn.StableEmbedding` register that override in
:class:`GlobalOptimManager`; an optimizer reads a parameter's overrides (module overrides,
``override_config`` and ``register_parameters`` entries) at construction and again when it
creates the parameter's state at its first step (bitsandbytes' documented order registers
overrides after constructing the optimizer) and at any eager step after an override was
registered or changed (as bitsandbytes reads them at every step), and merges them over the
group's hyperparameters at every step. A step run under ``torch.compile`` uses the overrides
known at its last eager read (the manager's weak-reference tables are not traceable).

Unlike bitsandbytes, entries never keep a module or a parameter alive (weak references), a
module override follows the module's *current* parameter (so ``.to()``, FSDP or re-assignment do
not lose it), and parameters are keyed by identity, so a recycled ``id()`` cannot inherit another
tensor's config.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import weakref
from collections import defaultdict
from itertools import chain
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ._constants import create_dynamic_map
from ._extension import load_extension
from .functional import get_paged
from .fsdp import is_dtensor as _is_dtensor
from ._singleton import Singleton
from .meta._common import ceil_div
from .meta.optim import OPTIMIZER_BLOCKSIZE

__all__ = [
    "GlobalOptimManager", "Optimizer8bit", "Optimizer1State", "Optimizer2State",
    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit",
    "AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
    "Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit",
    "SGD", "SGD8bit", "SGD32bit", "RMSprop", "RMSprop8bit", "RMSprop32bit",
    "AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "PagedAdEMAMix", "PagedAdEMAMix8bit",
    "PagedAdEMAMix32bit",
]


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
        #: bumped by every registration: an optimizer re-reads its overrides when it changed
        self.revision = getattr(self, "revision", 0) + 1

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
        self.revision += 1

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
        self.revision += 1

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
        self.revision += 1
        return self.index2config


# ---- the optimizers ----------------------------------------------------------------------------
#: Key under which bitsandbytes' ``state_dict`` nests the quantization tensors of a parameter
#: (so FSDP's full-state gather skips them).
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
#: Per-parameter state entries that are never cast to the parameter's dtype (bitsandbytes'
#: ``non_castable_tensor_keys``; the nested ones in a state dict).
NON_CASTABLE_KEYS = frozenset({"qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2",
                               "state1", "state2", "gnorm_vec", "absmax1", "absmax2",
                               "unorm_vec"})


@functools.lru_cache(maxsize=None)
def unsigned_dynamic_map() -> torch.Tensor:
    """The unsigned 8-bit dynamic map (256 sorted fp32 values in [0, 1]) of second-moment
    states, bitsandbytes' ``create_dynamic_map(signed=False)``."""
    return create_dynamic_map(signed=False)


#: The state tensors a paged optimizer keeps in unified memory (bitsandbytes pages these two).
PAGED_KEYS = ("state1", "state2")


def _paged_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros in CUDA unified memory (:func:`opsq.functional.get_paged`) on a CUDA device with
    the extension, outside ``torch.compile``; ordinary zeros otherwise."""
    if device.type == "cuda" and not torch.compiler.is_compiling() and load_extension():
        return get_paged(*shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its storage, so in-place writes reach the
    DTensor), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """The local shard of ``p.grad`` laid out as ``p``'s local shard (FSDP2 reduce-scatters
    gradients to the parameter's placements already; another placement is redistributed)."""
    grad = p.grad
    if _is_dtensor(p):
        if not _is_dtensor(grad):
            raise TypeError("a DTensor parameter needs a DTensor gradient (got "
                            f"{type(grad).__name__}); FSDP2 writes one")
        if tuple(grad.placements) != tuple(p.placements):
            grad = grad.redistribute(p.device_mesh, p.placements)
        return grad.to_local()
    return grad


def _arg(args, name: str, default):
    """A bitsandbytes ``args`` object's attribute (its ``MockArgs``), or ``default``."""
    return getattr(args, name, default) if args is not None else default


class Optimizer8bit(torch.optim.Optimizer):
    """Base of opsq's bitsandbytes optimizers: per-parameter state creation, overrides,
    bitsandbytes' state-dict layout. Subclasses set :attr:`optimizer_name` and the number of
    states; the arithmetic is the registered update ops'.

    Args:
        params: parameters or param-group dicts, as ``torch.optim.Optimizer``.
        defaults: the group hyperparameters.
        optim_bits: 32 (fp32 states) or 8 (8-bit blockwise states).
        is_paged: bitsandbytes' paged flag; kept (``self.is_paged``) but states are ordinary
            memory in this build.

    Sharded parameters (FSDP2's ``fully_shard``, or any ``DTensor``): the optimizer works on
    each rank's local shard. A step updates ``p.to_local()`` in place from
    ``p.grad.to_local()`` (the gradient redistributed to ``p``'s placements if they differ),
    with no communication; the states (``state1``/``state2``, ``absmax*``, ``unorm_vec``) are
    **plain local tensors** shaped like the local shard, not DTensors (8-bit ``absmax`` has one
    entry per block of 256 of the *local* shard, which no DTensor placement describes when
    shards are uneven). Whether a parameter gets 8-bit states is decided on its *global*
    ``numel()`` (as a single process decides). Consequences:

    * 32-bit states: every element is updated exactly as in a single process (elementwise
      arithmetic), given the same gradient.
    * 8-bit states: blocks of 256 run over the local shard from its own start. Where each
      shard starts at a multiple of 256 elements of the flattened parameter (FSDP2 shards dim 0:
      ``ceil(dim0 / world) * prod(shape[1:]) % 256 == 0``), the blocks are the single process's
      blocks and the update is bit for bit the same; otherwise the blocks of the later shards
      are cut differently, so their states are quantized with other absmax values (a
      difference of the order of the 8-bit quantization error itself).
    * ``state_dict()`` holds each rank's local states: save it per rank and load it with
      :meth:`load_state_dict` on the same rank of the same sharding (checked: a state whose
      size does not match the local shard raises). ``torch.distributed.checkpoint`` would take
      these plain tensors for replicated ones, so it is not supported for the optimizer state.
    * ``max_unorm > 0`` needs the norm of the whole parameter and update (a collective); with
      sharded parameters it raises ``NotImplementedError``.
    """

    #: Two states (first and second moment) or one.
    two_states = True

    def _configure(self, optimizer_name: str, args, optim_bits: int, min_8bit_size: int,
                   max_unorm: float, skip_zeros: bool) -> None:
        """The settings every bitsandbytes optimizer base stores; a bitsandbytes ``args`` object
        (its ``MockArgs``) overrides the keyword values."""
        self.optimizer_name = optimizer_name
        self.optim_bits = _arg(args, "optim_bits", optim_bits)
        self.min_8bit_size = _arg(args, "min_8bit_size", min_8bit_size)
        self.max_unorm = _arg(args, "max_unorm", max_unorm)
        self.skip_zeros = _arg(args, "skip_zeros", skip_zeros)

    def __init__(self, params, defaults: dict, optim_bits: int = 32, is_paged: bool = False):
        super().__init__(params, defaults)
        self.is_paged = is_paged
        self.mng = GlobalOptimManager.get_instance()
        self.non_castable_tensor_keys = set(NON_CASTABLE_KEYS)
        self._qmaps: dict = {}
        #: ``{(group_index, param_index): overrides}``: resolved here, and again (eagerly) when
        #: a parameter's state is made, so overrides registered after construction count.
        self._overrides: dict[tuple[int, int], dict] = {}
        self._resolve_overrides()
        self._revision = self.mng.revision
        for p in chain.from_iterable(g["params"] for g in self.param_groups):
            self._qmap(True, p.device)  # made here: building a map is not traceable
            self._qmap(False, p.device)

    def _resolve_overrides(self, only_with_state: bool = False) -> None:
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if not only_with_state or len(self.state.get(p, ())) > 0:
                    self._overrides[(gi, pi)] = self._overrides_of(gi, pi, p)

    # ---- config ---------------------------------------------------------------------------
    def _overrides_of(self, gindex: int, pindex: int, p: torch.Tensor) -> dict:
        found = dict(self.mng.index2config.get((gindex, pindex), {}))
        found.update(self.mng.get_config(p) or {})
        return found

    def get_config(self, gindex: int, pindex: int, group: dict) -> dict:
        """The hyperparameters of parameter ``pindex`` of group ``gindex``: the group's, the
        optimizer's ``optim_bits``/``min_8bit_size``/``max_unorm``/``skip_zeros``, then its
        :class:`GlobalOptimManager` overrides."""
        config = {
            "betas": group["betas"], "eps": group["eps"],
            "weight_decay": group["weight_decay"], "lr": group["lr"],
            "alpha": group.get("alpha", 0.0), "t_alpha": group.get("t_alpha"),
            "t_beta3": group.get("t_beta3"), "optim_bits": self.optim_bits,
            "min_8bit_size": self.min_8bit_size, "max_unorm": self.max_unorm,
            "skip_zeros": self.skip_zeros,
        }
        config.update(self._overrides.get((gindex, pindex), {}))
        return config

    # ---- state ------------------------------------------------------------------------------
    def _qmap(self, signed: bool, device) -> torch.Tensor:
        key = (signed, torch.device(device))
        if key not in self._qmaps:
            self._qmaps[key] = create_dynamic_map(signed=signed).to(device)
        return self._qmaps[key]

    @torch.no_grad()
    def init_state(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        """Create ``self.state[p]``: ``step`` 0 and zero states, 8-bit when ``optim_bits`` is 8
        and ``p`` has at least ``min_8bit_size`` elements.

        Raises:
            ValueError: ``optim_bits`` (after overrides) is not 8 or 32.
        """
        if not torch.compiler.is_compiling():
            # (the manager's weak-reference tables are not traceable: a compiled first step
            # uses the overrides resolved at construction)
            self._overrides[(gindex, pindex)] = self._overrides_of(gindex, pindex, p)
        config = self.get_config(gindex, pindex, group)
        bits = config["optim_bits"]
        if bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {bits}")
        # the 8-bit decision on the global size (DTensor.numel() is global), the states on the
        # local shard (a plain parameter is its own shard)
        eight = bits == 8 and p.numel() >= config["min_8bit_size"]
        if config["max_unorm"] > 0.0 and _is_dtensor(p):
            raise NotImplementedError("max_unorm > 0 with sharded (DTensor) parameters needs "
                                      "the norm of the whole parameter; not supported")
        local = _local(p)
        device = local.device
        dtype = torch.uint8 if eight else torch.float32
        double = self.optimizer_name == "ademamix"
        shape1 = (2, *local.shape) if double else tuple(local.shape)
        state = self.state[p]
        state["step"] = 0
        zeros = functools.partial(_paged_zeros if self.is_paged else torch.zeros, dtype=dtype,
                                  device=device)
        state["state1"] = zeros(shape1)
        if self.two_states:
            state["state2"] = zeros(tuple(local.shape))
        if eight:
            blocks = ceil_div(local.numel(), OPTIMIZER_BLOCKSIZE)
            state["qmap1"] = self._qmap(True, device)
            state["absmax1"] = torch.zeros((2, blocks) if double else (blocks,),
                                           dtype=torch.float32, device=device)
            if self.two_states:
                state["qmap2"] = self._qmap(False, device)
                state["absmax2"] = torch.zeros((blocks,), dtype=torch.float32, device=device)
        if config["max_unorm"] > 0.0:
            state["unorm_vec"] = torch.zeros((1,), dtype=torch.float32, device=device)

    def _schedule(self, config: dict, step: int) -> tuple[float, float]:
        """``(beta3, alpha)`` of this step (AdEMAMix's ``t_beta3`` / ``t_alpha`` warm-ups)."""
        betas = config["betas"]
        beta3 = betas[2] if len(betas) >= 3 else 0.0
        alpha = config.get("alpha", 0.0) or 0.0
        if config.get("t_alpha"):
            alpha = min(step * alpha / config["t_alpha"], alpha)
        if config.get("t_beta3"):
            ln1, ln3 = math.log(betas[0]), math.log(beta3)
            frac = step / config["t_beta3"]
            beta3 = min(math.exp(ln1 * ln3 / ((1 - frac) * ln3 + frac * ln1)), beta3)
        return beta3, alpha

    @torch.no_grad()
    def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        """One update of ``p`` from ``p.grad`` (one registered op call)."""
        state = self.state[p]
        config = self.get_config(gindex, pindex, group)
        state["step"] += 1
        step = state["step"]
        beta1, beta2 = config["betas"][0], config["betas"][1]
        beta3, alpha = self._schedule(config, step)
        grad = _local_grad(p)
        p = _local(p)  # sharded: the local shard (written in place), states are local too
        if self.is_paged and p.is_cuda and not torch.compiler.is_compiling():
            ext = load_extension()
            for key in PAGED_KEYS:
                if ext is not None and key in state and ext.is_managed(state[key]):
                    ext.prefetch(state[key], p.device.index)
        if state["state1"].dtype == torch.float32:
            torch.ops.opsq.optimizer_update_32bit(
                self.optimizer_name, grad, p, state["state1"], state.get("state2"),
                state.get("unorm_vec"), config["max_unorm"], 0.0, beta1, beta2, beta3, alpha,
                config["eps"], config["weight_decay"], step, config["lr"], 1.0,
                config["skip_zeros"])
        else:
            if config["max_unorm"] > 0.0:
                raise ValueError("max_unorm needs 32-bit states (bitsandbytes' 8-bit blockwise "
                                 "update has no max_unorm)")
            torch.ops.opsq.optimizer_update_8bit_blockwise(
                self.optimizer_name, grad, p, state["state1"], state.get("state2"), beta1,
                beta2, beta3, alpha, config["eps"], step, config["lr"], state["qmap1"],
                state.get("qmap2"), state["absmax1"], state.get("absmax2"),
                config["weight_decay"], 1.0, config["skip_zeros"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every parameter with a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling() and self._revision != self.mng.revision:
            # an override registered or changed since the last step: read them all again (the
            # manager's weak-reference tables are not traceable: a compiled step keeps them)
            self._resolve_overrides()
            self._revision = self.mng.revision
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)
        return loss

    # ---- bitsandbytes' state-dict layout ------------------------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict()`` with each parameter's quantization tensors
        (``state1``, ``state2``, ``qmap*``, ``absmax*``, ``unorm_vec``) nested under
        ``"__bnb_optimizer_quant_state__"``, as bitsandbytes 0.50 writes it."""
        sd = super().state_dict()
        wrapped = {}
        for key, param_state in sd["state"].items():
            param_state = dict(param_state)
            quant = {k: param_state.pop(k) for k in list(param_state)
                     if k in self.non_castable_tensor_keys}
            if quant:
                param_state[QUANT_STATE_KEY] = quant
            wrapped[key] = param_state
        sd["state"] = wrapped
        return sd

    def load_state_dict(self, state_dict: dict, move_to_device: bool = True) -> None:
        """Load a state dict of this class or of the bitsandbytes optimizer of the same name
        (nested or flat quantization tensors). Quantization tensors keep their dtype (moved to
        the parameter's device when ``move_to_device``); other floating-point tensors take the
        parameter's dtype and device; a tensor ``step`` becomes an int.

        Raises:
            ValueError: a different number of groups, or of parameters in a group.
        """
        state_dict = copy.deepcopy(state_dict)
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} parameter groups, "
                             f"the optimizer {len(groups)}")
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"parameter group {i}: the loaded state dict has "
                                 f"{len(sg['params'])} parameters, the optimizer "
                                 f"{len(g['params'])}")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))

        def load_one(param, saved: dict) -> dict:
            saved = dict(saved)
            saved.update(saved.pop(QUANT_STATE_KEY, {}))
            out = {}
            for k, v in saved.items():
                if k == "step":
                    out[k] = int(v.item()) if isinstance(v, torch.Tensor) else int(v)
                elif not isinstance(v, torch.Tensor):
                    out[k] = v
                elif k in self.non_castable_tensor_keys:
                    out[k] = v.to(param.device) if move_to_device else v
                elif param.is_floating_point() and v.is_floating_point():
                    out[k] = v.to(dtype=param.dtype, device=param.device)
                else:
                    out[k] = v.to(param.device)
            if _is_dtensor(param) and isinstance(out.get("state1"), torch.Tensor):
                # sharded: the states are this rank's local shard (see the class docstring)
                want = _local(param).numel() * (2 if self.optimizer_name == "ademamix" else 1)
                if out["state1"].numel() != want:
                    raise ValueError(
                        f"state1 of a sharded parameter has {out['state1'].numel()} elements, "
                        f"its local shard needs {want}: load the state dict this rank saved, "
                        "with the same sharding")
            return out

        state: defaultdict = defaultdict(dict)
        for k, v in state_dict["state"].items():
            if k in id_map:
                state[id_map[k]] = load_one(id_map[k], v)
            else:
                state[k] = v
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            sg = dict(sg)
            sg["params"] = g["params"]
            new_groups.append(sg)
        if self.is_paged:  # loaded states go into unified memory too
            for param_state in state.values():
                for key in PAGED_KEYS:
                    t = param_state.get(key)
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        paged = _paged_zeros(t.shape, t.dtype, t.device)
                        paged.copy_(t)
                        param_state[key] = paged
        self.__setstate__({"state": state, "param_groups": new_groups})
        self._resolve_overrides()


def _check_hyper(lr, eps, betas, weight_decay):
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class Optimizer2State(Optimizer8bit):
    """bitsandbytes' two-state base (``optimizer_name`` "adam" or "ademamix"): states ``state1``
    (first moment; AdEMAMix: its two EMAs, shape ``(2, *p.shape)``) and ``state2`` (second
    moment). Arguments as bitsandbytes' ``Optimizer2State``."""

    two_states = True

    def __init__(self, optimizer_name: str, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, optim_bits=32, args=None, min_8bit_size=4096, max_unorm=0.0,
                 skip_zeros=False, is_paged=False, alpha=0.0, t_alpha: Optional[int] = None,
                 t_beta3: Optional[int] = None):
        if isinstance(betas, str):  # bitsandbytes accepts '(0.9, 0.999)'
            betas = tuple(float(b) for b in betas.strip("() ").split(","))
        _check_hyper(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3)
        super().__init__(params, defaults, optim_bits, is_paged)
        self._configure(optimizer_name, args, optim_bits, min_8bit_size, max_unorm, skip_zeros)


class Optimizer1State(Optimizer8bit):
    """bitsandbytes' one-state base (``optimizer_name`` "lion", "momentum" or "rmsprop"):
    ``state1`` only. Arguments as bitsandbytes' ``Optimizer1State``."""

    two_states = False

    def __init__(self, optimizer_name: str, params, lr=1e-3, betas=(0.9, 0.0), eps=1e-8,
                 weight_decay=0.0, optim_bits=32, args=None, min_8bit_size=4096, max_unorm=0.0,
                 skip_zeros=False, is_paged=False):
        _check_hyper(lr, eps, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, optim_bits, is_paged)
        self._configure(optimizer_name, args, optim_bits, min_8bit_size, max_unorm, skip_zeros)


class Adam(Optimizer2State):
    """bitsandbytes' ``Adam``: Adam (Kingma & Ba, 2015) with fp32 (``optim_bits=32``) or 8-bit
    blockwise (``optim_bits=8``) states. Weight decay is decoupled (``p *= 1 - lr *
    weight_decay``), as in bitsandbytes' kernels: ``Adam`` and ``AdamW`` differ only in the
    default ``weight_decay``.

    Raises:
        ValueError: ``amsgrad=True`` (not supported), or invalid hyperparameters.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        if amsgrad:
            raise ValueError(f"{type(self).__name__} does not support amsgrad=True")
        super().__init__("adam", params, lr, betas, eps, weight_decay, optim_bits, args,
                         min_8bit_size, is_paged=is_paged)


class AdamW(Adam):
    """bitsandbytes' ``AdamW`` (Loshchilov & Hutter, 2019): :class:`Adam` with
    ``weight_decay=1e-2`` by default."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, is_paged)


class Lion(Optimizer1State):
    """bitsandbytes' ``Lion`` (Chen et al., "Symbolic Discovery of Optimization Algorithms",
    2023): ``p -= lr * sign(b1 m + (1-b1) g)``, then ``m = b2 m + (1-b2) g``; decoupled weight
    decay."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32,
                 args=None, min_8bit_size=4096, is_paged=False):
        super().__init__("lion", params, lr, betas, 0.0, weight_decay, optim_bits, args,
                         min_8bit_size, is_paged=is_paged)


class SGD(Optimizer1State):
    """bitsandbytes' ``SGD`` with momentum (``torch.optim.SGD`` with ``dampening=0``,
    ``nesterov=False``; L2 weight decay added to the gradient).

    Raises:
        NotImplementedError: ``momentum == 0``, ``dampening != 0`` or ``nesterov=True``
            (bitsandbytes' kernel has neither; it would ignore them silently).
    """

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 optim_bits=32, args=None, min_8bit_size=4096):
        if momentum == 0:
            raise NotImplementedError("SGD without momentum is not supported!")
        if dampening != 0 or nesterov:
            raise NotImplementedError("SGD with dampening or nesterov is not supported "
                                      f"(got dampening={dampening}, nesterov={nesterov})")
        super().__init__("momentum", params, lr, (momentum, dampening), 0.0, weight_decay,
                         optim_bits, args, min_8bit_size)


class RMSprop(Optimizer1State):
    """bitsandbytes' ``RMSprop`` (``torch.optim.RMSprop`` without momentum or centering; L2
    weight decay added to the gradient).

    Raises:
        NotImplementedError: ``alpha == 0``, ``centered=True`` or ``momentum != 0``
            (bitsandbytes' kernel ignores momentum; here that is an error).
    """

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, optim_bits=32, args=None, min_8bit_size=4096):
        if alpha == 0:
            raise NotImplementedError("RMSprop with alpha==0.0 is not supported!")
        if centered:
            raise NotImplementedError("Centered RMSprop is not supported!")
        if momentum != 0:
            raise NotImplementedError(f"RMSprop with momentum is not supported (got {momentum})")
        super().__init__("rmsprop", params, lr, (alpha, momentum), eps, weight_decay,
                         optim_bits, args, min_8bit_size)


class AdEMAMix(Optimizer2State):
    """bitsandbytes' ``AdEMAMix`` (Pagliardini et al., "The AdEMAMix Optimizer", 2024): Adam
    with a second, slow EMA ``m2`` (``beta3``) mixed in with weight ``alpha``; optional linear
    ``alpha`` warm-up over ``t_alpha`` steps and ``beta3`` warm-up over ``t_beta3`` steps.
    ``state1`` holds both EMAs, shape ``(2, *p.shape)`` (8-bit: ``absmax1`` ``(2, blocks)``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0,
                 t_alpha: Optional[int] = None, t_beta3: Optional[int] = None, eps=1e-8,
                 weight_decay=1e-2, optim_bits=32, min_8bit_size=4096, is_paged=False):
        super().__init__("ademamix", params, lr, betas, eps, weight_decay, optim_bits, None,
                         min_8bit_size, is_paged=is_paged, alpha=alpha, t_alpha=t_alpha,
                         t_beta3=t_beta3)


def _variant(base: type, name: str, bits: Optional[int], paged: Optional[bool],
             drop: tuple[str, ...] = ()) -> type:
    """bitsandbytes' ``<base>8bit`` / ``<base>32bit`` / ``Paged<base>...``: ``base`` with
    ``optim_bits`` and/or ``is_paged`` fixed. Parameters in ``drop`` are absent from the
    variant's signature (as in bitsandbytes); a kept ``optim_bits`` must stay at its default
    32 (bitsandbytes keeps it only for signature compatibility)."""
    base_sig = inspect.signature(base.__init__)
    params = [p for n, p in base_sig.parameters.items() if n not in drop]
    sig = base_sig.replace(parameters=params)

    def __init__(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        if bits is not None:
            if "optim_bits" in call and call["optim_bits"] != 32:
                raise ValueError(f"{name} only supports optim_bits=32 (the default, kept for "
                                 f"signature compatibility); got {call['optim_bits']}")
            call["optim_bits"] = bits
        if paged is not None:
            call["is_paged"] = paged
        base.__init__(self, **call)

    __init__.__signature__ = sig
    states = {8: "8-bit blockwise states", 32: "fp32 states", None: "``optim_bits`` states"}
    doc = f"bitsandbytes' ``{name}``: :class:`{base.__name__}` with {states[bits]}."
    if paged:
        doc += (" Paged: on CUDA its states live in CUDA unified memory, prefetched to the GPU "
                "before each update, and page out to host memory under GPU memory pressure "
                "(see the module docstring); otherwise identical to "
                f":class:`{base.__name__}`.")
    return type(name, (base,), {"__init__": __init__, "__doc__": doc,
                                "__module__": __name__, "__qualname__": name})


Adam8bit = _variant(Adam, "Adam8bit", 8, None)
Adam32bit = _variant(Adam, "Adam32bit", 32, None)
PagedAdam = _variant(Adam, "PagedAdam", None, True)
PagedAdam8bit = _variant(Adam, "PagedAdam8bit", 8, True)
PagedAdam32bit = _variant(Adam, "PagedAdam32bit", 32, True)
AdamW8bit = _variant(AdamW, "AdamW8bit", 8, None)
AdamW32bit = _variant(AdamW, "AdamW32bit", 32, None)
PagedAdamW = _variant(AdamW, "PagedAdamW", None, True, ("is_paged",))
PagedAdamW8bit = _variant(AdamW, "PagedAdamW8bit", 8, True, ("is_paged",))
PagedAdamW32bit = _variant(AdamW, "PagedAdamW32bit", 32, True, ("is_paged",))
Lion8bit = _variant(Lion, "Lion8bit", 8, None, ("optim_bits",))
Lion32bit = _variant(Lion, "Lion32bit", 32, None, ("optim_bits",))
PagedLion = _variant(Lion, "PagedLion", None, True, ("is_paged",))
PagedLion8bit = _variant(Lion, "PagedLion8bit", 8, True, ("optim_bits", "is_paged"))
PagedLion32bit = _variant(Lion, "PagedLion32bit", 32, True, ("optim_bits", "is_paged"))
SGD8bit = _variant(SGD, "SGD8bit", 8, None, ("optim_bits",))
SGD32bit = _variant(SGD, "SGD32bit", 32, None, ("optim_bits",))
RMSprop8bit = _variant(RMSprop, "RMSprop8bit", 8, None, ("optim_bits",))
RMSprop32bit = _variant(RMSprop, "RMSprop32bit", 32, None, ("optim_bits",))
AdEMAMix8bit = _variant(AdEMAMix, "AdEMAMix8bit", 8, None, ("optim_bits",))
AdEMAMix32bit = _variant(AdEMAMix, "AdEMAMix32bit", 32, None, ("optim_bits",))
PagedAdEMAMix = _variant(AdEMAMix, "PagedAdEMAMix", None, True, ("is_paged",))
PagedAdEMAMix8bit = _variant(AdEMAMix, "PagedAdEMAMix8bit", 8, True,
                             ("optim_bits", "is_paged"))
PagedAdEMAMix32bit = _variant(AdEMAMix, "PagedAdEMAMix32bit", 32, True,
                              ("optim_bits", "is_paged"))
