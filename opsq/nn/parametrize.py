"""Any parameter of any module in 4 bit (NF4 / FP4) through ``torch.nn.utils.parametrize``.

This is bitsandbytes' parametrize API (``bitsandbytes.nn.parametrize``, bitsandbytes 0.48+, as
transformers uses it for weights that are not ``nn.Linear``, e.g. Mixtral-style MoE experts of
shape ``(E, N, K)``): :func:`replace_parameter_4bit` quantizes ``module.<name>`` in place of the
parameter, and reading ``module.<name>`` afterwards returns its dequantization, computed by one
``torch.ops.opsq.dequantize_4bit`` call in :class:`Bnb4bitParametrization`.

State-dict format, the keys bitsandbytes writes for a parametrized parameter ``<name>``
(``n = numel`` of the original parameter, ``blocks = ceil(n / blocksize)``):

=============================================== ==============================================
``<name>``                                      packed codes, uint8 ``(ceil(n / 2), 1)``
``<name>.absmax``                               fp32 ``(blocks,)``; uint8 codes when nested
``<name>.quant_map``                            fp32 ``(16,)``, the NF4 / FP4 table
``<name>.nested_absmax``                        fp32 ``(ceil(blocks / 256),)``, nested only
``<name>.nested_quant_map``                     fp32 ``(256,)``, nested only
``<name>.quant_state.bitsandbytes__<nf4|fp4>``  uint8 JSON: quant_type, blocksize, dtype,
                                                shape and the nested fields
=============================================== ==============================================

Where opsq differs from bitsandbytes here, on purpose:

* the statistics live once, as buffers of the parametrization (``absmax``, ``nested_absmax``,
  ``nested_quant_map``, ``offset``); :attr:`Bnb4bitParametrization.quant_state` is rebuilt from
  them on each read, so ``.to(device)``, ``torch.func.functional_call`` and ``load_state_dict``
  cannot leave a stale copy behind;
* no forward hooks toggle ``torch.nn.utils.parametrize``'s global cache: a forward mutates no
  Python state and compiles with ``fullgraph=True``. Each read of ``module.<name>`` dequantizes
  once; wrap a block in ``torch.nn.utils.parametrize.cached()`` to reuse one dequantization;
* ``load_state_dict`` reads the keys above into a module on which :func:`replace_parameter_4bit`
  was called (bitsandbytes loads only through ``replace_parameter_4bit_prequantized``, also
  here); the checkpoint's quant_type, blocksize, nesting and dtype win, and a float tensor under
  ``<name>`` is quantized with the module's current settings;
* float casts of the module (``.half()``, ``.to(torch.bfloat16)``) leave the statistics and the
  dequantized dtype alone, and packed codes are always stored as uint8 (checkpoints in another
  ``quant_storage`` are read as bytes), so no float cast can touch packed bytes.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.utils.parametrize as P
from torch import nn

from .. import functional as Fq
from .._constants import FLOAT_DTYPES, NESTED_BLOCKSIZE, code_table, quant_map
from ..meta._common import ceil_div, check_blocksize, check_quant_type, check_type, numel_of
from ..meta.fourbit import check_dequantize_4bit

__all__ = ["Bnb4bitParametrization", "replace_parameter_4bit",
           "replace_parameter_4bit_prequantized"]

#: bitsandbytes' default blocksize for ``blocksize=None`` (64; it uses 128 only on ROCm).
DEFAULT_BLOCKSIZE = 64
#: Buffers of :class:`Bnb4bitParametrization`; the last three are None unless nested.
_STAT_NAMES = ("absmax", "nested_absmax", "nested_quant_map", "offset")


class Bnb4bitParametrization(nn.Module):
    """Dequantizes packed 4-bit codes to the original parameter (bitsandbytes'
    ``Bnb4bitParametrization``); registered by :func:`replace_parameter_4bit`.

    ``forward(packed)`` is one ``torch.ops.opsq.dequantize_4bit`` call that reads this module's
    buffers and attributes and changes nothing, so it traces under ``torch.compile`` and follows
    ``torch.func.functional_call``.

    Args:
        quant_state: the :class:`~opsq.functional.QuantState` of the packed codes (4-bit,
            plain or nested), e.g. from :func:`opsq.functional.quantize_4bit`.
    Attributes:
        shape: logical shape of the parameter (``tuple`` of ints, any number of dimensions).
        dtype: dtype of the dequantized parameter (fp16 / bf16 / fp32).
        blocksize: elements per absmax block, one of ``opsq._constants.BLOCKSIZES``.
        quant_type: "nf4" or "fp4".
        nested_blocksize: blocksize of the nested absmax quantization (256).
        absmax: buffer, fp32 ``(blocks,)``, or uint8 ``(blocks,)`` codes when nested.
        nested_absmax: buffer, fp32 ``(ceil(blocks / nested_blocksize),)`` or None.
        nested_quant_map: buffer, fp32 ``(256,)`` (the 8-bit dynamic map) or None.
        offset: buffer, fp32 ``(1,)``, the mean absmax subtracted before nesting, or None.
    Raises:
        ValueError: ``quant_state`` has a bad blocksize or quant_type.
        TypeError: its dtype is not fp16 / bf16 / fp32.
    """

    def __init__(self, quant_state: Fq.QuantState):
        super().__init__()
        for name in _STAT_NAMES:
            self.register_buffer(name, None)
        self._adopt(quant_state)

    def _adopt(self, state: Fq.QuantState) -> None:
        """Take over ``state``'s statistics and attributes (construction only)."""
        check_blocksize(state.blocksize)
        check_quant_type(state.quant_type)
        check_type(state.dtype in FLOAT_DTYPES,
                   lambda: f"dtype must be one of {list(FLOAT_DTYPES)}, got {state.dtype}")
        self.shape = tuple(int(s) for s in state.shape)
        self.dtype = state.dtype
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.nested_blocksize = state.state2.blocksize if state.nested else NESTED_BLOCKSIZE
        for name, value in zip(_STAT_NAMES, _stat_tensors(state)):
            self._buffers[name] = value

    @property
    def nested(self) -> bool:
        """Whether the absmax is nested (8-bit quantized, ``compress_statistics=True``)."""
        return self.nested_absmax is not None

    @property
    def quant_state(self) -> Fq.QuantState:
        """The :class:`~opsq.functional.QuantState` of the packed codes, built from the buffers
        (bitsandbytes keeps it as an attribute; here the buffers are the one home)."""
        state2 = offset = None
        if self.nested:
            state2 = Fq.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                   blocksize=self.nested_blocksize, dtype=torch.float32)
            offset = self.offset.reshape(())
        return Fq.QuantState(absmax=self.absmax, shape=self.shape,
                             code=quant_map(self.quant_type, self.absmax.device),
                             blocksize=self.blocksize, quant_type=self.quant_type,
                             dtype=self.dtype, offset=offset, state2=state2)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        """Dequantize.

        Args:
            packed: uint8 ``(ceil(n / 2), 1)`` codes, ``module.parametrizations[name].original``.
        Returns:
            ``self.shape`` in ``self.dtype``, on ``packed``'s device.
        """
        return torch.ops.opsq.dequantize_4bit(
            packed, self.absmax, self.blocksize, self.quant_type, list(self.shape), self.dtype,
            self.nested_absmax, self.nested_quant_map, self.offset, self.nested_blocksize)

    def _apply(self, fn, recurse=True):
        # Device moves apply to the statistics; dtype casts of the model (.half(), .to(bf16))
        # do not: a float16 absmax would lose bits and fail the op's dtype check.
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)
        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, dtype={self.dtype}, quant_type={self.quant_type}, "
                f"blocksize={self.blocksize}, nested={self.nested}")


