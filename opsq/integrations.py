"""transformers-style loading helpers: build a model without memory, swap its linear layers for
opsq's quantized layers, and fill them from float or bitsandbytes-format quantized checkpoints.

The usual flow::

    with opsq.integrations.init_empty_weights():          # parameters on "meta", buffers real
        model = AutoModelForCausalLM.from_config(config)
    skip = opsq.integrations.get_keys_to_not_convert(model)   # tied / output embeddings
    opsq.integrations.replace_with_bnb_linear(model, skip, BitsAndBytesConfig(load_in_4bit=True))
    opsq.integrations.load_quantized_state_dict(model, state_dict, device="cuda")

``quantization_config`` is transformers' ``BitsAndBytesConfig``, any object with its attribute
names, or a dict of them. transformers is not imported here: its GPT-2 style ``Conv1D`` is
recognised when transformers is already loaded (as it is when the model is a transformers model).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from . import functional as Fq
from ._constants import FLOAT_DTYPES, QUANT_STORAGE_DTYPES
from .layout_utils import maybe_rearrange_weight
from .meta.fourbit import packed_numel
from .nn.linear4bit import Linear4bit, Params4bit
from .nn.linear8bit import Int8Params, Linear8bitLt

__all__ = ["init_empty_weights", "replace_with_bnb_linear", "replace_with_opsq_linear",
           "set_module_quantized_tensor_to_device", "get_keys_to_not_convert",
           "load_quantized_state_dict", "should_convert_module", "enable_transformers",
           "plain_weights"]


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False):
    """Context in which new modules get their parameters on the meta device (no memory, no
    initialisation compute); buffers stay real unless ``include_buffers`` (then everything is
    created on meta, like ``with torch.device("meta")``). Real buffers matter for buffers that a
    checkpoint does not hold, such as rotary embeddings' ``inv_freq``.

    Parameter subclasses (``Params4bit``, ``Int8Params``) are left as created.
    """
    if include_buffers:
        with torch.device("meta"):
            yield
        return
    original = nn.Module.register_parameter

    def register_parameter(module, name, param):
        original(module, name, param)
        if type(param) is nn.Parameter and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.detach().to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = original


# ---- configuration --------------------------------------------------------------------------
def _dtype(value, name: str, allowed: Sequence[torch.dtype]) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if not isinstance(value, torch.dtype) or value not in allowed:
        raise ValueError(f"quantization_config.{name} must be one of {list(allowed)}, got "
                         f"{value!r}")
    return value


class _Settings:
    """The fields of a ``BitsAndBytesConfig`` that opsq's layers use, validated."""

    def __init__(self, config: Any):
        if config is None:
            raise ValueError("quantization_config is required (a BitsAndBytesConfig, an object "
                             "with its attributes, or a dict with load_in_4bit / load_in_8bit)")
        get = config.get if isinstance(config, dict) else \
            (lambda key, default=None: getattr(config, key, default))
        self.load_in_4bit = bool(get("load_in_4bit", False))
        self.load_in_8bit = bool(get("load_in_8bit", False))
        if self.load_in_4bit == self.load_in_8bit:
            raise ValueError("quantization_config must set exactly one of load_in_4bit and "
                             "load_in_8bit")
        self.quant_type = get("bnb_4bit_quant_type", "fp4")
        self.compute_dtype = _dtype(get("bnb_4bit_compute_dtype", None),
                                    "bnb_4bit_compute_dtype", FLOAT_DTYPES)
        self.compress_statistics = bool(get("bnb_4bit_use_double_quant", False))
        self.quant_storage = _dtype(get("bnb_4bit_quant_storage", None) or torch.uint8,
                                    "bnb_4bit_quant_storage", QUANT_STORAGE_DTYPES)
        self.blocksize = int(get("bnb_4bit_blocksize", 64) or 64)
        self.threshold = float(get("llm_int8_threshold", 6.0))
        self.has_fp16_weights = bool(get("llm_int8_has_fp16_weight", False))
        self.skip_modules = list(get("llm_int8_skip_modules", None) or [])

    def new_layer(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        if self.load_in_4bit:
            return Linear4bit(in_features, out_features, bias, self.compute_dtype,
                              self.compress_statistics, self.quant_type, self.quant_storage,
                              device="meta", blocksize=self.blocksize)
        return Linear8bitLt(in_features, out_features, bias, self.has_fp16_weights,
                            threshold=self.threshold, device="meta")


# ---- replacement ----------------------------------------------------------------------------
def should_convert_module(name: str, modules_to_not_convert: Optional[Iterable[str]]) -> bool:
    """False when an entry of ``modules_to_not_convert`` names ``name`` or one of its parents
    (or a run of dotted components inside it): ``"lm_head"`` matches ``"lm_head"`` and
    ``"model.lm_head"``, ``"attn"`` matches ``"h.0.attn.c_proj"``; ``"layer.1"`` does not match
    ``"layer.11"`` and ``"mlp.gate"`` does not match ``"mlp.gate_proj"``."""
    padded = f".{name}."
    return not any(f".{key}." in padded for key in (modules_to_not_convert or ()))


def _conv1d_class():
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _is_conv1d(cls) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(cls, type) and issubclass(cls, conv1d)


def replace_with_bnb_linear(model: nn.Module,
                            modules_to_not_convert: Optional[Iterable[str]] = None,
                            quantization_config: Any = None) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` (exact type) and transformers ``Conv1D`` of
    ``model`` by ``Linear4bit`` (``load_in_4bit``) or ``Linear8bitLt`` (``load_in_8bit``).

    New layers are created on the meta device (nothing is allocated), frozen
    (``requires_grad=False``) and remember the replaced class in ``source_cls`` (a ``Conv1D``
    weight is ``(in, out)``: :func:`set_module_quantized_tensor_to_device` transposes it). A layer
    whose weight was already real is quantized at once on its device (its bias copied).

    Args:
        model: any ``nn.Module``.
        modules_to_not_convert: names kept in full precision (see :func:`should_convert_module`);
            default ``["lm_head"]``; ``quantization_config.llm_int8_skip_modules`` is added.
        quantization_config: see the module docstring (``load_in_4bit`` / ``load_in_8bit``,
            ``bnb_4bit_quant_type``, ``bnb_4bit_compute_dtype``, ``bnb_4bit_use_double_quant``,
            ``bnb_4bit_quant_storage``, ``llm_int8_threshold``, ``llm_int8_has_fp16_weight``).
    Returns:
        ``model``.
    Raises:
        ValueError: no or contradictory ``quantization_config``, bad dtypes in it.
    """
    settings = _Settings(quantization_config)
    skip = list(["lm_head"] if modules_to_not_convert is None else modules_to_not_convert)
    skip += settings.skip_modules
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, skip):
            continue
        if type(module) is nn.Linear:
            in_f, out_f = module.in_features, module.out_features
        elif _is_conv1d(type(module)):
            in_f, out_f = module.weight.shape
        else:
            continue
        new = settings.new_layer(in_f, out_f, module.bias is not None)
        new.source_cls = type(module)
        new.requires_grad_(False)
        if module.weight.device.type != "meta":
            device = module.weight.device
            set_module_quantized_tensor_to_device(new, "weight", device,
                                                  module.weight.detach())
            if module.bias is not None:
                set_module_quantized_tensor_to_device(new, "bias", device,
                                                      module.bias.detach())
        model.set_submodule(name, new)
    return model


#: Alias with opsq's name.
replace_with_opsq_linear = replace_with_bnb_linear


# ---- setting tensors --------------------------------------------------------------------------
def _resolve(module: nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    *path, name = tensor_name.split(".")
    for part in path:
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            raise ValueError(f"tensor_name {tensor_name!r}: {type(module).__name__} has no "
                             f"submodule {part!r}")
        module = child
    if name not in module._parameters and name not in module._buffers:
        raise ValueError(f"tensor_name {tensor_name!r}: {type(module).__name__} has no "
                         f"parameter or buffer {name!r}")
    return module, name


def _float_weight(layer: nn.Linear, value: torch.Tensor, device, hint: str) -> torch.Tensor:
    """A float ``(out_features, in_features)`` weight on ``device``: checked, and transposed
    from a ``Conv1D`` source's ``(in, out)``."""
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{type(layer).__name__}'s weight must be fp16/bf16/fp32 to quantize, "
                        f"got {value.dtype} {hint}")
    if _is_conv1d(getattr(layer, "source_cls", None)):
        value = value.t()
    shape = (layer.out_features, layer.in_features)
    if tuple(value.shape) != shape:
        raise ValueError(f"weight must have shape {shape} (out_features, in_features), got "
                         f"{tuple(value.shape)}")
    return value.detach().contiguous().to(device)


def _set_4bit_weight(layer: Linear4bit, device, value: torch.Tensor,
                     quantized_stats: Optional[dict]) -> None:
    N, K = layer.out_features, layer.in_features
    if quantized_stats:  # pre-quantized: packed codes + bitsandbytes' statistics
        if value.dtype not in QUANT_STORAGE_DTYPES:
            raise TypeError(f"a pre-quantized 4-bit weight must be packed storage "
                            f"({list(QUANT_STORAGE_DTYPES)}), got {value.dtype}")
        expected = packed_numel(N * K, value.element_size())
        if value.numel() != expected:
            raise ValueError(f"packed 4-bit weight for ({N}, {K}) in {value.dtype} must have "
                             f"{expected} elements, got {value.numel()} ({tuple(value.shape)})")
        state = Fq.QuantState.from_dict(quantized_stats, device=device)
        layer._set_quantized(value.detach().to(device).reshape(expected, 1), state)
        return
    value = _float_weight(layer, value, device, "(a packed weight needs its quantized_stats)")
    packed, state = Fq.quantize_4bit(value,
                                     blocksize=layer.blocksize,
                                     compress_statistics=layer.compress_statistics,
                                     quant_type=layer.quant_type,
                                     quant_storage=layer.quant_storage)
    layer._set_quantized(packed, state)


def _set_8bit_weight(layer: Linear8bitLt, device, value: torch.Tensor,
                     quantized_stats: Optional[dict], fp16_statistics) -> None:
    N, K = layer.out_features, layer.in_features
    stats = dict(quantized_stats or {})
    SCB = fp16_statistics if fp16_statistics is not None else stats.get("SCB")
    if value.dtype == torch.int8:
        if SCB is None:
            raise ValueError("an int8 weight needs its row scales: pass fp16_statistics (the "
                             "checkpoint's SCB)")
        if "weight_format" in stats:
            sd = {"weight": value, "weight_format": stats["weight_format"]}
            maybe_rearrange_weight(sd, "", shape=(N, K))
            value = sd["weight"]
        if tuple(value.shape) != (N, K):
            raise ValueError(f"int8 weight must have shape ({N}, {K}), got {tuple(value.shape)}")
        layer._set_quantized(value.detach().to(device), SCB.detach().to(device))
        return
    if SCB is not None:
        raise TypeError(f"fp16_statistics (SCB) were given with a {value.dtype} weight; a "
                        "pre-quantized Linear8bitLt weight must be int8")
    value = _float_weight(layer, value, device, "(or int8 with its SCB)")
    if layer.has_fp16_weights:
        layer.weight = Int8Params(value, requires_grad=False, has_fp16_weights=True)
        return
    CB, SCB, _ = Fq.int8_vectorwise_quant(value)
    layer._set_quantized(CB, SCB)


def set_module_quantized_tensor_to_device(module: nn.Module, tensor_name: str, device,
                                          value: Optional[torch.Tensor] = None,
                                          quantized_stats: Optional[dict] = None,
                                          fp16_statistics: Optional[torch.Tensor] = None) -> None:
    """Set one parameter or buffer of ``module`` on ``device``, quantizing where the owner is an
    opsq quantized layer.

    * ``Linear4bit.weight``: a float ``value`` is quantized with the layer's settings (a
      ``Conv1D`` source's ``(in, out)`` weight is transposed first); packed codes need
      ``quantized_stats``, the bitsandbytes entries of that weight (``absmax``, ``quant_map``,
      ``quant_state.bitsandbytes__<type>``, nested ones; prefixes such as ``"weight."`` ignored).
    * ``Linear8bitLt.weight``: an int8 ``value`` needs ``fp16_statistics`` (the ``SCB`` row scales,
      or ``quantized_stats["SCB"]``; ``quantized_stats["weight_format"]`` undoes a legacy tiled
      layout); a float one is quantized (kept float with ``has_fp16_weights``).
    * anything else: ``value`` moved to ``device`` as is (a parameter keeps ``requires_grad``).

    Args:
        module: the root (or owning) module. tensor_name: dotted name below ``module``.
        device: target device. value: the tensor; None re-uses the current (non-meta) one (for
            an already quantized layer's weight: moves the whole layer to ``device``).
    Raises:
        ValueError: unknown ``tensor_name``; no ``value`` for a meta tensor; shape mismatches;
            int8 without scales; ``quantized_stats`` for a tensor that is not quantized.
        TypeError: a dtype that does not fit (float weight with scales, packed weight without
            statistics, integer weight for a 4-bit layer).
    """
    owner, name = _resolve(module, tensor_name)
    device = torch.device(device)
    current = getattr(owner, name)
    quantized_owner = isinstance(owner, (Linear4bit, Linear8bitLt)) and owner.is_quantized
    if value is None and name == "weight" and quantized_owner:
        owner.to(device)  # a device move of the quantized layer
        return
    if value is None:
        if current is None or current.device.type == "meta":
            raise ValueError(f"{tensor_name} is on the meta device: a value is required")
        value = current.data
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"value must be a tensor, got {type(value).__name__}")
    if name == "weight" and isinstance(owner, Linear4bit):
        _set_4bit_weight(owner, device, value, quantized_stats)
        return
    if name == "weight" and isinstance(owner, Linear8bitLt):
        _set_8bit_weight(owner, device, value, quantized_stats, fp16_statistics)
        return
    if quantized_stats or fp16_statistics is not None:
        raise ValueError(f"{tensor_name} is not the weight of a quantized layer; "
                         "quantized_stats / fp16_statistics do not apply")
    if current is not None and tuple(current.shape) != tuple(value.shape):
        raise ValueError(f"{tensor_name} must have shape {tuple(current.shape)}, got "
                         f"{tuple(value.shape)}")
    new = value.detach().to(device)
    if name in owner._parameters:
        grad = bool(current is not None and current.requires_grad and new.is_floating_point())
        owner._parameters[name] = nn.Parameter(new, requires_grad=grad)
    else:
        owner._buffers[name] = new


# ---- which modules to keep ----------------------------------------------------------------------
def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names sharing one parameter object, plus the model's declared ties
    (transformers' ``all_tied_weights_keys``)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    groups = [names for names in by_id.values() if len(names) > 1]
    declared = getattr(model, "all_tied_weights_keys", None)
    if isinstance(declared, dict):
        groups += [[k, v] for k, v in declared.items() if isinstance(v, str)]
    return groups


def get_keys_to_not_convert(model: nn.Module) -> list[str]:
    """Module names to keep in full precision: the owners of tied parameters (e.g. an input
    embedding tied to ``lm_head``) and the output embedding (``model.get_output_embeddings()``,
    when the model has one). Containers are never listed (a tie between a container's own tensor
    and a leaf's lists the leaf only), so no unrelated layer is kept by accident. Without any tie or
    output embedding, the owner of the last parameter is kept (transformers' rule).

    Returns:
        sorted module names, usable as ``modules_to_not_convert``.
    """
    modules = dict(model.named_modules())
    keep: set[str] = set()
    for group in _tied_groups(model):
        for pname in group:
            owner = pname.rpartition(".")[0]
            if owner in modules and not any(True for _ in modules[owner].children()):
                keep.add(owner)
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        keep.update(name for name, m in modules.items() if m is out_emb)
    if not keep:
        params = list(model.named_parameters())
        if params:
            keep.add(params[-1][0].rpartition(".")[0])
    return sorted(keep)


# ---- whole checkpoints --------------------------------------------------------------------------
def load_quantized_state_dict(model: nn.Module, state_dict: dict, device="cpu",
                              strict: bool = True) -> tuple[list[str], list[str]]:
    """Fill a (meta) model prepared by :func:`replace_with_bnb_linear` from a checkpoint, through
    :func:`set_module_quantized_tensor_to_device`: bitsandbytes-format quantized entries are
    adopted as they are, float weights of quantized layers are quantized, everything else is
    moved to ``device``. Tied parameters stay tied (one object), and a checkpoint may hold a tied
    tensor under one of its names only.

    Returns:
        ``(missing_keys, unexpected_keys)``; missing lists every parameter or persistent buffer
        still on meta.
    Raises:
        RuntimeError: a tensor that failed to load (the message names the key and the
            reason); with ``strict`` also missing or unexpected keys, or a non-persistent buffer
            left on meta (build the model under :func:`init_empty_weights`).
    """
    sd = dict(state_dict)
    unexpected: list[str] = []
    errors: list[str] = []

    def attempt(key, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except (ValueError, TypeError, RuntimeError) as e:
            errors.append(f"{key}: {e}")

    for name, layer in model.named_modules():
        if not isinstance(layer, (Linear4bit, Linear8bitLt)):
            continue
        wkey = f"{name}.weight" if name else "weight"
        if wkey not in sd:
            continue
        value = sd.pop(wkey)
        if isinstance(layer, Linear4bit):
            stats = {k[len(wkey) + 1:]: sd.pop(k) for k in list(sd) if k.startswith(wkey + ".")}
            attempt(wkey, set_module_quantized_tensor_to_device, layer, "weight", device, value,
                    quantized_stats=stats or None)
        else:
            base = wkey[:-len("weight")]
            scb, fmt = sd.pop(base + "SCB", None), sd.pop(base + "weight_format", None)
            attempt(wkey, set_module_quantized_tensor_to_device, layer, "weight", device, value,
                    quantized_stats=None if fmt is None else {"weight_format": fmt},
                    fp16_statistics=scb)

    tied = {n: g for g in _tied_groups(model) for n in g}
    done: set[str] = set()
    for key, value in sd.items():
        if key in done:
            continue
        try:
            owner, attr = _resolve(model, key)
        except ValueError:
            unexpected.append(key)
            continue
        attempt(key, set_module_quantized_tensor_to_device, owner, attr, device, value)
        new = getattr(owner, attr)
        for other in tied.get(key, [key]):
            if other != key and isinstance(new, nn.Parameter):
                other_owner, other_attr = _resolve(model, other)
                other_owner._parameters[other_attr] = new
            done.add(other)

    missing = [n for n, t in model.state_dict(keep_vars=True).items()
               if isinstance(t, torch.Tensor) and t.device.type == "meta"]
    meta_buffers = [n for n, b in model.named_buffers() if b.device.type == "meta"
                    and n not in missing]
    if errors or (strict and (missing or unexpected or meta_buffers)):
        raise RuntimeError("load_quantized_state_dict: "
                           + "; ".join(f"{what}: {items}" for what, items in (
                               ("errors", errors), ("missing keys", missing),
                               ("unexpected keys", unexpected),
                               ("buffers left on the meta device (not in the checkpoint; build "
                                "the model under init_empty_weights())", meta_buffers))
                               if items))
    return missing, unexpected


# ---- torch.export ---------------------------------------------------------------------------------
def plain_weights(program: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """``program`` (an ``ExportedProgram`` of a model with opsq layers) with its quantized weights
    (``Params4bit`` / ``Int8Params``) re-wrapped as plain frozen ``nn.Parameter`` over the same
    storage, in place; returns ``program``.

    The graph reads the weights only as tensors (one opsq op per layer takes the codes and the
    statistics as arguments), so nothing changes for ``program.module()``. AOTInductor
    (``torch._inductor.aoti_compile_and_package``) needs it on torch 2.11, whose fake-tensor
    propagation refuses tensor subclasses among a program's constants; torch 2.13 accepts both.
    """
    state = program.state_dict
    for name, value in list(state.items()):
        if isinstance(value, (Params4bit, Int8Params)):
            state[name] = nn.Parameter(torch.Tensor._make_subclass(torch.Tensor, value.data),
                                       requires_grad=False)
    return program


# ---- transformers' from_pretrained ---------------------------------------------------------------
def enable_transformers() -> None:
    """Route transformers' bitsandbytes quantization (``BitsAndBytesConfig``, checkpoints saved
    with ``"quant_method": "bitsandbytes"``) through opsq: :func:`opsq.hf.enable_transformers`,
    which imports transformers (this module does not)."""
    from .hf import enable_transformers as enable
    enable()
