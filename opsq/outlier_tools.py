"""Outlier-feature tooling with bitsandbytes' names: ``find_outlier_dims``, ``OutlierTracer``
and ``GlobalOutlierPooler``.

Background: Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(2022), Section 4: a few hidden dimensions carry activations of large magnitude (>= 6) in most
layers; they can be spotted in the activations, and as weight columns whose spread stands out.

These are offline analysis tools (they return index tensors of data-dependent length and are
not meant for ``torch.compile``). Differences from bitsandbytes, on purpose: every threshold is a
parameter; the tracer removes each hook as soon as its layer has been traced (and all of them on
:meth:`OutlierTracer.remove_hooks` or re-initialisation) instead of only when a weight repeats;
weights are identified by the exact memory region they view, not by their storage's address
alone, and a record is dropped once the traced weight has been freed, so a later tensor that
reuses the memory cannot inherit it; the first layer's z-score runs over the hidden dimension
(bitsandbytes' runs over tokens and mixes token and feature indices).
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ._singleton import Singleton

__all__ = ["find_outlier_dims", "OutlierTracer", "GlobalOutlierPooler"]


def _check_threshold(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def find_outlier_dims(weight: torch.Tensor, reduction_dim: int = 0, zscore: float = 4.0,
                      topk: Optional[int] = None, rdm: bool = False,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dimensions of ``weight`` whose spread stands out.

    The standard deviation is taken along ``reduction_dim`` (fp32), one value per remaining
    dimension; three modes pick among those:

    * z-score (default): the dimensions whose std lies more than ``zscore`` standard
      deviations above the mean std;
    * top-k (``topk=k``): the ``k`` dimensions of largest std;
    * random (``rdm=True, topk=k``): ``k`` distinct dimensions drawn uniformly (a baseline).

    Args:
        weight: 2-D floating tensor, e.g. a weight ``(N, K)`` (``reduction_dim=0`` scores its K
            input features) or activations ``(tokens, hidden)``.
        reduction_dim: 0 or 1 (or -2 / -1).
        zscore: threshold of the z-score mode, >= 0.
        topk: number of dimensions for the top-k and random modes, 1..size.
        rdm: random mode. generator: its ``torch.Generator`` (on ``weight``'s device).
    Returns:
        sorted int64 indices on ``weight``'s device (possibly empty).
    Raises:
        TypeError: ``weight`` is not a floating tensor. ValueError: not 2-D, bad
        ``reduction_dim``, ``zscore`` or ``topk``, or ``rdm`` without ``topk``.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if reduction_dim not in (0, 1, -1, -2):
        raise ValueError(f"reduction_dim must be 0 or 1, got {reduction_dim!r}")
    size = weight.shape[1 - reduction_dim % 2]
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int)
                             or not 1 <= topk <= size):
        raise ValueError(f"topk must be an int in [1, {size}], got {topk!r}")
    if rdm:
        if topk is None:
            raise ValueError("rdm=True needs topk (how many random dimensions)")
        pick = torch.randperm(size, generator=generator, device=weight.device)[:topk]
        return pick.sort().values
    std = weight.detach().to(torch.float32).std(dim=reduction_dim)
    if topk is not None:
        return torch.topk(std, k=topk).indices.sort().values
    zscore = _check_threshold("zscore", zscore)
    z = (std - std.mean()) / std.std()
    return torch.nonzero(z > zscore).reshape(-1)


def _memory_key(t: torch.Tensor) -> tuple:
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(),
            tuple(t.shape), tuple(t.stride()))


class OutlierTracer(Singleton):
    """Singleton that traces outlier dimensions of a model's linear layers during one forward.

    ``initialize(model)`` puts a forward-pre-hook on every layer of ``layer_types``; run the
    model once. The first layer to run gets its outliers from its input activations (z-score of
    the per-feature std over tokens > ``input_zscore``, or any |x| > ``magnitude_threshold``);
    every later layer from its weight (``find_outlier_dims(weight, zscore=weight_zscore)``, the
    weight's input features), or from its input as well when its weight is not a float matrix
    (e.g. a packed 4-bit weight). Each hook removes itself after its layer is traced.

    Results: :meth:`get_outliers` (by weight), :attr:`outliers` (in execution order),
    :attr:`outliers_by_name` (by module name).
    """

    def _setup(self) -> None:
        self._hooks = {}
        self._clear()
        self.initialized = False

    def _clear(self) -> None:
        self.outliers: list[torch.Tensor] = []
        self.hvalues: list[tuple] = []
        self.outliers_by_name: dict[str, torch.Tensor] = {}
        self._records: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}

    def initialize(self, model: nn.Module, input_zscore: float = 3.0,
                   magnitude_threshold: float = 6.0, weight_zscore: float = 4.0,
                   layer_types: tuple = (nn.Linear,)) -> "OutlierTracer":
        """Forget earlier results, remove earlier hooks and hook ``model``'s layers.

        Raises:
            TypeError: ``model`` is not an ``nn.Module``. ValueError: a negative or non-finite
            threshold.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.input_zscore = _check_threshold("input_zscore", input_zscore)
        self.magnitude_threshold = _check_threshold("magnitude_threshold", magnitude_threshold)
        self.weight_zscore = _check_threshold("weight_zscore", weight_zscore)
        self.remove_hooks()
        self._clear()
        for name, module in model.named_modules():
            if isinstance(module, layer_types):
                self._hooks[name] = module.register_forward_pre_hook(
                    self._make_hook(name), with_kwargs=True)
        self.initialized = True
        return self

    def is_initialized(self) -> bool:
        return self.initialized

    @property
    def hooks(self) -> list:
        """Handles of the hooks not yet fired."""
        return list(self._hooks.values())

    def remove_hooks(self) -> None:
        """Remove every remaining hook (results are kept)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def get_hvalue(self, weight: torch.Tensor) -> tuple:
        """The key identifying ``weight``: device, dtype, storage address, offset, shape and
        strides, so tensors viewing the same memory (a tied weight, ``weight.data``) share it and
        different views of one buffer do not."""
        return _memory_key(weight)

    def get_outliers(self, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Sorted int64 outlier indices traced for ``weight`` (its input features), or None when
        that weight was not traced (or has been freed since).

        Raises:
            RuntimeError: :meth:`initialize` was never called.
        """
        if not self.initialized:
            raise RuntimeError("OutlierTracer is not initialized: call "
                               "OutlierTracer.get_instance().initialize(model) and run a forward "
                               "pass first")
        key = self.get_hvalue(weight)
        record = self._records.get(key)
        if record is None:
            return None
        ref, idx = record
        if ref() is None:  # the traced tensor is gone: its memory may now hold another one
            del self._records[key]
            return None
        return idx

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next((v for v in kwargs.values()
                                           if isinstance(v, torch.Tensor)), None)
            with torch.no_grad():
                self._trace(name, module, x)
            handle = self._hooks.pop(name, None)
            if handle is not None:
                handle.remove()
        return hook

    def _trace(self, name: str, module: nn.Module, x: Optional[torch.Tensor]) -> None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return
        key = self.get_hvalue(weight)
        if key in self._records and self._records[key][0]() is not None:
            idx = self._records[key][1]  # the same weight memory (shared / tied): traced already
        else:
            float_matrix = weight.is_floating_point() and weight.dim() == 2
            if self.outliers and float_matrix:
                idx = find_outlier_dims(weight, reduction_dim=0, zscore=self.weight_zscore)
            elif isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1:
                idx = self._activation_outliers(x)
            else:
                return
            self.outliers.append(idx)
            self.hvalues.append(key)
            self._records[key] = (weakref.ref(weight), idx)
        self.outliers_by_name[name] = idx

    def _activation_outliers(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        idx = find_outlier_dims(tokens, reduction_dim=0, zscore=self.input_zscore) \
            if tokens.shape[0] > 1 else tokens.new_empty(0, dtype=torch.int64)
        big = torch.nonzero((tokens.abs() > self.magnitude_threshold).any(dim=0)).reshape(-1)
        return torch.unique(torch.cat([idx, big]))


class GlobalOutlierPooler(Singleton):
    """Singleton pool of outlier feature indices collected across layers
    (bitsandbytes' ``GlobalOutlierPooler``).

    Only indices of the model dimension are pooled: the first ``feature_dim`` passed to
    :meth:`add_outliers` fixes it, later calls with another ``feature_dim`` (e.g. an MLP's inner
    dimension) are ignored.
    """

    def initialize(self) -> None:
        """Empty the pool and forget the model dimension."""
        self.outliers: set[int] = set()
        self.model_dim: Optional[int] = None

    _setup = initialize

    def add_outliers(self, outlier_idx: Union[torch.Tensor, Iterable[int]],
                     feature_dim: int) -> bool:
        """Add indices (an int tensor / iterable, or a bool mask of length ``feature_dim``).

        Returns:
            whether they were pooled (False when ``feature_dim`` is not the model dimension).
        Raises:
            ValueError: ``feature_dim`` not a positive int; a mask of the wrong length; an index
            outside ``[0, feature_dim)``. TypeError: a floating-point tensor.
        """
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        if isinstance(outlier_idx, torch.Tensor):
            if outlier_idx.dtype == torch.bool:
                if outlier_idx.numel() != feature_dim:
                    raise ValueError(f"an outlier mask must have feature_dim={feature_dim} "
                                     f"entries, got {outlier_idx.numel()}")
                outlier_idx = torch.nonzero(outlier_idx.reshape(-1)).reshape(-1)
            elif outlier_idx.is_floating_point() or outlier_idx.is_complex():
                raise TypeError(f"outlier_idx must hold integer indices or a bool mask, got "
                                f"{outlier_idx.dtype}")
            values = outlier_idx.reshape(-1).tolist()
        else:
            values = [int(v) for v in outlier_idx]
        bad = [v for v in values if not 0 <= v < feature_dim]
        if bad:
            raise ValueError(f"outlier_idx must lie in [0, {feature_dim}), got {bad[:5]}")
        if self.model_dim is None:
            self.model_dim = feature_dim
        if feature_dim != self.model_dim:
            return False
        self.outliers.update(values)
        return True

    def get_current_outlier_idx(self, device=None) -> torch.Tensor:
        """Sorted int64 tensor of the pooled indices."""
        return torch.tensor(sorted(self.outliers), dtype=torch.int64, device=device)

    def get_current_outlier_mask(self, device=None) -> torch.Tensor:
        """Bool ``(model_dim,)`` mask of the pooled indices: the static-shape form opsq's ops use
        (``outlier_cols``).

        Raises:
            RuntimeError: nothing was pooled yet (the model dimension is unknown).
        """
        if self.model_dim is None:
            raise RuntimeError("GlobalOutlierPooler: no outliers added yet, the model dimension "
                               "is unknown")
        mask = torch.zeros(self.model_dim, dtype=torch.bool, device=device)
        mask[self.get_current_outlier_idx(device)] = True
        return mask
