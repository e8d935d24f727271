"""One launch of each issue-14 kernel, for Nsight Compute (scripts/gpu_run.sh with OPSQ_NCU=1
runs it under `ncu --kernel-name regex:...`): the 4-bit quantizer, the gemv at 8192->28672 and
4096->4096 (and nested at 8192->28672), double_quant's kernels, the int8 small-M matmul
(threshold 0 and 6; 6 also launches small_outliers_kernel), int8_linear at threshold 6 at
2048x4096->4096 (rowreg, outlier fix-up and compaction, igemm, the outlier epilogue) and at
2048x14336->4096 with every column an outlier (also the tail transpose), and the 8-bit
optimizer update; with the tiled16 layout (opsq/_tiled16.py): gemv4_tiled16_kernel at
4096->4096 and 8192->28672 (and nested at 8192->28672), plain and nested at 8192->8192, and
dequant4_tiled16_kernel at 28672x8192 (the prefill path)."""
import torch
import opsq  # noqa: F401
OPS = torch.ops.opsq
W = torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
p, am = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
OPS.gemv_4bit(torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16), p, [28672, 8192], am, 64, "nf4")
W = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
p, am = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
OPS.gemv_4bit(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16), p, [4096, 4096], am, 64, "nf4")
# the tiled16 layout: the decode kernel at a small and a large shape, the prefill dequantize
from opsq import _tiled16
for N, K in ((4096, 4096), (28672, 8192)):
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    p, am = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
    pt, amt = _tiled16.repack(p, am, [N, K])
    OPS.gemv_4bit(torch.randn(1, K, device="cuda", dtype=torch.bfloat16), pt, [N, K], amt, 64,
                  "nf4", layout="tiled16")
OPS.dequantize_4bit(pt, amt, 64, "nf4", [28672, 8192], torch.bfloat16, layout="tiled16")
W8 = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
CB, _, SCB, _, _ = OPS.double_quant(W8, 0.0)
for thr in (0.0, 6.0):
    A = torch.randn(16, 8192, device="cuda", dtype=torch.float16)
    A[:, :4] *= 8  # outlier columns for threshold 6
    OPS.int8_linear(A, CB, SCB, None, thr)
# nested absmax: the gemv at 8192->28672 (the quantizer's absmax pass is quant8_kernel)
from opsq.functional import gemv_4bit, quantize_4bit
W = torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
p, qs = quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
gemv_4bit(torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16), p, state=qs)
# ... and in the tiled16 layout (gemv4_tiled16_kernel<..., NESTED>; beside the plain launch at
# 28672x8192 above), then plain and nested at 8192^2, where nested costs 8-16 % (the gap's profile)
pt, qt = _tiled16.repack(p, qs.absmax, [28672, 8192])
OPS.gemv_4bit(torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16), pt, [28672, 8192], qt,
              64, "nf4", None, *qs.nested_args(), layout="tiled16")
W = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) * 0.02
x = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
p, am = OPS.quantize_4bit(W, 64, "nf4", torch.uint8)
pt, at = _tiled16.repack(p, am, [8192, 8192])
_, qs = quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
qt = _tiled16.repack_absmax(qs.absmax, [8192, 8192])
OPS.gemv_4bit(x, pt, [8192, 8192], at, 64, "nf4", layout="tiled16")
OPS.gemv_4bit(x, pt, [8192, 8192], qt, 64, "nf4", None, *qs.nested_args(), layout="tiled16")
# Linear8bitLt threshold 6 at prefill size (2048x4096->4096, bench's outlier input)
W8 = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
CB, _, SCB, _, _ = OPS.double_quant(W8, 0.0)
A = torch.randn(2048, 4096, device="cuda", dtype=torch.float16)
A[:, :16] *= 20
OPS.int8_linear(A, CB, SCB, None, 6.0)
# ... and with every column an outlier (a random Llama's down_proj at 2048 tokens): the tail
# transpose (outlier_tail_kernel) and the epilogue's SIMT outlier term, 2048x14336->4096
W8 = torch.randn(4096, 14336, device="cuda", dtype=torch.float16)
CB, _, SCB, _, _ = OPS.double_quant(W8, 0.0)
A = torch.randn(2048, 14336, device="cuda", dtype=torch.float16) * 20
OPS.int8_linear(A, CB, SCB, None, 6.0)
from opsq.optim import AdamW8bit
w = torch.nn.Parameter(torch.randn(1 << 24, device="cuda", dtype=torch.bfloat16))
opt = AdamW8bit([w])
w.grad = torch.randn_like(w)
opt.step()
torch.cuda.synchronize()
