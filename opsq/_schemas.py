"""The opsq op registry: every schema of ``torch.ops.opsq.*``, written exactly once.

Backends only add implementations: the fake kernels in :mod:`opsq.meta`, the pure-PyTorch
reference kernels in :mod:`opsq.reference` (the CPU path and the test oracle) and the CUDA
kernels registered from C++ (``opsq/csrc``, ``TORCH_LIBRARY_IMPL(opsq, CUDA, m)``).

Vocabulary (the same name means the same thing in every layer):

* ``A``: the main input (activations, or the tensor being quantized / dequantized).
* ``B``: a weight. For 4-bit ops it is the packed code tensor, shape ``(k, 1)`` in any
  ``quant_storage`` dtype (viewed as bytes); ``shapeB`` is the logical weight shape
  ``[N, K]`` (out_features, in_features). For int8 ops it is ``CB`` (int8 ``(N, K)``) or a
  floating-point weight that is quantized per call.
* ``absmax``: fp32 per-block scale (or uint8 codes when nested, with ``nested_absmax``,
  ``nested_code``, ``offset`` and ``nested_blocksize`` describing the 8-bit second level).
* ``layout``: the byte order of a 4-bit weight's ``B`` and ``absmax``: ``"packed"``
  (bitsandbytes', the default) or ``"tiled16"`` (the decode kernel's permutation of the same
  bytes, :mod:`opsq._tiled16`; blocksize 64, ``N % 16 == 0``, ``K % 256 == 0``).
* ``code``: a 256-entry fp32 map for 8-bit blockwise quantization.
* ``threshold``: LLM.int8 outlier threshold; 0.0 disables outlier handling.
* Outliers are returned as a static boolean column mask ``outlier_cols`` of shape ``(K,)``,
  never as data-dependent index tensors, so every op has static output shapes.
"""
from __future__ import annotations

import torch

NAMESPACE = "opsq"

_NESTED = ("Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
           "int nested_blocksize=256")
# The byte layout of a 4-bit weight's codes and absmax (opsq._constants.LAYOUTS_4BIT): "packed"
# (bitsandbytes') or "tiled16" (opsq._tiled16: the decode kernel's order, CUDA weights only).
_LAYOUT = 'str layout="packed"'

SCHEMAS: dict[str, str] = {
    # ---- 4-bit (NF4 / FP4) -------------------------------------------------------------
    "quantize_4bit":
        "(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)",
    # layout "tiled16" reads a tiled16 weight (shape [N, K]) in place; the default reads the packed
    # bytes, as bitsandbytes' dequantize_4bit does
    "dequantize_4bit":
        "(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
        f"ScalarType dtype, {_NESTED}, {_LAYOUT}) -> Tensor",
    # bitsandbytes' name for the batch-1 call of the same op: an alias of linear_4bit (see
    # ALIASES), one kernel and one autograd formula for both
    "gemv_4bit":
        "(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, int blocksize, str quant_type, "
        f"Tensor? bias=None, {_NESTED}, {_LAYOUT}) -> Tensor",
    "linear_4bit":
        "(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, int blocksize, str quant_type, "
        f"Tensor? bias=None, {_NESTED}, {_LAYOUT}) -> Tensor",
    # several 4-bit linears of one input A in one call (vLLM's "merged" linear: q/k/v, gate/up),
    # out[g] = linear_4bit(A, B[g], [N[g], K], absmax[g], ..., bias[g], nested...[g]); one launch
    # on CUDA where the decode kernel serves every weight. Lists of one entry a weight (None
    # where a weight has no bias / plain absmax). Written into compiled decode graphs by
    # opsq.fusion's pass; differentiable in A only.
    "linear_4bit_merged":
        "(Tensor A, Tensor[] B, SymInt[] N, Tensor[] absmax, int blocksize, str quant_type, "
        "Tensor?[] bias, Tensor?[] nested_absmax, Tensor?[] nested_code, Tensor?[] offset, "
        f"int nested_blocksize=256, {_LAYOUT}) -> Tensor[]",
    # ---- 8-bit blockwise (dynamic map), used for nested absmax ---------------------------
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise":
        "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    # ---- LLM.int8 --------------------------------------------------------------------------
    "vectorwise_quant": "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor)",
    "double_quant":
        "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "igemmlt": "(Tensor A, Tensor B) -> Tensor",
    "mm_dequant":
        "(Tensor A, Tensor row_stats, Tensor col_stats, Tensor? bias=None, "
        "ScalarType? dtype=None) -> Tensor",
    "int8_linear":
        "(Tensor A, Tensor B, Tensor? SCB=None, Tensor? bias=None, float threshold=0.0) -> Tensor",
    # ---- legacy cuBLASLt int8 layouts ------------------------------------------------------
    "transform": "(Tensor A, str from_order, str to_order, SymInt[] shape) -> Tensor",
}

#: ``{alias: op}``: ops defined only as a call of another op with the same schema
#: (``CompositeImplicitAutograd``: no kernels, fake or autograd of their own; a compiled graph
#: shows the target op).
ALIASES: dict[str, str] = {"gemv_4bit": "linear_4bit"}

