"""Quantized layers: ``Linear4bit`` (+ ``LinearNF4``/``LinearFP4``) with ``Params4bit``, and
``Linear8bitLt`` with ``Int8Params``, bitsandbytes-compatible."""
from .linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit
from .linear8bit import Int8Params, Linear8bitLt

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4", "Int8Params", "Linear8bitLt"]
from .embedding import (  # noqa: E402
    Embedding, Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, StableEmbedding)
from .outliers import OutlierAwareLinear  # noqa: E402
from .parametrize import replace_parameter_4bit  # noqa: E402
from .switchback import (  # noqa: E402
    StandardLinear, SwitchBackLinear, SwitchBackLinearBnb, SwitchBackLinearGlobal,
    SwitchBackLinearGlobalMemEfficient, SwitchBackLinearVectorwise)

__all__ += ["Embedding", "StableEmbedding", "Embedding4bit", "EmbeddingNF4", "EmbeddingFP4",
            "Embedding8bit", "OutlierAwareLinear", "SwitchBackLinear", "SwitchBackLinearGlobal",
            "SwitchBackLinearGlobalMemEfficient", "SwitchBackLinearVectorwise", "StandardLinear",
            "SwitchBackLinearBnb", "replace_parameter_4bit"]
