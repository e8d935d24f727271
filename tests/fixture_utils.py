import json
import os
from pathlib import Path

import pytest
import torch

import opsq  # noqa: F401  (registers torch.ops.opsq.*)

# ../shared/fixtures beside the checkout; OPSQ_FIXTURES overrides (the GPU machine gets a copy).
FIXTURES = Path(os.environ.get("OPSQ_FIXTURES") or
                Path(__file__).resolve().parents[2] / "shared" / "fixtures")
BNB = FIXTURES / "bnb-0.50.2"


def load_fixture(name: str) -> dict:
    path = BNB / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"fixture {path} not present (shared/ must sit beside the checkout)")
    return torch.load(path, weights_only=True)


def fixture_cases(kind: str) -> list:
    index = BNB / "index.json"
    if not index.exists():
        return []
    cases = json.loads(index.read_text())["cases"]
    return [name for name, c in cases.items() if c["kind"] == kind]


def quant_meta(d: dict) -> dict:
    key = next(k for k in d if "quant_state.bitsandbytes__" in k)
    return json.loads(bytes(d[key].tolist()).decode())


def linear4bit_fixture(name: str):
    """``(fixture dict, its bitsandbytes state dict, an empty opsq Linear4bit of that layer's
    shape and quantization settings)`` for a ``linear4bit_state_dict`` fixture."""
    from opsq.nn import Linear4bit
    d = load_fixture(name)
    sd = {k[3:]: v for k, v in d.items() if k.startswith("sd.")}
    N, K = d["W_fp32"].shape
    meta = quant_meta(d)
    layer = Linear4bit(K, N, bias="bias" in sd, quant_type=meta["quant_type"],
                       compress_statistics="nested_blocksize" in meta)
    return d, sd, layer
