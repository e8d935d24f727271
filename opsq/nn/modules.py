"""Quantized layers with bitsandbytes' names, state-dict format and construction semantics.

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

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .. import functional as Fq
from .._autograd import apply_op
from .._constants import (INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING,
                          LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING, NESTED_BLOCKSIZE)
from ..meta._common import (check_blocksize, check_float_dtype, check_quant_storage,
                            check_quant_type, check_threshold)
from ..meta.fourbit import check_dequantize_4bit

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4", "Int8Params", "Linear8bitLt"]


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


def _apply_intent(fn) -> tuple[Optional[torch.device], bool]:
    """``(target device or None, is_to_empty)`` of a ``Module._apply`` function: None for a
    pure dtype change (``.half()``, ``.float()``)."""
    _DeviceProbe.record = {}
    try:
        fn(torch.empty(0).as_subclass(_DeviceProbe))
    except Exception:
        pass
    rec, _DeviceProbe.record = _DeviceProbe.record, {}
    device = rec.get("device")
    if device is not None and not isinstance(device, torch.device):
        device = torch.device(device)
    return device, bool(rec.get("empty"))


def _parse_to_device(*args, **kwargs) -> Optional[torch.device]:
    device, _, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device


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
        current = dict(module._parameters)
        module._parameters.clear()
        for name in order:
            if name in held:
                module._parameters[name] = held[name]
            elif name in current:
                module._parameters[name] = current.pop(name)
        module._parameters.update(current)


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


def _weight_format_code(fmt) -> int:
    """bitsandbytes' ``weight_format`` of a checkpoint as its integer code: None (absent) is
    row-major (0); a 0-d tensor or int is the code; a string is the layout's name ("row",
    "col32", "col_turing", "col_ampere", as older bitsandbytes wrote it).

    Raises:
        ValueError: an unknown name (the caller checks the code's range).
    """
    if fmt is None:
        return 0
    if isinstance(fmt, str):
        if fmt not in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING:
            raise ValueError(f"weight_format must be one of "
                             f"{sorted(LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING)} (or its code), "
                             f"got {fmt!r}")
        return LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING[fmt]
    return int(fmt.item() if isinstance(fmt, torch.Tensor) else fmt)


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


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(t, DTensor)


def _drop_internal_keys(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """Forget our internal statistic names in an incoming state dict (the bitsandbytes keys
    carry the values; torch.distributed.checkpoint may add the internal ones)."""
    for name in module._quantized_names():
        if name != "weight":
            state_dict.pop(prefix + name, None)


def _held_apply(module: nn.Module, base, fn, recurse, device, to_empty, names) -> None:
    """``base._apply(fn)`` for everything but the quantized tensors ``names``, which only follow
    device moves (never dtype casts), keeping parameter/buffer kind."""
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


# =============================================================================================
# 4-bit
# =============================================================================================
class Params4bit(nn.Parameter):
    """A 4-bit weight parameter (bitsandbytes' ``Params4bit``).

    Before quantization it holds the float weight ``(N, K)``; ``.to(device)`` / ``.cuda()`` /
    ``.cpu()`` to a real device returns a new ``Params4bit`` holding the packed codes
    ``(ceil(N*K/2/itemsize), 1)`` in ``quant_storage`` and its :class:`~opsq.functional.QuantState`.

    Args:
        data: the float weight, or packed codes with ``bnb_quantized=True``.
        requires_grad: always False for quantized data.
        quant_state: the state of packed ``data``.
        blocksize: 32..4096, elements per absmax block (default 64).
        compress_statistics: nested (8-bit) absmax.
        quant_type: "nf4" or "fp4".
        quant_storage: dtype of the packed storage.
        module: the owning :class:`Linear4bit`, if any.
        bnb_quantized: whether ``data`` is already packed.
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = False,
                quant_state: Optional[Fq.QuantState] = None, blocksize: int = 64,
                compress_statistics: bool = True, quant_type: str = "fp4",
                quant_storage: torch.dtype = torch.uint8, module=None,
                bnb_quantized: bool = False):
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    def _attrs(self) -> dict[str, Any]:
        return dict(blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                    quant_type=self.quant_type, quant_storage=self.quant_storage)

    def __deepcopy__(self, memo):
        return type(self)(self.data.clone(), self.requires_grad,
                          copy.deepcopy(self.quant_state, memo), module=None,
                          bnb_quantized=self.bnb_quantized, **self._attrs())

    def __reduce_ex__(self, proto):
        return (_rebuild_params4bit, (self.data, self.requires_grad, self.quant_state,
                                      self.bnb_quantized, self._attrs()))

    def _quantize(self, device) -> "Params4bit":
        w = self.data.contiguous().to(device)
        packed, state = Fq.quantize_4bit(w, blocksize=self.blocksize,
                                         compress_statistics=self.compress_statistics,
                                         quant_type=self.quant_type,
                                         quant_storage=self.quant_storage)
        return type(self)(packed, False, state, module=self.module, bnb_quantized=True,
                          **self._attrs())

    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict[str, Any],
                          requires_grad: bool = False, device="cuda", module=None,
                          **kwargs) -> "Params4bit":
        """Wrap packed codes and their bitsandbytes state-dict entries (``absmax``,
        ``quant_map``, ``quant_state.bitsandbytes__<type>``, nested entries) on ``device``.

        Raises:
            ValueError: malformed ``quantized_stats``.
        """
        state = Fq.QuantState.from_dict(quantized_stats, device=device)
        return cls(data.to(device), requires_grad, state, blocksize=state.blocksize,
                   compress_statistics=state.nested, quant_type=state.quant_type,
                   quant_storage=data.dtype, module=module, bnb_quantized=True)

    def to(self, *args, **kwargs):
        device = _parse_to_device(*args, **kwargs)
        if device is None:  # dtype-only conversion: a plain tensor, as for any Parameter
            return super().to(*args, **kwargs)
        if device.type != "meta" and not self.bnb_quantized \
                and self.device.type != "meta":
            return self._quantize(device)
        if self.bnb_quantized:  # device move only: packed bytes and statistics keep their dtype
            state = copy.deepcopy(self.quant_state)
            if state is not None:
                state.to(device)
            data = self.data.to(device)
            return type(self)(data, False, state, module=self.module, bnb_quantized=True,
                              **self._attrs())
        return super().to(*args, **kwargs)

    def cuda(self, device=None, non_blocking=False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self):
        return self.to(device="cpu")


