"""Quantized layers: ``Linear4bit`` (+ ``LinearNF4``/``LinearFP4``) with ``Params4bit``, and
``Linear8bitLt`` with ``Int8Params``, bitsandbytes-compatible."""
from .modules import Int8Params, Linear4bit, Linear8bitLt, LinearFP4, LinearNF4, Params4bit

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4", "Int8Params", "Linear8bitLt"]
