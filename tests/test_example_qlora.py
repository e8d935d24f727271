"""The QLoRA example (examples/lora_qlora.py) trains with a falling loss, compiled with
fullgraph=True, activation checkpointing on, no graph breaks and no recompiles."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from opsq.testing import DEVICES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora_qlora.py"


def load_example():
    spec = importlib.util.spec_from_file_location("lora_qlora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["paged_adamw_8bit", "adamw"])
@pytest.mark.parametrize("device", DEVICES)
def test_example_loss_falls(device, optim, tmp_path, capsys):
    torch._dynamo.reset()
    example = load_example()
    png = tmp_path / "loss.png"
    result = example.main(["--device", device, "--steps", "40", "--backend", "aot_eager",
                           "--d-model", "64", "--batch", "8", "--log-every", "10",
                           "--plot", str(png), "--seed", str(torch.seed() % 1000),
                           "--optim", optim])
    out = capsys.readouterr().out
    assert "step   40" in out and "sample:" in out
    assert result["last"] < result["first"] - 1.0, result["losses"]
    assert result["graph_breaks"] == 0 and result["graphs"] == 1
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (result["plot"] is not None) == has_mpl and png.exists() == has_mpl
