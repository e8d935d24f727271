"""Reference kernels of the in-place optimizer updates (the formulas of bitsandbytes 0.50's
kernels; Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022).

All arithmetic is fp32 whatever the parameter dtype; ``p`` is rounded back to its dtype once.
With ``g`` the gradient times ``gnorm_scale`` and ``t`` the step (1 on the first update):

* adam: ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g²``;
  ``p = p (1 - lr wd) - lr sqrt(1-b2^t) / (1-b1^t) · m / (sqrt(v) + eps sqrt(1-b2^t))``
  (decoupled weight decay: Adam and AdamW differ only in their default ``weight_decay``).
* ademamix (``state1`` = the fast EMA m1 then the slow EMA m2): ``m1 = b1 m1 + (1-b1) g``;
  ``m2 = b3 m2 + (1-b3) g``; ``v = b2 v + (1-b2) g²``;
  ``p = p (1 - lr wd) - lr (m1 / (1-b1^t) + alpha m2) / (sqrt(v) / sqrt(1-b2^t) + eps)``.
* lion: ``p = p (1 - lr wd) - lr sign(b1 m + (1-b1) g)``; then ``m = b2 m + (1-b2) g``.
* momentum (SGD): ``g = g + wd p``; ``m = g`` at ``t = 1``, else ``b1 m + g``; ``p = p - lr m``.
* rmsprop: ``g = g + wd p``; ``v = b1 v + (1-b1) g²``; ``p = p - lr g / (sqrt(v) + eps)``.

``max_unorm > 0`` (not for ademamix) scales the step by ``min(1, c / ||u||)`` with ``u`` the
update direction before ``lr`` (adam: ``m̂ / (sqrt(v̂) + eps)``; momentum: ``m``; rmsprop:
``g / (sqrt(v) + eps)``; lion: ``sign(...)``), ``c = max_unorm · param_norm`` (``+ eps`` for
one-state optimizers, as bitsandbytes); ``param_norm <= 0`` means ``||p||`` computed here.
``||u||²`` is written to ``unorm_vec``. (bitsandbytes' Lion uses the previous step's norm of its
state instead; here every optimizer uses the current update's norm.)

``skip_zeros``: elements whose gradient is exactly 0 keep their parameter and states.

8-bit two-state updates (adam, ademamix): an element whose gradient is inf or NaN keeps its
parameter (no decay either) and gets zero states, as bitsandbytes' 8-bit blockwise kernel does,
so that one non-finite gradient cannot turn its block's absmax, and with it 256 parameters,
into NaN. (The 32-bit updates propagate it to that element, as bitsandbytes' do.)

8-bit blockwise: the states are dequantized (``qmap[code] · absmax[block]``), updated as above
in fp32, the parameter is updated from the fp32 states, and the states are re-quantized per block
of 256 to the nearest map entry after scaling by the block's new max |state|.
"""
from __future__ import annotations

import math

import torch

from ..meta.optim import (OPTIMIZER_BLOCKSIZE, check_optimizer_update_32bit,
                          check_optimizer_update_8bit_blockwise)
from .blockwise import dequantize_blockwise, quantize_blockwise


def _step(optimizer_name, g, p, s1, s2, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
          weight_decay, step, lr):
    """One update in fp32 on flat tensors: returns ``(p, s1, s2, unorm²)`` (new tensors)."""
    unorm = None
    scale = 1.0
    if optimizer_name in ("momentum", "rmsprop") and weight_decay > 0.0:
        g = g + weight_decay * p
    if optimizer_name in ("adam", "ademamix", "lion") and weight_decay > 0.0:
        p = p * (1.0 - lr * weight_decay)

    if optimizer_name == "adam":
        s1 = s1 * beta1 + (1.0 - beta1) * g
        s2 = s2 * beta2 + (1.0 - beta2) * (g * g)
        c1 = 1.0 - beta1 ** step
        c2 = math.sqrt(1.0 - beta2 ** step)
        direction = s1 / (s2.sqrt() + eps * c2)
        step_size = lr * c2 / c1
        if max_unorm > 0.0:  # the bias-corrected update m̂ / (sqrt(v̂) + eps)
            u = (s1 / c1) / ((s2 / (c2 * c2)).sqrt() + eps)
            unorm = (u * u).sum()
    elif optimizer_name == "ademamix":
        m1, m2 = s1[0], s1[1]
        m1 = m1 * beta1 + (1.0 - beta1) * g
        m2 = m2 * beta3 + (1.0 - beta3) * g
        s2 = s2 * beta2 + (1.0 - beta2) * (g * g)
        c1 = 1.0 - beta1 ** step
        c2 = math.sqrt(1.0 - beta2 ** step)
        direction = (m1 / c1 + alpha * m2) / (s2.sqrt() / c2 + eps)
        step_size = lr
        s1 = torch.stack([m1, m2])
    elif optimizer_name == "lion":
        direction = torch.sign(s1 * beta1 + (1.0 - beta1) * g)
        step_size = lr
        s1 = s1 * beta2 + (1.0 - beta2) * g
    elif optimizer_name == "momentum":
        s1 = g if step == 1 else s1 * beta1 + g
        direction = s1
        step_size = lr
    else:  # rmsprop
        s1 = s1 * beta1 + (1.0 - beta1) * (g * g)
        direction = g / (s1.sqrt() + eps)
        step_size = lr

    if max_unorm > 0.0:
        if unorm is None:
            unorm = (direction * direction).sum()
        pnorm = p.norm() if param_norm <= 0.0 else torch.tensor(param_norm, device=p.device)
        limit = max_unorm * pnorm + (0.0 if optimizer_name == "adam" else eps)
        current = unorm.sqrt()
        scale = torch.where(current > limit, limit / current, torch.ones_like(current))
    p = p - (scale * step_size) * direction
    return p, s1, s2, unorm


