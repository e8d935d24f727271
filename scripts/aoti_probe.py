"""Which models AOTInductor packages and loads, each in its own process (a crash in
``aoti_load_package`` kills only that case): a plain ``nn.Linear`` control, then opsq's layers
one kind at a time, then compile_tests/test_export.py's model. Each case checks the packaged
model against eager (``assert_close``, rtol = atol = 2e-3: Inductor fuses the GELU) and that
:func:`opsq.integrations.plain_weights` leaves the exported program's output unchanged. Prints
one line per case: ``case device rc last-stage max-abs-error``.

    python3 scripts/aoti_probe.py [--device cuda] [--cases linear,l4,...] [--no-opsq]
        [--split | --single-threaded | --legacy]

--no-opsq runs the ``linear`` control without importing opsq (is a crash torch's own?);
--split, --single-threaded and --legacy (one at a time) are ways around a loader crash (see
main's help). compile_tests/test_export.py runs ``--one full --split`` (and, when that crashes,
``--one linear --no-opsq --split``) in a subprocess.
"""
import argparse
import faulthandler
import os
import shutil
import subprocess
import sys
import tempfile

CASES = ("linear", "l4", "l4_bias", "l4_nested", "l8_t0", "l8_t6", "full")


def export_model(nested=True, threshold=6.0):
    """The model of compile_tests/test_export.py (and of the ``full`` case): a nested or plain
    NF4 layer, GELU, an LLM.int8 layer with ``threshold``, a plain FP4 layer; seeded, on the
    CPU in fp32."""
    import torch
    from opsq.nn import Linear4bit, Linear8bitLt
    torch.manual_seed(5)
    return torch.nn.Sequential(
        Linear4bit(64, 48, quant_type="nf4", compress_statistics=nested), torch.nn.GELU(),
        Linear8bitLt(48, 32, has_fp16_weights=False, threshold=threshold),
        Linear4bit(32, 16, bias=False, quant_type="fp4", compress_statistics=False))


def _model(case):
    import torch
    if case == "full":
        return export_model()
    torch.manual_seed(5)
    if case == "linear":
        return torch.nn.Sequential(torch.nn.Linear(64, 32))
    from opsq.nn import Linear4bit, Linear8bitLt
    if case == "l4":
        return torch.nn.Sequential(Linear4bit(64, 32, bias=False, compress_statistics=False))
    if case == "l4_bias":
        return torch.nn.Sequential(Linear4bit(64, 32, bias=True, compress_statistics=False))
    if case == "l4_nested":
        return torch.nn.Sequential(Linear4bit(64, 32, bias=False, compress_statistics=True))
    return torch.nn.Sequential(Linear8bitLt(64, 32, has_fp16_weights=False,
                                            threshold=0.0 if case == "l8_t0" else 6.0))


def run_case(case, device, with_opsq=True, split=False, single_threaded=False, legacy=False):
    """Export ``case``, package it with AOTInductor, load and run it against eager. ``split``
    packages in this process and loads in a fresh one; ``single_threaded`` passes
    ``run_single_threaded=True`` to the loader; ``legacy`` uses torch._export.aot_compile and
    aot_load (a bare .so, no package loader) instead."""
    faulthandler.enable()
    import torch
    if with_opsq:
        import opsq  # noqa: F401
    dtype = torch.float16 if device == "cuda" else torch.float32
    m = _model(case).to(device).to(dtype)
    x = torch.randn(4, 64, device=device, dtype=dtype) * 4
    print("stage export", flush=True)
    ep = torch.export.export(m, (x,))
    with torch.no_grad():
        want = m(x)
    if with_opsq:
        from opsq.integrations import plain_weights
        ep = plain_weights(ep)
        assert torch.equal(ep.module()(x), want), "plain_weights changed the exported program"

    print("stage compile", flush=True)
    with tempfile.TemporaryDirectory() as d:
        if legacy:
            so = torch._export.aot_compile(ep.module(), (x,))
            print("stage load", flush=True)
            runner = torch._export.aot_load(so, device)
        else:
            path = torch._inductor.aoti_compile_and_package(
                ep, package_path=os.path.join(d, "m.pt2"))
            if split:
                torch.save((x.cpu(), want.cpu()), os.path.join(d, "io.pt"))
                load = [sys.executable, __file__, "--load", path, "--device", device]
                print("stage load (a fresh process)", flush=True)
                rc = subprocess.run(load + ([] if with_opsq else ["--no-opsq"])).returncode
                if rc < 0:  # the loader died of a signal: die of the same one
                    faulthandler.disable()
                    os.kill(os.getpid(), -rc)
                sys.exit(rc)
            print("stage load", flush=True)
            runner = torch._inductor.aoti_load_package(path, run_single_threaded=single_threaded)
        _check(runner, x, want)


