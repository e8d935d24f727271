"""The fastest way to decode a transformers causal LM with opsq layers: a greedy loop over one
compiled decode step.

``model.generate(..., cache_implementation="static", compile_config=...)`` replays the model's
kernels from a CUDA graph, but between two replays it runs transformers' own per-token Python
(input preparation, logits processors, stopping criteria, ``torch.cat`` of the ids, cache
bookkeeping), the same for bf16 and quantized models. :class:`StaticGreedyDecoder` keeps only
what a greedy token needs: the model forward is one ``torch.compile(mode="reduce-overhead",
fullgraph=True)`` graph, followed by the last-position ``argmax`` and two in-place updates of
the token and position, which stay on the GPU; the host synchronises once per call of
:meth:`generate`, not per token.

Example::

    from opsq.decoding import StaticGreedyDecoder
    dec = StaticGreedyDecoder(model, max_cache_len=4096)       # model: LlamaForCausalLM & co.
    tokens = dec.generate(input_ids, max_new_tokens=128)      # (B, 128) int64, on the GPU
"""
from __future__ import annotations

import inspect
import contextlib
from typing import Optional

import torch
from torch import nn

__all__ = ["StaticGreedyDecoder"]


def _rewindable(layer) -> bool:
    """A cache layer of transformers' ``StaticLayer`` kind (or, in versions without that class,
    any layer) without a sliding window: keys and values at their positions, nothing else to
    rewind (a full window's dropped entries and a hybrid model's linear-attention states are
    not restored by moving a position)."""
    if getattr(layer, "is_sliding", False):
        return False
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError:
        return True
    return isinstance(layer, StaticLayer)


def _static_cache(model: nn.Module, max_cache_len: int):
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


