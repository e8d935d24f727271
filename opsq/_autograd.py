"""Autograd of the opsq ops, attached with ``torch.library.register_autograd``.

bitsandbytes keeps its gradients in ``torch.autograd.Function`` classes; opsq puts them on the
ops, so ``torch.ops.opsq.*`` are differentiable wherever they are called and a compiled backward
graph contains opsq ops. Every backward below is built from opsq ops and torch ops only (so it
compiles, and is itself differentiable: double backward works), saves its tensors with
``ctx.save_for_backward`` (so non-reentrant activation checkpointing can drop and recompute
them) and saves only what ``ctx.needs_input_grad`` asks for.

The answer for every input, op by op (``W`` = the dequantized weight, ``G`` = the incoming
gradient, flattened to rows):

* ``linear_4bit`` (and its alias ``gemv_4bit``): ``A`` -> ``G @ W``; ``bias`` -> ``G.sum(0)``;
  a float32 ``absmax`` -> per-block sums of ``(G.T @ A) * code_values``; with nested statistics,
  ``nested_absmax``, ``nested_code`` and ``offset`` by the chain rule through
  ``absmax = nested_code[q] * nested_absmax + offset``. The packed codes ``B`` get None even
  when their storage dtype is floating point (bf16 storage holds bytes, not numbers). A
  ``layout="tiled16"`` weight is read in place (``W`` and the code values come from
  ``dequantize_4bit(..., layout="tiled16")``; the codes are not un-packed); only the statistics'
  formulas un-pack ``absmax`` (1/32 of the codes' bytes, and only when one of them needs a
  gradient), and the ``absmax`` gradient is permuted back to tiled16 order.
* ``linear_4bit_merged``: ``A`` -> the sum over its weights of ``G[g] @ W[g]``. Its lists
  (weights, biases, statistics) take no gradient: a call in which one of their tensors requires
  grad while grad mode is on raises NotImplementedError (call ``linear_4bit`` per weight), so
  that no gradient is silently dropped.
* ``dequantize_4bit``: as above with ``G`` itself as the gradient of ``W``: ``absmax`` (fp32),
  ``nested_absmax``, ``nested_code``, ``offset``; the packed codes get None. ``layout`` as for
  ``linear_4bit``.
* ``dequantize_blockwise``: ``absmax`` and ``code``; the uint8 codes ``A`` cannot require grad.
* ``int8_linear``: ``A`` -> ``G @ dequant(CB)`` (the derivative of the forward with the input
  quantization treated as identity; ``CB`` is the int8 weight, or the per-call quantization of a
  float ``B``, as bitsandbytes' ``MatMul8bitLt``); a floating-point ``B`` -> ``G.T @ A`` (the
  straight-through estimator of LLM.int8 training); ``SCB`` -> the exact derivative
  ``(G * (dequant(CA) @ CB.T + outlier part) / 127).sum(0)`` (the output is linear in ``SCB``);
  ``bias`` -> ``G.sum(0)``. The outlier threshold does not change the gradients (outlier
  columns are multiplied against the same dequantized weight).
* ``mm_dequant``: ``row_stats``, ``col_stats`` and ``bias`` (the output is linear in each); the
  int32 ``A`` cannot require grad.
* Quantizers (``quantize_4bit``, ``quantize_blockwise``, ``vectorwise_quant``, ``double_quant``):
  rounding has a zero derivative almost everywhere, so every output, statistics included, is
  marked non-differentiable and the inputs get None. Train through a quantizer with an explicit
  straight-through estimator (as ``int8_linear`` does for a float ``B``).
* ``igemmlt`` and ``transform`` take only int8 tensors, which cannot require grad.
* The optimizer updates (``optimizer_update_32bit``, ``optimizer_update_8bit_blockwise``) write
  their arguments in place and return nothing: no derivative; they refuse to run where a
  gradient could flow and bump the version counters of what they write.
"""
from __future__ import annotations

import functools

import torch

