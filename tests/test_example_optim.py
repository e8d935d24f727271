"""The optimizer example (examples/optim_convergence.py): opsq's AdamW follows torch.optim.AdamW
and AdamW8bit stays close to the 32-bit AdamW.

The issue's target is AdamW8bit within 2 % of AdamW after 200 steps. The example's 200 steps
take ~17 s on a 2-core CPU (3 optimizers, 16384 samples), over this test's 10 s budget, so the
test runs 40 steps (~3 s). The relative gap grows with the steps (measured, seed 0: 0.12 % at
40, 1.1 % at 80, 1.45 % at 200 steps), so the test holds the 40-step gap to the target scaled
linearly, 2 % x 40 / 200 = 0.4 %: a gap above that at 40 steps, growing at least linearly, would
miss the target at 200.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "optim_convergence.py"
STEPS, TARGET, TARGET_STEPS = 40, 0.02, 200


def load_example():
    spec = importlib.util.spec_from_file_location("optim_convergence", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adamw8bit_within_target_of_adamw(tmp_path, capsys):
    example = load_example()
    png = tmp_path / "losses.png"
    result = example.main(["--steps", str(STEPS), "--plot", str(png)])
    out = capsys.readouterr().out
    assert "AdamW8bit vs AdamW (32-bit): relative difference" in out
    curves = result["losses"]
    assert set(curves) == {"torch.optim.AdamW", "opsq.optim.AdamW", "opsq.optim.AdamW8bit"}
    for name, losses in curves.items():
        assert len(losses) == STEPS + 1
        assert losses[-1] < 0.2 * losses[0], (name, losses[0], losses[-1])
    # the 32-bit optimizer is torch's AdamW up to fp32 rounding
    assert result["rel_diff_torch"] < 1e-4, result["final"]
    assert result["rel_diff"] <= TARGET * STEPS / TARGET_STEPS, result["final"]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (result["plot"] is not None) == has_mpl and png.exists() == has_mpl


def test_no_plot_without_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = load_example().main(["--steps", "3", "--samples", "256"])
    assert result["plot"] is None and not any(tmp_path.iterdir())
