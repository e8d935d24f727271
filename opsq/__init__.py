"""opsq: bitsandbytes-compatible 4-bit (NF4/FP4) and 8-bit (LLM.int8) quantization, every
kernel a ``torch.library`` custom op (``torch.ops.opsq.*``) with a fake kernel, a reference
kernel, an optional CUDA kernel and an autograd registration.

Import order matters: the schemas are defined first (``_schemas``), then the fake kernels
(``meta``), the reference kernels (``reference``), autograd, and finally the CUDA extension,
which only adds ``TORCH_LIBRARY_IMPL(opsq, CUDA, ...)`` kernels.
"""
from . import _schemas  # noqa: F401  (defines torch.ops.opsq.*)
from . import meta  # noqa: F401  (fake kernels)
from . import reference  # noqa: F401  (reference kernels)
from . import _autograd  # noqa: F401
from ._extension import backends, load_extension

load_extension()

from . import functional, nn, utils  # noqa: E402
from .autograd import (MatmulLtState, MatMul4Bit, MatMul8bit, MatMul8bitLt,  # noqa: E402
                       bmm_cublas, matmul, matmul_4bit, matmul_cublas, mm_cublas)
from .functional import QuantState  # noqa: E402

__version__ = "0.1.0"
#: Devices the ops run on (bitsandbytes 0.50's ``supported_torch_devices``): CUDA kernels, and
#: the pure-PyTorch reference kernels on the CPU (and any other device torch supports).
supported_torch_devices = {"cpu", "cuda"}

__all__ = ["functional", "nn", "utils", "QuantState", "matmul", "matmul_4bit", "MatmulLtState",
           "MatMul8bitLt", "MatMul4Bit", "MatMul8bit", "matmul_cublas", "mm_cublas",
           "bmm_cublas", "backends", "supported_torch_devices", "__version__"]

from . import fsdp, integrations, lora, optim  # noqa: E402
from .layout_utils import (get_inverse_transform_indices, get_tile_inds,  # noqa: E402
                           supports_igemmlt, undo_layout)
from .outlier_tools import GlobalOutlierPooler  # noqa: E402

__all__ += ["fsdp", "integrations", "lora", "optim", "GlobalOutlierPooler", "get_inverse_transform_indices",
            "get_tile_inds", "undo_layout", "supports_igemmlt"]
