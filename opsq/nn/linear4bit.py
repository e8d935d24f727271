"""4-bit (NF4 / FP4) linear layers: ``Params4bit``, ``Linear4bit``, ``LinearFP4``, ``LinearNF4``
(bitsandbytes' names, state-dict format and construction semantics; the shared lifecycle is
:mod:`opsq.nn._lifecycle`)."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .. import _tiled16
from .. import functional as Fq
from .._autograd import apply_op
from .._constants import NESTED_BLOCKSIZE
from ..meta._common import (check_blocksize, check_float_dtype, check_quant_storage,
                            check_quant_type)
from ..meta.fourbit import check_dequantize_4bit
from ..fsdp import is_dtensor as _is_dtensor
from ._lifecycle import (QuantizedWeightMixin, _apply_intent, _bits, _copy_into,
                         _drop_internal_keys, _forget_internal_missing, _held_apply,
                         _load_without_weight, _parse_to_device, _pickle_state,
                         _refuse_new_sharded_tensors,
                         _save_without_quantized, _set_tensor, _value)

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4"]


# =============================================================================================
# 4-bit
# =============================================================================================
class Params4bit(nn.Parameter):
    """A 4-bit weight parameter (bitsandbytes' ``Params4bit``).

    Before quantization it holds the float weight ``(N, K)``; ``.to(device)`` / ``.cuda()`` /
    ``.cpu()`` to a real device returns a new ``Params4bit`` holding the packed codes
    ``(ceil(N*K/2/itemsize), 1)`` in ``quant_storage`` and its :class:`~opsq.functional.QuantState`.

    Layout: a free-standing parameter (``module`` None) that lands on a CUDA device eligible for
    the decode kernel's layout (:func:`opsq._tiled16.tiled16_eligible`: sm_90 code, blocksize
    64, ``N % 16 == 0``, ``K % 256 == 0``) holds its codes and ``quant_state.absmax`` in the
    "tiled16" order (``quant_state.layout``); anywhere else, and in everything it pickles, the
    bitsandbytes order. A parameter owned by a :class:`Linear4bit` leaves the layout to the layer.

    Args:
        data: the float weight, or packed codes with ``bnb_quantized=True``.
        requires_grad: always False for quantized data.
        quant_state: the state of packed ``data``.
        blocksize: 32..4096, elements per absmax block (default 64; None means 64, as in
            bitsandbytes).
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
        self.blocksize = 64 if blocksize is None else blocksize  # None: bitsandbytes' default
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "quant_state" and value is not None:
            # bitsandbytes' idiom for swapping a layer's weight in place (``weight.data =
            # codes; weight.quant_state = state``: its layers read weight.quant_state at every
            # call): the module this parameter is the weight of adopts the codes and the state
            # now, as an assignment of the parameter would; opsq's own writes go through
            # attach_quant_state and adopt nothing
            m = self.__dict__.get("module")
            if m is not None and m._parameters.get("weight") is self:
                m.weight = self

    def _attrs(self) -> dict[str, Any]:
        return dict(blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                    quant_type=self.quant_type, quant_storage=self.quant_storage)

    def __deepcopy__(self, memo):
        return type(self)(self.data.clone(), self.requires_grad,
                          copy.deepcopy(self.quant_state, memo), module=None,
                          bnb_quantized=self.bnb_quantized, **self._attrs())

    def __reduce_ex__(self, proto):
        # the statistics are pickled as copies: in a layer they view the storage of its int32
        # bit-pattern parameters, and torch.save refuses one storage under two dtypes when a
        # state dict holds both (torch.export.save of a program, for one). Pickled bytes are
        # always bitsandbytes' (a tiled16 weight is un-packed; _rebuild_params4bit tiles it
        # again where it lands on an eligible device).
        data, state = _packed_copy(self.data, self.quant_state)
        return (_rebuild_params4bit, (data, self.requires_grad, state, self.bnb_quantized,
                                      self._attrs()))

    def _settle_layout(self) -> None:
        """Free-standing only: put the codes and ``quant_state.absmax`` in the layout the
        current device wants (tiled16 where eligible, else packed); new tensors, not in
        place (``.to`` to the same device may share storage with the source)."""
        state = self.quant_state
        if (self.module is not None or not self.bnb_quantized or state is None
                or state.shape is None or self.device.type == "meta" or _is_dtensor(self.data)):
            return
        want = _tiled16.layout_for(state.shape, state.blocksize, self.device)
        if want == state.layout:
            return
        with torch.no_grad():
            self.data, state.absmax = _tiled16.to_layout(self.data, state.absmax, state.shape,
                                                         want)
        state.layout = want

    def _placed(self) -> "Params4bit":
        """A newly quantized or loaded parameter where it lands. One that names its module
        (``module=``, as bitsandbytes' loaders pass it) goes to that module, as bitsandbytes
        sets ``module.quant_state``: the module adopts the codes and state (its layout
        included) and its own weight parameter is returned, so that a caller who then writes
        ``module._parameters["weight"] = result`` (accelerate, transformers) leaves codes and
        statistics that belong together. Otherwise (no such module, or other shapes: a chunk of
        the weight) it stays free-standing, in the layout its device wants."""
        m, state = self.module, self.quant_state
        if (m is not None and hasattr(m, "_set_quantized") and state.shape is not None
                and tuple(state.shape) == tuple(getattr(m, "weight_shape", ()))):
            m._set_quantized(self.data, state)
            return m.weight
        self._settle_layout()
        return self

    def _quantize(self, device) -> "Params4bit":
        w = self.data.contiguous().to(device)
        packed, state = Fq.quantize_4bit(w, blocksize=self.blocksize,
                                         compress_statistics=self.compress_statistics,
                                         quant_type=self.quant_type,
                                         quant_storage=self.quant_storage)
        return type(self)(packed, False, state, module=self.module, bnb_quantized=True,
                          **self._attrs())._placed()

    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict[str, Any],
                          requires_grad: bool = False, device="cuda", module=None,
                          **kwargs) -> "Params4bit":
        """Wrap packed codes and their bitsandbytes state-dict entries (``absmax``,
        ``quant_map``, ``quant_state.bitsandbytes__<type>``, nested entries) on ``device``.
        With ``module`` (a 4-bit layer of this shape) the layer adopts them and its weight
        parameter is returned (see ``_placed``).

        Raises:
            ValueError: malformed ``quantized_stats``.
        """
        state = Fq.QuantState.from_dict(quantized_stats, device=device)
        return cls(data.to(device), requires_grad, state, blocksize=state.blocksize,
                   compress_statistics=state.nested, quant_type=state.quant_type,
                   quant_storage=data.dtype, module=module, bnb_quantized=True)._placed()

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
            out = type(self)(data, False, state, module=self.module, bnb_quantized=True,
                             **self._attrs())
            out._settle_layout()
            return out
        return super().to(*args, **kwargs)

    def cuda(self, device=None, non_blocking=False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def cpu(self):
        return self.to(device="cpu")


def _state_field(doc: str, get, nested: bool = False) -> property:
    """A read-only view of one field of a :class:`Params4bit`'s ``quant_state``; AttributeError
    (so ``hasattr`` is False) where the weight has no state, or no nested state for a nested
    field."""
    def fget(self):
        qs = self.__dict__.get("quant_state")
        if qs is None or (nested and qs.state2 is None):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute {doc!r} "
                                 f"(no {'nested ' if nested else ''}quant_state)")
        return get(qs)
    return property(fget, doc=f"``quant_state``'s {doc} (bitsandbytes' FSDP key path).")