def _stat_tensors(state: Fq.QuantState) -> tuple[Optional[torch.Tensor], ...]:
    """``(absmax, nested_absmax, nested_quant_map, offset)`` of a 4-bit state, as stored."""
    if not state.nested:
        return state.absmax, None, None, None
    return (state.absmax, state.state2.absmax, state.state2.code,
            state.offset.reshape(1).to(torch.float32))


def _as_packed_bytes(t: torch.Tensor, n: int) -> torch.Tensor:
    """Packed codes in any ``quant_storage`` dtype as the uint8 ``(ceil(n / 2), 1)`` column
    opsq stores (the bytes themselves, never a value conversion); the padding bytes of a wider
    storage dtype are dropped. A wrong size is left for the op's own check to report."""
    raw = t.detach().contiguous().reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
        need = ceil_div(n, 2)
        if need <= raw.numel() < need + t.element_size():
            raw = raw[:need]
    return raw.reshape(-1, 1)


def _validate(packed: torch.Tensor, state: Fq.QuantState) -> None:
    """The op's own checks of ``packed`` against ``state`` (absmax length, nested statistics)."""
    check_dequantize_4bit(packed, state.absmax, state.blocksize, state.quant_type,
                          list(state.shape), state.dtype, *_stat_tensors(state)[1:],
                          state.state2.blocksize if state.nested else NESTED_BLOCKSIZE)


