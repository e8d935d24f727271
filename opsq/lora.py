"""LoRA adapters on (quantized) linear layers: the QLoRA recipe (Dettmers et al., "QLoRA:
Efficient Finetuning of Quantized LLMs", 2023) on top of Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", 2021.

Two ways to put adapters on opsq's :class:`~opsq.nn.Linear4bit` / :class:`~opsq.nn.Linear8bitLt`:

* This module's own small implementation. ``LoRALinear(base)`` computes
  ``base(x) + dropout(x) @ lora_A.T @ lora_B.T * alpha / r``. The base layer (an
  :class:`~opsq.nn.Linear4bit`, :class:`~opsq.nn.Linear8bitLt` or any ``nn.Linear``) stays
  frozen; only ``lora_A`` ``(r, K)`` and ``lora_B`` ``(N, r)`` train, in their own dtype (fp32 by
  default, as PEFT keeps them) whatever the base's compute dtype. ``lora_B`` starts at zero, so a
  freshly wrapped model computes exactly what the base computes. Everything is plain modules and
  opsq ops: a model with adapters compiles with ``torch.compile(fullgraph=True)``, forward and
  backward, and works with ``torch.utils.checkpoint``. No merging.
* PEFT (``pip install "opsq[peft]"``), through :func:`peft_config`. PEFT picks the LoRA layer
  for each target by its class; its bitsandbytes layers match only bitsandbytes' classes, so on
  its own PEFT wraps opsq's layers (``nn.Linear`` subclasses) in its plain ``lora.Linear``:
  training works, but merging adds a float delta to the packed weight and fails (PEFT 0.21:
  a size mismatch for 4-bit, a Float-to-Char cast error for int8).
  ``peft_config(LoraConfig(...))`` registers opsq's PEFT layers (:class:`PeftLinear4bit`,
  :class:`PeftLinear8bitLt`) through ``LoraConfig``'s custom-module hook
  (``_register_custom_module``, PEFT's documented, experimental API for custom layers). They
  train like PEFT's bitsandbytes layers (each adapter's output cast to the base output's dtype
  before it is added, outside autocast), and ``merge`` / ``unmerge`` / ``merge_and_unload``
  dequantize the base weight (4-bit: to its own dtype, then fp32, as PEFT's bitsandbytes merge
  reads it), add or subtract the adapters' delta in fp32 and quantize the
  result again into the same layer (same quant_type, blocksize, nesting and storage for 4-bit;
  new ``CB``/``SCB`` for int8), as PEFT does for bitsandbytes. Merging is lossy: the merged
  layer carries a new rounding error of about one quantization step, so a delta much smaller
  than the 4-bit step is partly rounded away. Plain LoRA only (no DoRA or other PEFT variants).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as Fq
from .nn._lifecycle import _copy_into
from .nn.linear4bit import Linear4bit
from .nn.linear8bit import Linear8bitLt

__all__ = ["LoRALinear", "add_lora", "mark_only_lora_trainable", "lora_parameters",
           "lora_state_dict", "peft_config", "prepare_model_for_kbit_training"]


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


# =============================================================================================
# PEFT
# =============================================================================================
def peft_config(config: Any = None, /, **kwargs: Any):
    """A PEFT ``LoraConfig`` that wraps opsq's quantized layers in LoRA layers that know their
    base is quantized: :class:`~opsq.nn.Linear4bit` (and ``LinearNF4``/``LinearFP4``) in
    :class:`PeftLinear4bit`, :class:`~opsq.nn.Linear8bitLt` in :class:`PeftLinear8bitLt`.
    Every other target gets PEFT's own layer.

    Use it wherever PEFT takes a config::

        model = get_peft_model(model, opsq.lora.peft_config(LoraConfig(r=8, ...)))
        model = PeftModel.from_pretrained(base, path, config=opsq.lora.peft_config(path))

    Without it PEFT wraps opsq's layers in its plain ``lora.Linear``, which trains but cannot
    merge (see the module docstring).

    Args:
        config: a ``peft.LoraConfig`` (registered in place and returned); a path or Hub id of
            a saved adapter (its ``LoraConfig.from_pretrained``, ``kwargs`` passed on); or None
            (``LoraConfig(**kwargs)``).
    Returns:
        the ``LoraConfig``, with opsq's layers registered through
        ``LoraConfig._register_custom_module`` (not saved with the adapter: pass the loading
        config through this function too). The first call also registers them on every
        ``LoraConfig`` built later in the process, so that the routes that read a config from
        disk and take none (``PeftModel.load_adapter``, transformers' ``load_adapter``) wrap
        opsq's layers the same way; without that, a second adapter got PEFT's plain
        ``lora.Linear`` and ``merge_and_unload`` failed halfway, leaving earlier layers merged.
    Raises:
        ImportError: PEFT is not installed. TypeError: ``config`` is not a ``LoraConfig``
        (e.g. another PEFT method, or a path to one), or a ``LoraConfig`` with ``kwargs``.
    """
    try:
        from peft import LoraConfig, PeftType
    except ImportError as e:
        raise ImportError('opsq.lora.peft_config needs PEFT: pip install "opsq[peft]"') from e
    if config is None:
        config = LoraConfig(**kwargs)
    elif isinstance(config, (str, os.PathLike)):
        config = LoraConfig.from_pretrained(config, **kwargs)
    elif kwargs:
        raise TypeError(f"peft_config: pass a LoraConfig or keyword arguments for one, not both "
                        f"(got a {type(config).__name__} and {sorted(kwargs)})")
    if not isinstance(config, LoraConfig) or config.peft_type != PeftType.LORA:
        raise TypeError(f"peft_config: config must be a peft.LoraConfig (LoRA), got "
                        f"{type(config).__name__}")
    _register_opsq_layers(config)
    _register_on_every_lora_config(LoraConfig)
    return config


def _register_opsq_layers(config: Any) -> None:
    """opsq's LoRA layers for its quantized layers, on one ``LoraConfig``."""
    layers = _peft_layers()
    config._register_custom_module({Linear4bit: layers["PeftLinear4bit"],
                                    Linear8bitLt: layers["PeftLinear8bitLt"]})


def _register_on_every_lora_config(lora_config_cls: type) -> None:
    """From now on each new ``LoraConfig`` registers opsq's layers as it is built (a wrapper of
    the dataclass's ``__post_init__``, installed once)."""
    from peft import PeftType
    post_init = lora_config_cls.__post_init__
    if getattr(post_init, "_opsq_registers", False):
        return

    def __post_init__(self, *args: Any, **kwargs: Any) -> None:
        post_init(self, *args, **kwargs)
        if self.peft_type == PeftType.LORA:
            _register_opsq_layers(self)
    __post_init__._opsq_registers = True
    lora_config_cls.__post_init__ = __post_init__


def prepare_model_for_kbit_training(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """PEFT's ``prepare_model_for_kbit_training`` for a model with opsq layers: the base frozen,
    16-bit parameters (not the packed weights) cast to fp32, and, as for bitsandbytes models,
    gradient checkpointing and input gradients turned on.

    PEFT turns those two on only where ``model.is_loaded_in_4bit`` / ``is_loaded_in_8bit`` is
    set; opsq's transformers integration leaves them unset (transformers imports bitsandbytes
    where it reads them), so called on its own PEFT silently skips the checkpointing and a run
    needs far more activation memory than with bitsandbytes. This sets the flags of the layers
    the model holds for the duration of PEFT's call only; a model without transformers'
    checkpointing methods (``gradient_checkpointing_enable`` and ``enable_input_require_grads`` or
    ``get_input_embeddings``) is left unflagged, as PEFT leaves it. Arguments after ``model``
    are PEFT's (``use_gradient_checkpointing``, ``gradient_checkpointing_kwargs``, ...).

    Raises:
        ImportError: peft is not installed.
    """
    from peft import prepare_model_for_kbit_training as prepare
    kinds = {"is_loaded_in_4bit": Linear4bit, "is_loaded_in_8bit": Linear8bitLt}
    # PEFT's checkpointing branch needs a transformers model's methods; a plain module is left
    # unflagged, as PEFT leaves it (it would raise AttributeError on the missing methods)
    transformers_like = hasattr(model, "gradient_checkpointing_enable") and (
        hasattr(model, "enable_input_require_grads") or hasattr(model, "get_input_embeddings"))
    names = [n for n, cls in kinds.items()
             if transformers_like and any(isinstance(m, cls) for m in model.modules())]
    missing = object()
    saved = {n: model.__dict__.get(n, missing) for n in names}
    try:
        for n in names:
            model.__dict__[n] = True
        return prepare(model, *args, **kwargs)
    finally:
        for n, v in saved.items():
            if v is missing:
                model.__dict__.pop(n, None)
            else:
                model.__dict__[n] = v


# ---- the quantized base weight as fp32, and back ---------------------------------------------
def _dequantized_4bit(layer: Linear4bit) -> torch.Tensor:
    """``layer``'s weight ``(N, K)`` dequantized to its own dtype (``weight_dtype``), then fp32:
    what PEFT's merge of a bitsandbytes layer adds the delta to (``dequantize_4bit`` in
    ``quant_state.dtype``), so merged codes equal PEFT + bitsandbytes' byte for byte."""
    state = layer.quant_state  # rebuilt from the module's tensors on each access: ours to edit
    if state is None:
        raise RuntimeError("Linear4bit: the weight is not quantized yet, nothing to merge into; "
                           "move the layer to a device first")
    state.dtype = layer.weight_dtype
    return Fq.dequantize_4bit(layer.weight, state).float()


def _requantize_4bit(layer: Linear4bit, weight: torch.Tensor) -> None:
    """Quantize fp32 ``weight`` ``(N, K)`` into ``layer`` with its own settings (quant_type,
    blocksize, nesting, quant_storage; the dequantized dtype stays ``layer.weight_dtype``),
    in place where the layout is unchanged (the parameters keep their identity)."""
    packed, state = Fq.quantize_4bit(
        weight.contiguous(), blocksize=layer.blocksize,
        compress_statistics=layer.compress_statistics, quant_type=layer.quant_type,
        quant_storage=layer.quant_storage)
    state.dtype = layer.weight_dtype
    layer._store_quantized(packed, state)


def _dequantized_8bit(layer: Linear8bitLt) -> torch.Tensor:
    """``layer``'s weight as fp32 ``(N, K)``: ``CB * SCB / 127``, or the float weight of a
    ``has_fp16_weights`` layer."""
    if not layer.is_quantized:
        return layer.weight.detach().float()
    return Fq.int8_vectorwise_dequant(layer.weight.detach(), layer.SCB)


def _requantize_8bit(layer: Linear8bitLt, weight: torch.Tensor) -> None:
    """Row-wise int8 quantization of fp32 ``weight`` ``(N, K)`` into ``layer``'s ``CB``/``SCB``
    in place (a float weight of a ``has_fp16_weights`` layer is overwritten as is)."""
    if not layer.is_quantized:
        with torch.no_grad():
            layer.weight.copy_(weight.to(layer.weight.dtype))
        return
    CB, SCB, _ = Fq.int8_vectorwise_quant(weight.contiguous())
    _copy_into(layer.weight, CB)
    _copy_into(layer.weight_scb, SCB)
    layer._sync_weight_state()


# ---- PEFT's LoRA layers for opsq's quantized layers ------------------------------------------
# PEFT is optional and slow to import, so the classes are built on first use (peft_config, or
# an attribute access such as ``opsq.lora.PeftLinear4bit``, which is also how pickle finds them).
_PEFT_LAYERS: dict[str, type] = {}


def __getattr__(name: str):
    if name in ("PeftLinear4bit", "PeftLinear8bitLt", "PeftQuantizedLinear"):
        try:
            return _peft_layers()[name]
        except ImportError as e:  # AttributeError keeps hasattr() and introspection working
            raise AttributeError(f"opsq.lora.{name} needs PEFT: pip install \"opsq[peft]\"") \
                from e
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _peft_layers() -> dict[str, type]:
    if _PEFT_LAYERS:
        return _PEFT_LAYERS
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import check_adapters_to_merge
    except ImportError as e:
        raise ImportError('opsq.lora: PEFT layers need PEFT: pip install "opsq[peft]"') from e

    class PeftQuantizedLinear(nn.Module, LoraLayer):
        """PEFT LoRA layer over a quantized opsq linear layer ``base_layer`` (``(N, K)``).

        ``forward(x)`` = ``base_layer(x) + sum over active adapters of
        lora_B(lora_A(dropout(x))) * scaling``, the adapters in their own dtype (PEFT keeps them
        in fp32), the sum in the base output's dtype. ``merge``/``unmerge`` dequantize the base
        weight to fp32, add/subtract the delta ``lora_B.weight @ lora_A.weight * scaling`` of
        every adapter named (one requantization for all of them) and quantize the result into
        the same layer. Plain LoRA only.

        Constructed by PEFT's dispatcher (``peft_config`` registers it) with PEFT's arguments:
        ``(base_layer, adapter_name, config=LoraConfig, r=..., lora_alpha=..., **kwargs)``.
        Subclasses define ``_dequantize_base`` and ``_requantize_base``.

        Raises:
            ValueError: the config asks for a LoRA variant (DoRA, aLoRA, ...); ``merge`` with
            ``safe_merge=True`` meets a non-finite merged weight or bias.
            RuntimeError: merging ``lora_bias`` into a base layer without a bias.
        """

        _dequantize_base = None  # (base_layer) -> fp32 (N, K)
        _requantize_base = None  # (base_layer, fp32 (N, K)) -> None

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0,
                     lora_alpha: int = 1, **kwargs) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.fan_in_fan_out = False  # opsq's weights are (out_features, in_features)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def resolve_lora_variant(self, *, config, **kwargs):
            try:
                return super().resolve_lora_variant(config=config, **kwargs)
            except ValueError as e:
                raise ValueError(f"{type(self).__name__} (opsq's PEFT layer over "
                                 f"{type(self.get_base_layer()).__name__}) implements plain LoRA "
                                 f"only, not DoRA or other PEFT LoRA variants: {e}") from e

        # ---- forward ---------------------------------------------------------------------------
        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            if adapter_names is not None:
                return self._mixed_batch_forward(x, *args, adapter_names=adapter_names,
                                                 **kwargs)
            result = self.base_layer(x, *args, **kwargs)
            if self.merged:
                return result
            out_dtype = result.dtype
            # PEFT's bitsandbytes layers' arithmetic (peft/tuners/lora/bnb.py): outside autocast
            # the input is cast to the adapter's dtype and each adapter's output to the base
            # output's dtype before it is added; under autocast neither is cast
            convert = not torch.is_autocast_enabled()
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype) if convert else x
                out = lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
                result = result + (out.to(out_dtype) if convert else out)
            return result.to(out_dtype)

        # ---- merging ---------------------------------------------------------------------------
        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            """``lora_B.weight @ lora_A.weight * scaling`` of ``adapter``, fp32 ``(N, K)``."""
            A = self.lora_A[adapter].weight.float()
            B = self.lora_B[adapter].weight.float()
            return (B @ A) * self.scaling[adapter]

        def _bias_delta(self, adapter: str) -> Optional[torch.Tensor]:
            if not self.lora_bias.get(adapter, False):
                return None
            if getattr(self.get_base_layer(), "bias", None) is None:
                raise RuntimeError(f"{type(self).__name__}: cannot merge adapter {adapter!r} "
                                   "(lora_bias=True): the base layer has no bias")
            return self.lora_B[adapter].bias.float() * self.scaling[adapter]

        def _apply_deltas(self, names: list[str], sign: float, safe_merge: bool) -> None:
            """Base weight (and bias) += ``sign`` * the deltas of ``names``, requantized once."""
            base = self.get_base_layer()
            with torch.no_grad():
                weight = self._dequantize_base(base)
                bias = None
                for name in names:
                    delta = self.get_delta_weight(name).to(weight.device)
                    bias_delta = self._bias_delta(name)
                    if safe_merge and not (torch.isfinite(delta).all() and (
                            bias_delta is None or torch.isfinite(bias_delta).all())):
                        raise ValueError(f"NaNs detected in the merged weights. The adapter "
                                         f"{name} seems to be broken")
                    weight = weight + sign * delta
                    if bias_delta is not None:
                        bias = base.bias.float() if bias is None else bias
                        bias = bias + sign * bias_delta.to(bias.device)
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs detected in the merged weights of adapters {names}")
                self._requantize_base(base, weight)
                if bias is not None:
                    base.bias.copy_(bias.to(base.bias.dtype))

        def merge(self, safe_merge: bool = False,
                  adapter_names: Optional[list[str]] = None) -> None:
            """Merge the adapters ``adapter_names`` (default: the active ones not yet merged)
            into the quantized base weight: dequantize, add, quantize again. ``safe_merge``
            checks the merged weight for NaN/Inf before storing it (the base is untouched then).
            """
            names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
            if not names:
                return
            self._apply_deltas(names, 1.0, safe_merge)
            self.merged_adapters.extend(names)

        def unmerge(self) -> None:
            """Take every merged adapter out of the base weight again (dequantize, subtract,
            quantize: the result differs from the weight before ``merge`` by requantization
            error)."""
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            names = [n for n in self.merged_adapters if n in self.lora_A]
            if names:
                self._apply_deltas(names, -1.0, False)
            self.merged_adapters.clear()

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    class PeftLinear4bit(PeftQuantizedLinear):
        __doc__ = ("PEFT LoRA layer over an opsq :class:`~opsq.nn.Linear4bit`; merging "
                   "requantizes with the layer's quant_type, blocksize, nesting and "
                   "quant_storage.\n\n" + PeftQuantizedLinear.__doc__)
        _dequantize_base = staticmethod(_dequantized_4bit)
        _requantize_base = staticmethod(_requantize_4bit)

    class PeftLinear8bitLt(PeftQuantizedLinear):
        __doc__ = ("PEFT LoRA layer over an opsq :class:`~opsq.nn.Linear8bitLt`; merging "
                   "writes new row-wise int8 ``CB``/``SCB`` (or the float weight of a "
                   "``has_fp16_weights`` layer).\n\n" + PeftQuantizedLinear.__doc__)
        _dequantize_base = staticmethod(_dequantized_8bit)
        _requantize_base = staticmethod(_requantize_8bit)

    for cls in (PeftQuantizedLinear, PeftLinear4bit, PeftLinear8bitLt):
        cls.__qualname__ = cls.__name__  # importable as opsq.lora.<name> (pickle)
        _PEFT_LAYERS[cls.__name__] = cls
    return _PEFT_LAYERS
