"""``python -m opsq``: diagnostics (torch, CUDA, which backend serves each op)."""
import sys

from .cli import diagnostics

sys.exit(diagnostics())
