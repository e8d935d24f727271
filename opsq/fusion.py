"""Graph passes that cut the number of quantized-linear launches in a compiled decode step.

A decoder layer calls several linears on the same activation: Llama's q/k/v projections read
one normed hidden state, gate/up another. At decode batch sizes each 4-bit call is one gemv
launch whose fixed cost (launch, first DRAM round trip, table fill: ~5 us on an H100,
benchmarks/NOTES.md "Tenth session") is a large share of the small shapes' time, so
:func:`merge_linear_4bit` rewrites sibling ``opsq::linear_4bit`` calls of one graph into one
``opsq::linear_4bit_merged`` call each group (vLLM calls such a layer a merged linear), whose
CUDA kernel streams all the group's weights in one launch. Each output keeps its bytes: the
merged op computes every weight exactly as ``linear_4bit`` does alone.

The rewrite runs on the post-grad graph of Inductor (:class:`MergeLinear4bitPass`, passed as
``torch.compile(..., options=compile_options("reduce-overhead"))``;
:class:`opsq.decoding.StaticGreedyDecoder` does so by default, and transformers' compiled
``generate`` takes ``CompileConfig(fullgraph=True, mode=None, options=compile_options())``) or
on any FX graph.
"""
from __future__ import annotations

import operator

import torch

__all__ = ["merge_linear_4bit", "MergeLinear4bitPass", "compile_options", "MAX_MERGED"]

#: Weights a merged call takes at most (the CUDA kernel's segment count); larger groups are cut
#: into several calls.
MAX_MERGED = 4

_LINEAR = torch.ops.opsq.linear_4bit.default
_MERGED = torch.ops.opsq.linear_4bit_merged.default
_NAMES = [a.name for a in _LINEAR._schema.arguments]
_DEFAULTS = {a.name: a.default_value for a in _LINEAR._schema.arguments if a.has_default_value()}
_SCALARS = ("blocksize", "quant_type", "nested_blocksize", "layout")
_LISTED = ("bias", "nested_absmax", "nested_code", "offset")


def _arguments(node: torch.fx.Node) -> dict | None:
    """``{argument name: value}`` of a ``linear_4bit`` call node, defaults filled in; None where
    the call cannot be merged (a shape or a scalar that is not a plain constant)."""
    args = dict(zip(_NAMES, node.args))
    args.update(node.kwargs)
    for name in _NAMES:
        if name not in args:
            if name not in _DEFAULTS:
                return None
            args[name] = _DEFAULTS[name]
    shape = args["shapeB"]
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(type(s) is int for s in shape)):
        return None
    if not all(isinstance(args[k], (int, str)) for k in _SCALARS):
        return None
    if not isinstance(args["A"], torch.fx.Node):
        return None
    return args


def _check_max_merged(max_merged: int) -> None:
    if max_merged < 2:
        raise ValueError(f"max_merged must be >= 2, got {max_merged}")


def merge_linear_4bit(graph: torch.fx.Graph, max_merged: int = MAX_MERGED) -> int:
    """Rewrite sibling ``opsq::linear_4bit`` calls of ``graph`` in place.

    Calls are siblings when they read the same activation node ``A`` with the same
    ``blocksize``, ``quant_type``, ``nested_blocksize``, ``layout``, ``K`` (``shapeB[1]``) and
    kind of statistics (plain or nested).
    Each group of two or more (in graph order, cut into runs of at most ``max_merged``) becomes
    one ``linear_4bit_merged`` call placed where the group's first call was, whose outputs
    replace the calls' (``operator.getitem``). Inputs of a later call produced after the first
    call (a constant's fetch, the view of a statistic) move up where they are pure; a group is
    left alone where one is not (the merged call could not come first).

    Args:
        graph: an FX graph (Inductor's post-grad graph, or one from ``make_fx``).
        max_merged: weights a merged call may take (>= 2).
    Returns:
        The number of merged calls written.
    Raises:
        ValueError: ``max_merged`` < 2.
    """
    _check_max_merged(max_merged)
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not _LINEAR:
            continue
        args = _arguments(node)
        if args is None:
            continue
        # (plain and nested statistics apart: one kernel instance serves a merged call)
        key = (args["A"], args["shapeB"][1], args["nested_absmax"] is None,
               *(args[k] for k in _SCALARS))
        groups.setdefault(key, []).append((node, args))
    merged = 0
    for members in groups.values():
        for start in range(0, len(members), max_merged):
            run = members[start:start + max_merged]
            if len(run) < 2:
                continue
            first = run[0][0]
            moves = _hoistable([i for node, _ in run[1:] for i in node.all_input_nodes],
                               first, order)
            if moves is None:
                continue
            for i in moves:  # in dependency order, each right before the first call
                first.prepend(i)
            _rewrite(graph, run)
            merged += 1
    if merged:
        graph.lint()
    return merged


