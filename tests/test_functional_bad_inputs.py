"""Bad input at the functional level (opsq.functional, opsq.autograd), beside the ops' own
tests/test_bad_inputs.py: out= buffers must match the result (shape, dtype, device), as
bitsandbytes' .out ops require (out.copy_ broadcast, cast an int32 product into int8, or wrote to
the meta device, silently); a 0-d A of matmul_4bit is named under compile too."""
import pytest
import torch
import torch._dynamo

import opsq.functional as F
from opsq.autograd import matmul_4bit

_G = torch.Generator().manual_seed(0)
_W = torch.randn(16, 64, generator=_G)
_A = torch.randn(3, 64, generator=_G)
_Q, _QS = F.quantize_4bit(_W, quant_type="nf4")
_CA, _, _ = F.int8_vectorwise_quant(_A)
_CB, _, _ = F.int8_vectorwise_quant(_W)

CASES = [
    ("int8_linear_matmul_out_int8", lambda o: F.int8_linear_matmul(_CA, _CB, out=o),
     torch.empty(3, 16, dtype=torch.int8), TypeError, r"out must have dtype torch.int32"),
    ("int8_linear_matmul_out_bigger", lambda o: F.int8_linear_matmul(_CA, _CB, out=o),
     torch.empty(2, 3, 16, dtype=torch.int32), ValueError, r"out must have shape \(3, 16\)"),
    ("int8_linear_matmul_out_meta", lambda o: F.int8_linear_matmul(_CA, _CB, out=o),
     torch.empty(3, 16, dtype=torch.int32, device="meta"), ValueError, r"out must be on"),
    ("gemv_4bit_out_int32", lambda o: F.gemv_4bit(_A[:1], _Q.t(), out=o, state=_QS),
     torch.empty(1, 16, dtype=torch.int32), TypeError, r"out must have dtype"),
    ("gemv_4bit_out_bigger", lambda o: F.gemv_4bit(_A[:1], _Q.t(), out=o, state=_QS),
     torch.empty(4, 16), ValueError, r"out must have shape \(1, 16\)"),
    ("dequantize_4bit_out_bigger", lambda o: F.dequantize_4bit(_Q, _QS, out=o),
     torch.empty(2, 16, 64), ValueError, r"out must have shape \(16, 64\)"),
    ("double_quant_out_row_bigger", lambda o: F.int8_double_quant(_A, out_row=o),
     torch.empty(2, 3, 64, dtype=torch.int8), ValueError, r"out_row must have shape"),
    ("matmul_4bit_out_int32", lambda o: matmul_4bit(_A, _Q.t(), _QS, out=o),
     torch.empty(3, 16, dtype=torch.int32), TypeError, r"out must have dtype torch.float32"),
]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_out_buffer_mismatch_raises(case, compiled):
    _, fn, out, exc, match = case
    torch._dynamo.reset()
    f = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn
    with pytest.raises(Exception) as info:
        f(out)
    e = info.value
    if isinstance(e, torch._dynamo.exc.TorchDynamoException):
        assert exc.__name__ in str(e) or "Observed exception" in str(e), str(e)
    else:
        assert isinstance(e, exc), repr(e)
    import re
    assert re.search(match, str(e)), str(e)
    torch._dynamo.reset()


def test_matching_out_buffers_still_work():
    o = torch.empty(3, 16, dtype=torch.int32)
    assert F.int8_linear_matmul(_CA, _CB, out=o) is o
    assert torch.equal(o, F.int8_linear_matmul(_CA, _CB))
    o = torch.empty(1, 16)
    assert F.gemv_4bit(_A[:1], _Q.t(), out=o, state=_QS) is o
    o = torch.empty(16, 64)
    assert torch.equal(F.dequantize_4bit(_Q, _QS, out=o), F.dequantize_4bit(_Q, _QS))
    o = torch.empty(3, 16)
    assert matmul_4bit(_A, _Q.t(), _QS, out=o) is o


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_matmul_4bit_0d_A_names_A(compiled):
    """A 0-d A raises the op's message naming A, in eager and under compile (Dynamo raised a
    bare 'IndexError: list index out of range' from A.shape[-1])."""
    torch._dynamo.reset()
    q, qs = F.quantize_4bit(torch.randn(16, 64), quant_type="nf4")
    fn = matmul_4bit
    if compiled:
        fn = torch.compile(matmul_4bit, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as info:
        fn(torch.tensor(1.0), q.t(), qs)
    assert not isinstance(info.value, IndexError)
    assert "RuntimeError" in str(info.value) or isinstance(info.value, RuntimeError)
    assert "A must have at least 1 dimension" in str(info.value)
    torch._dynamo.reset()