def _keep_where_zero(g_flat, new, old, two_halves=False):
    """``skip_zeros``: the old value wherever the gradient is exactly 0."""
    if two_halves:
        return torch.where(g_flat == 0, old.view(2, -1), new.view(2, -1))
    return torch.where(g_flat == 0, old, new)


def _skip_zeros(gf, p_pair, s1_pair, s2_pair, two):
    """``skip_zeros``: each (new, old) pair keeps its old values where the gradient is 0."""
    new_p = _keep_where_zero(gf, *p_pair)
    new_s1 = _keep_where_zero(gf, *s1_pair, two)
    new_s2 = None if s2_pair[1] is None else _keep_where_zero(gf, *s2_pair)
    return new_p, new_s1, new_s2


def optimizer_update_32bit(optimizer_name: str, g: torch.Tensor, p: torch.Tensor,
                           state1: torch.Tensor, state2, unorm_vec, max_unorm: float,
                           param_norm: float, beta1: float, beta2: float, beta3: float,
                           alpha: float, eps: float, weight_decay: float, step: int, lr: float,
                           gnorm_scale: float = 1.0, skip_zeros: bool = False) -> None:
    check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm,
                                 param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step,
                                 lr, gnorm_scale, skip_zeros)
    if p.numel() == 0:
        return
    two = optimizer_name == "ademamix"
    gf = g.reshape(-1).float() * gnorm_scale
    pf = p.reshape(-1).float()
    s1 = state1.reshape(2, -1) if two else state1.reshape(-1)
    s2 = state2.reshape(-1) if state2 is not None else None
    new_p, new_s1, new_s2, unorm = _step(optimizer_name, gf, pf, s1, s2, max_unorm, param_norm,
                                         beta1, beta2, beta3, alpha, eps, weight_decay, step, lr)
    if skip_zeros:
        new_p, new_s1, new_s2 = _skip_zeros(gf, (new_p, pf), (new_s1, s1), (new_s2, s2), two)
    p.copy_(new_p.view(p.shape))
    state1.copy_(new_s1.reshape(state1.shape))
    if state2 is not None:
        state2.copy_(new_s2.view(state2.shape))
    if unorm is not None and unorm_vec is not None:
        unorm_vec.copy_(unorm.reshape(unorm_vec.shape))


def _dequant(codes, absmax, qmap):
    return dequantize_blockwise(codes.reshape(-1), absmax.reshape(-1), qmap, OPTIMIZER_BLOCKSIZE,
                                torch.float32)


def _quant_into(values, codes, absmax, qmap):
    q, a = quantize_blockwise(values.reshape(-1), qmap, OPTIMIZER_BLOCKSIZE)
    codes.copy_(q.view(codes.shape))
    absmax.copy_(a.view(absmax.shape))


def optimizer_update_8bit_blockwise(optimizer_name: str, g: torch.Tensor, p: torch.Tensor,
                                    state1: torch.Tensor, state2, beta1: float, beta2: float,
                                    beta3: float, alpha: float, eps: float, step: int, lr: float,
                                    qmap1: torch.Tensor, qmap2, absmax1: torch.Tensor, absmax2,
                                    weight_decay: float = 0.0, gnorm_scale: float = 1.0,
                                    skip_zeros: bool = False) -> None:
    check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, beta1, beta2,
                                          beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
                                          absmax2, weight_decay, gnorm_scale, skip_zeros)
    if p.numel() == 0:
        return
    two = optimizer_name == "ademamix"
    gf = g.reshape(-1).float() * gnorm_scale
    pf = p.reshape(-1).float()
    if two:  # each EMA is blocked from its own start, with its own row of absmax1
        c1, a1 = state1.reshape(2, -1), absmax1.reshape(2, -1)
        s1 = torch.stack([_dequant(c1[0], a1[0], qmap1), _dequant(c1[1], a1[1], qmap1)])
    else:
        s1 = _dequant(state1, absmax1, qmap1)
    s2 = _dequant(state2, absmax2, qmap2) if state2 is not None else None
    new_p, new_s1, new_s2, _ = _step(optimizer_name, gf, pf, s1, s2, 0.0, 0.0, beta1, beta2,
                                     beta3, alpha, eps, weight_decay, step, lr)
    if skip_zeros:
        new_p, new_s1, new_s2 = _skip_zeros(gf, (new_p, pf), (new_s1, s1), (new_s2, s2), two)
    if optimizer_name in ("adam", "ademamix"):  # two states: a non-finite gradient is skipped
        bad = ~torch.isfinite(gf)
        new_p = torch.where(bad, pf, new_p)
        new_s1 = torch.where(bad, 0.0, new_s1)
        new_s2 = torch.where(bad, 0.0, new_s2)
    p.copy_(new_p.view(p.shape))
    if two:
        (q0, m0), (q1, m1) = (quantize_blockwise(new_s1[i], qmap1, OPTIMIZER_BLOCKSIZE)
                              for i in range(2))
        state1.copy_(torch.stack([q0, q1]).view(state1.shape))
        absmax1.copy_(torch.stack([m0, m1]).view(absmax1.shape))
    else:
        _quant_into(new_s1, state1, absmax1, qmap1)
    if state2 is not None:
        _quant_into(new_s2, state2, absmax2, qmap2)