def _rebuild_params4bit(data, requires_grad, quant_state, bnb_quantized, attrs):
    return Params4bit(data, requires_grad, quant_state, bnb_quantized=bnb_quantized, **attrs)


_STATE_4BIT = ("weight_absmax", "weight_quant_map", "weight_nested_absmax",
               "weight_nested_quant_map", "weight_offset")
class _KeyPath:
    """Attribute chain ``weight.absmax`` ... ``weight.quant_state.bitsandbytes__nf4`` so that
    ``torch.distributed.checkpoint`` can resolve bitsandbytes' dotted state-dict keys
    (it walks them with ``getattr``; see :meth:`Linear4bit._fqn_modifiers`)."""

    def __init__(self, **children):
        self.__dict__.update(children)


_BNB_WEIGHT_KEYS = _KeyPath(weight=_KeyPath(
    absmax=None, quant_map=None, nested_absmax=None, nested_quant_map=None,
    quant_state=_KeyPath(bitsandbytes__nf4=None, bitsandbytes__fp4=None)))


class Linear4bit(nn.Linear):
    """4-bit (NF4 / FP4) linear layer, bitsandbytes' ``Linear4bit``; QLoRA's storage format
    (Dettmers et al., "QLoRA", 2023).

    ``y = x @ dequant(W).T + bias`` computed in ``compute_dtype`` (default: the input's dtype)
    by one ``torch.ops.opsq.linear_4bit`` call; output in the input's dtype.

    Args:
        input_features: K.
        output_features: N.
        bias: add a bias of shape ``(N,)``.
        compute_dtype: fp16/bf16/fp32 or None (use the input's dtype).
        compress_statistics: nested (8-bit) absmax.
        quant_type: "nf4" or "fp4".
        quant_storage: dtype the packed weight is stored as (e.g. bf16 for FSDP1).
        device: where the float weight is created (quantization happens on the first move).
        blocksize: 32..4096 (default 64).
    Shapes:
        input ``(..., K)`` fp16/bf16/fp32 → output ``(..., N)`` of the same dtype.
    Raises:
        TypeError: ``compute_dtype`` not None/fp16/bf16/fp32 (a string too), ``quant_storage``
            not a supported dtype. ValueError: bad ``quant_type`` or ``blocksize``.
        RuntimeError: ``forward`` before the weight is quantized.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8,
                 device=None, blocksize: int = 64):
        if compute_dtype is not None:
            check_float_dtype("compute_dtype", compute_dtype)
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        check_quant_storage(quant_storage)
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(self.weight.data, requires_grad=False,
                                 compress_statistics=compress_statistics, quant_type=quant_type,
                                 quant_storage=quant_storage, blocksize=blocksize, module=self)
        self.compute_dtype = compute_dtype
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_storage = quant_storage
        self.blocksize = blocksize
        self.nested_blocksize = NESTED_BLOCKSIZE
        self.weight_shape = (output_features, input_features)
        self.weight_dtype = self.weight.dtype
        for name in _STATE_4BIT:
            self.register_buffer(name, None, persistent=False)

    # ---- state ------------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return self.weight_absmax is not None

    def __setattr__(self, name: str, value) -> None:
        # One home for the statistics: a Params4bit assigned to ``weight`` by any route
        # (``layer.weight = ...``, ``b.weight = a.weight``, PEFT's merge) brings its quant_state
        # into the module's tensors, or is quantized now when the layer already is. Plain
        # parameters (FSDP's shards, ``_apply``) are set as they are.
        if name == "weight" and isinstance(value, Params4bit) and self._adopt_weight(value):
            return
        super().__setattr__(name, value)

    def _adopt_weight(self, w: "Params4bit") -> bool:
        """Take ``w``'s codes and statistics as this layer's; False when ``w`` is a float
        weight for a layer that is not quantized yet (it is then set as is, and quantized on
        the first move). Raises ValueError for a quantized ``w`` without a quant_state or with
        another layer's shape."""
        if w.bnb_quantized:
            if w.quant_state is None:
                raise ValueError("weight: a quantized Params4bit (bnb_quantized=True) needs its "
                                 "quant_state (use Params4bit.from_prequantized)")
            self._set_quantized(w.data, w.quant_state)
            return True
        absmax = self.__dict__.get("_parameters", {}).get("weight_absmax",
                                                          self.__dict__.get("_buffers", {})
                                                          .get("weight_absmax"))
        if absmax is None or w.device.type == "meta":
            return False
        packed, state = Fq.quantize_4bit(
            w.data.contiguous().to(absmax.device), blocksize=w.blocksize,
            compress_statistics=w.compress_statistics, quant_type=w.quant_type,
            quant_storage=w.quant_storage)
        self.weight_dtype = w.dtype
        self._set_quantized(packed, state)
        return True

    @property
    def _stats_as_params(self) -> bool:
        return not self.quant_storage.is_floating_point

    def _quantized_names(self) -> tuple[str, ...]:
        return ("weight",) + _STATE_4BIT if self.is_quantized else ()

    def _fqn_modifiers(self) -> dict[str, str]:
        # torch.distributed.checkpoint resolves "weight.absmax" & co. through this chain.
        return {"weight": "_bnb_weight_keys"} if self.is_quantized else {}

    _bnb_weight_keys = _BNB_WEIGHT_KEYS

    @property
    def quant_state(self) -> Optional[Fq.QuantState]:
        """The weight's :class:`~opsq.functional.QuantState`, rebuilt from the module's tensors."""
        if not self.is_quantized:
            return None
        state2 = offset = None
        if self.weight_nested_absmax is not None:
            state2 = Fq.QuantState(absmax=_value(self.weight_nested_absmax),
                                   code=self.weight_nested_quant_map,
                                   blocksize=self.nested_blocksize, dtype=torch.float32)
            offset = self.weight_offset.reshape(())
        return Fq.QuantState(absmax=_value(self.weight_absmax), shape=self.weight_shape,
                             code=self.weight_quant_map, blocksize=self.blocksize,
                             quant_type=self.quant_type, dtype=self.weight_dtype,
                             offset=offset, state2=state2)

    def _set_quantized(self, packed: torch.Tensor, state: Fq.QuantState) -> None:
        """Adopt packed codes and their state (shape must be this layer's ``(N, K)``)."""
        if tuple(state.shape) != self.weight_shape:
            raise ValueError(f"quantized weight has shape {tuple(state.shape)}, layer expects "
                             f"{self.weight_shape} (out_features, in_features)")
        # Reject a corrupted/truncated checkpoint now (absmax, codes, nested stats), not at the
        # first forward: the ops' own shared validation.
        check_dequantize_4bit(packed, state.absmax, state.blocksize, state.quant_type,
                              list(state.shape), state.dtype,
                              state.state2.absmax if state.nested else None,
                              state.state2.code if state.nested else None,
                              state.offset if state.nested else None,
                              state.state2.blocksize if state.nested else NESTED_BLOCKSIZE)
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.quant_storage = packed.dtype
        self.weight_dtype = state.dtype
        self.compress_statistics = state.nested
        shard = self._stats_as_params
        _set_tensor(self, "weight_absmax", _bits(state.absmax) if shard else state.absmax, shard)
        _set_tensor(self, "weight_quant_map", state.code, False)
        nested_absmax = state.state2.absmax if state.nested else None
        _set_tensor(self, "weight_nested_absmax",
                    _bits(nested_absmax) if shard else nested_absmax, shard)
        _set_tensor(self, "weight_nested_quant_map",
                    state.state2.code if state.nested else None, False)
        _set_tensor(self, "weight_offset",
                    state.offset.reshape(1).to(torch.float32) if state.nested else None, False)
        if state.nested:
            self.nested_blocksize = state.state2.blocksize
        nn.Module.__setattr__(self, "weight", Params4bit(
            packed, False, None, blocksize=self.blocksize, compress_statistics=state.nested,
            quant_type=self.quant_type, quant_storage=packed.dtype, module=self,
            bnb_quantized=True))
        self._sync_weight_state()

    def __getstate__(self) -> dict:
        w = self._parameters.get("weight")
        bare = None
        if isinstance(w, Params4bit) and w.bnb_quantized:
            bare = Params4bit(w.data, False, None, bnb_quantized=True, **w._attrs())
        return _pickle_state(self, bare)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._sync_weight_state()

    def _same_layout(self, packed: torch.Tensor, state: Fq.QuantState) -> bool:
        """Whether ``packed``/``state`` fit the current tensors exactly (in-place load)."""
        return (self.is_quantized and packed.shape == self.weight.shape
                and packed.dtype == self.weight.dtype and state.nested == self.compress_statistics
                and state.blocksize == self.blocksize and state.quant_type == self.quant_type
                and state.absmax.shape == self.weight_absmax.shape
                and (not state.nested
                     or state.state2.absmax.shape == self.weight_nested_absmax.shape))

    def _copy_quantized(self, packed: torch.Tensor, state: Fq.QuantState) -> None:
        """Load into the existing tensors in place (keeps FSDP2's sharded parameters)."""
        _copy_into(self.weight, packed)
        _copy_into(self.weight_absmax, state.absmax)
        _copy_into(self.weight_quant_map, state.code)
        if state.nested:
            _copy_into(self.weight_nested_absmax, state.state2.absmax)
            _copy_into(self.weight_nested_quant_map, state.state2.code)
            _copy_into(self.weight_offset, state.offset.reshape(1))
        self.weight_dtype = state.dtype
        self._sync_weight_state()

    def _sync_weight_state(self) -> None:
        if isinstance(self.weight, Params4bit):
            self.weight.quant_state = self.quant_state
            self.weight.bnb_quantized = self.is_quantized

    def _apply(self, fn, recurse=True):
        device, to_empty = _apply_intent(fn)
        w = self.weight
        if not self.is_quantized and isinstance(w, Params4bit) and w.bnb_quantized:
            # A pre-quantized Params4bit was assigned directly: adopt its state.
            self._set_quantized(w.data, w.quant_state)
        elif (not self.is_quantized and device is not None and device.type != "meta"
              and not to_empty and w is not None and w.device.type != "meta"):
            packed, state = Fq.quantize_4bit(
                w.data.contiguous().to(device), blocksize=self.blocksize,
                compress_statistics=self.compress_statistics, quant_type=self.quant_type,
                quant_storage=self.quant_storage)
            self.weight_dtype = w.dtype
            self._set_quantized(packed, state)
        if not self.is_quantized:
            return super()._apply(fn, recurse)
        _held_apply(self, nn.Linear, fn, recurse, device, to_empty, self._quantized_names())
        w = self._parameters["weight"]
        if not isinstance(w, Params4bit) and type(w) is nn.Parameter:
            self._parameters["weight"] = Params4bit(
                w.data, False, None, blocksize=self.blocksize,
                compress_statistics=self.compress_statistics, quant_type=self.quant_type,
                quant_storage=self.quant_storage, module=self, bnb_quantized=True)
        self._sync_weight_state()
        return self

    # ---- construction helpers -----------------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                   compress_statistics: bool = False, quant_storage: torch.dtype = torch.uint8,
                   compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """A quantized copy of ``linear`` on ``linear``'s device (weights quantized now).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``. ValueError: bad options.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        dev = linear.weight.device
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                    quant_type=quant_type, quant_storage=quant_storage, device="meta",
                    blocksize=blocksize)
        packed, state = Fq.quantize_4bit(linear.weight.detach().contiguous(),
                                         blocksize=blocksize,
                                         compress_statistics=compress_statistics,
                                         quant_type=quant_type, quant_storage=quant_storage)
        layer._set_quantized(packed, state)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone().to(dev),
                                      requires_grad=linear.bias.requires_grad)
        return layer

    # ---- state dict -----------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _save_without_quantized(self, nn.Linear, destination, prefix, keep_vars)
        if self.is_quantized:
            for k, v in self.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _drop_internal_keys(self, state_dict, prefix)
        wkey = prefix + "weight"
        qs_keys = [k for k in state_dict if k.startswith(wkey + ".")]
        incoming = state_dict.get(wkey)
        if qs_keys or (incoming is not None and self.is_quantized):
            if incoming is None:
                missing_keys.append(wkey)
                return
            qs = {k[len(wkey) + 1:]: state_dict.pop(k) for k in qs_keys}
            state_dict.pop(wkey)
            device = self._device_for_load(incoming)
            try:
                if qs:
                    state = Fq.QuantState.from_dict(qs, device=device)
                    packed = incoming.detach().to(device)
                else:  # float weight into a quantized layer: quantize it with our settings
                    if tuple(incoming.shape) != self.weight_shape:
                        raise ValueError(
                            f"a float weight of shape {tuple(incoming.shape)} does not fit "
                            f"this layer: expected {self.weight_shape} (out_features, "
                            "in_features)")
                    packed, state = Fq.quantize_4bit(
                        incoming.detach().to(device), blocksize=self.blocksize,
                        compress_statistics=self.compress_statistics,
                        quant_type=self.quant_type, quant_storage=self.quant_storage)
                if tuple(state.shape) != self.weight_shape:
                    raise ValueError(f"the checkpoint's quant_state shape {tuple(state.shape)} "
                                     f"is not this layer's {self.weight_shape} (out_features, "
                                     "in_features)")
                if self._same_layout(packed, state):
                    self._copy_quantized(packed, state)
                else:
                    self._set_quantized(packed, state)
            except (ValueError, TypeError, RuntimeError) as e:
                error_msgs.append(f"While loading {wkey}: {e}")
                return
            _load_without_weight(self, nn.Linear, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _device_for_load(self, incoming: torch.Tensor) -> torch.device:
        own = self.weight.device if self.weight is not None else incoming.device
        return incoming.device if own.type == "meta" else own

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The hot path of every decode step: one op call and attribute reads, nothing else
        # (the checks below are attribute comparisons; the op validates the rest).
        absmax = self.weight_absmax
        if absmax is None:
            raise RuntimeError(
                "Linear4bit: the weight is not quantized yet; move the layer to a device "
                "(.to(device), .cuda(), .to('cpu')), use Linear4bit.from_float, or load a "
                "quantized state dict first")
        weight = self.weight
        if weight.dtype != self.quant_storage:
            raise RuntimeError(
                f"Linear4bit: the packed weight arrived as {weight.dtype}, not its "
                f"quant_storage {self.quant_storage}: something cast it (e.g. an FSDP2 "
                "MixedPrecisionPolicy param_dtype different from a floating quant_storage); use "
                "quant_storage=torch.uint8 with FSDP2 mixed precision")
        cdt = self.compute_dtype
        xc = x if cdt is None or x.dtype == cdt else x.to(cdt)
        out = apply_op(
            "linear_4bit", xc, weight, self.weight_shape, _value(absmax), self.blocksize,
            self.quant_type, self.bias, _value(self.weight_nested_absmax),
            self.weight_nested_quant_map, self.weight_offset, self.nested_blocksize)
        return out if xc is x else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, compress_statistics={self.compress_statistics}, "
                f"quant_storage={self.quant_storage}, quantized={self.is_quantized}")


class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="fp4"``."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                 compress_statistics=True, quant_storage=torch.uint8, device=None,
                 blocksize=64):
        super().__init__(input_features, output_features, bias, compute_dtype,
                         compress_statistics, "fp4", quant_storage, device, blocksize)


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="nf4"`` (QLoRA's NormalFloat4)."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                 compress_statistics=True, quant_storage=torch.uint8, device=None,
                 blocksize=64):
        super().__init__(input_features, output_features, bias, compute_dtype,
                         compress_statistics, "nf4", quant_storage, device, blocksize)


# =============================================================================================
# int8 (LLM.int8)
# =============================================================================================
class Int8Params(nn.Parameter):
    """An int8 weight parameter (bitsandbytes' ``Int8Params``).

    With ``has_fp16_weights=False``, ``.to(device)`` to a real device returns a new
    ``Int8Params`` holding ``CB`` (int8 ``(N, K)``, row-wise absmax-quantized to ±127) with
    ``SCB`` (fp32 ``(N,)`` row absmax). With ``has_fp16_weights=True`` it stays a float weight.
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = True,
                has_fp16_weights: bool = False, CB: Optional[torch.Tensor] = None,
                SCB: Optional[torch.Tensor] = None):
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.has_fp16_weights = has_fp16_weights
        self.CB = CB
        self.SCB = SCB
        return self

    def __deepcopy__(self, memo):
        return type(self)(self.data.clone(), self.requires_grad, self.has_fp16_weights,
                          None if self.CB is None else self.data.clone(),
                          None if self.SCB is None else self.SCB.clone())

    def __reduce_ex__(self, proto):
        return (Int8Params, (self.data, self.requires_grad, self.has_fp16_weights, self.CB,
                             self.SCB))

    def _quantize(self, device) -> "Int8Params":
        CB, SCB, _ = Fq.int8_vectorwise_quant(self.data.contiguous().to(device))
        return type(self)(CB, False, False, CB, SCB)

    def to(self, *args, **kwargs):
        device = _parse_to_device(*args, **kwargs)
        if device is None:  # dtype-only conversion: a plain tensor, as for any Parameter
            return super().to(*args, **kwargs)
        if device.type != "meta" and not self.has_fp16_weights \
                and self.CB is None and self.data.is_floating_point() \
                and self.device.type != "meta":
            return self._quantize(device)
        if self.CB is not None:  # device move only
            data = self.data.to(device)
            scb = None if self.SCB is None else self.SCB.to(device)
            return type(self)(data, False, False, data, scb)
        return super().to(*args, **kwargs)

    def cuda(self, device=None, non_blocking=False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self):
        return self.to(device="cpu")