class StaticGreedyDecoder:
    """Greedy decoding with a static KV cache and a CUDA-graph decode step.

    The model's forward is compiled the way transformers' ``generate`` compiles it (the
    model's ``__call__``, the cache passed as an argument), so what works there works here.
    The token and position live in two small GPU buffers owned by the decoder (refreshed with
    two copies after each step, so no graph output is ever fed back as an input), and the loop
    runs with ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` once the step is warm:
    every step calls the same graph with the same objects, so only the guards that tell cache
    entries apart are checked (otherwise Dynamo evaluates its whole guard tree every token:
    213 us per token for 8 bf16 Llama layers, 373 us with NF4 layers, under the profiler on the
    H200's host, ``benchmarks/NOTES.md``).

    What it does not do: it reads nothing of the model's ``generation_config`` (no EOS stop,
    no logits processors: exactly ``max_new_tokens`` greedy tokens), and it takes no attention
    mask, so the rows of a batch must be prompts of one length with no padding (a padded row
    attends to its pads). Its tokens are those of ``generate(..., do_sample=False,
    cache_implementation="static")`` with the same cache length (generate sizes its static cache
    to prompt + new tokens; a longer cache sums attention over more slots and in bf16 can round
    differently, as can the default dynamic cache). It notices a change of the model between
    calls (its modules, its parameters' dtypes), of the batch size and of
    ``torch.inference_mode``: the cache is rebuilt and the compiled step re-checks its guards;
    the first step of each call checks them anyway, so a change of the model's Python state
    between calls (a flag such as PEFT's ``disable_adapter()``) is seen. A change in the middle
    of a call is not. Caches with sliding-window layers keep Dynamo's guards on every step (the
    step's code changes when the window fills).

    Args:
        model: a transformers causal LM (``forward(input_ids, position_ids, cache_position,
            past_key_values | cache, use_cache)`` returning ``.logits``), on its device, in eval
            mode; its linear layers may be opsq's ``Linear4bit`` / ``Linear8bitLt``.
        max_cache_len: tokens the static cache holds (prompt + new tokens), > 0.
        compile: compile the forward with ``torch.compile(fullgraph=True)`` (False: eager,
            for debugging).
        mode: its ``torch.compile`` mode (default ``"reduce-overhead"``: CUDA graphs).
        backend: its ``torch.compile`` backend (default ``"inductor"``).
        merge_linears: with Inductor, rewrite the compiled step's sibling 4-bit linears (the
            q/k/v projections, gate/up: calls of ``opsq::linear_4bit`` on one input) into one
            ``opsq::linear_4bit_merged`` call each (:mod:`opsq.fusion`; same bytes, fewer
            launches). Default True.
    Raises:
        ValueError: ``max_cache_len`` < 1.
        ImportError: transformers is not installed.
    """

    def __init__(self, model: nn.Module, max_cache_len: int, compile: bool = True,
                 mode: Optional[str] = "reduce-overhead", backend: str = "inductor",
                 merge_linears: bool = True):
        if int(max_cache_len) < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.model = model
        self.max_cache_len = int(max_cache_len)
        self.cache = _static_cache(model, self.max_cache_len)
        # transformers >= 5.2x names the cache argument `cache` (`past_key_values` deprecated)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.compiled = bool(compile)
        if not compile:
            self.forward = model.__call__
        else:
            from .fusion import compile_options
            how = (dict(options=compile_options(mode)) if merge_linears and backend == "inductor"
                   else dict(mode=mode))  # (torch.compile takes a mode or options, not both)
            self.forward = torch.compile(model.__call__, backend=backend, fullgraph=True, **how)
        self._ids: Optional[torch.Tensor] = None   # (B, 1) int64: the token to feed next
        self._pos: Optional[torch.Tensor] = None   # (1,) int64: its cache position
        self._next = 0  # the same position on the host (checked without a sync)
        self._warm = 0
        self._built_for = None  # what the cache and the warm steps were made for (_model_key)

    def _model_key(self, batch: int) -> tuple:
        """What a cache and a warm compiled step depend on: the model's modules (identity and
        type), its tensors' identity, dtype, shape and device, the batch size and whether
        inference mode is on (a cache allocated under it cannot be written outside)."""
        tensors = [(id(t), t.dtype, tuple(t.shape), t.device)
                   for t in (*self.model.parameters(), *self.model.buffers())]
        modules = [(id(m), type(m)) for m in self.model.modules()]
        return (batch, torch.is_inference_mode_enabled(), tuple(modules), tuple(tensors))

    def _sliding(self) -> bool:
        return any(getattr(layer, "is_sliding", False) for layer in getattr(self.cache, "layers", ()))

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reset the cache and run the prompt ``(B, P)`` eagerly; returns the first new ids
        ``(B, 1)`` (the decoder's token buffer: copy what you keep)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, prompt_len >= 1), got "
                             f"{tuple(input_ids.shape)}")
        P = input_ids.shape[1]
        if P >= self.max_cache_len:
            raise ValueError(f"the prompt ({P} tokens) must be shorter than max_cache_len "
                             f"({self.max_cache_len})")
        key = self._model_key(input_ids.shape[0])
        if key != self._built_for:  # a new batch size, dtype, module, ...: a fresh cache and
            self.cache = _static_cache(self.model, self.max_cache_len)  # checked guards
            self._ids = self._pos = None  # (made anew below, in the current inference mode)
            self._warm = 0
            self._built_for = key
        self.cache.reset()
        pos = torch.arange(P, device=input_ids.device)
        logits = self.model(input_ids=input_ids, position_ids=pos.unsqueeze(0),
                            cache_position=pos, use_cache=True, logits_to_keep=1,
                            **{self._cache_kw: self.cache}).logits
        ids = logits[:, -1:].argmax(-1)
        if self._ids is None or self._ids.shape != ids.shape or self._ids.device != ids.device:
            self._ids = torch.empty_like(ids)
            self._pos = torch.empty(1, dtype=torch.long, device=ids.device)
        self._ids.copy_(ids)
        self._pos.fill_(P)
        self._next = P
        return self._ids

    @torch.no_grad()
    def decode_step(self) -> torch.Tensor:
        """Feed the current token at the current position (one CUDA-graph replay once warm),
        store the greedy next token and advance the position. Returns the token buffer
        ``(B, 1)`` (overwritten by the next step: copy what you keep).

        Raises:
            RuntimeError: before :meth:`prefill`. ValueError: the position is
            ``max_cache_len`` (the cache is full; nothing is run)."""
        if self._ids is None:
            raise RuntimeError("call prefill(input_ids) before decode_step()")
        if self._next >= self.max_cache_len:  # (the cache's index_copy_ would fail: on CUDA a
            # device-side assert that ends the process's CUDA context)
            raise ValueError(f"decode_step: the cache is full (position {self._next}, "
                             f"max_cache_len {self.max_cache_len}); seek() back or prefill() "
                             f"again, or make the decoder with a larger max_cache_len")
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        pos = self._pos
        logits = self.forward(input_ids=self._ids, position_ids=pos.unsqueeze(0),
                              cache_position=pos, use_cache=True,
                              **{self._cache_kw: self.cache}).logits
        self._ids.copy_(logits[:, -1:].argmax(-1))
        self._pos.add_(1)
        self._next += 1
        return self._ids

    def seek(self, position: int) -> None:
        """Set the cache position of the next :meth:`decode_step` (0 <= position <
        ``max_cache_len``; entries at and after it are overwritten as decoding goes on). The
        cache's own write counters move with it (transformers' static layers that count their
        writes instead of reading ``cache_position``).

        Raises:
            RuntimeError: before :meth:`prefill`. ValueError: ``position`` out of range.
            NotImplementedError: a cache with sliding-window layers (the entries a full window
            dropped cannot be restored)."""
        if self._pos is None:
            raise RuntimeError("call prefill(input_ids) before seek()")
        if not 0 <= position < self.max_cache_len:
            raise ValueError(f"position must be in [0, {self.max_cache_len}), got {position}")
        layers = list(getattr(self.cache, "layers", ()))
        if not all(_rewindable(layer) for layer in layers):
            raise NotImplementedError("seek: the cache has sliding-window or other non-static "
                                      "layers (their dropped entries or recurrent states "
                                      "cannot be rewound)")
        counters = []
        for layer in layers:
            count = getattr(layer, "cumulative_length", None)
            if isinstance(count, torch.Tensor):
                counters.append(count)
            elif isinstance(count, int):
                layer.cumulative_length = position
        self._pos.fill_(position)
        self._next = position
        if counters:  # one launch for all the layers (the bench times seek with each step)
            torch._foreach_copy_(counters, [self._pos.reshape(()).to(counters[0].dtype)]
                                 * len(counters))

    def _steps(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Decode the tokens ``out[:, start:stop]``."""
        for i in range(start, stop):
            out[:, i:i + 1] = self.decode_step()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` ``(B, P)`` int64.

        Returns:
            ``(B, max_new_tokens)`` int64 on the model's device: the new tokens only (no EOS
            handling: exactly ``max_new_tokens`` are produced).
        Raises:
            ValueError: bad shapes, or ``P + max_new_tokens`` > ``max_cache_len``.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if input_ids.shape[-1] + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({input_ids.shape[-1]}) + max_new_tokens "
                             f"({max_new_tokens}) exceed max_cache_len ({self.max_cache_len})")
        out = torch.empty(input_ids.shape[0], max_new_tokens, dtype=torch.long,
                          device=input_ids.device)
        out[:, :1] = self.prefill(input_ids)
        # The first calls compile and record (guards needed); after that every step hits the
        # same cache entry and the guards can be skipped. The first step of every call keeps
        # its guards: the model's Python state may have changed since the last call without a
        # module or tensor changing (PEFT's disable_adapter() / merge_adapter() flip plain
        # attributes), and only a guarded step recompiles for it (one guard evaluation a call).
        warm = min(max_new_tokens - 1, max(1, 3 - self._warm))
        self._steps(out, 1, 1 + warm)
        self._warm += warm
        skip_guards = (torch.compiler.set_stance(skip_guard_eval_unsafe=True)
                       if self.compiled and not self._sliding() else contextlib.nullcontext())
        with skip_guards:
            self._steps(out, 1 + warm, max_new_tokens)
        return out