def _check_target(module: Any, param_name: Any) -> nn.Parameter:
    """The parameter ``module.<param_name>``, or an exception naming the bad argument."""
    check_type(isinstance(module, nn.Module),
               lambda: f"module must be an nn.Module, got {type(module).__name__}")
    check_type(isinstance(param_name, str),
               lambda: f"param_name must be a str, got {type(param_name).__name__}")
    cls = P.type_before_parametrizations(module).__name__
    if P.is_parametrized(module, param_name):
        kinds = [type(p).__name__ for p in module.parametrizations[param_name]]
        raise ValueError(f"param_name {param_name!r} of {cls} is already parametrized ({kinds}); "
                         "replace_parameter_4bit needs a plain nn.Parameter")
    params = [n for n, p in module._parameters.items() if p is not None]
    if param_name not in params:
        if getattr(module, param_name, None) is not None:
            raise TypeError(f"param_name {param_name!r} of {cls} must name an nn.Parameter, got "
                            f"a {type(getattr(module, param_name)).__name__} (buffers, "
                            "properties and submodules are not supported)")
        raise AttributeError(f"param_name must name a parameter of {cls} (one of {params}), "
                             f"got {param_name!r}")
    return module._parameters[param_name]


def _register(module: nn.Module, param_name: str, packed: torch.Tensor,
              state: Fq.QuantState) -> None:
    """Swap ``module.<param_name>`` for ``packed`` under a :class:`Bnb4bitParametrization`."""
    parametrization = Bnb4bitParametrization(state)
    setattr(module, param_name, nn.Parameter(packed, requires_grad=False))
    # unsafe=True: the parametrization changes dtype (uint8 -> float) and shape by design.
    P.register_parametrization(module, param_name, parametrization, unsafe=True)
    module.register_state_dict_post_hook(
        functools.partial(_state_dict_post_hook, param_name=param_name))
    module.register_load_state_dict_pre_hook(
        functools.partial(_load_state_dict_pre_hook, param_name=param_name))