from . import _tiled16
from ._schemas import OPTIMIZER_SCHEMAS, SCHEMAS

ops = torch.ops.opsq
_INV127 = 1.0 / 127.0
_INV127SQ = 1.0 / (127.0 * 127.0)


@functools.lru_cache(maxsize=None)
def _names(name: str) -> tuple[str, ...]:
    schema = torch._C.parse_schema(f"opsq::{name}{SCHEMAS[name]}")
    return tuple(a.name for a in schema.arguments)


def _arg_names(name: str) -> list[str]:
    """The argument names of op ``name``, in schema order."""
    return list(_names(name))


class _Args:
    """Inputs of an op call by schema name (``setup_context`` receives them positionally)."""

    def __init__(self, name: str, inputs):
        self.__dict__.update(zip(_names(name), inputs))


def _need(ctx, name: str, *args: str) -> dict[str, bool]:
    """``{arg: needs grad}`` for the named arguments of op ``name``."""
    index = {n: i for i, n in enumerate(_names(name))}
    need = ctx.needs_input_grad  # only as long as the arguments actually passed
    return {a: index[a] < len(need) and bool(need[index[a]]) for a in args}


def _grads(name: str, **grads) -> tuple:
    """The backward's return tuple: ``grads`` by argument name, None everywhere else."""
    return tuple(grads.get(n) for n in _names(name))


#: ``{op name: (setup_context, backward)}`` of every op registered through :func:`_register`.
_FORMULAS: dict = {}


def _register(name: str, backward, setup_context) -> None:
    """``torch.library.register_autograd`` for ``opsq::name``, remembering the formula so the
    C++ Autograd kernels of the hot ops can reuse it (:func:`install_native_callbacks`)."""
    _FORMULAS[name] = (setup_context, backward)
    torch.library.register_autograd(f"opsq::{name}", backward, setup_context=setup_context)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _bias_grad(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _rows(grad).sum(0, dtype=torch.float32).to(dtype)


def _block_sums(values: torch.Tensor, blocksize: int, blocks) -> torch.Tensor:
    """Sums of consecutive blocks of ``blocksize`` flat elements (last block zero-padded)."""
    flat = values.reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, blocks * blocksize - flat.numel()))
    return flat.view(blocks, blocksize).sum(1)


def _per_element(scales: torch.Tensor, blocksize: int, n) -> torch.Tensor:
    """``scales[i // blocksize]`` for ``i < n``."""
    return scales.reshape(-1, 1).expand(-1, blocksize).reshape(-1)[:n]


def _code_grad(codes: torch.Tensor, values: torch.Tensor, code_numel: int) -> torch.Tensor:
    """Gradient of a code table: ``values`` summed per code index."""
    out = torch.zeros(code_numel, dtype=torch.float32, device=values.device)
    return out.index_add(0, codes.reshape(-1).long(), values.reshape(-1).float())


# ---- statistics of the 4-bit format ------------------------------------------------------------
_STATS_4BIT = ("absmax", "nested_absmax", "nested_code", "offset")


