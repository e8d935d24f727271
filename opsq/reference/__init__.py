"""Pure-PyTorch reference kernels of every opsq op.

They are registered as each op's ``CompositeExplicitAutograd`` kernel: they serve the CPU, and
any device for which no native kernel is registered (a CUDA kernel from ``opsq/csrc`` takes
precedence on CUDA). Called directly (``opsq.reference.quantize_4bit(...)``) they are the test
oracle on any device. They validate their inputs with the same helpers as the fake kernels.
"""
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

for _name, _fn in KERNELS.items():
    torch.library.impl(f"opsq::{_name}", "CompositeExplicitAutograd")(
        with_tensor_args_checked(_name, _fn))
