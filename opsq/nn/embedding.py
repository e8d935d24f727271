"""Embedding layers with bitsandbytes' names: float ``Embedding`` / ``StableEmbedding`` and the
quantized tables ``Embedding4bit`` (``EmbeddingNF4``, ``EmbeddingFP4``) and ``Embedding8bit``.

The quantized tables follow the construction semantics of the quantized linear layers: the float
table is quantized on the first move to a real device (``.to(device)``, ``.cuda()``), by
``from_float``, or by loading a state dict; later moves change only the device; ``forward``
mutates nothing. A lookup gathers the packed bytes (4-bit) or int8 rows and their statistics of
the looked-up rows only and dequantizes just those through an opsq op (``dequantize_4bit`` /
``mm_dequant``), so the cost is independent of the vocabulary size.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as Fq
from .._constants import BLOCKSIZES, FLOAT_DTYPES, NESTED_BLOCKSIZE, QUANT_TYPES
from ..meta.fourbit import packed_numel
from ..optim import GlobalOptimManager
from ._lifecycle import (QuantizedWeightMixin, _apply_intent, _forget_internal_missing,
                         _held_apply, _load_without_weight)
from .linear4bit import (Bnb4bitWeightKeys, Linear4bit, Params4bit, _as_packed,
                         attach_quant_state, params4bit_is_foreign)
from .linear8bit import Int8Params, Linear8bitLt, int8_is_foreign

__all__ = ["Embedding", "StableEmbedding", "Embedding4bit", "EmbeddingNF4", "EmbeddingFP4",
           "Embedding8bit"]


def _check_indices(layer: str, input: torch.Tensor, num_embeddings: int,
                   device: torch.device) -> torch.Tensor:
    """Flat int64 indices; dtype and device (the table's, ``device``) checked here, range
    checked on the device without a sync (``_assert_async``: raises at once on the CPU, a
    device-side assert on CUDA)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{layer}: input must be a tensor of indices, got {type(input).__name__}")
    if input.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{layer}: input must be int32 or int64 indices, got {input.dtype}")
    if input.device != device:  # (a CPU table indexed with meta indices reads garbage)
        raise ValueError(f"{layer}: input must be on the table's device ({device}), got "
                         f"{input.device}")
    idx = input.reshape(-1).to(torch.int64)
    torch._assert_async(((idx >= 0) & (idx < num_embeddings)).all(),
                        f"{layer}: input holds an index outside [0, num_embeddings="
                        f"{num_embeddings})")
    return idx


# =============================================================================================
# float embeddings
# =============================================================================================
class Embedding(nn.Embedding):
    """``nn.Embedding`` whose weight keeps 32-bit optimizer state under 8-bit optimizers
    (registered with :class:`opsq.optim.GlobalOptimManager` as ``{"optim_bits": 32}``), Xavier
    uniform initialisation, as bitsandbytes' ``Embedding``.

    Args: as ``nn.Embedding`` (num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
        scale_grad_by_freq, sparse, _weight, device, dtype).
    Shapes:
        input ``(...)`` int32/int64 in ``[0, num_embeddings)`` → ``(..., embedding_dim)``.
    ``max_norm`` rescales the looked-up rows to norm <= max_norm in the output only: unlike
    ``nn.Embedding`` the weight is never renormalised in place (``forward`` mutates nothing);
    the output's values and the weight's gradient are ``nn.Embedding``'s for that call.
    Raises:
        TypeError: non-integer input. RuntimeError: an index out of range.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: Optional[torch.Tensor] = None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, device=device, dtype=dtype)
        GlobalOptimManager.get_instance().register_module_override(self, "weight",
                                                                   {"optim_bits": 32})

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        idx = _check_indices(type(self).__name__, input, self.num_embeddings, self.weight.device)
        emb = F.embedding(idx, self.weight, self.padding_idx, None, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        if self.max_norm is not None:
            norms = emb.detach().norm(p=self.norm_type, dim=-1, keepdim=True)
            scale = torch.where(norms > self.max_norm, self.max_norm / (norms + 1e-7),
                                torch.ones_like(norms))
            # the rescaled values, with the gradient of the looked-up rows (as nn.Embedding's
            # in-place renorm gives it: the renorm itself is not differentiated)
            emb = (emb * scale).detach() + (emb - emb.detach())
        return emb.reshape(*input.shape, self.embedding_dim)


class StableEmbedding(Embedding):
    """Stable Embedding (Dettmers et al., "8-bit Optimizers via Block-wise Quantization",
    ICLR 2022, Section 2.3): Xavier-uniform :class:`Embedding` followed by a LayerNorm computed in
    fp32 whatever the table's dtype; the output is cast back to the table's dtype. Its weight
    keeps 32-bit optimizer state.

    Args: as :class:`Embedding`; the LayerNorm ``norm`` has fp32 parameters.
    Shapes:
        input ``(...)`` int32/int64 → ``(..., embedding_dim)`` in the weight's dtype.
    Raises:
        TypeError: non-integer input. RuntimeError: an index out of range.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs):
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=self.weight.device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = super().forward(input).to(torch.float32)
        norm = self.norm
        weight = None if norm.weight is None else norm.weight.to(torch.float32)
        bias = None if norm.bias is None else norm.bias.to(torch.float32)
        out = F.layer_norm(emb, norm.normalized_shape, weight, bias, norm.eps)
        return out.to(self.weight.dtype)


