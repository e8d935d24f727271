"""Checks that a module call left the module's state alone (the rule "layers never mutate state
in forward"), shared by tests/ and compile_tests/."""
from __future__ import annotations

import torch


def snapshot(module: torch.nn.Module) -> dict:
    """``{name: (id, detached copy)}`` of every parameter and buffer of ``module``."""
    return {k: (id(v), v.detach().clone()) for k, v in
            list(module.named_parameters()) + list(module.named_buffers())}


def assert_unchanged(module: torch.nn.Module, snap: dict) -> None:
    """The same parameter and buffer objects as at :func:`snapshot`, with the same values."""
    now = dict(list(module.named_parameters()) + list(module.named_buffers()))
    assert set(now) == set(snap)
    for k, (ident, value) in snap.items():
        assert id(now[k]) == ident and torch.equal(now[k].detach(), value), k
