"""The C++ copies of opsq's constants and validation rules agree with their Python home
(``opsq/_constants.py``, ``opsq/meta/_common.py``): the code tables and decision boundaries in
``opsq/csrc/common.cuh`` (read from the source), and the blocksize / quant_type / threshold
rules of ``opsq/csrc/checks.h`` (compiled and run against the installed torch's headers, so the
test runs on a CPU-only machine; skipped without a C++ compiler)."""
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from opsq import _constants as C
from opsq._constants import FLOAT_DTYPES
from opsq.meta._common import (check_blocksize, check_blockwise_blocksize, check_dtype,
                               check_float_dtype, check_quant_storage, check_quant_type,
                               check_threshold)

CSRC = os.path.join(os.path.dirname(C.__file__), "csrc")


def _hex_floats(name: str) -> list[float]:
    text = open(os.path.join(CSRC, "common.cuh")).read()
    m = re.search(rf"(?:#define {name}\b|\b{name}\[\d+\] = \{{)(.*?)(?:\n\n|\n//|\}};)", text,
                  re.S)
    assert m, name
    return [float.fromhex(v) for v in re.findall(r"-?0x[0-9a-fA-F.]+p[-+]?\d+", m.group(1))]


def _fp32(values) -> list[float]:
    return torch.tensor(values, dtype=torch.float64).float().double().tolist()


def test_code_tables_match():
    assert _hex_floats("OPSQ_NF4_VALUES") == _fp32(C.NF4_CODE)
    fp4 = _hex_floats("OPSQ_FP4_VALUES")
    want = _fp32(C.FP4_CODE)
    assert fp4 == want
    assert [math.copysign(1, v) for v in fp4] == [math.copysign(1, v) for v in want]  # -0.0


def test_decision_boundaries_match():
    nf4 = torch.tensor(C.NF4_CODE, dtype=torch.float64)
    mids = ((nf4[1:] + nf4[:-1]) / 2).float().double().tolist()
    assert _hex_floats("kNF4Mid") == mids
    assert _hex_floats("kFP4Thr") == _fp32(C.FP4_THRESHOLDS)
    text = open(os.path.join(CSRC, "common.cuh")).read()
    asc = re.search(r"kFP4Asc\[8\] = \{([^}]*)\}", text).group(1)
    assert tuple(int(v) for v in asc.split(",")) == C.FP4_CODES_ASCENDING
    assert f"kZeroCodeNF4 = {C.ZERO_CODE['nf4']};" in text


def test_nf4_lookup_design_equals_bucketize():
    """The NF4 encoder's look-up (common.cuh, Enc<true>): per bucket of width 1/64 the number lo
    of boundaries below the bucket widened by half a bucket, and code = lo + (v > mid[lo]) with
    mid[15] = +inf, from the table index floor(64 (v + 1)) + 1 (pads for buckets -1 and 128).
    Emulated here over every float32 within 2000 ulps of each boundary and bucket edge, random
    values and the fast path's extremes +-(1 + 2^-20): equal to torch.bucketize(right=False)."""
    mids = torch.tensor(_hex_floats("kNF4Mid"), dtype=torch.float32)
    f32 = torch.float32
    lo = []
    for e in range(130):  # table entry e holds bucket e - 1, computed as Enc::build does in fp32
        low = torch.tensor(-1.0, dtype=f32) + torch.tensor(e - 1, dtype=f32) / 64
        lo_m, hi_m = low - 1 / 128, low + 1 / 64 + 1 / 128
        assert int(((mids >= lo_m) & (mids <= hi_m)).sum()) <= 1  # one boundary a window
        lo.append(int((mids < lo_m).sum()))
    lo = torch.tensor(lo)
    mid16 = torch.cat([mids, torch.tensor([float("inf")])])
    edges = torch.cat([mids, torch.arange(-64, 65, dtype=f32) / 64])
    ulps = torch.arange(-2000, 2001, dtype=torch.int32)
    near = (edges.view(torch.int32)[:, None] + ulps[None, :]).view(f32)
    assert near.shape == (edges.numel(), ulps.numel())
    v = torch.cat([near.reshape(-1), torch.rand(1_000_000) * 2 - 1,
                   torch.tensor([1 + 2**-23, 1 + 2**-20, -1 - 2**-23, -1 - 2**-20, 0.0, -0.0])])
    v = v[v.isfinite() & (v.abs() <= 1 + 2**-20)]
    idx = torch.floor(64 * (v.double() + 1)).long() + 1  # the subnormal multiply-add's bits
    code = lo[idx] + (v > mid16[lo[idx]]).long()
    want = torch.bucketize(v, mids, right=False)
    assert torch.equal(code, want), f"{int((code != want).sum())} codes differ"