#: Ops other libraries call under bitsandbytes' names and argument order, written as a call of
#: opsq ops (``CompositeImplicitAutograd``, bodies in :mod:`opsq._composites`): no kernels, fake
#: or autograd of their own, every device the ops they call serve; a compiled graph shows those.
COMPOSITES: dict[str, str] = {
    # bitsandbytes' 4-bit matmul: nested statistics as absmax_8bit (uint8 codes), absmax (their
    # fp32 scale per 256), absmax_code, absmax_offset (0-dim); opsq's linear_4bit
    "gemm_4bit":
        "(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, int blocksize, str quant_type, "
        "Tensor? bias=None, Tensor? absmax_8bit=None, Tensor? absmax_code=None, "
        "Tensor? absmax_offset=None) -> Tensor",
    # int8 x int8 -> int32, dequantized with row and column statistics, + bias: igemmlt then
    # mm_dequant
    "int8_scaled_mm":
        "(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, "
        "ScalarType? dtype=None) -> Tensor",
}

#: ``name.out`` overloads (CUDA-graph users preallocate outputs): the op's result written into
#: ``out`` (same shape and dtype, else ValueError / TypeError naming it), which is returned.
OUT_OVERLOADS: dict[str, str] = {
    "igemmlt": "(Tensor A, Tensor B, *, Tensor(a!) out) -> Tensor(a!)",
    "dequantize_4bit":
        "(Tensor A, Tensor absmax, int blocksize, str quant_type, SymInt[] shape, "
        f"ScalarType dtype, {_NESTED}, {_LAYOUT}, *, Tensor(a!) out) -> Tensor(a!)",
    "gemv_4bit":
        "(Tensor A, Tensor B, SymInt[] shapeB, Tensor absmax, int blocksize, str quant_type, "
        f"Tensor? bias=None, {_NESTED}, {_LAYOUT}, *, Tensor(a!) out) -> Tensor(a!)",
    "quantize_blockwise":
        "(Tensor A, Tensor code, int blocksize, *, Tensor(a!) out, Tensor(b!) absmax_out) "
        "-> (Tensor(a!), Tensor(b!))",
    "dequantize_blockwise":
        "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, *, "
        "Tensor(a!) out) -> Tensor(a!)",
}

#: In-place optimizer updates (bitsandbytes 0.50's names, argument names and order; Dettmers et
#: al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022). ``optimizer_name`` is one of
#: "adam", "ademamix", "lion", "momentum", "rmsprop". They write the parameter ``p`` and the
#: states and return nothing: every written tensor is declared ``Tensor(x!)`` (so
#: functionalization, torch.compile and CUDA graphs see the writes); ``g`` and the maps are only
#: read. Fake kernels in :mod:`opsq.meta.optim`, reference kernels in :mod:`opsq.reference.optim`;
#: no derivative (:mod:`opsq._autograd` registers them as in-place, non-differentiable ops).
#: 32-bit: fp32 states; ``state1`` is ``(2, *p.shape)`` for "ademamix" (its two EMAs).
#: 8-bit blockwise: uint8 states, quantized per 256 elements with the 8-bit dynamic map
#: (``qmap1`` signed, ``qmap2`` unsigned), one fp32 ``absmax`` per block.
OPTIMIZER_SCHEMAS: dict[str, str] = {
    "optimizer_update_32bit":
        "(str optimizer_name, Tensor g, Tensor(a!) p, Tensor(b!) state1, Tensor(c!)? state2, "
        "Tensor(d!)? unorm_vec, float max_unorm, float param_norm, float beta1, float beta2, "
        "float beta3, float alpha, float eps, float weight_decay, SymInt step, float lr, "
        "float gnorm_scale=1.0, bool skip_zeros=False) -> ()",
    "optimizer_update_8bit_blockwise":
        "(str optimizer_name, Tensor g, Tensor(a!) p, Tensor(b!) state1, Tensor(c!)? state2, "
        "float beta1, float beta2, float beta3, float alpha, float eps, SymInt step, float lr, "
        "Tensor qmap1, Tensor? qmap2, Tensor(d!) absmax1, Tensor(e!)? absmax2, "
        "float weight_decay=0.0, float gnorm_scale=1.0, bool skip_zeros=False) -> ()",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in {**SCHEMAS, **OPTIMIZER_SCHEMAS}.items():
    _lib.define(_name + _schema)
for _name, _schema in COMPOSITES.items():
    _lib.define(_name + _schema)
for _name, _schema in OUT_OVERLOADS.items():
    _lib.define(_name + ".out" + _schema)


def _alias_kernel(target: str):
    op = getattr(torch.ops.opsq, target)

    def kernel(*args, **kwargs):
        return op(*args, **kwargs)
    return kernel


for _alias, _target in ALIASES.items():
    assert SCHEMAS[_alias] == SCHEMAS[_target], _alias
    _lib.impl(_alias, _alias_kernel(_target), "CompositeImplicitAutograd")


from . import _composites  # noqa: E402  (the bodies above; they call torch.ops.opsq)

for _name in COMPOSITES:
    _lib.impl(_name, getattr(_composites, _name), "CompositeImplicitAutograd")
for _name in OUT_OVERLOADS:
    _lib.impl(_name + ".out", _composites.out_kernel(_name), "CompositeImplicitAutograd")


def qualname(name: str) -> str:
    """``"quantize_4bit"`` -> ``"opsq::quantize_4bit"``."""
    return f"{NAMESPACE}::{name}"