class Linear8bitLt(nn.Linear):
    """LLM.int8 linear layer (Dettmers et al., "LLM.int8()", 2022), bitsandbytes'
    ``Linear8bitLt``.

    Inputs are quantized row-wise to int8 per call; the weight is int8 ``CB`` with row scales
    ``SCB`` (``has_fp16_weights=False``, quantized on the first move to a device) or a float
    weight quantized per call (``has_fp16_weights=True``, trainable). With ``threshold > 0``
    input columns holding a value with |x| >= threshold are multiplied in 16-bit precision.
    ``forward`` is one ``torch.ops.opsq.int8_linear`` call.

    Args:
        input_features: K. output_features: N. bias: add a bias ``(N,)``.
        has_fp16_weights: keep a float, trainable weight.
        memory_efficient_backward: bitsandbytes < 0.45's fifth argument, accepted for
            compatibility (True warns: opsq's backward never keeps a dequantized weight). A
            number in this position is bitsandbytes >= 0.45's positional ``threshold`` (that
            signature has no ``memory_efficient_backward``) and is read as such.
        threshold: outlier threshold, finite and >= 0 (0 disables the mixed-precision
            decomposition). Stored in ``state.threshold`` (bitsandbytes' ``MatmulLtState``),
            its one home: ``layer.threshold`` and ``layer.state.threshold`` are the same value.
        index: accepted for compatibility, unused.
        device: where the float weight is created.
    Shapes:
        input ``(..., K)`` fp16/bf16/fp32 → output ``(..., N)`` of the same dtype.
    Raises:
        ValueError: ``threshold`` negative, NaN or infinite.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 has_fp16_weights: bool = True, memory_efficient_backward=False,
                 threshold: float = 0.0, index=None, device=None):
        if not isinstance(memory_efficient_backward, bool):
            # bitsandbytes >= 0.45 positional order: (.., has_fp16_weights, threshold, index,
            # device); shift the arguments back into place.
            memory_efficient_backward, threshold, index, device = (
                False, memory_efficient_backward, None if threshold == 0.0 else threshold, index)
        elif memory_efficient_backward:
            warnings.warn("Linear8bitLt: memory_efficient_backward is deprecated and ignored "
                          "(opsq's backward never keeps a dequantized weight)",
                          DeprecationWarning, stacklevel=2)
        check_threshold(threshold)
        super().__init__(input_features, output_features, bias, device)
        from ..autograd import MatmulLtState
        self.state = MatmulLtState()
        self.state.threshold = float(threshold)
        self.state.has_fp16_weights = has_fp16_weights
        self.memory_efficient_backward = memory_efficient_backward
        self.index = index
        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights,
                                 requires_grad=has_fp16_weights)
        self.register_parameter("weight_scb", None)

    @property
    def is_quantized(self) -> bool:
        return self.weight_scb is not None

    @property
    def threshold(self) -> float:
        """The outlier threshold; its home is ``state.threshold`` (setting either changes
        both). Raises ValueError on a negative, NaN or infinite value."""
        return self.state.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        check_threshold(value)
        self.state.threshold = float(value)

    @property
    def has_fp16_weights(self) -> bool:
        """Whether the weight is kept in float and trained; its home is
        ``state.has_fp16_weights``."""
        return self.state.has_fp16_weights

    @has_fp16_weights.setter
    def has_fp16_weights(self, value: bool) -> None:
        self.state.has_fp16_weights = bool(value)

    @property
    def SCB(self) -> Optional[torch.Tensor]:
        """fp32 ``(N,)`` row absmax of the int8 weight (a view of the ``weight_scb`` bits)."""
        return _value(self.weight_scb)

    @property
    def weight_format(self) -> torch.Tensor:
        """bitsandbytes' ``weight_format`` code of the stored weight: always 0 (row-major)."""
        return torch.tensor(0, dtype=torch.uint8)

    def _quantized_names(self) -> tuple[str, ...]:
        return ("weight", "weight_scb") if self.is_quantized else ()

    def __setattr__(self, name: str, value) -> None:
        # One home for SCB: an Int8Params assigned to ``weight`` brings its CB/SCB along (or is
        # quantized now); a float trainable one makes the layer quantize per call.
        if name == "weight" and isinstance(value, Int8Params) and self._adopt_weight(value):
            return
        super().__setattr__(name, value)

    def _adopt_weight(self, w: "Int8Params") -> bool:
        """Take ``w``'s int8 codes and scales as this layer's (True), or let it be set as is
        (False: a float weight of a layer that is not quantized, or a trainable one).

        Raises:
            ValueError: int8 data without ``SCB``, or another layer's shape.
        """
        if w.dtype == torch.int8:
            if w.SCB is None:
                raise ValueError("weight: int8 codes need their row scales SCB (Int8Params(CB, "
                                 "..., CB=CB, SCB=SCB))")
            self._set_quantized(w.data, w.SCB)
            return True
        scb = self.__dict__.get("_parameters", {}).get("weight_scb")
        if scb is None or w.device.type == "meta":
            return False
        if w.has_fp16_weights:  # a trainable float weight: quantized per call from now on
            self._parameters.pop("weight_scb", None)
            self.register_parameter("weight_scb", None)
            self.has_fp16_weights = True
            return False
        CB, SCB, _ = Fq.int8_vectorwise_quant(w.data.contiguous().to(scb.device))
        self._set_quantized(CB, SCB)
        return True

    def _set_quantized(self, CB: torch.Tensor, SCB: torch.Tensor) -> None:
        if tuple(CB.shape) != (self.out_features, self.in_features) or CB.dtype != torch.int8:
            raise ValueError(f"CB must be int8 of shape ({self.out_features}, "
                             f"{self.in_features}), got {CB.dtype} {tuple(CB.shape)}")
        if SCB.numel() != self.out_features:
            raise ValueError(f"SCB must have {self.out_features} elements, got {SCB.numel()}")
        nn.Module.__setattr__(self, "weight", Int8Params(CB, False, False, CB, None))
        _set_tensor(self, "weight_scb", _bits(SCB.reshape(-1).to(torch.float32)), True)
        self._sync_weight_state()

    def __getstate__(self) -> dict:
        w = self._parameters.get("weight")
        bare = None
        if isinstance(w, Int8Params):
            bare = Int8Params(w.data, w.requires_grad, w.has_fp16_weights)
        state = _pickle_state(self, bare)
        st = copy.copy(state["state"])
        st.CB = st.SCB = None  # views of the weight and of weight_scb: re-derived on load
        state["state"] = st
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._sync_weight_state()

    def _sync_weight_state(self) -> None:
        if isinstance(self.weight, Int8Params) and self.is_quantized:
            self.weight.CB = self.weight.data
            self.weight.SCB = self.SCB
        self.state.CB = self.weight.data if self.is_quantized else None
        self.state.SCB = self.SCB

    def _apply(self, fn, recurse=True):
        device, to_empty = _apply_intent(fn)
        w = self.weight
        if not self.is_quantized and isinstance(w, Int8Params) and w.CB is not None \
                and w.SCB is not None:
            self._set_quantized(w.data, w.SCB)
        elif (not self.is_quantized and not self.has_fp16_weights and device is not None
              and device.type != "meta" and not to_empty and w.device.type != "meta"
              and w.is_floating_point()):
            CB, SCB, _ = Fq.int8_vectorwise_quant(w.data.contiguous().to(device))
            self._set_quantized(CB, SCB)
        if not self.is_quantized:
            return super()._apply(fn, recurse)
        _held_apply(self, nn.Linear, fn, recurse, device, to_empty, self._quantized_names())
        w = self._parameters["weight"]
        if not isinstance(w, Int8Params) and type(w) is nn.Parameter:
            self._parameters["weight"] = Int8Params(w.data, False, False, w.data, None)
        self._sync_weight_state()
        return self

    @classmethod
    def from_float(cls, linear: nn.Linear, threshold: float = 6.0,
                   has_fp16_weights: bool = False) -> "Linear8bitLt":
        """An int8 copy of ``linear`` on its device (quantized now unless
        ``has_fp16_weights``).

        Raises:
            TypeError: ``linear`` is not an ``nn.Linear``. ValueError: ``threshold`` < 0.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    has_fp16_weights=has_fp16_weights, threshold=threshold, device="meta")
        w = linear.weight.detach()
        if has_fp16_weights:
            layer.weight = Int8Params(w.clone(), True, True)
        else:
            CB, SCB, _ = Fq.int8_vectorwise_quant(w.contiguous())
            layer._set_quantized(CB, SCB)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(),
                                      requires_grad=linear.bias.requires_grad)
        return layer

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _save_without_quantized(self, nn.Linear, destination, prefix, keep_vars)
        if self.is_quantized:
            destination[prefix + "SCB"] = self.SCB if keep_vars else self.SCB.detach()
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _drop_internal_keys(self, state_dict, prefix)
        wkey, skey, fkey = prefix + "weight", prefix + "SCB", prefix + "weight_format"
        fmt = state_dict.pop(fkey, None)
        if skey in state_dict:
            SCB = state_dict.pop(skey)
            if wkey not in state_dict:
                missing_keys.append(wkey)
                return
            CB = state_dict.pop(wkey)
            try:
                code = _weight_format_code(fmt)
                order = INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.get(code)
                if order is None:
                    raise ValueError(f"weight_format must be one of "
                                     f"{sorted(INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING)}, "
                                     f"got {code}")
                if order != "row":  # legacy cuBLASLt tiled checkpoint: undo the layout
                    CB = torch.ops.opsq.transform(CB.reshape(-1).contiguous(), order, "row",
                                                  [self.out_features, self.in_features])
                device = self.weight.device if self.weight.device.type != "meta" else CB.device
                if self.is_quantized and CB.shape == self.weight.shape \
                        and CB.dtype == self.weight.dtype \
                        and SCB.numel() == self.out_features:  # in place: keeps FSDP2 shards
                    _copy_into(self.weight, CB)
                    _copy_into(self.weight_scb, SCB.reshape(-1).to(torch.float32))
                    self._sync_weight_state()
                else:
                    self._set_quantized(CB.detach().to(device), SCB.detach().to(device))
            except (ValueError, TypeError, RuntimeError) as e:
                error_msgs.append(f"While loading {wkey}: {e}")
                return
            _load_without_weight(self, nn.Linear, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs)
            return
        if wkey in state_dict and state_dict[wkey].dtype == torch.int8:
            # int8 codes without their SCB: never pair them with the old scales (or quantize
            # codes again); report the checkpoint key that is missing.
            state_dict.pop(wkey)
            missing_keys.append(skey)  # strict loads raise "Missing key(s): ...SCB"
            _load_without_weight(self, nn.Linear, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs)
            return
        if self.is_quantized and wkey in state_dict and state_dict[wkey].is_floating_point():
            w = state_dict.pop(wkey)
            CB, SCB, _ = Fq.int8_vectorwise_quant(w.detach().to(self.weight.device))
            self._set_quantized(CB, SCB)
            _load_without_weight(self, nn.Linear, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One op call. SCB None: a float weight (has_fp16_weights=True, or not yet moved),
        # quantized per call.
        return apply_op("int8_linear", x, self.weight, _value(self.weight_scb), self.bias,
                        self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, "
                f"has_fp16_weights={self.has_fp16_weights}, quantized={self.is_quantized}")
