"""QLoRA with opsq: a small byte-level transformer whose Linear layers are frozen NF4
``opsq.nn.Linear4bit`` with trainable LoRA adapters, trained on the sentences shipped in
``opsq/data/sentences.txt`` with the forward and backward compiled
(``torch.compile(model, fullgraph=True)``) and non-reentrant activation checkpointing.

The base weights are random here (no download; in real use they come from a pretrained
checkpoint through ``load_state_dict``), so besides the adapters the embeddings, norms and
output head train too (PEFT's ``modules_to_save``); every Linear of the transformer blocks is
4-bit and frozen, and its gradient flows through ``torch.ops.opsq.linear_4bit``'s autograd.

    python examples/lora_qlora.py                       # CPU: Inductor, 300 steps
    python examples/lora_qlora.py --backend aot_eager   # CPU without a C++ compiler
    python examples/lora_qlora.py --device cuda --dtype bfloat16
    python examples/lora_qlora.py --optim adamw         # torch.optim.AdamW instead

The optimizer defaults to ``opsq.optim.PagedAdamW8bit``, the QLoRA recipe's
``paged_adamw_8bit`` (8-bit states for tensors of >= 4096 elements, CUDA unified memory on a GPU).

Prints the loss curve and, when matplotlib is importable, plots it to ``--plot``.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import opsq.optim
from opsq.lora import add_lora, lora_parameters, mark_only_lora_trainable
from opsq.nn import Linear4bit

CORPUS = Path(__file__).resolve().parents[1] / "opsq" / "data" / "sentences.txt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``--optim`` choices (the names transformers' Trainer uses for them)
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw_8bit": opsq.optim.AdamW8bit,
              "paged_adamw_8bit": opsq.optim.PagedAdamW8bit}


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP, all four Linears
    4-bit."""

    def __init__(self, d: int, heads: int, linear):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = linear(d, 3 * d), linear(d, d)
        self.fc1, self.fc2 = linear(d, 4 * d), linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    """Byte-level language model; ``forward(idx, targets)`` returns the mean cross-entropy
    (the whole training forward is one compiled graph)."""

    def __init__(self, d: int, layers: int, heads: int, seq: int, linear,
                 checkpointing: bool = True):
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, linear) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        self.checkpointing = checkpointing

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))


def build_model(args) -> TinyLM:
    def linear(k, n):
        return Linear4bit(k, n, compute_dtype=DTYPES[args.dtype], quant_type=args.quant_type,
                          compress_statistics=True)

    model = TinyLM(args.d_model, args.layers, args.heads, args.seq, linear,
                   checkpointing=not args.no_checkpoint)
    for m in model.modules():  # GPT-2's initialisation: the scale of a pretrained base
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=args.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    model = model.to(args.device)  # the first move quantizes every Linear4bit
    add_lora(model, r=args.rank, alpha=args.alpha, target_modules=["qkv", "proj", "fc1", "fc2"])
    return mark_only_lora_trainable(model, also=["tok", "pos", "ln", "head"])


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator, device):
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).to(device)
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def sample(model: TinyLM, prompt: str, n: int, seq: int, device, temperature: float = 0.8,
           seed: int = 0) -> str:
    """``n`` bytes after ``prompt``, sampled at ``temperature`` (eager, uncompiled model)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([list(prompt.encode())], dtype=torch.long, device=device)
    for _ in range(n):
        logits = model(idx[:, -seq:])[:, -1].float().cpu()
        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)
        idx = torch.cat([idx, nxt.to(device)], dim=1)
    model.train()
    return bytes(idx[0].tolist()).decode("utf-8", errors="replace")


def plot(losses: list[float], path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title="QLoRA with opsq")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype of the 4-bit layers (default: bfloat16 on CUDA, "
                        "float32 on the CPU)")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend: inductor, aot_eager, or 'none' (eager)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init-std", type=float, default=0.02,
                   help="std of the random (stand-in for pretrained) weights")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="turn activation checkpointing off")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--plot", default="",
                   help="write the loss curve to this PNG (when matplotlib is importable); "
                        "default: no file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optim", choices=sorted(OPTIMIZERS), default="paged_adamw_8bit",
                   help="optimizer of the trainable parameters")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if str(args.device).startswith("cuda") else "float32"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    counters.clear()
    torch.manual_seed(args.seed)
    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)
    model = build_model(args)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_lora = sum(p.numel() for p in lora_parameters(model))
    print(f"corpus: {data.numel()} bytes; device {args.device}, compute {args.dtype}, "
          f"backend {args.backend}, checkpointing {not args.no_checkpoint}")
    print(f"trainable parameters: {n_train} ({n_lora} LoRA, rank {args.rank}); "
          f"4-bit layers: {sum(isinstance(m, Linear4bit) for m in model.modules())}")

    step_fn = model if args.backend == "none" else \
        torch.compile(model, fullgraph=True, backend=args.backend)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[args.optim](params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    stream = batches(data, args.batch, args.seq, torch.Generator().manual_seed(args.seed),
                     args.device)

    losses: list[float] = []
    t0 = time.perf_counter()
    first_step_s = 0.0
    for step in range(args.steps):
        x, y = next(stream)
        loss = step_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step == 0:
            first_step_s = time.perf_counter() - t0
            print(f"step    1  loss {losses[0]:.4f}  (first step incl. compile: "
                  f"{first_step_s:.1f}s)")
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            window = losses[-args.log_every:]
            print(f"step {step + 1:4d}  loss {sum(window) / len(window):.4f}  "
                  f"({time.perf_counter() - t0:.1f}s)")
    total_s = time.perf_counter() - t0
    tail = losses[-min(20, len(losses)):]
    result = {"losses": losses, "first": losses[0], "last": sum(tail) / len(tail),
              "steps": args.steps, "seconds": total_s, "compile_seconds": first_step_s,
              "graph_breaks": sum(counters["graph_break"].values()),
              "graphs": counters["stats"]["unique_graphs"]}
    print(f"loss {result['first']:.3f} -> {result['last']:.3f} (mean of the last {len(tail)}) "
          f"in {args.steps} steps, {total_s:.1f}s; compiled graphs {result['graphs']}, "
          f"graph breaks {result['graph_breaks']}")
    print("sample:", repr(sample(model, "The ", 80, args.seq, args.device, seed=args.seed)))
    if args.plot:
        path = plot(losses, args.plot)
        print(f"loss curve: {path}" if path else "loss curve: matplotlib not installed, "
                                                  "no plot")
        result["plot"] = path
    return result


if __name__ == "__main__":
    main()