def _hoistable(nodes: list, first: torch.fx.Node, order: dict) -> list | None:
    """The nodes among ``nodes`` (and their inputs) that come after ``first``, in dependency
    order, where every one of them is pure (a view of a statistic, a constant's fetch) and so
    may move before ``first``; None where one may not (then the group stays as it is)."""
    moves: list = []
    seen: set = set()

    def visit(n: torch.fx.Node) -> bool:
        if order[n] < order[first] or n in seen:
            return True
        if n is first or n.op not in ("call_function", "call_method", "get_attr") or n.is_impure():
            return False
        seen.add(n)
        if not all(visit(i) for i in n.all_input_nodes):
            return False
        moves.append(n)
        return True

    return moves if all(visit(n) for n in nodes) else None


def _rewrite(graph: torch.fx.Graph, run: list) -> None:
    first_node, first = run[0]
    lists = {k: [a[k] for _, a in run] for k in ("B", "absmax", *_LISTED)}
    with graph.inserting_before(first_node):
        call = graph.call_function(_MERGED, (
            first["A"], lists["B"], [a["shapeB"][0] for _, a in run], lists["absmax"],
            first["blocksize"], first["quant_type"], lists["bias"], lists["nested_absmax"],
            lists["nested_code"], lists["offset"], first["nested_blocksize"], first["layout"]))
        vals = [node.meta.get("val") for node, _ in run]
        if all(v is not None for v in vals):
            call.meta["val"] = vals
        for i, (node, _) in enumerate(run):
            item = graph.call_function(operator.getitem, (call, i))
            item.meta.update(node.meta)
            node.replace_all_uses_with(item)
    for node, _ in run:
        graph.erase_node(node)


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # pragma: no cover - older torch
    CustomGraphPass = object
    get_hash_for_files = None


class MergeLinear4bitPass(CustomGraphPass):
    """:func:`merge_linear_4bit` as an Inductor post-grad pass
    (``options={"post_grad_custom_post_pass": MergeLinear4bitPass()}``); its cache key is the
    hash of this file, so a changed pass recompiles."""

    def __init__(self, max_merged: int = MAX_MERGED):
        _check_max_merged(max_merged)
        self.max_merged = max_merged

    def __call__(self, graph: torch.fx.Graph) -> None:
        merge_linear_4bit(graph, self.max_merged)

    def uuid(self):
        digest = get_hash_for_files((__file__,)).hex() if get_hash_for_files else ""
        return f"{digest}-{self.max_merged}"

    def __eq__(self, other) -> bool:  # equal settings: equal passes (transformers compares
        # CompileConfigs to decide whether to compile again)
        return type(other) is type(self) and other.max_merged == self.max_merged

    def __hash__(self) -> int:
        return hash((type(self), self.max_merged))


def compile_options(mode: str | None = "reduce-overhead", max_merged: int = MAX_MERGED) -> dict:
    """Inductor options of ``torch.compile`` ``mode`` plus :class:`MergeLinear4bitPass`.

    ``torch.compile`` takes a mode or options, not both, so the mode's options
    (``torch._inductor.list_mode_options``) are spelled out: pass the result as
    ``torch.compile(fn, fullgraph=True, options=compile_options())``, or to transformers as
    ``CompileConfig(fullgraph=True, mode=None, options=compile_options())``.

    Args:
        mode: a ``torch.compile`` mode (default ``"reduce-overhead"``: CUDA graphs) or None.
        max_merged: weights a merged call takes at most (>= 2; the CUDA kernel takes
            ``MAX_MERGED`` a launch).
    Raises:
        ValueError: ``max_merged`` < 2. RuntimeError: an unknown ``mode`` (torch's).
    """
    from torch._inductor import list_mode_options
    return dict(list_mode_options(mode) if mode else {},
                post_grad_custom_post_pass=MergeLinear4bitPass(max_merged))