# bitsandbytes 0.48+: FSDP resolves the dotted state-dict keys of a 4-bit weight
# ("weight.absmax", "weight.nested_quant_map", ...) with getattr on the weight. Properties, not
# __getattr__, so that Dynamo traces them.
for _name, _get, _nested in (
        ("absmax", lambda qs: qs.absmax, False), ("code", lambda qs: qs.code, False),
        ("quant_map", lambda qs: qs.code, False), ("offset", lambda qs: qs.offset, False),
        ("state2", lambda qs: qs.state2, False),
        ("nested_absmax", lambda qs: qs.state2.absmax, True),
        ("nested_blocksize", lambda qs: qs.state2.blocksize, True),
        ("nested_quant_map", lambda qs: qs.state2.code, True),
        ("nested_dtype", lambda qs: qs.state2.dtype, True),
        ("nested_offset", lambda qs: qs.offset, False)):
    setattr(Params4bit, _name, _state_field(_name, _get, _nested))
del _name, _get, _nested

def _as_packed(packed: torch.Tensor, state: Fq.QuantState):
    """``(packed, state)`` in bitsandbytes' layout: a tiled16 pair un-packed (a new state; the
    caller's is not modified), a packed one returned as it is."""
    if state.layout != "tiled16":
        return packed, state
    state = copy.copy(state)
    packed = _tiled16.on_full(_tiled16.unpack_codes, packed, state.shape)
    state.absmax = state._packed_absmax()
    state.layout = "packed"
    return packed, state


