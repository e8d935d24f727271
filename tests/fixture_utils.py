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
