"""The lifecycle every quantized module shares (``Linear4bit``, ``Linear8bitLt``, the quantized
embeddings): where its state lives, how it moves, loads, saves and pickles.

Design:

* The layer owns its quantized state as tensors registered on the module, never as Python
  attributes of a parameter: the packed weight is the ``weight`` parameter
  (``requires_grad=False``); the per-block statistics ``weight_absmax`` /
  ``weight_nested_absmax`` (4-bit) and ``weight_scb`` (int8) are parameters too, so FSDP2
  shards them with the weight. They are stored with a non-floating dtype (fp32 values as int32
  bit patterns, read back with a same-size ``.view(torch.float32)``), so no mixed-precision
  cast and no float copy ever touches them. Exception, the FSDP1 convention: with a floating
  ``quant_storage`` (e.g. bf16, so the packed weight joins FSDP1's flat parameter) the 4-bit
  statistics are buffers in their natural dtype. The small code tables ``weight_quant_map``,
  ``weight_nested_quant_map`` and ``weight_offset`` are always buffers. Static metadata (shape,
  blocksize, quant_type) are plain Python ints/strings fixed at quantization. ``forward`` reads
  only these, so swapping parameter objects (FSDP, ``.to()``) loses nothing;
  ``weight.quant_state`` is kept in sync for bitsandbytes-style callers.
* Quantization happens on the first move to a real device (``.to(device)``, ``.cuda()``,
  ``.to("cpu")``), on loading a state dict, or with ``from_float``/``from_prequantized``.
  Moves after that change only the device: packed bytes and fp32 statistics are never cast
  (``.half()`` on a quantized model leaves them bit-exact).
* ``forward`` is one opsq op (``linear_4bit`` / ``int8_linear``) and mutates nothing.
* ``state_dict()`` writes bitsandbytes' keys; ``load_state_dict()`` reads them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..fsdp import is_dtensor as _is_dtensor


class _DeviceProbe(torch.Tensor):
    """Records which device a ``Module._apply`` function moves tensors to, without moving."""

    record: dict = {}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        rec = _DeviceProbe.record
        if name == "to":
            rec["device"] = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        elif name in ("cuda", "xpu"):
            d = args[1] if len(args) > 1 else kwargs.get("device")
            rec["device"] = torch.device(name, d) if isinstance(d, int) else \
                torch.device(d if d is not None else name)
        elif name == "cpu":
            rec["device"] = torch.device("cpu")
        elif name == "empty_like":  # Module.to_empty: materialisation, not a move of data
            rec["device"] = kwargs.get("device")
            rec["empty"] = True
        else:  # queries such as is_floating_point(): answer them normally
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        return args[0]


#: What a ``Module._apply`` function may raise when it meets the probe (an empty tensor of a
#: recording subclass) rather than a real tensor: the probe's answer is then "no move"; the
#: real ``_apply`` runs ``fn`` again on the real tensors, where such an error surfaces.
_PROBE_REJECTIONS = (RuntimeError, TypeError, ValueError, NotImplementedError, IndexError)


def _apply_intent(fn) -> tuple[Optional[torch.device], bool]:
    """``(target device or None, is_to_empty)`` of a ``Module._apply`` function: None for a
    pure dtype change (``.half()``, ``.float()``). Exceptions other than
    :data:`_PROBE_REJECTIONS` (a ``KeyboardInterrupt``, a bug in ``fn``) propagate."""
    _DeviceProbe.record = {}
    try:
        fn(torch.empty(0).as_subclass(_DeviceProbe))
    except _PROBE_REJECTIONS:
        pass
    rec, _DeviceProbe.record = _DeviceProbe.record, {}
    device = rec.get("device")
    if device is not None and not isinstance(device, torch.device):
        device = torch.device(device)
    return device, bool(rec.get("empty"))


def _parse_to_device(*args, **kwargs) -> Optional[torch.device]:
    device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device


def _in_order(d: dict, keys: list) -> None:
    """Reorder ``d`` in place: ``keys`` (those present) first, in that order, then the rest
    (torch optimizers key their state by the order of a module's parameters)."""
    items = {k: d[k] for k in keys if k in d}
    items.update((k, v) for k, v in d.items() if k not in items)
    d.clear()
    d.update(items)


def _load_without_weight(module, base, state_dict, prefix, *args) -> None:
    """Run ``base._load_from_state_dict`` for everything but the (already adopted) quantized
    tensors. What the base load assigns (``assign=True`` replaces the bias object) is kept; the
    quantized tensors come back in their places (parameter order unchanged)."""
    order = list(module._parameters)
    held = {name: module._parameters.pop(name) for name in module._quantized_names()
            if name in module._parameters}
    try:
        base._load_from_state_dict(module, state_dict, prefix, *args)
    finally:
        module._parameters.update(held)
        _in_order(module._parameters, order)


def _forget_internal_missing(module, prefix: str, missing_keys: list) -> None:
    """Drop the internal statistic names (never in a state dict: bitsandbytes' keys carry their
    values) from the missing keys a base load reported; a missing weight stays reported."""
    internal = {prefix + name for name in module._quantized_names() if name != "weight"}
    missing_keys[:] = [k for k in missing_keys if k not in internal]


def _save_without_quantized(module, base, destination, prefix, keep_vars) -> None:
    """``base._save_to_state_dict`` without the internal statistics parameters (they are
    written under bitsandbytes' keys by the caller)."""
    saved = dict(module._parameters)
    for name in module._quantized_names():
        if name != "weight":
            module._parameters.pop(name, None)
    try:
        base._save_to_state_dict(module, destination, prefix, keep_vars)
    finally:
        module._parameters.clear()
        module._parameters.update(saved)


def _pickle_state(module: nn.Module, weight: Optional[nn.Parameter]) -> dict:
    """``module.__dict__`` for pickling (``torch.save(model)``, ``copy.deepcopy``) with
    ``weight`` (a bare copy of the weight parameter, without the derived ``quant_state`` / ``SCB``
    views of the module's int32-stored statistics, which ``torch.save`` cannot write beside the
    same storage's int32 view) in place of the weight; ``__setstate__`` re-derives them."""
    state = dict(module.__dict__)
    if weight is not None:
        params = dict(state["_parameters"])
        params["weight"] = weight
        state["_parameters"] = params
    return state


def _bits(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Storage form of a statistic: fp32 as its int32 bit pattern (same shape), else as is."""
    return t.view(torch.int32) if t is not None and t.dtype == torch.float32 else t


def _value(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Inverse of :func:`_bits`: int32 bit patterns read back as fp32 (a view)."""
    return t if t is None or t.dtype is not torch.int32 else t.view(torch.float32)


def _set_tensor(module: nn.Module, name: str, t: Optional[torch.Tensor], as_param: bool) -> None:
    """Register ``t`` under ``name`` as a frozen parameter or a non-persistent buffer."""
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    if as_param and t is not None:
        module._parameters[name] = nn.Parameter(t, requires_grad=False)
        # not a buffer any more: torch.export drops names in this set from the module state
        module._non_persistent_buffers_set.discard(name)
    else:
        module._buffers[name] = t
        module._non_persistent_buffers_set.add(name)


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """In-place copy that keeps ``dst``'s identity (and its FSDP2 sharding). A full tensor
    loaded into a sharded (DTensor) parameter is sliced locally to ``dst``'s placement."""
    src = _bits(src) if dst.dtype == torch.int32 else src
    if _is_dtensor(dst) and not _is_dtensor(src):
        from torch.distributed.tensor import distribute_tensor
        src = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements,
                                src_data_rank=None)
    with torch.no_grad():
        dst.copy_(src)


def _refuse_new_sharded_tensors(module: nn.Module, have: str, incoming: str) -> None:
    """ValueError where adopting incoming quantized tensors would register new parameters in
    place of ones FSDP2's ``fully_shard`` has sharded (it keeps its own references to them: the
    load would end in an AttributeError inside FSDP2, or a layer that computes with tensors
    FSDP2 no longer gathers). ``have`` / ``incoming`` describe both sides for the message."""
    if _is_dtensor(module._parameters.get("weight")):
        raise ValueError(
            f"{type(module).__name__} is sharded (FSDP2 fully_shard) as {have}, but the "
            f"checkpoint holds {incoming}; a sharded layer loads only into tensors of the same "
            "shapes and settings. Build the layer with the checkpoint's settings, quantized "
            "(e.g. from_float of a meta nn.Linear), before fully_shard")


def _drop_internal_keys(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Forget our internal statistic names in an incoming state dict (the bitsandbytes keys
    carry the values; torch.distributed.checkpoint may add the internal ones)."""
    for name in module._quantized_names():
        if name != "weight":
            state_dict.pop(prefix + name, None)


def _same_memory(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Whether two tensors view the same bytes (a statistic and the module's copy of it, maybe
    in another dtype): same start and size (slices of one fused storage are told apart)."""
    return (a is not None and b is not None and a.device == b.device
            and a.data_ptr() == b.data_ptr()
            and a.numel() * a.element_size() == b.numel() * b.element_size())


def _held_apply(module: nn.Module, base, fn, recurse, device, to_empty, names) -> None:
    """``base._apply(fn)`` for everything but the quantized tensors ``names``, which only follow
    device moves (never dtype casts), keeping parameter/buffer kind and the order of the
    module's parameters and buffers (torch optimizers key their state by that order)."""
    order = (list(module._parameters), list(module._buffers))
    held = {}
    for name in names:
        if name in module._parameters:
            held[name] = (True, module._parameters.pop(name))
        elif name in module._buffers:
            held[name] = (False, module._buffers.pop(name))
    try:
        base._apply(module, fn, recurse)
    finally:
        for name, (is_param, t) in held.items():
            if t is not None and device is not None:
                t = torch.empty_like(t, device=device) if to_empty else t.to(device)
            if is_param:
                module._parameters[name] = t if isinstance(t, nn.Parameter) else \
                    nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[name] = t
        _in_order(module._parameters, order[0])
        _in_order(module._buffers, order[1])


class QuantizedWeightMixin:
    """The weight-assignment rule every quantized module shares (one home for the statistics).

    Assigning ``weight`` a parameter of the module's quantized type (``Params4bit`` /
    ``Int8Params``) by any route (``layer.weight = ...``, ``b.weight = a.weight``, PEFT's merge)
    brings the statistics it carries into the module's tensors; a float one given to a module
    that is already quantized is quantized at once; a mismatch (another shape, codes without
    their statistics) is an error. Other values (FSDP's shards, ``nn.Parameter``) are set as
    they are. A subclass names ``_weight_types`` and defines ``_carried_stats(w)`` (the
    statistics ``w`` carries, None for float values; raises ValueError for codes without
    them), ``_set_quantized(codes, stats)`` and ``_quantize_weight(w)`` (quantize float ``w``
    for a quantized module, with the settings ``w`` carries; False leaves ``w`` to be set as
    is), and may define ``_take_settings(w)`` (a module not quantized yet adopts the settings a
    float ``w`` carries, for its quantization at the next move).
    """

    _weight_types: tuple = ()

    def __prepare_scriptable__(self):
        # torch.jit.script asks every module for this first: a clear error instead of a failure
        # deep in the script compiler (the TorchScript tracer fails inside PyTorch as well)
        raise RuntimeError(f"{type(self).__name__}: TorchScript (torch.jit.script) is not "
                           "supported; use torch.export.export or torch.compile")

    def _take_settings(self, w) -> None:
        """The quantization settings a float ``w`` of ``_weight_types`` carries become those of
        this module, not quantized yet, so that it is quantized with them (as bitsandbytes
        quantizes a ``Params4bit`` with its own). Default: none."""

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and isinstance(value, self._weight_types) \
                and self._adopt_weight(value):
            return
        super().__setattr__(name, value)

    def _quantized_now(self) -> bool:
        """``is_quantized``, False while ``__init__`` has not registered the statistics yet."""
        try:
            return self.is_quantized
        except AttributeError:
            return False

    def _weight_is_foreign(self, w) -> bool:
        """Whether quantized ``w`` carries statistics other than this module's (it was placed
        through ``module._parameters`` or came from another layer). Default: never."""
        return False

    def _adopt_foreign_weight(self) -> None:
        """A quantized weight written straight into ``_parameters`` (``b._parameters["weight"] =
        a.weight``, a checkpoint's ``Params4bit`` without ``module=``, transformers' 8-bit
        ``Int8Params(CB)`` then ``weight.SCB = SCB``) is adopted with its own statistics at the
        module's next move, as an assignment would have (bitsandbytes' layers read the
        statistics from the weight at every call); ``_apply`` calls this first."""
        w = self._parameters.get("weight")
        if w is not None and self._quantized_now() and self._weight_is_foreign(w):
            self.weight = w

    def _adopt_weight(self, w) -> bool:
        stats = self._carried_stats(w)
        if stats is not None:
            self._set_quantized(w.data, stats)
            return True
        if self._quantized_now() and w.device.type != "meta":
            # quantized with w's own settings; the module takes them only once it succeeded
            return self._quantize_weight(w)
        self._take_settings(w)
        return False