def replace_parameter_4bit(module: nn.Module, param_name: str,
                           compress_statistics: bool = False, quant_type: str = "nf4",
                           blocksize: Optional[int] = None) -> None:
    """Quantize ``module.<param_name>`` to 4 bit in place; reading it afterwards dequantizes.

    bitsandbytes 0.48+'s ``bitsandbytes.nn.parametrize.replace_parameter_4bit`` (same name,
    arguments, defaults and state-dict keys; see the module docstring). The parameter is
    replaced by its packed codes, uint8 ``(ceil(n / 2), 1)`` at
    ``module.parametrizations[param_name].original`` (a frozen ``nn.Parameter``), and a
    :class:`Bnb4bitParametrization` holding the statistics; ``module.<param_name>`` then returns
    the dequantized tensor of the original shape and dtype (NF4 / FP4 blockwise, QLoRA,
    Dettmers et al. 2023), without gradient. Assigning to ``module.<param_name>`` is not
    supported afterwards; load a state dict instead.

    Args:
        module: the module owning the parameter (any ``nn.Module``).
        param_name: name of a direct ``nn.Parameter`` of ``module`` (not dotted), of any shape
            (e.g. ``(N, K)`` or MoE experts ``(E, N, K)``) and dtype fp16 / bf16 / fp32.
        compress_statistics: nested absmax (8-bit blockwise, blocksize 256, offset = mean).
        quant_type: "nf4" or "fp4".
        blocksize: elements per absmax block, one of 32..4096 (powers of two); None means 64,
            bitsandbytes' default.
    Raises:
        TypeError: ``module`` is not an ``nn.Module``, ``param_name`` not a str or names a
            buffer / non-parameter attribute, the parameter is not fp16 / bf16 / fp32, or
            ``compress_statistics`` is not a bool.
        AttributeError: ``module`` has no parameter ``param_name``.
        ValueError: bad ``quant_type`` or ``blocksize``, or ``param_name`` is already
            parametrized.
    """
    param = _check_target(module, param_name)
    check_type(param.dtype in FLOAT_DTYPES,
               lambda: f"param_name {param_name!r} must be a parameter with dtype in "
                       f"{list(FLOAT_DTYPES)}, got {param.dtype}")
    check_type(isinstance(compress_statistics, bool),
               lambda: "compress_statistics must be a bool, got "
                       f"{type(compress_statistics).__name__}")
    check_quant_type(quant_type)
    if blocksize is None:
        blocksize = DEFAULT_BLOCKSIZE
    check_blocksize(blocksize)
    with torch.no_grad():
        packed, state = Fq.quantize_4bit(param.detach().contiguous(), blocksize=blocksize,
                                         compress_statistics=compress_statistics,
                                         quant_type=quant_type)
    _register(module, param_name, packed, state)


def replace_parameter_4bit_prequantized(module: nn.Module, param_name: str,
                                        qs_dict: dict[str, Any], device) -> None:
    """Like :func:`replace_parameter_4bit` for a parameter that already holds packed codes
    (bitsandbytes 0.48+'s loader path, as transformers uses it for pre-quantized checkpoints).

    Args:
        module: the module owning the parameter.
        param_name: name of a direct ``nn.Parameter`` of ``module`` holding the packed codes,
            ``(ceil(n / 2 / itemsize), 1)`` in any ``quant_storage`` dtype (read as bytes).
        qs_dict: the bitsandbytes state-dict entries of that parameter (``absmax``,
            ``quant_map``, ``quant_state.bitsandbytes__<nf4|fp4>``, nested entries; any key
            prefix such as ``"weight."`` is ignored), as :meth:`QuantState.from_dict` reads.
        device: where the codes and statistics go.
    Raises:
        TypeError / AttributeError / ValueError: as :func:`replace_parameter_4bit` for
            ``module`` and ``param_name``; ValueError for malformed ``qs_dict``; RuntimeError
            when the codes or absmax do not fit the state's shape and blocksize.
    """
    param = _check_target(module, param_name)
    state = Fq.QuantState.from_dict(qs_dict, device=device)
    packed = _as_packed_bytes(param.detach().to(device), numel_of(state.shape))
    _validate(packed, state)
    _register(module, param_name, packed, state)