def _stat_grads_4bit(need: dict, grad_W: torch.Tensor, B, absmax, blocksize, quant_type, shape,
                     nested_absmax, nested_code, offset, nested_blocksize,
                     layout: str = "packed") -> dict:
    """Gradients of the 4-bit statistics given ``grad_W``, the gradient of the dequantized
    weight (any float dtype, the logical shape). Only the entries ``need`` asks for. ``B`` and
    ``absmax`` are in ``layout``; a tiled16 ``absmax`` is un-packed here (the nested formulas
    index it in block order) and its gradient returned in tiled16 order."""
    out: dict = {}
    if not any(need[k] for k in _STATS_4BIT):
        return out
    tiled = layout == "tiled16"
    if tiled:
        absmax = _tiled16.unpack_absmax(absmax, shape)
    blocks = absmax.numel()
    # The code values (absmax = 1, the same in either order) times the gradient, summed per
    # block (bitsandbytes' block order).
    ones = torch.ones(blocks, dtype=torch.float32, device=grad_W.device)
    unit = ops.dequantize_4bit(B, ones, blocksize, quant_type, shape, torch.float32,
                               layout=layout)
    grad_absmax = _block_sums(grad_W.float() * unit, blocksize, blocks)
    if absmax.dtype == torch.float32:
        if need["absmax"]:
            out["absmax"] = _tiled16.repack_absmax(grad_absmax, shape) if tiled else grad_absmax
        return out
    # Nested: absmax = nested_code[q] * nested_absmax[i // nested_blocksize] + offset.
    if need["nested_absmax"]:
        ones2 = torch.ones_like(nested_absmax)
        unit2 = ops.dequantize_blockwise(absmax, ones2, nested_code, nested_blocksize,
                                         torch.float32)
        out["nested_absmax"] = _block_sums(grad_absmax * unit2, nested_blocksize,
                                           nested_absmax.numel())
    if need["nested_code"]:
        scale = _per_element(nested_absmax, nested_blocksize, blocks)
        out["nested_code"] = _code_grad(absmax, grad_absmax * scale, nested_code.numel())
    if need["offset"]:
        out["offset"] = grad_absmax.sum().reshape(offset.shape)
    return out


# ---- linear_4bit / gemv_4bit -------------------------------------------------------------------
def _make_linear_4bit_autograd(name: str):
    def setup_context(ctx, inputs, output):
        a = _Args(name, inputs)
        need = _need(ctx, name, "A", "bias", *_STATS_4BIT)
        ctx.need = need
        ctx.meta = (list(a.shapeB), a.blocksize, a.quant_type, a.nested_blocksize,
                    getattr(a, "layout", "packed"))
        ctx.bias_dtype = None if a.bias is None else a.bias.dtype
        stats = any(need[k] for k in _STATS_4BIT)
        keep = need["A"] or stats
        ctx.save_for_backward(
            a.A if stats else None, a.B if keep else None, a.absmax if keep else None,
            a.nested_absmax if keep else None, a.nested_code if keep else None,
            a.offset if keep else None)

    def backward(ctx, grad):
        A, B, absmax, nabs, ncode, offset = ctx.saved_tensors
        shapeB, blocksize, quant_type, nbs, layout = ctx.meta
        need = ctx.need
        grads = {}
        if need["A"]:  # a tiled16 weight is dequantized in place (one op, no un-pack)
            W = ops.dequantize_4bit(B, absmax, blocksize, quant_type, shapeB, grad.dtype, nabs,
                                    ncode, offset, nbs, layout)
            grads["A"] = grad.matmul(W)
        if need["bias"] and ctx.bias_dtype is not None:
            grads["bias"] = _bias_grad(grad, ctx.bias_dtype)
        if any(need[k] for k in _STATS_4BIT):
            grad_W = _rows(grad).t().float().matmul(_rows(A).float())
            grads.update(_stat_grads_4bit(need, grad_W, B, absmax, blocksize, quant_type,
                                          shapeB, nabs, ncode, offset, nbs, layout))
        return _grads(name, **grads)

    _register(name, backward, setup_context)


_make_linear_4bit_autograd("linear_4bit")


# ---- linear_4bit_merged ------------------------------------------------------------------------
def _merged_setup(ctx, inputs, output):
    a = _Args("linear_4bit_merged", inputs)
    # (setup_context runs only where a graph is recorded: grad mode on, an input requiring grad)
    for name in ("B", "absmax", "bias", "nested_absmax", "nested_code", "offset"):
        if any(t is not None and t.requires_grad for t in getattr(a, name)):
            raise NotImplementedError(
                f"linear_4bit_merged: {name} requires grad, and the merged op gives its lists "
                "no gradient; call linear_4bit for each weight instead")
    ctx.need_A = bool(ctx.needs_input_grad[0])
    ctx.meta = ([int(n) for n in a.N], a.A.shape[-1], a.blocksize, a.quant_type,
                a.nested_blocksize, a.layout)
    if ctx.need_A:  # lists cannot be saved with save_for_backward: held on ctx (no grad)
        ctx.weights = (list(a.B), list(a.absmax), list(a.nested_absmax), list(a.nested_code),
                       list(a.offset))


