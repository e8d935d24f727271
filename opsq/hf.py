"""transformers integration: ``from_pretrained`` quantizes with opsq, loads bitsandbytes
checkpoints with opsq, and ``save_pretrained`` writes bitsandbytes' format; no bitsandbytes and
no accelerate needed.

Two ways in:

* :class:`OpsqConfig`, registered under ``quant_method="opsq"`` through transformers' public
  ``register_quantization_config`` / ``register_quantizer`` when this module is imported::

      from opsq.hf import OpsqConfig
      model = AutoModelForCausalLM.from_pretrained(
          path, quantization_config=OpsqConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))

* :func:`enable_transformers`: from then on, in this process, transformers' own bitsandbytes
  route (``BitsAndBytesConfig`` quantize-on-load, and ``from_pretrained`` of a checkpoint whose
  ``config.json`` says ``"quant_method": "bitsandbytes"``) runs on opsq's layers. This holds
  whether or not bitsandbytes is installed: the call is the opt-in. transformers has no public
  API to replace a built-in quantizer, so this one call rebinds the two bitsandbytes entries of
  ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` (:func:`disable_transformers` puts the
  originals back).

Both use the same quantizer (:class:`OpsqHfQuantizer`). Its layers are
:class:`~opsq.nn.Linear4bit` / :class:`~opsq.nn.Linear8bitLt`, built and filled by
:mod:`opsq.integrations` (the same code as the manual route), so a model loaded this way equals
quantizing the same weights with opsq directly, and its ``state_dict`` / ``save_pretrained``
holds bitsandbytes' keys and tensors.

Placement: transformers 5 refuses every ``device_map``, even ``"cpu"``, unless accelerate is
installed (``check_and_set_device_map``, which runs before any quantizer hook). Without accelerate,
leave ``device_map`` out: this quantizer then loads onto the current CUDA device when there is
one, else the CPU (bitsandbytes' rule), and ``model.to(device)`` moves the model afterwards. With
accelerate, ``device_map="cpu"``, ``"cuda"``, ``{"": 0}`` and ``"auto"`` on one device work. A map
over several GPUs is dispatched by transformers with accelerate's hooks (untested); CPU or disk
offload beside a GPU is refused (accelerate's offload hooks re-create parameters), except for
modules kept unquantized by ``BitsAndBytesConfig(llm_int8_enable_fp32_cpu_offload=True)``.

A checkpoint saved with :class:`OpsqConfig` says ``"quant_method": "opsq"``: ``import opsq.hf``
before ``from_pretrained`` (transformers skips quantization methods it does not know).

Differences from transformers + bitsandbytes, on purpose:

* ``model.is_loaded_in_4bit`` / ``is_loaded_in_8bit`` are not set: transformers reads them to
  import bitsandbytes (``num_parameters``, ``.to()`` of 8-bit models). ``model.is_quantized`` and
  ``model.quantization_method`` are set as usual. PEFT's ``prepare_model_for_kbit_training``
  reads them too (to turn gradient checkpointing on): use
  :func:`opsq.lora.prepare_model_for_kbit_training`, which sets them for PEFT's call only.
* ``BitsAndBytesConfig``'s ``bnb_4bit_compute_dtype`` (float32 when not given) is passed by
  transformers to bitsandbytes' ``Linear4bit``, which then computes in fp32 (it casts the input
  to fp32 and the output back). opsq reads a float32 compute dtype from ``BitsAndBytesConfig``
  as "the input's dtype" (``None``) unless the model is fp16, so a bf16 model computes in bf16:
  its logits differ from bitsandbytes' by bf16 rounding (the same top tokens in the fixtures'
  runs), at the 16-bit kernels' speed. For bitsandbytes' fp32 numbers pass
  ``OpsqConfig(bnb_4bit_compute_dtype=torch.float32)``; :class:`OpsqConfig` passes its
  ``bnb_4bit_compute_dtype`` as given (default ``None``).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

try:
    import transformers
    from transformers.core_model_loading import ConversionOps, WeightConverter
    from transformers.quantizers import HfQuantizer, register_quantization_config, \
        register_quantizer
    from transformers.quantizers import auto as _hf_auto
    from transformers.quantizers.quantizers_utils import get_module_from_name, \
        should_convert_module
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("opsq.hf needs transformers >= 5 (pip install 'transformers>=5'); "
                      f"importing it failed: {e}") from e

from . import functional as Fq
from ._constants import BLOCKSIZES, FLOAT_DTYPES, QUANT_STORAGE_DTYPES, QUANT_TYPES
from .integrations import (_dtype, _is_conv1d, replace_with_bnb_linear,
                           set_module_quantized_tensor_to_device)
from .nn.linear4bit import Linear4bit
from .nn.linear8bit import Linear8bitLt

__all__ = ["QUANT_METHOD", "OpsqConfig", "OpsqHfQuantizer", "enable_transformers",
           "disable_transformers"]

#: ``quant_method`` of :class:`OpsqConfig` in ``config.json`` and in transformers' registries.
QUANT_METHOD = "opsq"

#: bitsandbytes' entries of transformers' quantizer registry that :func:`enable_transformers`
#: rebinds (transformers appends ``_4bit`` / ``_8bit`` to ``quant_method="bitsandbytes"``).
_BNB_QUANTIZER_KEYS = ("bitsandbytes_4bit", "bitsandbytes_8bit")

#: Checkpoint entries of one 4-bit / 8-bit weight, as bitsandbytes writes them (suffixes of the
#: module name). The more specific names come first: they are alternatives of one regex.
_SERIALIZED_4BIT = ("weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map",
                    "weight.absmax", "weight.quant_state.bitsandbytes__nf4",
                    "weight.quant_state.bitsandbytes__fp4", "weight")
_SERIALIZED_8BIT = ("SCB", "weight_format", "weight")


# ---- configuration ------------------------------------------------------------------------------
def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class OpsqConfig(QuantizationConfigMixin):
    """Quantization settings for ``from_pretrained(..., quantization_config=OpsqConfig(...))``.

    Field names and defaults are ``BitsAndBytesConfig``'s where they mean the same, except
    ``bnb_4bit_compute_dtype`` (default None: compute in the input's dtype).

    Args:
        load_in_4bit: quantize ``nn.Linear`` layers to :class:`~opsq.nn.Linear4bit`.
        load_in_8bit: quantize them to :class:`~opsq.nn.Linear8bitLt` (LLM.int8). Exactly one of
            the two (or ``bits``) must be set.
        bnb_4bit_quant_type: "nf4" or "fp4" (default "fp4", as bitsandbytes).
        bnb_4bit_use_double_quant: nested 8-bit absmax (QLoRA's double quantization).
        bnb_4bit_compute_dtype: torch.float16/bfloat16/float32 (or its name), or None for the
            input's dtype.
        bnb_4bit_quant_storage: dtype the packed 4-bit codes are stored as (default uint8; e.g.
            bfloat16 for FSDP1). Any of opsq's storage dtypes.
        bnb_4bit_blocksize: elements per absmax block, 32..4096 (default 64, bitsandbytes').
        llm_int8_threshold: LLM.int8 outlier threshold, finite and >= 0 (default 6.0; 0 turns
            the mixed-precision decomposition off).
        llm_int8_skip_modules: module names (transformers' patterns: prefix, regex or suffix)
            kept in full precision; when given, they replace the default ones (the output
            embedding / ``lm_head``), as with bitsandbytes.
        llm_int8_has_fp16_weight: 8-bit layers keep a trainable float weight.
        bits: 4 or 8, the serialized form of ``load_in_4bit`` / ``load_in_8bit``.
        quant_method: accepted when reading a ``config.json``; must be "opsq".
    Serialization:
        ``to_dict()`` writes ``{"quant_method": "opsq", "bits": 4 | 8, ...}`` with dtypes as
        names and no ``load_in_4bit`` / ``load_in_8bit`` keys (transformers would read those as
        a bitsandbytes config); ``from_dict(to_dict())`` gives an equal config.
    Raises:
        ValueError: no or both bit widths, bad quant_type, dtype, blocksize or threshold,
            another quant_method. TypeError: unknown keyword, ``llm_int8_skip_modules`` not a
            list of strings.
    """

    def __init__(self, load_in_4bit: bool = False, load_in_8bit: bool = False,
                 bnb_4bit_quant_type: str = "fp4", bnb_4bit_use_double_quant: bool = False,
                 bnb_4bit_compute_dtype=None, bnb_4bit_quant_storage=None,
                 bnb_4bit_blocksize: int = 64, llm_int8_threshold: float = 6.0,
                 llm_int8_skip_modules: Optional[list] = None,
                 llm_int8_has_fp16_weight: bool = False, bits: Optional[int] = None,
                 quant_method: Optional[str] = None, **unknown):
        if unknown:
            raise TypeError(f"OpsqConfig got unknown fields {sorted(unknown)}")
        if quant_method not in (None, QUANT_METHOD):
            raise ValueError(f"OpsqConfig: quant_method must be {QUANT_METHOD!r}, got "
                             f"{quant_method!r}")
        if bits is None:
            if bool(load_in_4bit) == bool(load_in_8bit):
                raise ValueError("OpsqConfig: set exactly one of load_in_4bit and load_in_8bit")
            bits = 4 if load_in_4bit else 8
        elif bits not in (4, 8) or (load_in_4bit and bits != 4) or (load_in_8bit and bits != 8):
            raise ValueError(f"OpsqConfig: bits must be 4 or 8 and agree with load_in_4bit / "
                             f"load_in_8bit, got bits={bits!r}")
        if bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type must be one of {QUANT_TYPES}, got "
                             f"{bnb_4bit_quant_type!r}")
        if bnb_4bit_blocksize not in BLOCKSIZES:
            raise ValueError(f"bnb_4bit_blocksize must be one of {BLOCKSIZES}, got "
                             f"{bnb_4bit_blocksize!r}")
        if not (isinstance(llm_int8_threshold, (int, float)) and math.isfinite(llm_int8_threshold)
                and llm_int8_threshold >= 0):
            raise ValueError(f"llm_int8_threshold must be a finite number >= 0, got "
                             f"{llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and not (
                isinstance(llm_int8_skip_modules, (list, tuple))
                and all(isinstance(s, str) for s in llm_int8_skip_modules)):
            raise TypeError(f"llm_int8_skip_modules must be a list of module names or None, got "
                            f"{llm_int8_skip_modules!r}")
        self.quant_method = QUANT_METHOD
        self.bits = int(bits)
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bool(bnb_4bit_use_double_quant)
        self.bnb_4bit_compute_dtype = _dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype",
                                             FLOAT_DTYPES)
        self.bnb_4bit_quant_storage = _dtype(bnb_4bit_quant_storage or torch.uint8,
                                             "bnb_4bit_quant_storage", QUANT_STORAGE_DTYPES)
        self.bnb_4bit_blocksize = int(bnb_4bit_blocksize)
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = None if llm_int8_skip_modules is None \
            else list(llm_int8_skip_modules)
        self.llm_int8_has_fp16_weight = bool(llm_int8_has_fp16_weight)

    @property
    def load_in_4bit(self) -> bool:
        return self.bits == 4

    @load_in_4bit.setter
    def load_in_4bit(self, value: bool) -> None:
        self._set_bits(4, value)

    @property
    def load_in_8bit(self) -> bool:
        return self.bits == 8

    @load_in_8bit.setter
    def load_in_8bit(self, value: bool) -> None:
        self._set_bits(8, value)

    def _set_bits(self, bits: int, value: bool) -> None:
        if value:
            self.bits = bits
        elif self.bits == bits:
            raise ValueError(f"OpsqConfig needs one bit width: set load_in_{12 - bits}bit=True "
                             f"instead of load_in_{bits}bit=False")

    def quantization_method(self) -> str:
        """bitsandbytes' name of the method: "llm_int8", "nf4" or "fp4"."""
        return "llm_int8" if self.load_in_8bit else self.bnb_4bit_quant_type

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["bnb_4bit_compute_dtype"] = _dtype_name(self.bnb_4bit_compute_dtype)
        out["bnb_4bit_quant_storage"] = _dtype_name(self.bnb_4bit_quant_storage)
        out["llm_int8_skip_modules"] = None if self.llm_int8_skip_modules is None \
            else list(self.llm_int8_skip_modules)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()  # always complete: the file must not depend on our defaults

    def to_bitsandbytes_config(self):
        """The equivalent ``transformers.BitsAndBytesConfig`` (e.g. to set as
        ``model.config.quantization_config`` before ``save_pretrained``, so that the saved
        ``config.json`` says ``"quant_method": "bitsandbytes"`` and bitsandbytes users can load
        it; the tensors are the same either way). ``bnb_4bit_compute_dtype=None`` becomes
        bitsandbytes' default (float32, which bitsandbytes replaces by a bf16/fp32 input's dtype).

        Raises:
            ValueError: ``bnb_4bit_blocksize`` other than 64 (``BitsAndBytesConfig`` has no such
                field; the blocksize is in each weight's quant_state all the same, but
                bitsandbytes would quantize new layers with 64).
        """
        if self.bnb_4bit_blocksize != 64:
            raise ValueError("BitsAndBytesConfig has no blocksize: only bnb_4bit_blocksize=64 "
                             f"converts, got {self.bnb_4bit_blocksize}")
        return transformers.BitsAndBytesConfig(
            load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
            bnb_4bit_quant_storage=self.bnb_4bit_quant_storage,
            llm_int8_threshold=self.llm_int8_threshold,
            llm_int8_skip_modules=self.llm_int8_skip_modules,
            llm_int8_has_fp16_weight=self.llm_int8_has_fp16_weight)


def _layer_settings(config, model_dtype: torch.dtype) -> dict[str, Any]:
    """The :mod:`opsq.integrations` settings of an :class:`OpsqConfig` or a
    ``BitsAndBytesConfig`` (module docstring: how bitsandbytes' float32 compute default is
    resolved). Skip patterns are resolved by the quantizer, so none are passed on."""
    compute = config.bnb_4bit_compute_dtype
    if isinstance(compute, str):
        compute = getattr(torch, compute)
    if not isinstance(config, OpsqConfig) and compute == torch.float32 \
            and model_dtype != torch.float16:
        compute = None
    return dict(load_in_4bit=config.load_in_4bit, load_in_8bit=config.load_in_8bit,
                bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_quant_storage=config.bnb_4bit_quant_storage,
                bnb_4bit_blocksize=getattr(config, "bnb_4bit_blocksize", 64),
                llm_int8_threshold=config.llm_int8_threshold,
                llm_int8_has_fp16_weight=config.llm_int8_has_fp16_weight,
                llm_int8_skip_modules=None)


# ---- loading operations -------------------------------------------------------------------------
def _first(value):
    return value[0] if isinstance(value, list) else value


class _OpsqOp(ConversionOps):
    """Base of the two loading operations; ``hf_quantizer`` marks them (transformers then leaves
    the checkpoint tensors' dtypes alone)."""

    def __init__(self, hf_quantizer: "OpsqHfQuantizer"):
        self.hf_quantizer = hf_quantizer


class _QuantizeOnLoad(_OpsqOp):
    """A float checkpoint weight of a quantized layer → quantized in place on its device."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        out = {}
        for name, value in input_dict.items():
            module, attr = get_module_from_name(model, name)
            value = _first(value)
            set_module_quantized_tensor_to_device(module, attr, value.device, value)
            out[name] = _loaded(module)
        return out


class _LoadQuantized(_OpsqOp):
    """bitsandbytes' entries of one weight (packed codes + statistics, or int8 + SCB) → the
    layer's quantized state. A lone ``weight`` (a layer kept in float, a norm, an embedding) is
    passed through."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        if len(input_dict) == 1:
            return self._float_tensor(input_dict, model, full_layer_name)
        tensors = {k: _first(v) for k, v in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        weight = tensors.pop("weight")
        if isinstance(module, Linear4bit):
            set_module_quantized_tensor_to_device(module, "weight", weight.device, weight,
                                                  quantized_stats=tensors)
        elif isinstance(module, Linear8bitLt):
            fmt = tensors.get("weight_format")
            set_module_quantized_tensor_to_device(
                module, "weight", weight.device, weight,
                quantized_stats=None if fmt is None else {"weight_format": fmt},
                fp16_statistics=tensors.get("SCB"))
        else:
            raise ValueError(f"{full_layer_name}: the checkpoint holds quantized entries "
                             f"{sorted(tensors)} but the model's module is a "
                             f"{type(module).__name__}, not an opsq quantized layer")
        return {full_layer_name: _loaded(module)}

    @staticmethod
    def _float_tensor(input_dict, model, full_layer_name):
        """A tensor this converter only passes through, cast to the dtype the model was built
        with (``from_pretrained(..., dtype=...)``), or to the one transformers' keep-in-fp32 plan
        gives it (:func:`_planned_dtype`): transformers leaves the dtype of every tensor a
        quantizer's converter sees alone, its plan included."""
        (key, value), = input_dict.items()
        value = _first(value)
        try:
            target = model.get_parameter_or_buffer(full_layer_name)
        except (AttributeError, ValueError):
            return input_dict
        if value.is_floating_point() and target.is_floating_point():
            dtype = _planned_dtype(model, full_layer_name, target.dtype)
            if value.dtype != dtype:
                value = value.to(dtype)
        return {key: value}


def _planned_dtype(model: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype transformers' keep-in-fp32 plan gives tensor ``name`` of a model loaded in
    ``dtype`` (``_keep_in_fp32_modules`` for fp16, ``_keep_in_fp32_modules_strict`` for fp16 and
    bf16: fp32, e.g. T5's ``wo``), matched as transformers matches it; ``dtype`` where no entry
    names it."""
    plan = getattr(model, "_get_dtype_plan", lambda _: {})(dtype)
    if not plan:
        return dtype
    from transformers.core_model_loading import build_glob_alternation
    pattern, group_to_glob, _ = build_glob_alternation(list(plan))
    match = pattern.search(name)
    return plan[group_to_glob[match.lastgroup]] if match else dtype


def _loaded(module: nn.Module) -> nn.Parameter:
    """Hand a just-filled quantized layer over to transformers for the rest of its loading.

    Two steps of transformers' loading would damage opsq's layers, so the quantized weight
    (which carries its statistics) is kept aside on the module and transformers gets a frozen
    plain ``nn.Parameter`` over the same packed bytes, marked ``_is_hf_initialized``:

    * transformers assigns what a conversion returns with ``setattr``; assigning a quantized
      weight re-creates the parameter (``QuantizedWeightMixin``), which would lose the mark,
      and a parent module's ``_init_weights`` (GPT-2's ``c_proj``) would then draw random
      numbers into the codes;
    * after loading, transformers replaces every non-persistent buffer of the model by
      ``torch.empty_like`` and re-creates them through ``_init_weights``, which knows nothing
      of opsq's code tables and offsets.

    :func:`_finish_loading` (the quantizer's ``_process_model_after_weight_loading``) assigns
    the kept weight back, which restores every statistic from it."""
    module._is_hf_initialized = True
    module.__dict__["_opsq_loaded_weight"] = module.weight
    return nn.Parameter(module.weight.data, requires_grad=False)


def _finish_loading(model: nn.Module) -> None:
    for module in model.modules():
        weight = module.__dict__.pop("_opsq_loaded_weight", None)
        if weight is not None:
            module.weight = weight  # brings the statistics it carries back into the module


def _is_opsq_conversion(transform) -> bool:
    return any(isinstance(op, _OpsqOp) for op in getattr(transform, "operations", ()) or ())


# ---- the quantizer ------------------------------------------------------------------------------
class OpsqHfQuantizer(HfQuantizer):
    """transformers ``HfQuantizer`` that builds opsq layers, for :class:`OpsqConfig` and (after
    :func:`enable_transformers`) ``BitsAndBytesConfig``.

    Before loading: every ``nn.Linear`` / ``Conv1D`` not excluded (``llm_int8_skip_modules``,
    else transformers' default: output embedding, tied and last modules; plus
    ``_keep_in_fp32_modules``; patterns matched with transformers' own rule) becomes an empty
    ``Linear4bit`` / ``Linear8bitLt`` (:func:`opsq.integrations.replace_with_bnb_linear`).
    While loading: float weights are quantized on their target device; bitsandbytes' serialized
    entries are adopted as they are (both through
    :func:`opsq.integrations.set_module_quantized_tensor_to_device`).
    """

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    # -- environment and placement
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            places = {str(v) for v in device_map.values()}
            if places & {"cpu", "disk"} and places != {"cpu"} and not getattr(
                    self.quantization_config, "llm_int8_enable_fp32_cpu_offload", False):
                # accelerate offloads "cpu"/"disk" entries of a GPU model through hooks that
                # re-create parameters; quantized layers must not go through them.
                raise ValueError(
                    f"device_map places modules on {sorted(places)}: accelerate would offload "
                    "the 'cpu' / 'disk' ones, and opsq's quantized layers cannot be offloaded. "
                    "Load on one device (the CPU or one GPU), or (BitsAndBytesConfig) set "
                    "llm_int8_enable_fp32_cpu_offload=True to keep the offloaded modules "
                    "unquantized")
            if len(places) > 1:
                from transformers.utils import is_accelerate_available
                if not is_accelerate_available():
                    raise ImportError(
                        f"this device_map spreads the model over {sorted(places)}: transformers "
                        "dispatches such models with accelerate's hooks (pip install accelerate);"
                        " one device (device_map='cpu', 'cuda', {'': 0}) needs no accelerate")

    def update_device_map(self, device_map):
        if device_map is None:  # bitsandbytes' default: the current accelerator, else the CPU
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() \
                else {"": "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory):
        return {key: val * 0.90 for key, val in max_memory.items()}  # quantization buffers

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        try:
            module, name = get_module_from_name(model, param_name)
        except AttributeError:
            return False
        return isinstance(module, (Linear4bit, Linear8bitLt)) and name == "weight"

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        if self.param_needs_quantization(model, param_name):
            return 0.5 if self.quantization_config.load_in_4bit else 1.0
        return param.element_size()

    # -- model surgery
    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        config = self.quantization_config
        skip = self.get_modules_to_not_convert(model, config.llm_int8_skip_modules,
                                               getattr(model, "_keep_in_fp32_modules", None))
        if getattr(config, "llm_int8_enable_fp32_cpu_offload", False) \
                and isinstance(device_map, dict):
            skip += [k for k, v in device_map.items() if str(v) in ("cpu", "disk")]
        self.modules_to_not_convert = skip
        keep = [name for name, m in model.named_modules()
                if name and (type(m) is nn.Linear or _is_conv1d(type(m)))
                and not should_convert_module(name, skip)]
        replace_with_bnb_linear(model, keep, _layer_settings(config, model.dtype))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _finish_loading(model)
        # transformers keeps the loading conversions to revert them in save_pretrained; ours have
        # no reverse (the state dict is already in bitsandbytes' format), so drop them.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if not _is_opsq_conversion(c)]
        return model

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def get_weight_conversions(self):
        if not self.pre_quantized:
            return []
        names = _SERIALIZED_4BIT if self.quantization_config.load_in_4bit else _SERIALIZED_8BIT
        return [WeightConverter(source_patterns=list(names), target_patterns="weight",
                                operations=[_LoadQuantized(self)])]

    # -- capabilities
    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """Replace every opsq quantized layer by an ``nn.Linear`` holding the dequantized weight
        on the same device, in ``dtype`` (default: a 4-bit weight's original dtype, the model's
        dtype for int8), as transformers' bitsandbytes route does for ``model.dequantize()``."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        for name, layer in list(model.named_modules()):
            if not isinstance(layer, (Linear4bit, Linear8bitLt)) or not layer.is_quantized:
                continue
            if isinstance(layer, Linear4bit):
                weight = Fq.dequantize_4bit(layer.weight, layer.quant_state)
                weight = weight.to(dtype or layer.weight_dtype)
            else:
                weight = Fq.int8_vectorwise_dequant(layer.weight.data, layer.SCB)
                weight = weight.to(dtype or model.dtype)
            new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                            device="meta")
            new.weight = nn.Parameter(weight)
            if layer.bias is not None:
                new.bias = layer.bias
            model.set_submodule(name, new)
        return model


# ---- registration -------------------------------------------------------------------------------
def _register() -> None:
    """Register :class:`OpsqConfig` and :class:`OpsqHfQuantizer` under ``"opsq"`` with
    transformers' public registration API (once per process)."""
    if _hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not OpsqConfig:
        register_quantization_config(QUANT_METHOD)(OpsqConfig)
    if _hf_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not OpsqHfQuantizer:
        register_quantizer(QUANT_METHOD)(OpsqHfQuantizer)


_register()

_displaced: dict[str, Any] = {}


def enable_transformers() -> None:
    """Route transformers' bitsandbytes quantization through opsq, for this process: after this
    call ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` quantizes with
    opsq's layers, and ``from_pretrained`` of a checkpoint saved by transformers + bitsandbytes
    (``config.json``: ``"quant_method": "bitsandbytes"``) loads into them; ``save_pretrained``
    writes the same format back. Always opsq after the call, whether or not bitsandbytes is
    installed. Idempotent; :func:`disable_transformers` undoes it.

    transformers has no public API to replace a built-in quantizer: this rebinds the
    ``"bitsandbytes_4bit"`` / ``"bitsandbytes_8bit"`` entries of
    ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING``, the table ``from_pretrained``
    looks quantizers up in. Models loaded before the call keep their quantizer.
    """
    _register()
    mapping = _hf_auto.AUTO_QUANTIZER_MAPPING
    for key in _BNB_QUANTIZER_KEYS:
        if mapping.get(key) is not OpsqHfQuantizer:
            _displaced[key] = mapping.get(key)
            mapping[key] = OpsqHfQuantizer


def disable_transformers() -> None:
    """Undo :func:`enable_transformers` (transformers' own bitsandbytes quantizers again).
    Idempotent."""
    mapping = _hf_auto.AUTO_QUANTIZER_MAPPING
    for key in _BNB_QUANTIZER_KEYS:
        if mapping.get(key) is OpsqHfQuantizer and key in _displaced:
            original = _displaced.pop(key)
            if original is None:
                mapping.pop(key, None)
            else:
                mapping[key] = original
