"""Fake (meta) kernels of every opsq op, one module per op family.

Importing this package registers them with ``torch.library.register_fake`` (through
``_common.register_fake``, which first checks that every Tensor argument is a tensor). Each
family module also holds that family's ``check_*`` validation helpers, shared with the
reference kernels.
"""
from . import blockwise, fourbit, int8, layout, optim  # noqa: F401  (registers the fakes)
