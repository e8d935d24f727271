"""The registry: every op defined once, with matching argument names in every layer."""
import inspect

import torch

import opsq
from opsq import reference
from opsq._autograd import _arg_names
from opsq._schemas import ALIASES, OPTIMIZER_SCHEMAS, SCHEMAS


def test_every_op_registered_with_fake_reference_and_autograd():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for name in [*SCHEMAS, *OPTIMIZER_SCHEMAS]:
        qual = f"opsq::{name}"
        assert hasattr(torch.ops.opsq, name)
        if name in ALIASES:  # one kernel, fake and formula: the target's
            assert has(qual, "CompositeImplicitAutograd")
            assert not any(has(qual, k) for k in ("CompositeExplicitAutograd", "Meta", "CUDA"))
            continue
        assert has(qual, "CompositeExplicitAutograd")
        assert has(qual, "Meta")
        assert has(qual, "Autograd")


def test_optimizer_ops_declare_their_writes_and_return_nothing():
    """The in-place updates: every tensor they write is declared (a!), nothing else is, and
    they version-bump what they write (ADInplaceOrView) as torch.library.custom_op would."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    written = {"optimizer_update_32bit": {"p", "state1", "state2", "unorm_vec"},
               "optimizer_update_8bit_blockwise": {"p", "state1", "state2", "absmax1",
                                                   "absmax2"}}
    assert set(OPTIMIZER_SCHEMAS) == set(written) and not set(OPTIMIZER_SCHEMAS) & set(SCHEMAS)
    for name, want in written.items():
        schema = getattr(torch.ops.opsq, name).default._schema
        got = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
        assert got == want, name
        assert len(schema.returns) == 0
        assert has(f"opsq::{name}", "ADInplaceOrView")


def test_alias_is_the_same_op():
    A = torch.randn(3, 64)
    packed, absmax = torch.ops.opsq.quantize_4bit(torch.randn(16, 64), 64, "nf4", torch.uint8)
    for alias, target in ALIASES.items():
        assert SCHEMAS[alias] == SCHEMAS[target]
        args = (A, packed, [16, 64], absmax, 64, "nf4")
        assert torch.equal(getattr(torch.ops.opsq, alias)(*args),
                           getattr(torch.ops.opsq, target)(*args))
        # a traced graph (what AOTAutograd / Inductor see) holds the target op only
        from torch.fx.experimental.proxy_tensor import make_fx
        gm = make_fx(lambda a: getattr(torch.ops.opsq, alias)(a, *args[1:]))(A)
        assert f"opsq.{target}" in gm.code and f"opsq.{alias}" not in gm.code


def test_argument_names_agree_between_schema_reference_and_fake():
    from opsq import meta
    fakes = {}
    for mod in (meta.fourbit, meta.blockwise, meta.int8, meta.layout, meta.optim):
        for attr, fn in vars(mod).items():
            if attr.startswith("_") and attr.endswith("_fake"):
                fakes[attr[1:-5]] = fn
    for name in (set(SCHEMAS) | set(OPTIMIZER_SCHEMAS)) - set(ALIASES):
        schema_names = [a.name for a in getattr(torch.ops.opsq, name).default._schema.arguments]
        if name in SCHEMAS:
            assert _arg_names(name) == schema_names
        ref = list(inspect.signature(reference.KERNELS[name]).parameters)
        assert ref == schema_names, (name, ref, schema_names)
        fake_names = list(inspect.signature(fakes[name]).parameters)
        assert fake_names == schema_names, (name, fake_names, schema_names)


def test_backends_report_lists_every_op():
    report = opsq.backends()
    assert set(report) == set(SCHEMAS) | set(OPTIMIZER_SCHEMAS)
    assert all(v["cpu"].startswith("reference") for v in report.values())
