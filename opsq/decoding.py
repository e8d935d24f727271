"""The fastest way to decode a transformers causal LM with opsq layers: a greedy loop over one
compiled decode step.

``model.generate(..., cache_implementation="static", compile_config=...)`` replays the model's
kernels from a CUDA graph, but between two replays it runs transformers' own per-token Python
(input preparation, logits processors, stopping criteria, ``torch.cat`` of the ids, cache
bookkeeping), the same for bf16 and quantized models. :class:`StaticGreedyDecoder` keeps only
what a greedy token needs: the whole step (model forward, last-position ``argmax``, next cache
position) is one ``torch.compile(mode="reduce-overhead", fullgraph=True)`` graph, the token and
position stay on the GPU, and the host synchronises once per call of :meth:`generate`, not per
token.

Example::

    from opsq.decoding import StaticGreedyDecoder
    dec = StaticGreedyDecoder(model, max_cache_len=4096)       # model: LlamaForCausalLM & co.
    tokens = dec.generate(input_ids, max_new_tokens=128)      # (B, 128) int64, on the GPU
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

__all__ = ["StaticGreedyDecoder"]


def _static_cache(model: nn.Module, max_cache_len: int):
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


class StaticGreedyDecoder:
    """Greedy decoding with a static KV cache and a CUDA-graph decode step.

    Args:
        model: a transformers causal LM (``forward(input_ids, position_ids, cache_position,
            past_key_values, use_cache)`` returning ``.logits``), on its device, in eval mode;
            its linear layers may be opsq's ``Linear4bit`` / ``Linear8bitLt``.
        max_cache_len: tokens the static cache holds (prompt + new tokens), > 0.
        compile: compile the decode step with ``torch.compile(fullgraph=True)`` (False: eager,
            for debugging).
        mode: its ``torch.compile`` mode (default ``"reduce-overhead"``: CUDA graphs).
        backend: its ``torch.compile`` backend (default ``"inductor"``).
    Raises:
        ValueError: ``max_cache_len`` < 1.
        ImportError: transformers is not installed.
    """

    def __init__(self, model: nn.Module, max_cache_len: int, compile: bool = True,
                 mode: Optional[str] = "reduce-overhead", backend: str = "inductor"):
        if int(max_cache_len) < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.model = model
        self.max_cache_len = int(max_cache_len)
        self.cache = _static_cache(model, self.max_cache_len)
        # transformers >= 5.2x names the cache argument `cache` (`past_key_values` deprecated)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.compiled = bool(compile)
        self.step = (torch.compile(self._step, mode=mode, backend=backend, fullgraph=True)
                     if compile else self._step)

    def _step(self, input_ids: torch.Tensor, cache_position: torch.Tensor):
        """One token: ``(B, 1)`` ids at ``cache_position`` ``(1,)`` -> the next ids ``(B, 1)``
        and the next position."""
        logits = self.model(input_ids=input_ids, position_ids=cache_position.unsqueeze(0),
                            cache_position=cache_position, use_cache=True,
                            **{self._cache_kw: self.cache}).logits
        return logits[:, -1:].argmax(-1), cache_position + 1

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset the cache and run the prompt ``(B, P)`` eagerly; returns the first new ids
        ``(B, 1)`` and the next cache position ``(1,)`` (both on the model's device)."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, prompt_len >= 1), got "
                             f"{tuple(input_ids.shape)}")
        P = input_ids.shape[1]
        if P >= self.max_cache_len:
            raise ValueError(f"the prompt ({P} tokens) must be shorter than max_cache_len "
                             f"({self.max_cache_len})")
        self.cache.reset()
        pos = torch.arange(P, device=input_ids.device)
        logits = self.model(input_ids=input_ids, position_ids=pos.unsqueeze(0),
                            cache_position=pos, use_cache=True, logits_to_keep=1,
                            **{self._cache_kw: self.cache}).logits
        return logits[:, -1:].argmax(-1), pos[-1:] + 1

    @torch.no_grad()
    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor):
        """One compiled step (a CUDA-graph replay once warm); returns ``(ids, pos)`` as
        :meth:`_step`. The returned tensors are overwritten by the next replay: copy what you
        keep."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        return self.step(ids, pos)

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
        ids, pos = self.prefill(input_ids)
        out = torch.empty(input_ids.shape[0], max_new_tokens, dtype=torch.long,
                          device=input_ids.device)
        out[:, :1] = ids
        for i in range(1, max_new_tokens):
            ids, pos = self.decode_step(ids, pos)
            out[:, i:i + 1] = ids
        return out
