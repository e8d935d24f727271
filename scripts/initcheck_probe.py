"""Probe for compute-sanitizer initcheck's report on int8_linear: are the "uninitialized" reads
of the igemmlt output real, or does initcheck not see cuBLASLt's stores?

Step 1 writes C with torch._int_mm alone (cuBLASLt, no opsq code) and reads it with torch's own
copy kernel (C.clone()); step 2 does the same through opsq.igemmlt + opsq.mm_dequant. If
initcheck flags the clone of step 1 too, the reports are about cuBLASLt's stores (invisible to
initcheck), not about opsq; the values are then checked against an int64 CPU product, so they
were written.
    compute-sanitizer --tool initcheck python scripts/initcheck_probe.py
"""
import torch

import opsq  # noqa: F401

g = torch.Generator().manual_seed(0)
a = torch.randint(-127, 128, (64, 256), generator=g, dtype=torch.int8)
b = torch.randint(-127, 128, (128, 256), generator=g, dtype=torch.int8)
want = a.long() @ b.long().t()
ad, bd = a.cuda(), b.cuda()

print("step 1: torch._int_mm then C.clone()", flush=True)
C = torch._int_mm(ad, bd.t())
C2 = C.clone()
torch.cuda.synchronize()
assert torch.equal(C2.cpu().long(), want), "torch._int_mm result differs from the CPU product"

print("step 2: opsq.igemmlt then opsq.mm_dequant", flush=True)
C = torch.ops.opsq.igemmlt(ad, bd)
out = torch.ops.opsq.mm_dequant(C, torch.ones(64, device="cuda"), torch.ones(128, device="cuda"),
                                None, torch.float32)
torch.cuda.synchronize()
assert torch.equal(C.cpu().long(), want), "igemmlt result differs from the CPU product"
print("values equal the CPU product in both steps", flush=True)