# ---- state dict (hooks on the owning module) ----------------------------------------------------
def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata,
                          *, param_name: str) -> None:
    """Rewrite ``parametrizations.<name>.original`` / ``parametrizations.<name>.0.*`` into
    bitsandbytes' keys ``<name>``, ``<name>.absmax``, ... (module docstring)."""
    base = f"{prefix}parametrizations.{param_name}."
    if base + "original" not in state_dict:
        return
    parametrization = module.parametrizations[param_name][0]
    packed = state_dict.pop(base + "original")
    stored = {n: state_dict.pop(base + "0." + n, None) for n in _STAT_NAMES}
    key = prefix + param_name
    state_dict[key] = packed
    for k, v in parametrization.quant_state.as_dict(packed=True).items():
        # the module's own state-dict entries where there are some (detached like the rest)
        state_dict[f"{key}.{k}"] = stored[k] if stored.get(k) is not None else v


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata,
                              strict, missing_keys, unexpected_keys, error_msgs, *,
                              param_name: str) -> None:
    """Read bitsandbytes' keys for ``<name>`` into the native entries
    ``parametrizations.<name>.original`` / ``parametrizations.<name>.0.*``, resizing the
    module's tensors first where the checkpoint's layout differs (blocksize, nesting)."""
    key = prefix + param_name
    stat_keys = [k for k in state_dict if k.startswith(key + ".")]
    if key not in state_dict:
        if stat_keys:
            for k in stat_keys:
                state_dict.pop(k)
            missing_keys.append(key)
        return
    incoming = state_dict.pop(key)
    stats = {k[len(key) + 1:]: state_dict.pop(k) for k in stat_keys}
    plist = module.parametrizations[param_name]
    parametrization = plist[0]
    own = plist.original.device
    device = incoming.device if own.type == "meta" else own
    try:
        packed, state = _incoming_state(parametrization, key, incoming, stats, device)
    except (ValueError, TypeError, RuntimeError) as e:
        error_msgs.append(f"While loading {key}: {e}")
        return
    # Same shapes and dtypes as the incoming tensors, so torch's own copy_ (or assign=True)
    # finishes the load and keeps tensor identity where the layout already fits.
    if plist.original.shape != packed.shape or plist.original.dtype != packed.dtype:
        plist._parameters["original"] = nn.Parameter(
            torch.empty_like(packed, device=own), requires_grad=False)
    base = f"{prefix}parametrizations.{param_name}."
    state_dict[base + "original"] = packed
    for name, value in zip(_STAT_NAMES, _stat_tensors(state)):
        current = parametrization._buffers[name]
        if value is None:
            parametrization._buffers[name] = None
            continue
        if current is None or current.shape != value.shape or current.dtype != value.dtype:
            parametrization._buffers[name] = torch.empty_like(value, device=own)
        state_dict[base + "0." + name] = value
    parametrization.dtype = state.dtype
    parametrization.blocksize = state.blocksize
    parametrization.quant_type = state.quant_type
    parametrization.nested_blocksize = (state.state2.blocksize if state.nested
                                        else NESTED_BLOCKSIZE)


def _incoming_state(parametrization: Bnb4bitParametrization, key: str, incoming, stats: dict,
                    device) -> tuple[torch.Tensor, Fq.QuantState]:
    """``(uint8 packed codes, QuantState)`` on ``device`` for a checkpoint's ``<name>`` entry
    and its ``<name>.*`` statistics, validated against the parametrized shape.

    Raises:
        ValueError: malformed statistics, packed codes without statistics, another shape, or a
            quant_map that is not the NF4 / FP4 table the op decodes with.
        TypeError / RuntimeError: the op's checks (dtype, absmax length, code count).
    """
    expected = parametrization.shape
    if not isinstance(incoming, torch.Tensor):
        raise ValueError(f"expected a tensor, got {type(incoming).__name__}")
    if not stats:
        if not incoming.is_floating_point():
            raise ValueError(f"{key} holds packed {incoming.dtype} codes but the state dict has "
                             f"no {key}.absmax / {key}.quant_state.* entries")
        if tuple(incoming.shape) != expected:
            raise ValueError(f"a float {key} of shape {tuple(incoming.shape)} does not fit: "
                             f"expected {expected}")
        with torch.no_grad():
            return Fq.quantize_4bit(incoming.detach().to(device).contiguous(),
                                    blocksize=parametrization.blocksize,
                                    compress_statistics=parametrization.nested,
                                    quant_type=parametrization.quant_type)
    state = Fq.QuantState.from_dict(stats, device=device)
    if tuple(state.shape) != expected:
        raise ValueError(f"the checkpoint's quant_state shape {tuple(state.shape)} is not this "
                         f"parameter's {expected}")
    table = code_table(state.quant_type, "cpu")
    if state.code.shape != table.shape or not torch.allclose(state.code.detach().cpu().float(),
                                                             table, rtol=0, atol=1e-6):
        raise ValueError(f"{key}.quant_map is not the {state.quant_type} code table, which the "
                         f"dequantization uses; got {state.code.tolist()}")
    packed = _as_packed_bytes(incoming.to(device), numel_of(expected))
    _validate(packed, state)
    return packed, state