def _check(runner, x, want):
    import torch
    print("stage run", flush=True)
    with torch.no_grad():
        got = runner(x)
    err = (got.float() - want.float()).abs().max().item()
    print(f"stage run {err:.3g}", flush=True)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # GELU fused by Inductor
    print(f"stage done {err:.3g}", flush=True)


def load_and_run(path, device, with_opsq):
    """The second half of ``--split``: load the package at ``path`` in this process and check it
    against the input and eager output saved beside it."""
    faulthandler.enable()
    import torch
    if with_opsq:
        import opsq  # noqa: F401
    x, want = torch.load(os.path.join(os.path.dirname(path), "io.pt"))
    print("stage load", flush=True)
    runner = torch._inductor.aoti_load_package(path)
    _check(runner, x.to(device), want.to(device))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--one", metavar="CASE", help="run one case in this process")
    ap.add_argument("--no-opsq", action="store_true", help="do not import opsq (linear only)")
    ap.add_argument("--split", action="store_true",
                    help="package in one process, load in a fresh one")
    ap.add_argument("--single-threaded", action="store_true",
                    help="aoti_load_package(..., run_single_threaded=True)")
    ap.add_argument("--legacy", action="store_true",
                    help="torch._export.aot_compile + aot_load instead of the package")
    ap.add_argument("--load", metavar="PACKAGE", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=300)
    a = ap.parse_args()
    if a.load:  # --split's loading process (the case was checked by the one that packaged)
        return load_and_run(a.load, a.device, not a.no_opsq)
    if a.no_opsq and (a.one or a.cases) != "linear":
        ap.error("--no-opsq runs only the linear case")
    if a.one:
        return run_case(a.one, a.device, not a.no_opsq, split=a.split,
                        single_threaded=a.single_threaded, legacy=a.legacy)
    extra = [f for f, on in (("--no-opsq", a.no_opsq), ("--split", a.split),
                             ("--single-threaded", a.single_threaded),
                             ("--legacy", a.legacy)) if on]
    procs = {c: subprocess.Popen(
        [sys.executable, __file__, "--one", c, "--device", a.device, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in a.cases.split(",")}
    for case, p in procs.items():
        try:
            out, _ = p.communicate(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        stages = [ln for ln in out.splitlines() if ln.startswith("stage ")]
        print(f"{case:<10} {a.device:<5} rc={p.returncode:<4} {stages[-1] if stages else '-'}")
        if p.returncode != 0:
            tail = [ln for ln in out.splitlines() if ln.strip()][-30:]
            print("    " + "\n    ".join(tail))
            if p.returncode < 0 and shutil.which("gdb"):  # a native crash: its C++ frames
                bt = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args",
                                     sys.executable, __file__, "--one", case, "--device",
                                     a.device, *extra], capture_output=True, text=True,
                                    timeout=a.timeout).stdout
                print("    " + "\n    ".join(ln for ln in bt.splitlines() if ln.startswith("#")))


if __name__ == "__main__":
    main()
