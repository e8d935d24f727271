"""LLM.int8 linear layer: ``Int8Params`` and ``Linear8bitLt`` (bitsandbytes' names, state-dict
format and construction semantics; the shared lifecycle is :mod:`opsq.nn._lifecycle`)."""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from .. import functional as Fq
from .._autograd import apply_op
from .._constants import (INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING,
                          LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING)
from ..meta._common import check_threshold
from ._lifecycle import (QuantizedWeightMixin, _apply_intent, _bits, _copy_into,
                         _drop_internal_keys, _forget_internal_missing, _held_apply,
                         _load_without_weight, _parse_to_device, _pickle_state,
                         _refuse_new_sharded_tensors, _same_memory,
                         _save_without_quantized, _set_tensor, _value)

__all__ = ["Int8Params", "Linear8bitLt"]


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
        data = self.data.clone()
        # CB is the weight's own bytes (as after quantization): the copy shares them too
        cb = (None if self.CB is None else
              data if _same_memory(self.CB, self.data) else self.CB.clone())
        return type(self)(data, self.requires_grad, self.has_fp16_weights, cb,
                          None if self.SCB is None else self.SCB.clone())

    def __reduce_ex__(self, proto):
        # SCB is pickled as a copy: in a layer it views the storage of the int32 bit-pattern
        # parameter ``weight_scb`` (see Params4bit.__reduce_ex__)
        return (Int8Params, (self.data, self.requires_grad, self.has_fp16_weights, self.CB,
                             None if self.SCB is None else self.SCB.clone()))

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


def int8_is_foreign(w, scb: Optional[torch.Tensor]) -> bool:
    """Int8 codes ``w`` whose row scales ``w.SCB`` are not the module's ``scb``."""
    return (isinstance(w, Int8Params) and w.dtype == torch.int8 and w.SCB is not None
            and not _same_memory(w.SCB, scb))


class Linear8bitLt(QuantizedWeightMixin, nn.Linear):
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
            compatibility (True warns: opsq's backward never keeps a dequantized weight).
            Positional arguments after ``has_fp16_weights`` follow either bitsandbytes order:
            a bool first is < 0.45's ``(memory_efficient_backward, threshold, index,
            device)``, anything else >= 0.45's ``(threshold, index, device)``; keyword
            arguments always mean what they name.
        threshold: outlier threshold, finite and >= 0 (0 disables the mixed-precision
            decomposition). Stored in ``state.threshold`` (bitsandbytes' ``MatmulLtState``),
            its one home: ``layer.threshold`` and ``layer.state.threshold`` are the same value.
        index: accepted for compatibility, unused.
        device: where the float weight is created.
    Shapes:
        input ``(..., K)`` fp16/bf16/fp32 → output ``(..., N)`` of the same dtype.
    Raises:
        ValueError: ``threshold`` negative, NaN or infinite. TypeError: too many positional
        arguments, or one given both by position and by keyword.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 has_fp16_weights: bool = True, *args, memory_efficient_backward: bool = False,
                 threshold: float = 0.0, index=None, device=None):
        if args:
            # the positional arguments after has_fp16_weights, in either bitsandbytes order:
            # < 0.45 (memory_efficient_backward, threshold, index, device), told apart by a
            # bool first; >= 0.45 (threshold, index, device). Keywords stay what they name.
            names = (("memory_efficient_backward", "threshold", "index", "device")
                     if isinstance(args[0], bool) else ("threshold", "index", "device"))
            if len(args) > len(names):
                raise TypeError(f"Linear8bitLt takes at most {4 + len(names)} positional "
                                f"arguments in this order, got {4 + len(args)}")
            given = dict(memory_efficient_backward=memory_efficient_backward,
                         threshold=threshold, index=index, device=device)
            defaults = dict(memory_efficient_backward=False, threshold=0.0, index=None,
                            device=None)
            for name, value in zip(names, args):
                if given[name] is not defaults[name] and given[name] != defaults[name]:
                    raise TypeError(f"Linear8bitLt got multiple values for argument {name!r}")
                given[name] = value
            memory_efficient_backward, threshold, index, device = (
                given["memory_efficient_backward"], given["threshold"], given["index"],
                given["device"])
        if memory_efficient_backward:
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

    _weight_types = (Int8Params,)

    def _carried_stats(self, w: Int8Params) -> Optional[torch.Tensor]:
        if w.dtype != torch.int8:
            return None
        if w.SCB is None:
            raise ValueError("weight: int8 codes need their row scales SCB (Int8Params(CB, "
                             "..., CB=CB, SCB=SCB))")
        return w.SCB

    def _take_settings(self, w: Int8Params) -> None:
        """A float ``Int8Params``'s ``has_fp16_weights`` becomes the layer's (not quantized
        yet): a trainable weight stays float (quantized per call), a frozen one is quantized on
        the next move, as bitsandbytes' ``Int8Params.to`` decides by its own flag."""
        self.has_fp16_weights = bool(w.has_fp16_weights)

    def _quantize_weight(self, w: Int8Params) -> bool:
        if w.has_fp16_weights:  # a trainable float weight: quantized per call from now on
            self._parameters["weight_scb"] = None
            self.has_fp16_weights = True
            return False
        CB, SCB, _ = Fq.int8_vectorwise_quant(
            w.data.contiguous().to(self._parameters["weight"].device))
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

    def _weight_is_foreign(self, w) -> bool:
        return int8_is_foreign(w, self.weight_scb)

    def _apply(self, fn, recurse=True):
        self._adopt_foreign_weight()
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
                        and CB.dtype == self.weight.dtype and self.weight.device.type != "meta" \
                        and SCB.numel() == self.out_features:  # in place: keeps FSDP2 shards
                    _copy_into(self.weight, CB)
                    _copy_into(self.weight_scb, SCB.reshape(-1).to(torch.float32))
                    self._sync_weight_state()
                else:
                    _refuse_new_sharded_tensors(
                        self, f"{tuple(self.weight.shape)} {self.weight.dtype}"
                        + ("" if self.is_quantized else " (not quantized yet)"),
                        f"int8 codes {tuple(CB.shape)} with {SCB.numel()} row scales")
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
        _forget_internal_missing(self, prefix, missing_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One op call. SCB None: a float weight (has_fp16_weights=True, or not yet moved),
        # quantized per call.
        return apply_op("int8_linear", x, self.weight, _value(self.weight_scb), self.bias,
                        self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}, "
                f"has_fp16_weights={self.has_fp16_weights}, quantized={self.is_quantized}")