_PROGRAM = r'''
#include "checks.h"
#include <cmath>
#include <iostream>
#include <limits>
template <typename F> int ok(F f) { try { f(); return 1; } catch (const std::exception&) { return 0; } }
template <typename F> std::string msg(F f) { try { f(); return "ok"; } catch (const c10::Error& e) { return e.msg(); } }
int main() {
  for (long b = 1; b <= 8192; ++b) if (ok([&] { opsq::check_blocksize(b); })) std::cout << "b " << b << "\n";
  for (long b = 1; b <= 65536; ++b) if (ok([&] { opsq::check_blockwise_blocksize(b); })) std::cout << "w " << b << "\n";
  for (const char* q : {"nf4", "fp4", "NF4", "int4", "nf4 ", ""})
    std::cout << "q '" << q << "' " << ok([&] { opsq::check_quant_type(q); }) << "\n";
  const double inf = std::numeric_limits<double>::infinity();
  const double vals[] = {0.0, 6.0, 1e300, -1.0, -0.0, inf, -inf, std::nan("")};
  for (double t : vals) std::cout << "t " << ok([&] { opsq::check_threshold(t); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_float_dtype_arg("dtype", at::kDouble); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_float_dtype("A", at::kChar); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_quant_storage("quant_storage", at::kComplexFloat, true); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_dtype("A", at::kInt, {at::kChar}); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_blocksize(48); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_blocksize(8192); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_blockwise_blocksize(3000); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_blockwise_blocksize(32768, "nested_blocksize"); }) << "\n";
  std::cout << "m " << msg([&] { opsq::check_quant_type("int4"); }) << "\n";
}
'''


def _accepts(check, *args) -> int:
    try:
        check(*args)
        return 1
    except (ValueError, TypeError, RuntimeError):
        return 0


@pytest.mark.slow
def test_checks_h_rules_match_python(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on this machine")
    from torch.utils.cpp_extension import include_paths, library_paths
    src = tmp_path / "checks.cpp"
    src.write_text(_PROGRAM)
    exe = tmp_path / "checks"
    lib = library_paths()[0]
    cmd = [cxx, "-std=c++17", "-w", *[f"-I{p}" for p in include_paths()], f"-I{CSRC}",
           str(src), f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        pytest.fail(f"checks.h does not compile against this torch:\n{build.stderr[-3000:]}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert [int(l.split()[1]) for l in out if l.startswith("b ")] == list(C.BLOCKSIZES)
    assert [int(l.split()[1]) for l in out if l.startswith("w ")] == \
        list(C.BLOCKWISE_BLOCKSIZES)
    for q, line in zip(["nf4", "fp4", "NF4", "int4", "nf4 ", ""],
                       [l for l in out if l.startswith("q ")]):
        assert int(line.split()[-1]) == _accepts(check_quant_type, q), q
    vals = [0.0, 6.0, 1e300, -1.0, -0.0, math.inf, -math.inf, math.nan]
    got = [int(l.split()[1]) for l in out if l.startswith("t ")]
    assert got == [_accepts(check_threshold, v) for v in vals]
    assert got == [1, 1, 1, 0, 1, 0, 0, 0]
    assert all(_accepts(check_blocksize, b) for b in C.BLOCKSIZES)
    assert all(_accepts(check_blockwise_blocksize, b) for b in C.BLOCKWISE_BLOCKSIZES)
    assert not any(_accepts(check_blocksize, b) for b in (8192, 16384))
    # the same messages, word for word, as the Python checks the CPU and fake kernels run
    want = [_message(check_float_dtype, "dtype", torch.float64),
            _message(check_dtype, "A", torch.zeros(1, dtype=torch.int8), FLOAT_DTYPES),
            _message(check_quant_storage, torch.complex64),
            _message(check_dtype, "A", torch.zeros(1, dtype=torch.int32), (torch.int8,)),
            _message(check_blocksize, 48), _message(check_blocksize, 8192),
            _message(check_blockwise_blocksize, 3000),
            _message(check_blockwise_blocksize, 32768, "nested_blocksize"),
            _message(check_quant_type, "int4")]
    assert [l[2:] for l in out if l.startswith("m ")] == want


def _message(check, *args) -> str:
    try:
        check(*args)
    except (ValueError, TypeError, RuntimeError) as e:
        return str(e)
    return "ok"
