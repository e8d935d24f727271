"""``OutlierAwareLinear``: a linear layer whose quantization treats outlier input features apart
(bitsandbytes' base class for outlier-aware quantization experiments)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..outlier_tools import OutlierTracer

__all__ = ["OutlierAwareLinear"]


class OutlierAwareLinear(nn.Linear):
    """Base class: a linear layer quantized with knowledge of its outlier input features.

    Subclasses implement two hooks:

    * ``quantize_weight(self, w, outlier_idx) -> Tensor``: the weight to use from now on, shape
      ``(out_features, in_features)`` (any dtype), given the float weight ``w`` and the sorted
      int64 outlier feature indices;
    * ``forward_with_outliers(self, x, outlier_idx) -> Tensor``: the layer's output for ``x``
      ``(..., in_features)``.

    Life cycle: trace the model (``OutlierTracer.get_instance().initialize(model)`` and one
    forward pass, during which the layer is a plain float ``nn.Linear``), then call
    :meth:`prepare` (or ``prepare(outlier_idx)`` with known indices), which stores the indices in
    the buffer ``outlier_dim`` and replaces ``weight`` by ``quantize_weight``'s result; from then
    on ``forward`` calls ``forward_with_outliers``. Unlike bitsandbytes, ``forward`` never
    quantizes lazily or mutates the layer.

    Args:
        input_features: K. output_features: N. bias: add a bias ``(N,)``. device: of the params.
    Raises:
        NotImplementedError: a hook was not overridden.
    """

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 device=None):
        super().__init__(input_features, output_features, bias, device)
        self.register_buffer("outlier_dim", None, persistent=False)
        self.is_quantized = False

    def quantize_weight(self, w: torch.Tensor, outlier_idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must override "
                                  "quantize_weight(self, w, outlier_idx)")

    def forward_with_outliers(self, x: torch.Tensor, outlier_idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must override "
                                  "forward_with_outliers(self, x, outlier_idx)")

    @torch.no_grad()
    def prepare(self, outlier_idx: Optional[torch.Tensor] = None) -> "OutlierAwareLinear":
        """Quantize the weight once, with ``outlier_idx`` or the indices traced for it.

        Raises:
            RuntimeError: no indices given and none traced for this weight.
            ValueError: indices not a 1-D integer tensor in ``[0, in_features)``;
            ``quantize_weight`` returned a tensor of the wrong shape.
        """
        if outlier_idx is None:
            outlier_idx = OutlierTracer.get_instance().get_outliers(self.weight)
            if outlier_idx is None:
                raise RuntimeError(f"{type(self).__name__}: no outliers were traced for this "
                                   "layer's weight; run OutlierTracer.initialize(model) and a "
                                   "forward pass first, or pass outlier_idx")
        if not isinstance(outlier_idx, torch.Tensor) or outlier_idx.dim() != 1 \
                or outlier_idx.is_floating_point() or outlier_idx.dtype == torch.bool:
            raise ValueError("outlier_idx must be a 1-D integer tensor of feature indices, got "
                             f"{getattr(outlier_idx, 'dtype', type(outlier_idx).__name__)} "
                             f"{tuple(getattr(outlier_idx, 'shape', ()))}")
        if outlier_idx.numel() and not (0 <= int(outlier_idx.min())
                                        and int(outlier_idx.max()) < self.in_features):
            raise ValueError(f"outlier_idx must lie in [0, in_features={self.in_features}), "
                             f"got min {int(outlier_idx.min())}, max {int(outlier_idx.max())}")
        idx = torch.unique(outlier_idx.to(device=self.weight.device, dtype=torch.int64))
        w = self.quantize_weight(self.weight.detach(), idx)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(self.weight.shape):
            raise ValueError(f"quantize_weight must return a tensor of shape "
                             f"{tuple(self.weight.shape)}, got "
                             f"{tuple(getattr(w, 'shape', ())) or type(w).__name__}")
        self.weight = nn.Parameter(w.detach(), requires_grad=False)
        self.outlier_dim = idx
        self.is_quantized = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:  # not prepared yet (e.g. the tracing pass): a float layer
            return super().forward(x)
        return self.forward_with_outliers(x, self.outlier_dim)
