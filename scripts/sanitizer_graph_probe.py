"""Probe (session 11): does a reduce-overhead compile fail cudagraph trees' pool check under
compute-sanitizer for plain torch too, or only for an opsq layer (tiled16 / packed)?"""
import sys
import traceback

import torch
import torch._inductor.config as icfg

import opsq

icfg.triton.cudagraph_trees_history_recording = True


def case(name, make):
    torch._dynamo.reset()
    try:
        mod = make()
        step = torch.compile(mod, mode="reduce-overhead", fullgraph=True)
        with torch.no_grad():
            for s in range(3):
                x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
                assert torch.equal(step(x), mod(x))
        print(f"{name}: ok", flush=True)
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {str(e)[:3000]}", flush=True)
        traceback.print_exc(limit=4, file=sys.stdout)


def q(layout):
    def make():
        torch.manual_seed(0)
        lin = torch.nn.Linear(1024, 2048, dtype=torch.bfloat16)
        layer = opsq.nn.Linear4bit(1024, 2048, quant_type="nf4").to(torch.bfloat16)
        # blocksize 128 is not tiled16-eligible: the packed layout
        layer.weight = opsq.nn.Params4bit(lin.weight.detach().clone(), quant_type="nf4",
                                          blocksize=64 if layout == "tiled16" else 128)
        layer = layer.cuda()
        print(layout, "->", layer.layout, flush=True)
        return layer
    return make


case("nn.Linear", lambda: torch.nn.Linear(1024, 2048, device="cuda", dtype=torch.bfloat16))
case("nn.Linear + F.silu", lambda: torch.nn.Sequential(
    torch.nn.Linear(1024, 2048, device="cuda", dtype=torch.bfloat16), torch.nn.SiLU()))
case("Linear4bit tiled16", q("tiled16"))
case("Linear4bit packed", q("packed"))
