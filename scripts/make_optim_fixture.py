"""Record bitsandbytes' optimizers on CUDA, for tests/test_optim.py's continuation test (issue 18).

Run on the GPU machine with bitsandbytes 0.50.2 importable (``.peers/bitsandbytes``, a copy of
``../shared/peers``)::

    PYTHONPATH=.peers python3 scripts/make_optim_fixture.py --out tests/data/bnb_optim_cuda.pt

For each optimizer below, seeded fp32 parameters (8-bit tensors with and without a partial last
block of 256, one 32-bit tensor under ``min_8bit_size``) take ``STEPS_BEFORE`` steps of bitsandbytes with
seeded gradients; the file keeps the parameters and ``state_dict()`` there (the start of the
test), then the parameters and state after ``STEPS_AFTER`` more steps (its oracle). Gradients and
initial parameters are not stored: the test draws them again from the same CPU generator seeds.
"""
from __future__ import annotations

import argparse

import torch

#: 5200 and 4100 elements (8-bit, a partial last block), 8192 (8-bit, whole blocks; the only
#: kind whose AdEMAMix8bit state bitsandbytes lays out as opsq does), 130 (32-bit)
SHAPES = ((40, 130), (4100,), (32, 256), (130,))
PARAM_SEED, GRAD_SEED = 0, 1
STEPS_BEFORE, STEPS_AFTER = 3, 2
#: bitsandbytes class name -> keyword arguments (the same for opsq.optim's class of that name)
RUNS: dict[str, dict] = {
    "AdamW8bit": dict(lr=1e-2, weight_decay=1e-2),
    "Adam8bit": dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6),
    "PagedAdamW8bit": dict(lr=1e-2),
    "Lion8bit": dict(lr=1e-3, weight_decay=1e-2),
    "SGD8bit": dict(lr=1e-2, momentum=0.9),
    "RMSprop8bit": dict(lr=1e-3, alpha=0.9),
    "AdEMAMix8bit": dict(lr=1e-2),
    "AdamW": dict(lr=1e-2),
}


def initial_params(device) -> list[torch.nn.Parameter]:
    """The seeded starting parameters (CPU generator, then moved)."""
    g = torch.Generator().manual_seed(PARAM_SEED)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(device)) for s in SHAPES]


def gradients(device) -> list[list[torch.Tensor]]:
    """``STEPS_BEFORE + STEPS_AFTER`` seeded gradient sets (CPU generator, then moved)."""
    g = torch.Generator().manual_seed(GRAD_SEED)
    return [[torch.randn(*s, generator=g).to(device) for s in SHAPES]
            for _ in range(STEPS_BEFORE + STEPS_AFTER)]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def record(bnb, name: str, kwargs: dict, device: str) -> dict:
    params = initial_params(device)
    grads = gradients(device)
    opt = getattr(bnb.optim, name)(params, **kwargs)
    out = {"kwargs": kwargs}
    for i, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        if i + 1 == STEPS_BEFORE:
            out["params_before"] = _to_cpu([p.data for p in params])
            out["state_before"] = _to_cpu(opt.state_dict())
    out["params_after"] = _to_cpu([p.data for p in params])
    out["state_after"] = _to_cpu(opt.state_dict())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    import bitsandbytes as bnb
    data = {"bitsandbytes": bnb.__version__, "torch": str(torch.__version__),
            "device": (torch.cuda.get_device_name() if args.device == "cuda" else args.device), "shapes": SHAPES, "param_seed": PARAM_SEED,
            "grad_seed": GRAD_SEED, "steps_before": STEPS_BEFORE, "steps_after": STEPS_AFTER,
            "runs": {name: record(bnb, name, kw, args.device) for name, kw in RUNS.items()}}
    torch.save(data, args.out)
    print(f"wrote {args.out}: {', '.join(RUNS)} (bitsandbytes {bnb.__version__}, "
          f"{data['device']}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