_SPLITS = (torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split)


def _params4bit_torch_function(cls, func, types, args=(), kwargs=None):
    """``torch.chunk`` / ``torch.split`` of a Params4bit give Params4bit pieces that keep its
    quant_state and settings (as bitsandbytes 0.48+, for FSDP's flat-parameter sharding); every
    other function returns plain tensors, as for any ``nn.Parameter``."""
    kwargs = kwargs or {}
    if func in _SPLITS and isinstance(args[0], Params4bit):
        src = args[0]
        with torch._C.DisableTorchFunctionSubclass():
            pieces = func(*args, **kwargs)
        return tuple(cls(p, src.requires_grad, src.quant_state, module=src.module,
                         bnb_quantized=src.bnb_quantized, **src._attrs()) for p in pieces)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


Params4bit.__torch_function__ = classmethod(_params4bit_torch_function)


def params4bit_is_foreign(module: nn.Module, w) -> bool:
    """A quantized ``Params4bit`` that is not ``module``'s own (its state is another's)."""
    return (isinstance(w, Params4bit) and w.bnb_quantized and w.quant_state is not None
            and w.__dict__.get("module") is not module)


def attach_quant_state(weight: Params4bit, state: Optional[Fq.QuantState],
                       module: Optional[nn.Module] = None) -> None:
    """Set ``weight.quant_state`` to a state its module already holds (the layers' own
    bookkeeping), without the adoption a user's assignment triggers; with ``module``, also bind
    the weight to it (a deepcopied or unpickled weight comes back without its module)."""
    weight.__dict__["quant_state"] = state
    if module is not None:
        weight.__dict__["module"] = module


def _rebuild_params4bit(data, requires_grad, quant_state, bnb_quantized, attrs):
    out = Params4bit(data, requires_grad, quant_state, bnb_quantized=bnb_quantized, **attrs)
    out._settle_layout()
    return out


def _packed_copy(data: torch.Tensor, state: Optional[Fq.QuantState]):
    """``(codes, state copy)`` in bitsandbytes' layout: :func:`_as_packed` of a deep copy of
    the state (None stays None, with the codes as they are)."""
    state = copy.deepcopy(state)
    return (data, state) if state is None else _as_packed(data, state)


def _describe_codes(storage, quant_type, blocksize, nested, absmax_shape) -> str:
    """A 4-bit weight's settings, for error messages."""
    return (f"4-bit codes (quant_storage={storage}, quant_type={quant_type!r}, "
            f"blocksize={blocksize}, compress_statistics={nested}, "
            f"absmax {tuple(absmax_shape)})")


def _check_settings(quant_type: str, blocksize: int, quant_storage: torch.dtype) -> None:
    """A 4-bit layer's settings: ValueError / TypeError naming the one that is wrong."""
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_quant_storage(quant_storage)


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


class Bnb4bitWeightKeys:
    """For modules whose state dict holds a 4-bit weight with bitsandbytes' dotted entries
    (``Linear4bit``, ``Embedding4bit``): torch.distributed.checkpoint resolves
    ``weight.absmax`` & co. through ``_fqn_modifiers``."""

    _bnb_weight_keys = _BNB_WEIGHT_KEYS

    def _fqn_modifiers(self) -> dict[str, str]:
        return {"weight": "_bnb_weight_keys"} if self.is_quantized else {}


