"""Pure-PyTorch reference kernels of every opsq op.

They are registered as each op's ``CompositeExplicitAutograd`` kernel: they serve the CPU, and
any device for which no native kernel is registered (a CUDA kernel from ``opsq/csrc`` takes
precedence on CUDA). Called directly (``opsq.reference.quantize_4bit(...)``) they are the test
oracle on any device. They validate their inputs with the same helpers as the fake kernels.
"""
import contextlib
import functools

import torch

from ..meta._common import with_tensor_args_checked
from .blockwise import dequantize_blockwise, quantize_blockwise
from .fourbit import dequantize_4bit, linear_4bit, linear_4bit_merged, quantize_4bit
from .int8 import double_quant, igemmlt, int8_linear, mm_dequant, vectorwise_quant
from .layout import transform
from .optim import optimizer_update_32bit, optimizer_update_8bit_blockwise

KERNELS = {
    "quantize_4bit": quantize_4bit,
    "dequantize_4bit": dequantize_4bit,
    "linear_4bit": linear_4bit,
    "linear_4bit_merged": linear_4bit_merged,
    "quantize_blockwise": quantize_blockwise,
    "dequantize_blockwise": dequantize_blockwise,
    "vectorwise_quant": vectorwise_quant,
    "double_quant": double_quant,
    "igemmlt": igemmlt,
    "mm_dequant": mm_dequant,
    "int8_linear": int8_linear,
    "transform": transform,
    "optimizer_update_32bit": optimizer_update_32bit,
    "optimizer_update_8bit_blockwise": optimizer_update_8bit_blockwise,
}


def _outside_autocast(fn):
    """``fn`` with autocast off for its inputs' device types: a kernel computes in the dtypes its
    op documents, and an autocast region around an eager op call (CPU autocast) would recast
    the products it makes with torch ops (``F.linear``, ``@``), where a compiled graph runs the
    same kernel outside autocast: eager and compiled results would differ."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        types = set()
        for a in args:
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor):
                    types.add(t.device.type)
        on = [d for d in sorted(types) if torch.is_autocast_enabled(d)]
        if not on:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for d in on:
                stack.enter_context(torch.autocast(d, enabled=False))
            return fn(*args, **kwargs)
    return run


for _name, _fn in KERNELS.items():
    torch.library.impl(f"opsq::{_name}", "CompositeExplicitAutograd")(
        with_tensor_args_checked(_name, _outside_autocast(_fn)))
