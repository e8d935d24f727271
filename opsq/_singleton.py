"""Base class of the process-wide registries with bitsandbytes' singleton protocol."""
from __future__ import annotations


class Singleton:
    """``Cls.get_instance()`` returns the one instance (created on first use, set up by
    ``_setup()``); calling ``Cls()`` raises, as in bitsandbytes."""

    def __init__(self):
        name = type(self).__name__
        raise RuntimeError(f"{name} is a singleton: use {name}.get_instance()")

    @classmethod
    def get_instance(cls):
        instance = cls.__dict__.get("_instance")
        if instance is None:
            instance = cls.__new__(cls)
            instance._setup()
            cls._instance = instance
        return instance

    def _setup(self) -> None:
        raise NotImplementedError
