"""Fake kernels and shared validation of the in-place optimizer updates:
``optimizer_update_32bit`` and ``optimizer_update_8bit_blockwise``.

Both return nothing and write ``p`` and the states in place, so the fakes only validate. The
checks are shared with the reference kernels (:mod:`opsq.reference.optim`).
"""
from __future__ import annotations

import torch

from .._constants import FLOAT_DTYPES
from ._common import (ceil_div, check, check_dtype, check_numel, check_same_device, check_type,
                      check_value, register_fake)

#: Optimizers the update ops implement (bitsandbytes' ``optimizer_name`` strings).
OPTIMIZER_NAMES: tuple[str, ...] = ("adam", "ademamix", "lion", "momentum", "rmsprop")
#: Optimizers with two states (``state2`` required); the others take ``state2=None``.
TWO_STATE: tuple[str, ...] = ("adam", "ademamix")
#: Elements per absmax of the 8-bit blockwise states (bitsandbytes' fixed 256).
OPTIMIZER_BLOCKSIZE = 256


def _n_state1(optimizer_name: str, n):
    """Elements of ``state1``: two EMAs for AdEMAMix, one otherwise."""
    return 2 * n if optimizer_name == "ademamix" else n


def _check_common(optimizer_name, g, p, state2, max_unorm, beta1, beta2, beta3, alpha, eps,
                  weight_decay, step, lr, gnorm_scale):
    check_value(optimizer_name in OPTIMIZER_NAMES,
                lambda: f"optimizer_name must be one of {OPTIMIZER_NAMES}, "
                        f"got {optimizer_name!r}")
    check_dtype("p", p, FLOAT_DTYPES)
    check_dtype("g", g, FLOAT_DTYPES)
    check_type(g.dtype == p.dtype,
               lambda: f"g must have the dtype of p ({p.dtype}), got {g.dtype}")
    check(g.shape == p.shape,
          lambda: f"g must have the shape of p {tuple(p.shape)}, got {tuple(g.shape)}")
    if optimizer_name in TWO_STATE:
        check_value(state2 is not None,
                    lambda: f"state2 is required for optimizer_name={optimizer_name!r}")
    else:
        check_value(state2 is None,
                    lambda: f"state2 must be None for optimizer_name={optimizer_name!r} "
                            "(one state)")
    for name, value in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
        check_value(0.0 <= value < 1.0,
                    lambda: f"{name} must be in [0, 1), got {value}")
    check_value(eps >= 0.0, lambda: f"eps must be >= 0, got {eps}")
    check_value(lr >= 0.0, lambda: f"lr must be >= 0, got {lr}")
    check_value(weight_decay >= 0.0,
                lambda: f"weight_decay must be >= 0, got {weight_decay}")
    check_value(max_unorm >= 0.0, lambda: f"max_unorm must be >= 0, got {max_unorm}")
    check_value(gnorm_scale >= 0.0,
                lambda: f"gnorm_scale must be >= 0, got {gnorm_scale}")
    check_value(alpha >= 0.0, lambda: f"alpha must be >= 0, got {alpha}")
    check_value(step >= 1, lambda: f"step must be >= 1 (1 on the first update), "
                                   f"got {step}")


def check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm,
                                 param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step,
                                 lr, gnorm_scale, skip_zeros):
    _check_common(optimizer_name, g, p, state2, max_unorm, beta1, beta2, beta3, alpha, eps,
                  weight_decay, step, lr, gnorm_scale)
    n = p.numel()
    check_dtype("state1", state1, (torch.float32,))
    check_numel("state1", state1, _n_state1(optimizer_name, n),
                f" ({'2 x ' if optimizer_name == 'ademamix' else ''}p.numel())")
    if state2 is not None:
        check_dtype("state2", state2, (torch.float32,))
        check_numel("state2", state2, n, " (p.numel())")
    if max_unorm > 0.0:
        check_value(optimizer_name != "ademamix",
                    lambda: "max_unorm > 0 is not supported for optimizer_name="
                            "'ademamix' (bitsandbytes ignores it there); pass 0.0")
        check_value(unorm_vec is not None, lambda: "unorm_vec is required when "
                                                   f"max_unorm > 0 (got {max_unorm})")
    if unorm_vec is not None:
        check_dtype("unorm_vec", unorm_vec, (torch.float32,))
        check_numel("unorm_vec", unorm_vec, 1)
    check_same_device("p", p, g=g, state1=state1, state2=state2, unorm_vec=unorm_vec)


def check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, beta1, beta2,
                                          beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
                                          absmax2, weight_decay, gnorm_scale, skip_zeros):
    _check_common(optimizer_name, g, p, state2, 0.0, beta1, beta2, beta3, alpha, eps,
                  weight_decay, step, lr, gnorm_scale)
    n = p.numel()
    blocks = ceil_div(n, OPTIMIZER_BLOCKSIZE)
    two = optimizer_name == "ademamix"
    check_dtype("state1", state1, (torch.uint8,))
    check_numel("state1", state1, _n_state1(optimizer_name, n),
                f" ({'2 x ' if two else ''}p.numel())")
    check_dtype("qmap1", qmap1, (torch.float32,))
    check_numel("qmap1", qmap1, 256)
    check_dtype("absmax1", absmax1, (torch.float32,))
    check_numel("absmax1", absmax1, 2 * blocks if two else blocks,
                f" ({'2 x ' if two else ''}one per block of {OPTIMIZER_BLOCKSIZE} of "
                f"{n} elements)")
    if state2 is not None:
        check_dtype("state2", state2, (torch.uint8,))
        check_numel("state2", state2, n, " (p.numel())")
        check_value(qmap2 is not None, lambda: "qmap2 is required with state2")
        check_value(absmax2 is not None, lambda: "absmax2 is required with state2")
        check_dtype("qmap2", qmap2, (torch.float32,))
        check_numel("qmap2", qmap2, 256)
        check_dtype("absmax2", absmax2, (torch.float32,))
        check_numel("absmax2", absmax2, blocks,
                    f" (one per block of {OPTIMIZER_BLOCKSIZE} of {n} elements)")
    check_same_device("p", p, g=g, state1=state1, state2=state2, qmap1=qmap1, qmap2=qmap2,
                      absmax1=absmax1, absmax2=absmax2)


@register_fake("opsq::optimizer_update_32bit")
def _optimizer_update_32bit_fake(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm,
                                 param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step,
                                 lr, gnorm_scale=1.0, skip_zeros=False):
    check_optimizer_update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm,
                                 param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step,
                                 lr, gnorm_scale, skip_zeros)


@register_fake("opsq::optimizer_update_8bit_blockwise")
def _optimizer_update_8bit_blockwise_fake(optimizer_name, g, p, state1, state2, beta1, beta2,
                                          beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
                                          absmax2, weight_decay=0.0, gnorm_scale=1.0,
                                          skip_zeros=False):
    check_optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, beta1, beta2,
                                          beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
                                          absmax2, weight_decay, gnorm_scale, skip_zeros)