def _merged_backward(ctx, grads):
    # the return mirrors the inputs as torch.library structures them, which needs_input_grad
    # has in backward: a list of Nones for each list of tensors, None for anything else
    out = [[None] * len(x) if isinstance(x, (list, tuple)) else None
           for x in ctx.needs_input_grad]
    if not ctx.need_A:
        return tuple(out)
    N, K, blocksize, quant_type, nbs, layout = ctx.meta
    gA = None
    for g, (B, absmax, nabs, ncode, offset) in enumerate(zip(*ctx.weights)):
        if grads[g] is None:
            continue
        W = ops.dequantize_4bit(B, absmax, blocksize, quant_type, [N[g], K], grads[g].dtype,
                                nabs, ncode, offset, nbs, layout)
        term = grads[g].matmul(W)
        gA = term if gA is None else gA + term
    out[0] = gA
    return tuple(out)


_register("linear_4bit_merged", _merged_backward, _merged_setup)


# ---- dequantize_4bit ---------------------------------------------------------------------------
def _dq4_setup(ctx, inputs, output):
    a = _Args("dequantize_4bit", inputs)
    ctx.need = _need(ctx, "dequantize_4bit", *_STATS_4BIT)
    ctx.meta = (a.blocksize, a.quant_type, list(a.shape), a.nested_blocksize,
                getattr(a, "layout", "packed"))
    if any(ctx.need.values()):
        ctx.save_for_backward(a.A, a.absmax, a.nested_absmax, a.nested_code, a.offset)


def _dq4_backward(ctx, grad):
    if not any(ctx.need.values()):
        return _grads("dequantize_4bit")
    A, absmax, nabs, ncode, offset = ctx.saved_tensors
    blocksize, quant_type, shape, nbs, layout = ctx.meta
    return _grads("dequantize_4bit",
                  **_stat_grads_4bit(ctx.need, grad, A, absmax, blocksize, quant_type, shape,
                                     nabs, ncode, offset, nbs, layout))


_register("dequantize_4bit", _dq4_backward, _dq4_setup)


# ---- dequantize_blockwise ----------------------------------------------------------------------
def _dqb_setup(ctx, inputs, output):
    a = _Args("dequantize_blockwise", inputs)
    ctx.need = _need(ctx, "dequantize_blockwise", "absmax", "code")
    ctx.blocksize = a.blocksize
    if any(ctx.need.values()):
        ctx.save_for_backward(a.A, a.absmax, a.code)


def _dqb_backward(ctx, grad):
    grads = {}
    if any(ctx.need.values()):
        A, absmax, code = ctx.saved_tensors
        bs = ctx.blocksize
        if ctx.need["absmax"]:
            ones = torch.ones_like(absmax)
            unit = ops.dequantize_blockwise(A, ones, code, bs, torch.float32)
            grads["absmax"] = _block_sums(grad.float() * unit, bs, absmax.numel())
        if ctx.need["code"]:
            scale = _per_element(absmax, bs, A.numel())
            grads["code"] = _code_grad(A, grad.reshape(-1).float() * scale,
                                       code.numel()).to(code.dtype)
    return _grads("dequantize_blockwise", **grads)


_register("dequantize_blockwise", _dqb_backward, _dqb_setup)


