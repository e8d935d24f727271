"""Former home of the quantized linear layers, kept so that imports and pickles naming
``opsq.nn.modules`` keep working. The layers live in :mod:`opsq.nn.linear4bit` and
:mod:`opsq.nn.linear8bit`, their shared lifecycle in :mod:`opsq.nn._lifecycle`."""
from ._lifecycle import (_apply_intent, _bits, _copy_into, _drop_internal_keys,  # noqa: F401
                         _held_apply, _load_without_weight, _parse_to_device, _pickle_state,
                         _save_without_quantized, _set_tensor, _value)
from .linear4bit import (Linear4bit, LinearFP4, LinearNF4, Params4bit,  # noqa: F401
                         _rebuild_params4bit)
from .linear8bit import Int8Params, Linear8bitLt, _weight_format_code  # noqa: F401
from ..functional import fix_4bit_weight_quant_state_from_module  # noqa: F401,E402  (bitsandbytes.nn.modules has it)

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4", "Int8Params", "Linear8bitLt"]