class Linear4bit(Bnb4bitWeightKeys, QuantizedWeightMixin, nn.Linear):
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
    Layout:
        ``layout`` (a plain string, also ``quant_state.layout``) is ``"tiled16"`` while the
        quantized tensors sit, unsharded, on a CUDA device eligible for the decode kernel's
        byte order (:func:`opsq._tiled16.tiled16_eligible`: sm_90 code, blocksize 64,
        ``N % 16 == 0``, ``K % 256 == 0``; NF4/FP4, plain or nested absmax, fp16 or bf16
        inputs, since the kernel takes both), else ``"packed"``. It changes only where the
        tensors arrive: a move (``.to`` / ``.cuda`` / ``.cpu``), quantization, a load, an
        assigned weight, unpickling; never in ``forward``. Everything that leaves the layer
        is bitsandbytes' bytes: ``state_dict()`` (FSDP2-sharded tensors are gathered, un-packed
        and re-sharded), ``quant_state.as_dict``, ``Fq.dequantize_4bit(weight, quant_state)``,
        ``torch.save`` / pickling, ``.to("cpu")``.
    Raises:
        TypeError: ``compute_dtype`` not None/fp16/bf16/fp32 (a string too), ``quant_storage``
            not a supported dtype. ValueError: bad ``quant_type`` or ``blocksize``.
        RuntimeError: ``forward`` before the weight is quantized.
    """

    #: the quantized tensors' byte order (see "Layout" above); the class default covers new
    #: layers and layers pickled before the layout existed
    layout: str = "packed"

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 compute_dtype: Optional[torch.dtype] = None, compress_statistics: bool = True,
                 quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8,
                 device=None, blocksize: int = 64):
        if compute_dtype is not None:
            check_float_dtype("compute_dtype", compute_dtype)
        _check_settings(quant_type, blocksize, quant_storage)
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

    _weight_types = (Params4bit,)

    def _carried_stats(self, w: Params4bit) -> Optional[Fq.QuantState]:
        if not w.bnb_quantized:
            return None
        if w.quant_state is None:
            raise ValueError("weight: a quantized Params4bit (bnb_quantized=True) needs its "
                             "quant_state (use Params4bit.from_prequantized)")
        return w.quant_state

    def _take_settings(self, w: Params4bit) -> None:
        """A float ``Params4bit``'s blocksize, quant_type, compress_statistics and
        quant_storage become the layer's (checked: ValueError / TypeError naming the setting),
        as bitsandbytes quantizes a ``Params4bit`` with its own settings."""
        _check_settings(w.quant_type, w.blocksize, w.quant_storage)
        for k, v in w._attrs().items():
            setattr(self, k, v)

    def _quantize_weight(self, w: Params4bit) -> bool:
        # w's own settings: the layer takes them from the state in _set_quantized, and keeps
        # its own where quantizing or the shape check fails
        packed, state = Fq.quantize_4bit(
            w.data.contiguous().to(self._parameters["weight"].device), **w._attrs())
        self._set_quantized(packed, state)  # (weight_dtype from the state: w's dtype)
        return True

    @property
    def _stats_as_params(self) -> bool:
        return not self.quant_storage.is_floating_point

    def _quantized_names(self) -> tuple[str, ...]:
        return ("weight",) + _STATE_4BIT if self.is_quantized else ()

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
                             offset=offset, state2=state2,
                             layout=self.layout)

    def _set_quantized(self, packed: torch.Tensor, state: Fq.QuantState) -> None:
        """Adopt packed codes and their state (shape must be this layer's ``(N, K)``)."""
        if tuple(state.shape) != self.weight_shape:
            raise ValueError(f"quantized weight has shape {tuple(state.shape)}, layer expects "
                             f"{self.weight_shape} (out_features, in_features)")
        packed, state = _as_packed(packed, state)
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
        self.layout = "packed"
        self._settle_layout()
        self._sync_weight_state()

    def _settle_layout(self) -> None:
        """Permute the packed weight and ``weight_absmax`` into the layout this device wants:
        tiled16 where :func:`opsq._tiled16.tiled16_eligible`, else packed. The tensor objects
        are kept and given new storage (``.data =``; not a copy into the old storage, which a
        loaded state dict may share). Sharded (DTensor) and meta tensors are left as they are."""
        w = self._parameters.get("weight")
        absmax = self._parameters.get("weight_absmax")
        if absmax is None:
            absmax = self._buffers.get("weight_absmax")
        if (not self.is_quantized or w is None or absmax is None or w.device.type == "meta"
                or _is_dtensor(w) or _is_dtensor(absmax)):
            return
        want = _tiled16.layout_for(self.weight_shape, self.blocksize, w.device)
        if want == self.layout:
            return
        with torch.no_grad():
            w.data, absmax.data = _tiled16.to_layout(w.data, absmax.data, self.weight_shape,
                                                     want)
        self.layout = want

    def __getstate__(self) -> dict:
        w = self._parameters.get("weight")
        tiled = self.layout == "tiled16" and self.is_quantized
        bare = None
        # (on_full: FSDP2-sharded tensors are permuted shard by shard where shards hold whole
        # tiles, else gathered and re-sharded, as in state_dict())
        if isinstance(w, Params4bit) and w.bnb_quantized:
            data = (_tiled16.on_full(_tiled16.unpack_codes, w.data, self.weight_shape) if tiled
                    else w.data)
            bare = Params4bit(data, False, None, bnb_quantized=True, **w._attrs())
        elif tiled and w is not None:  # a plain parameter over the tiled bytes (FSDP1 views,
            # opsq.hf's loading hand-over, FSDP2's DTensor): its bytes leave un-packed too
            bare = nn.Parameter(_tiled16.on_full(_tiled16.unpack_codes, w.data,
                                                 self.weight_shape), requires_grad=False)
        state = _pickle_state(self, bare)
        if tiled:  # pickled bytes are bitsandbytes'; __setstate__ tiles them again if eligible
            state["layout"] = "packed"
            for store in ("_parameters", "_buffers"):
                held = dict(state[store])
                t = held.get("weight_absmax")
                if t is not None:
                    stats = _tiled16.on_full(_tiled16.unpack_absmax, t.data, self.weight_shape)
                    held["weight_absmax"] = (nn.Parameter(stats, requires_grad=False)
                                             if isinstance(t, nn.Parameter) else stats)
                state[store] = held
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._settle_layout()
        self._sync_weight_state()

    def _same_layout(self, packed: torch.Tensor, state: Fq.QuantState) -> bool:
        """Whether ``packed``/``state`` fit the current tensors exactly (in-place load; never
        into meta tensors, where a copy is a no-op: a meta layer takes the incoming tensors)."""
        return (self.is_quantized and self.weight.device.type != "meta"
                and packed.shape == self.weight.shape
                and packed.dtype == self.weight.dtype and state.nested == self.compress_statistics
                and state.blocksize == self.blocksize and state.quant_type == self.quant_type
                and state.absmax.shape == self.weight_absmax.shape
                and (not state.nested
                     or state.state2.absmax.shape == self.weight_nested_absmax.shape))

    def _copy_quantized(self, packed: torch.Tensor, state: Fq.QuantState) -> None:
        """Load into the existing tensors in place (keeps FSDP2's sharded parameters), in the
        layer's current layout."""
        packed, state = _as_packed(packed, state)
        absmax = state.absmax
        if self.layout == "tiled16":
            packed = _tiled16.on_full(_tiled16.repack_codes, packed, self.weight_shape)
            absmax = _tiled16.on_full(_tiled16.repack_absmax, absmax, self.weight_shape)
        _copy_into(self.weight, packed)
        _copy_into(self.weight_absmax, absmax)
        _copy_into(self.weight_quant_map, state.code)
        if state.nested:
            _copy_into(self.weight_nested_absmax, state.state2.absmax)
            _copy_into(self.weight_nested_quant_map, state.state2.code)
            _copy_into(self.weight_offset, state.offset.reshape(1))
        self.weight_dtype = state.dtype
        self._sync_weight_state()

    def _store_quantized(self, packed: torch.Tensor, state: Fq.QuantState) -> None:
        """Adopt packed codes and their state: in place where the layout is unchanged (the
        tensors keep their identity), else registered anew."""
        if self._same_layout(packed, state):
            self._copy_quantized(packed, state)
        else:
            _refuse_new_sharded_tensors(self, self._settings_text(), _describe_codes(
                packed.dtype, state.quant_type, state.blocksize, state.nested,
                state.absmax.shape))
            self._set_quantized(packed, state)

    def _settings_text(self) -> str:
        if not self.is_quantized:
            return f"a float weight not quantized yet ({tuple(self.weight.shape)})"
        return _describe_codes(self.weight.dtype, self.quant_type, self.blocksize,
                              self.compress_statistics, self.weight_absmax.shape)

    def _sync_weight_state(self) -> None:
        if isinstance(self.weight, Params4bit):
            attach_quant_state(self.weight, self.quant_state, self)
            self.weight.bnb_quantized = self.is_quantized

    def _weight_is_foreign(self, w) -> bool:
        return params4bit_is_foreign(self, w)

    def _apply(self, fn, recurse=True):
        self._adopt_foreign_weight()
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
        if device is not None:  # arrived somewhere: the layout that device wants
            self._settle_layout()
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
            key = prefix + "weight"
            if self.layout == "tiled16" and key in destination:
                # bitsandbytes' bytes (a new tensor, also with keep_vars; FSDP2 shards are
                # gathered, un-packed and re-sharded: every rank saves, as FSDP2 requires)
                destination[key] = _tiled16.on_full(_tiled16.unpack_codes,
                                                    destination[key].detach(),
                                                    self.weight_shape)
            for k, v in self.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _drop_internal_keys(self, state_dict, prefix)
        wkey = prefix + "weight"
        qs_keys = [k for k in state_dict if k.startswith(wkey + ".")]
        incoming = state_dict.get(wkey)
        if (not qs_keys and incoming is not None and self.is_quantized
                and tuple(incoming.shape) != self.weight_shape
                and tuple(incoming.shape) == tuple(self.weight.shape)
                and incoming.dtype == self.weight.dtype):
            # this layer's packed codes without any of their statistics (e.g.
            # torch.distributed.checkpoint's broadcast_from_rank0, which carries parameter
            # names only): never pair them with the old statistics, nor read them as a float
            # weight; report bitsandbytes' keys that are missing, as Linear8bitLt reports SCB
            state_dict.pop(wkey)
            missing_keys.extend(wkey + "." + k for k in self.quant_state.as_dict(packed=True))
            _load_without_weight(self, nn.Linear, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs)
            return
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
                self._store_quantized(packed, state)
            except (ValueError, TypeError, RuntimeError) as e:
                error_msgs.append(f"While loading {wkey}: {e}")
                return
            _load_without_weight(self, nn.Linear, state_dict, prefix, local_metadata, strict,
                                 missing_keys, unexpected_keys, error_msgs)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        _forget_internal_missing(self, prefix, missing_keys)

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
        if type(x) is torch.Tensor:
            # Params4bit.__torch_function__ (Python; it only matters for chunk / split) would
            # run for the dtype read and again for the op call, ~4-5 us each on every decode
            # step; with plain activations nothing else here has a __torch_function__.
            with torch._C.DisableTorchFunctionSubclass():
                return self._forward(x, absmax)
        return self._forward(x, absmax)

    def _forward(self, x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype != self.quant_storage:
            raise RuntimeError(
                f"Linear4bit: the packed weight arrived as {weight.dtype}, not its "
                f"quant_storage {self.quant_storage}: something cast it (e.g. an FSDP2 "
                "MixedPrecisionPolicy param_dtype different from a floating quant_storage); use "
                "quant_storage=torch.uint8 with FSDP2 mixed precision")
        cdt = self.compute_dtype
        if cdt is not None and not x.is_floating_point():  # (the cast in and out would hide it)
            raise TypeError(f"Linear4bit: input must be a floating-point tensor, got {x.dtype}")
        if cdt is not None and x.dtype != cdt and not torch.compiler.is_compiling():
            self.set_compute_type(x)
        xc = x if cdt is None or x.dtype == cdt else x.to(cdt)
        out = apply_op(
            "linear_4bit", xc, weight, self.weight_shape, _value(absmax), self.blocksize,
            self.quant_type, self.bias, _value(self.weight_nested_absmax),
            self.weight_nested_quant_map, self.weight_offset, self.nested_blocksize,
            self.layout)
        return out if xc is x else out.to(x.dtype)

    def set_compute_type(self, x: torch.Tensor) -> None:
        """bitsandbytes' advisory check of ``compute_dtype`` against an input ``x``: warns
        (``UserWarning``, once per layer) when a 16-bit input is computed in fp32, which takes
        dequantize + fp32 matmul instead of the fused 4-bit kernel (slow inference and training).
        Unlike bitsandbytes it never changes ``compute_dtype``: ``None`` (the default) already
        computes in the input's dtype. ``forward`` calls it, outside compiled graphs only."""
        if (self.compute_dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
                and not self.__dict__.get("_warned_compute_dtype")):
            self.__dict__["_warned_compute_dtype"] = True
            kind = "inference" if x.numel() == x.shape[-1] else "inference or training"
            warnings.warn(f"Linear4bit: input dtype is {x.dtype} but compute_dtype=torch.float32: "
                          "every call casts the input to fp32 and runs dequantize + an fp32 "
                          f"matmul instead of the fused 4-bit kernel (slow {kind}); use "
                          "compute_dtype=None (the input's dtype) or the input's dtype",
                          UserWarning, stacklevel=3)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, compress_statistics={self.compress_statistics}, "
                f"quant_storage={self.quant_storage}, quantized={self.is_quantized}, "
                f"layout={self.layout}")


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