# =============================================================================================
# quantized tables
# =============================================================================================
class _QuantizedTable(QuantizedWeightMixin, nn.Embedding):
    """Construction semantics shared by the quantized tables (see the module docstring).

    Subclasses define ``is_quantized``, ``_quantized_names()``, ``_quantize(float_table)``,
    ``_rewrap_weight()``, and for state dicts ``_quant_keys(state_dict, prefix)`` (the entries
    that come with a quantized weight), ``_adopt(weight, entries, device)`` and
    ``_quant_entries`` (their names, for messages). ``dtype`` is the output dtype: the float
    table's dtype, following later dtype conversions of the module (``.half()``) while the
    quantized tensors stay untouched.
    """

    dtype: torch.dtype

    def _quantize_weight(self, w: nn.Parameter) -> bool:
        """A float table assigned to a quantized table: quantized with the table's settings."""
        self._quantize(w.data.contiguous().to(self._parameters["weight"].device))
        return True

    def _apply(self, fn, recurse=True):
        self._adopt_foreign_weight()
        device, to_empty = _apply_intent(fn)
        w = self.weight
        if (not self.is_quantized and device is not None and device.type != "meta"
                and not to_empty and w.device.type != "meta" and w.is_floating_point()):
            self._quantize(w.detach().contiguous().to(device))
        if not self.is_quantized:
            super()._apply(fn, recurse)
            self.dtype = self.weight.dtype
            return self
        # a dtype conversion (alone, with a move: .to("cuda", torch.float16), or .to(tensor)):
        # the output follows it; the probe sits on the target device, so only the cast applies
        converted = fn(torch.empty(0, dtype=self.dtype, device=device or "cpu"))
        if converted.is_floating_point():
            self.dtype = converted.dtype
        _held_apply(self, nn.Embedding, fn, recurse, device, to_empty, self._quantized_names())
        self._rewrap_weight()
        return self

    def _indices(self, input: torch.Tensor) -> torch.Tensor:
        """Flat int64 indices of a lookup, after checking that the table is quantized."""
        name = type(self).__name__
        if not self.is_quantized:
            raise RuntimeError(f"{name}: the table is not quantized yet; move the layer to a "
                               "device (.to(device)), use from_float, or load a state dict")
        return _check_indices(name, input, self.num_embeddings, self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        extra = {k[len(prefix):]: state_dict[k] for k in self._quant_keys(state_dict, prefix)}
        if not extra and not (wkey in state_dict and self.is_quantized):  # plain float table
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                          missing_keys, unexpected_keys, error_msgs)
            return _forget_internal_missing(self, prefix, missing_keys)
        for k in extra:
            state_dict.pop(prefix + k)
        incoming = state_dict.pop(wkey, None)
        own = self.weight.device
        device = own if own.type != "meta" or incoming is None else incoming.device
        dtype = self.dtype  # the output dtype stays the module's, as nn.Embedding's does
        try:
            if incoming is None:
                raise ValueError("the quantized weight is missing")
            if extra:
                self._adopt(incoming.detach().to(device), extra, device)
            elif not incoming.is_floating_point():
                raise ValueError(f"a {incoming.dtype} weight needs its quantization entries "
                                 f"({self._quant_entries})")
            else:  # a float table into a quantized layer: quantized with its settings
                self._quantize(incoming.detach().to(device))
        except (ValueError, TypeError, RuntimeError) as e:
            error_msgs.append(f"While loading {wkey}: {e}")
            return
        self.dtype = dtype
        _load_without_weight(self, nn.Embedding, state_dict, prefix, local_metadata, strict,
                             missing_keys, unexpected_keys, error_msgs)