# ---- int8_linear -------------------------------------------------------------------------------
def _dequant_rows(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``CB * SCB / 127`` (int8 rows times their absmax), in ``dtype``."""
    return (CB.float() * (SCB.reshape(-1, 1) * _INV127)).to(dtype)


def _i8l_setup(ctx, inputs, output):
    a = _Args("int8_linear", inputs)
    need = _need(ctx, "int8_linear", "A", "B", "SCB", "bias")
    ctx.need = need
    ctx.B_dtype = a.B.dtype
    ctx.threshold = a.threshold
    ctx.bias_dtype = None if a.bias is None else a.bias.dtype
    keep_A = need["B"] or need["SCB"]
    keep_B = need["A"] or need["SCB"]
    ctx.save_for_backward(a.A if keep_A else None, a.B if keep_B else None,
                          a.SCB if keep_B else None)


def _i8l_backward(ctx, grad):
    A, B, SCB = ctx.saved_tensors
    need = ctx.need
    grads = {}
    if need["A"]:
        if B.dtype == torch.int8:
            CB, scb = B, SCB
        else:  # the weight the forward multiplied with: B quantized per call
            CB, scb, _ = ops.vectorwise_quant(B, 0.0)
        grads["A"] = grad.matmul(_dequant_rows(CB, scb, grad.dtype))
    if need["B"]:  # only a floating-point B can require grad
        g = _rows(grad)
        grads["B"] = g.t().matmul(_rows(A).to(g.dtype)).to(ctx.B_dtype)
    if need["SCB"]:
        # Exact: y[m, n] = (C[m, n] * SCA[m] / 127 + (A * outlier_cols)[m] . CB[n]) * SCB[n] / 127
        # with C = igemmlt(CA, CB); dy/dSCB[n] is the same without the factor SCB[n].
        A2 = _rows(A)
        CA, SCA, cols = ops.vectorwise_quant(A2, ctx.threshold)
        ones = torch.ones_like(SCB)
        dy = ops.mm_dequant(ops.igemmlt(CA, B), SCA, ones, None, torch.float32)
        if ctx.threshold > 0.0:
            dy = dy + (A2.float() * cols).matmul(B.float().t()) * _INV127
        grads["SCB"] = (_rows(grad).float() * dy).sum(0).to(SCB.dtype)
    if need["bias"] and ctx.bias_dtype is not None:
        grads["bias"] = _bias_grad(grad, ctx.bias_dtype)
    return _grads("int8_linear", **grads)


_register("int8_linear", _i8l_backward, _i8l_setup)


# ---- mm_dequant --------------------------------------------------------------------------------
def _mmd_setup(ctx, inputs, output):
    a = _Args("mm_dequant", inputs)
    need = _need(ctx, "mm_dequant", "row_stats", "col_stats", "bias")
    ctx.need = need
    ctx.bias_dtype = None if a.bias is None else a.bias.dtype
    stats = need["row_stats"] or need["col_stats"]
    ctx.save_for_backward(a.A if stats else None, a.row_stats if stats else None,
                          a.col_stats if stats else None)


def _mmd_backward(ctx, grad):
    A, row, col = ctx.saved_tensors
    need = ctx.need
    grads = {}
    if need["row_stats"] or need["col_stats"]:
        # out = A * row[:, None] * col[None, :] / 127**2 (+ bias)
        gA = _rows(grad).float() * _rows(A).float() * _INV127SQ
        if need["row_stats"]:
            grads["row_stats"] = gA.matmul(col.reshape(-1).float()).reshape(row.shape)
        if need["col_stats"]:
            grads["col_stats"] = row.reshape(1, -1).float().matmul(gA).reshape(col.shape)
    if need["bias"] and ctx.bias_dtype is not None:
        grads["bias"] = _bias_grad(grad, ctx.bias_dtype)
    return _grads("mm_dequant", **grads)


_register("mm_dequant", _mmd_backward, _mmd_setup)


# ---- non-differentiable ops --------------------------------------------------------------------
def _register_non_differentiable(name: str):
    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*[o for o in outs if isinstance(o, torch.Tensor)])

    def backward(ctx, *grads):
        return _grads(name)

    _register(name, backward, setup_context)


NON_DIFFERENTIABLE = ("quantize_4bit", "quantize_blockwise", "vectorwise_quant", "double_quant",
                      "igemmlt", "transform")

for _name in NON_DIFFERENTIABLE:
    _register_non_differentiable(_name)


# ---- in-place ops (the optimizer updates) ------------------------------------------------------
# They return nothing and overwrite their Tensor(x!) arguments, so there is no derivative to
# register (``register_autograd`` does not take mutating ops). As ``torch.library.custom_op`` does
# for a mutating op, they get an Autograd kernel that redispatches below autograd (refusing to
# run where a gradient could flow: grad mode on and a tensor argument requiring grad) and an
# ADInplaceOrView kernel that bumps the version counter of every written tensor, so autograd
# notices a saved tensor that an update overwrote.
_INPLACE_LIB = torch.library.Library("opsq", "FRAGMENT")


def _register_in_place(name: str) -> None:
    op = getattr(ops, name).default
    schema = op._schema
    names = [a.name for a in schema.arguments]
    written = [i for i, a in enumerate(schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]

    def autograd_kernel(keyset, *args, **kwargs):
        if torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad
                for a in (*args, *kwargs.values())):
            raise RuntimeError(
                f"opsq::{name} updates its arguments in place and is not differentiable; call "
                "it under torch.no_grad() (as an optimizer's step does)")
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args, **kwargs)

    def version_bump_kernel(keyset, *args, **kwargs):
        for i in written:
            value = args[i] if i < len(args) else kwargs.get(names[i])
            if isinstance(value, torch.Tensor):
                torch.autograd.graph.increment_version(value)
        return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)

    _INPLACE_LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    _INPLACE_LIB.impl(name, version_bump_kernel, "ADInplaceOrView", with_keyset=True)


#: Ops that write their arguments in place and have no derivative.
IN_PLACE = tuple(OPTIMIZER_SCHEMAS)

for _name in IN_PLACE:
    _register_in_place(_name)


# ---- the C++ Autograd kernels' gradient path ---------------------------------------------------
#: Ops whose CUDA autograd kernel is C++ (``opsq/csrc/autograd.cpp``): it redispatches below
#: autograd without entering Python when no gradient is needed, and otherwise calls the
#: ``torch.autograd.Function`` built here from the same formula as the registration above.
NATIVE_AUTOGRAD_OPS = ("linear_4bit", "int8_linear")


def autograd_function(name: str) -> type:
    """A ``torch.autograd.Function`` computing ``opsq::name`` with the gradient registered above
    (same ``setup_context`` and ``backward``). Its ``apply`` takes every argument positionally,
    in schema order."""
    setup, backward = _FORMULAS[name]
    op = getattr(ops, name).default

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return type(f"{name}_function", (torch.autograd.Function,), dict(
        forward=staticmethod(forward),
        setup_context=staticmethod(setup),
        backward=staticmethod(backward)))


@functools.lru_cache(maxsize=None)
def _function(name: str) -> type:
    return autograd_function(name)


def apply_op(name: str, *args):
    """``torch.ops.opsq.<name>(*args)``, differentiable under ``torch.func`` transforms too.

    The ``torch.autograd.Function`` that ``register_autograd`` generates takes ``ctx`` in
    ``forward``, which ``torch.func.grad`` / ``vjp`` reject; while such a transform
    is active this calls :func:`autograd_function` (same formula, separate ``setup_context``)
    instead. Otherwise (eager, ``torch.compile``: the check is a constant there) it is the op
    call itself. ``args`` are positional, in schema order; omitted trailing ones take their
    defaults.
    """
    op = getattr(ops, name)
    if torch._C._are_functorch_transforms_active():
        full, _ = torch._library.utils.fill_defaults(op.default._schema, args, {})
        return _function(name).apply(*full)
    return op(*args)


def install_native_callbacks(ext) -> None:
    """Give the C++ Autograd kernels of :data:`NATIVE_AUTOGRAD_OPS` their gradient path."""
    for name in NATIVE_AUTOGRAD_OPS:
        ext.set_autograd_callback(name, _function(name).apply)
