"""8-bit against 32-bit AdamW: a small synthetic regression trained with ``torch.optim.AdamW``,
``opsq.optim.AdamW`` (32-bit states) and ``opsq.optim.AdamW8bit`` (8-bit blockwise states,
Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022) from the same
initial weights on the same data.

The task: a random two-layer tanh "teacher" MLP labels 16384 Gaussian inputs plus noise of
std 0.3 (a noise floor of 0.09 MSE); a wider student MLP regresses it with the mean squared
error, full batch, so each run is deterministic. With that many samples the student cannot
memorize the noise, so the losses settle near the floor. ``--min-8bit-size 0`` (the default
here): *every* state is 8-bit, biases included (bitsandbytes' default 4096 keeps small
parameters 32-bit; pass ``--min-8bit-size 4096`` for that).

Measured on a CPU (seeds 0-3, 200 steps): AdamW8bit ends 0.6-1.5 % *below* AdamW's loss. With
few samples (``--samples 4096 --d-in 32 --noise 0.1``) the student memorizes the noise and the
gap grows to 2-8 % (8-bit again lower): the 2 % target holds in the noise-dominated regime.

    python examples/optim_convergence.py                     # 200 steps
    python examples/optim_convergence.py --plot losses.png   # and plot the three loss curves

Prints the final losses and the relative difference of AdamW8bit to the 32-bit AdamW (the
target: within 2 % after 200 steps); plots only with ``--plot`` (matplotlib optional).
"""
from __future__ import annotations

import argparse
import time
from typing import Optional

import torch
from torch import nn

import opsq.optim

OPTIMIZERS = {
    "torch.optim.AdamW": torch.optim.AdamW,
    "opsq.optim.AdamW": opsq.optim.AdamW,
    "opsq.optim.AdamW8bit": opsq.optim.AdamW8bit,
}


def make_data(n: int, d_in: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(n, d_in)`` and targets ``(n, 1)`` of a random teacher MLP plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w1 = torch.randn(d_in, 32, generator=g) / d_in ** 0.5
    w2 = torch.randn(32, 1, generator=g) / 32 ** 0.5
    y = torch.tanh(x @ w1) @ w2 * 2.0 + noise * torch.randn(n, 1, generator=g)
    return x, y


def make_model(d_in: int, hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                         nn.Tanh(), nn.Linear(hidden, 1))


def train(opt_cls, x, y, args) -> list[float]:
    """The loss before each of ``args.steps`` steps, then the final loss."""
    model = make_model(x.shape[1], args.hidden, args.seed)
    kw = dict(lr=args.lr, weight_decay=args.weight_decay)
    if opt_cls is opsq.optim.AdamW8bit:
        kw["min_8bit_size"] = args.min_8bit_size
    opt = opt_cls(model.parameters(), **kw)
    losses = []
    for _ in range(args.steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(nn.functional.mse_loss(model(x), y).item())
    return losses


def plot(curves: dict[str, list[float]], path: str) -> Optional[str]:
    """Write the loss curves to ``path``; None when matplotlib is not importable."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, losses), style in zip(curves.items(), ("-", "--", ":")):
        ax.plot(losses, style, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("AdamW: 32-bit against 8-bit blockwise states")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=16384)
    p.add_argument("--d-in", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--min-8bit-size", type=int, default=0,
                   help="parameters with fewer elements keep 32-bit states (bitsandbytes' "
                        "default 4096)")
    p.add_argument("--plot", default="",
                   help="write the three loss curves to this PNG (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the three trainings; returns ``{"losses": {name: curve}, "final": {name: loss},
    "rel_diff": |8-bit - 32-bit| / 32-bit (opsq's AdamW), "rel_diff_torch": opsq's AdamW
    against torch.optim.AdamW, "plot": path or None, "seconds": wall time}``."""
    args = parse_args(argv)
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    x, y = make_data(args.samples, args.d_in, args.seed, args.noise)
    start = time.perf_counter()
    curves = {name: train(cls, x, y, args) for name, cls in OPTIMIZERS.items()}
    seconds = time.perf_counter() - start
    final = {name: losses[-1] for name, losses in curves.items()}
    ref = final["opsq.optim.AdamW"]
    rel = abs(final["opsq.optim.AdamW8bit"] - ref) / ref
    rel_torch = abs(ref - final["torch.optim.AdamW"]) / final["torch.optim.AdamW"]
    print(f"{args.steps} steps, initial loss {curves['opsq.optim.AdamW'][0]:.5f} "
          f"(noise floor ~{args.noise ** 2:.4f})")
    for name, loss in final.items():
        print(f"  {name:22s} final loss {loss:.6f}")
    print(f"AdamW8bit vs AdamW (32-bit): relative difference {100 * rel:.3f} % "
          f"({'within' if rel <= 0.02 else 'outside'} the 2 % target)")
    print(f"opsq AdamW vs torch.optim.AdamW: relative difference {100 * rel_torch:.2e} %")
    path = None
    if args.plot:
        path = plot(curves, args.plot)
        print(f"loss curves: {path}" if path else "loss curves: matplotlib not installed, "
                                                  "no plot")
    return {"losses": curves, "final": final, "rel_diff": rel, "rel_diff_torch": rel_torch,
            "plot": path, "seconds": seconds}


if __name__ == "__main__":
    main()
