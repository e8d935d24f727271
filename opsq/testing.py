"""Helpers the test suites share (``tests/``, ``compile_tests/``); needs pytest.

``DEVICES``: the devices a parametrized test runs on, ``pytest.mark.parametrize("device",
DEVICES)``: the CPU always (the reference kernels), CUDA marked ``cuda`` and skipped where no
CUDA device is available (the GPU machine runs them with ``-k cuda``).
"""
import pytest
import torch

__all__ = ["DEVICES"]

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=(
               pytest.mark.cuda,
               pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")))]
