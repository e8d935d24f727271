"""The registry: every op defined once, with matching argument names in every layer."""
import inspect

import torch

import opsq
from opsq import reference
from opsq._autograd import _arg_names
from opsq._schemas import SCHEMAS


def test_every_op_registered_with_fake_reference_and_autograd():
    for name in SCHEMAS:
        qual = f"opsq::{name}"
        assert hasattr(torch.ops.opsq, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Meta")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qual, "Autograd")


def test_argument_names_agree_between_schema_reference_and_fake():
    from opsq import meta
    fakes = {}
    for mod in (meta.fourbit, meta.blockwise, meta.int8, meta.layout):
        for attr, fn in vars(mod).items():
            if attr.startswith("_") and attr.endswith("_fake"):
                fakes[attr[1:-5]] = fn
    fakes["gemv_4bit"] = fakes["linear_4bit"]
    for name in SCHEMAS:
        schema_names = _arg_names(name)
        ref = list(inspect.signature(reference.KERNELS[name]).parameters)
        assert ref == schema_names, (name, ref, schema_names)
        fake_names = list(inspect.signature(fakes[name]).parameters)
        assert fake_names == schema_names, (name, fake_names, schema_names)


def test_backends_report_lists_every_op():
    report = opsq.backends()
    assert set(report) == set(SCHEMAS)
    assert all(v["cpu"] == "reference" for v in report.values())