def _check_table_args(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


_STATE_4BIT = ("weight_absmax", "weight_quant_map", "weight_nested_absmax",
               "weight_nested_quant_map", "weight_offset")


class Embedding4bit(Bnb4bitWeightKeys, _QuantizedTable):
    """Embedding table stored in 4 bit (NF4 / FP4), bitsandbytes' ``Embedding4bit``.

    The table ``(num_embeddings, embedding_dim)`` is quantized like a ``Linear4bit`` weight
    (flattened row-major, blocks of ``blocksize``, fp32 absmax, optionally nested), and its state
    dict uses the same bitsandbytes keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
    ``weight.quant_state.bitsandbytes__<type>``, nested entries). A lookup gathers, for each index,
    the packed bytes and absmax of the blocks its row touches and dequantizes only those with one
    ``torch.ops.opsq.dequantize_4bit`` call; rows need not be block-aligned (any
    ``embedding_dim``), though ``embedding_dim % blocksize == 0`` gathers no extra block.

    Args:
        num_embeddings: rows. embedding_dim: columns.
        dtype: dtype of the float table before quantization, and of the output.
        quant_type: "nf4" or "fp4" (bitsandbytes' default).
        quant_storage: dtype the packed bytes are stored as.
        device: where the float table is created (quantized on the first move).
        blocksize: 32..4096 (default 64). compress_statistics: nested absmax (default False).
    Shapes:
        input ``(...)`` int32/int64 in ``[0, num_embeddings)`` → ``(..., embedding_dim)`` in
        ``dtype``.
    Raises:
        ValueError: bad ``quant_type`` / ``blocksize``. TypeError: non-integer input.
        RuntimeError: ``forward`` before quantization; an index out of range.
    """

    default_quant_type = "fp4"

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None,
                 quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8, device=None,
                 blocksize: int = 64, compress_statistics: bool = False):
        _check_table_args(quant_type, blocksize)
        if embedding_dim % blocksize:
            warnings.warn(f"Embedding4bit: embedding_dim {embedding_dim} is not a multiple of "
                          f"blocksize {blocksize}: each lookup dequantizes up to one extra block "
                          "per row (slower lookups)", UserWarning, stacklevel=2)
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        self.quant_type = quant_type
        self.quant_storage = quant_storage
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.nested_blocksize = NESTED_BLOCKSIZE
        self.weight = Params4bit(self.weight.data, requires_grad=False, blocksize=blocksize,
                                 compress_statistics=compress_statistics, quant_type=quant_type,
                                 quant_storage=quant_storage, module=self)
        for name in _STATE_4BIT:
            self.register_buffer(name, None, persistent=False)

    @property
    def is_quantized(self) -> bool:
        return self.weight_absmax is not None

    def _quantized_names(self) -> tuple[str, ...]:
        return ("weight",) + _STATE_4BIT if self.is_quantized else ()

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.dtype

    #: The table's :class:`~opsq.functional.QuantState` (None before quantization), rebuilt
    #: from the module's tensors as for ``Linear4bit``.
    quant_state = Linear4bit.quant_state
    layout = Linear4bit.layout  # its tables stay in bitsandbytes' layout (the property reads it)

    def _quantize(self, table: torch.Tensor) -> None:
        packed, state = Fq.quantize_4bit(table, blocksize=self.blocksize,
                                         compress_statistics=self.compress_statistics,
                                         quant_type=self.quant_type,
                                         quant_storage=self.quant_storage)
        self._set_quantized(packed, state)

    def _set_quantized(self, packed: torch.Tensor, state: Fq.QuantState) -> None:
        """Adopt packed codes and their state (shape ``(num_embeddings, embedding_dim)``)."""
        shape = (self.num_embeddings, self.embedding_dim)
        if tuple(state.shape) != shape:
            raise ValueError(f"quantized table has shape {tuple(state.shape)}, layer expects "
                             f"{shape} (num_embeddings, embedding_dim)")
        packed, state = _as_packed(packed, state)  # tables stay in bitsandbytes' layout
        n = shape[0] * shape[1]
        blocks = -(-n // state.blocksize)
        if state.absmax.numel() != blocks:
            raise ValueError(f"absmax must have {blocks} entries (one per block of "
                             f"{state.blocksize}), got {state.absmax.numel()}")
        if packed.numel() != packed_numel(n, packed.element_size()):
            raise ValueError(f"packed weight must have {packed_numel(n, packed.element_size())} "
                             f"{packed.dtype} elements for {n} codes, got {packed.numel()}")
        self.blocksize, self.quant_type = state.blocksize, state.quant_type
        self.quant_storage, self.dtype = packed.dtype, state.dtype
        self.compress_statistics = state.nested
        self.weight_absmax, self.weight_quant_map = state.absmax, state.code
        if state.nested:
            self.weight_nested_absmax = state.state2.absmax
            self.weight_nested_quant_map = state.state2.code
            self.weight_offset = state.offset.reshape(1).to(torch.float32)
            self.nested_blocksize = state.state2.blocksize
        else:
            self.weight_nested_absmax = self.weight_nested_quant_map = self.weight_offset = None
        nn.Module.__setattr__(self, "weight", Params4bit(
            packed, False, None, bnb_quantized=True, module=self, **self._param_attrs()))
        attach_quant_state(self.weight, self.quant_state, self)

    _weight_types = (Params4bit,)

    def _weight_is_foreign(self, w) -> bool:
        return params4bit_is_foreign(self, w)

    def _carried_stats(self, w: Params4bit) -> Optional[Fq.QuantState]:
        return Linear4bit._carried_stats(self, w)

    _take_settings = Linear4bit._take_settings
    # (a float Params4bit, the only weight type adopted here, with its own settings)
    _quantize_weight = Linear4bit._quantize_weight

    def _param_attrs(self) -> dict:
        return dict(blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                    quant_type=self.quant_type, quant_storage=self.quant_storage)

    def _rewrap_weight(self) -> None:
        w = self._parameters["weight"]
        if not isinstance(w, Params4bit):
            w = Params4bit(w.data, False, None, bnb_quantized=True, module=self,
                           **self._param_attrs())
            self._parameters["weight"] = w
        attach_quant_state(w, self.quant_state, self)

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle rebuild the weight without its module (Params4bit pickles
        # module=None): bind it to this table again, as Linear4bit does, so that bitsandbytes'
        # in-place swap (weight.data = codes; weight.quant_state = state) is adopted at once
        super().__setstate__(state)
        w = self._parameters.get("weight")
        if isinstance(w, Params4bit):
            attach_quant_state(w, self.quant_state if self.is_quantized else w.quant_state,
                               self)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, quant_type: Optional[str] = None,
                   blocksize: int = 64, compress_statistics: bool = False,
                   quant_storage: torch.dtype = torch.uint8) -> "Embedding4bit":
        """A quantized copy of ``embedding`` on its device (``quant_type`` defaults to the
        class's: "fp4" for ``Embedding4bit``, "nf4" for ``EmbeddingNF4``).

        Raises:
            TypeError: ``embedding`` is not an ``nn.Embedding``. ValueError: bad options, or a
            ``quant_type`` other than the class's for ``EmbeddingNF4`` / ``EmbeddingFP4``.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        if quant_type is None:
            quant_type = cls.default_quant_type
        elif cls is not Embedding4bit and quant_type != cls.default_quant_type:
            raise ValueError(f"{cls.__name__} stores {cls.default_quant_type}, got "
                             f"quant_type={quant_type!r}")
        layer = cls.__new__(cls)
        Embedding4bit.__init__(layer, embedding.num_embeddings, embedding.embedding_dim,
                               embedding.weight.dtype, quant_type, quant_storage, "meta",
                               blocksize, compress_statistics)
        layer._quantize(embedding.weight.detach().contiguous())
        return layer

    # ---- state dict -----------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:
            for k, v in self.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    _quant_entries = "weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__<type>"

    def _quant_keys(self, state_dict, prefix):
        return [k for k in state_dict if k.startswith(prefix + "weight.")]

    def _adopt(self, packed, entries, device):
        self._set_quantized(packed, Fq.QuantState.from_dict(entries, device=device))

    # ---- forward --------------------------------------------------------------------------------
    def _absmax_of_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """fp32 absmax of the given block indices (decoding nested statistics)."""
        if self.weight_nested_absmax is None:
            return self.weight_absmax[blocks]
        codes = self.weight_absmax[blocks].to(torch.int64)
        return (self.weight_nested_quant_map[codes]
                * self.weight_nested_absmax[blocks // self.nested_blocksize]
                + self.weight_offset)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        idx = self._indices(input)
        D, bs = self.embedding_dim, self.blocksize
        n_blocks = self.weight_absmax.numel()
        # A row starts at offset (r * D) % bs inside its first block; those offsets are
        # multiples of gcd(D, bs), so a row touches at most `span` blocks.
        max_offset = bs - math.gcd(D, bs)
        span = (max_offset + D + bs - 1) // bs
        start = idx * D
        first = start // bs
        steps = torch.arange(span, device=idx.device)
        # Past the table's end a row's span is clamped to the last block (never read).
        blocks = (first.unsqueeze(1) + steps).clamp(max=n_blocks - 1)
        raw = self.weight.reshape(-1).view(torch.uint8)
        half = bs // 2
        byte_idx = blocks.unsqueeze(2) * half + torch.arange(half, device=idx.device)
        packed = raw[byte_idx.clamp(max=raw.numel() - 1)].reshape(-1, 1)
        absmax = self._absmax_of_blocks(blocks).reshape(-1)
        # (a table converted to a dtype the op does not write, e.g. .double(): fp32, then cast)
        compute = self.dtype if self.dtype in FLOAT_DTYPES else torch.float32
        rows = torch.ops.opsq.dequantize_4bit(packed, absmax, bs, self.quant_type,
                                              [idx.shape[0], span * bs], compute)
        if max_offset:
            cols = (start - first * bs).unsqueeze(1) + torch.arange(D, device=idx.device)
            rows = rows.gather(1, cols)
        return rows.to(self.dtype).reshape(*input.shape, D)

    def extra_repr(self) -> str:
        fields = ("quant_type", "blocksize", "compress_statistics", "quant_storage", "dtype",
                  "is_quantized")
        return f"{self.num_embeddings}, {self.embedding_dim}, " + ", ".join(
            f"{f}={getattr(self, f)}" for f in fields)


def _fixed_type(quant_type: str) -> type:
    """``Embedding4bit`` with ``quant_type`` fixed (``EmbeddingNF4`` / ``EmbeddingFP4``)."""

    class Fixed(Embedding4bit):
        default_quant_type = quant_type

        def __init__(self, num_embeddings: int, embedding_dim: int, dtype=None,
                     quant_storage: torch.dtype = torch.uint8, device=None, blocksize: int = 64,
                     compress_statistics: bool = False):
            super().__init__(num_embeddings, embedding_dim, dtype, quant_type, quant_storage,
                             device, blocksize, compress_statistics)

    Fixed.__name__ = Fixed.__qualname__ = f"Embedding{quant_type.upper()}"
    Fixed.__doc__ = f":class:`Embedding4bit` with ``quant_type={quant_type!r}``."
    return Fixed


EmbeddingNF4 = _fixed_type("nf4")
EmbeddingFP4 = _fixed_type("fp4")


class Embedding8bit(_QuantizedTable):
    """Embedding table stored in int8 with one absmax per row, bitsandbytes' ``Embedding8bit``
    (the LLM.int8 row-wise format: ``CB = round(W * 127 / SCB)``, ``SCB`` the row's max |W|).

    A lookup gathers the int8 rows and their scales and dequantizes them as bitsandbytes does on
    CUDA, ``CB * (SCB / 127)`` in fp32 with the division done as torch does it there, a product
    with fp32(1 / 127), then in the table's dtype; the same bytes on every device. The state
    dict holds ``weight`` (int8 ``CB``) and ``SCB`` (bitsandbytes cannot save this layer; opsq
    can, and also loads a float table).

    Args:
        num_embeddings: rows. embedding_dim: columns.
        device: where the float table is created (quantized on the first move).
        dtype: dtype of the float table, and of the output.
    Shapes:
        input ``(...)`` int32/int64 in ``[0, num_embeddings)`` → ``(..., embedding_dim)`` in
        ``dtype``.
    Raises:
        TypeError: non-integer input. RuntimeError: ``forward`` before quantization; an index
        out of range.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.dtype
        self.weight = Int8Params(self.weight.data, has_fp16_weights=False, requires_grad=False)
        self.register_buffer("SCB", None, persistent=False)

    @property
    def is_quantized(self) -> bool:
        return self.SCB is not None

    def _quantized_names(self) -> tuple[str, ...]:
        return ("weight", "SCB") if self.is_quantized else ()

    def _quantize(self, table: torch.Tensor) -> None:
        CB, SCB, _ = Fq.int8_vectorwise_quant(table)
        self._set_quantized(CB, SCB)

    def _set_quantized(self, CB: torch.Tensor, SCB: torch.Tensor) -> None:
        shape = (self.num_embeddings, self.embedding_dim)
        if CB.dtype != torch.int8 or tuple(CB.shape) != shape:
            raise ValueError(f"weight must be int8 of shape {shape}, got {CB.dtype} "
                             f"{tuple(CB.shape)}")
        if SCB.numel() != self.num_embeddings or not SCB.is_floating_point():
            raise ValueError(f"SCB must hold {self.num_embeddings} float row scales, got "
                             f"{SCB.dtype} {tuple(SCB.shape)}")
        self.SCB = SCB.reshape(-1).to(device=CB.device, dtype=torch.float32)
        nn.Module.__setattr__(self, "weight", Int8Params(CB, False, False, CB, self.SCB))

    _weight_types = (Int8Params,)

    def _weight_is_foreign(self, w) -> bool:
        return int8_is_foreign(w, self.SCB)

    def _carried_stats(self, w: Int8Params) -> Optional[torch.Tensor]:
        return Linear8bitLt._carried_stats(self, w)

    def _rewrap_weight(self) -> None:
        w = self._parameters["weight"]
        self._parameters["weight"] = Int8Params(w.data, False, False, w.data, self.SCB)

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Embedding8bit":
        """An int8 copy of ``embedding`` on its device.

        Raises:
            TypeError: ``embedding`` is not an ``nn.Embedding``.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta",
                    dtype=embedding.weight.dtype)
        layer._quantize(embedding.weight.detach().contiguous())
        return layer

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:
            destination[prefix + "SCB"] = self.SCB if keep_vars else self.SCB.detach()

    _quant_entries = "SCB"

    def _quant_keys(self, state_dict, prefix):
        return [prefix + "SCB"] if prefix + "SCB" in state_dict else []

    def _adopt(self, CB, entries, device):
        self._set_quantized(CB, entries["SCB"].to(device))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        idx = self._indices(input)
        # bitsandbytes' arithmetic: CB * (SCB / 127) in fp32, then the table's dtype. torch
        # divides by a Python scalar on CUDA as a product with fp32(1 / 127) and on the CPU
        # exactly (1 ulp apart); the product is written out so that every device gives CUDA's
        rows = self.weight[idx].to(torch.float32) * (self.SCB[idx].unsqueeze(-1) * (1.0 / 127.0))
        return rows.to(self.dtype).reshape(*input.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}, "
                f"quantized={self.is_quantized}")

