"""The ``opsq`` command line.

Subcommands:

* ``opsq demo``: quantize a pretrained sentence-embedding model with NF4 / FP4 / LLM.int8,
  compile it and compare it with fp32 (see :mod:`opsq.demo`).
* ``opsq diagnostics``: torch version, CUDA availability and which kernel serves each op
  (the same report as ``python -m opsq``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def diagnostics() -> int:
    """Print torch version, CUDA availability and ``opsq.backends()`` as a table to stdout.

    Returns:
        0 (the report itself never fails; a missing CUDA extension is reported, not raised).
    """
    import torch

    import opsq

    print(f"opsq    {getattr(opsq, '__version__', 'unknown')}")
    print(f"torch   {torch.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"CUDA    available (runtime {torch.version.cuda}; {names})")
    else:
        print(f"CUDA    not available (torch built with CUDA: {torch.version.cuda or 'no'})")
    ext_error = getattr(getattr(opsq, "_extension", None), "extension_error", lambda: None)()
    print(f"opsq._C {'not loaded: ' + ext_error if ext_error else 'loaded'}")
    print()

    table = opsq.backends()
    devices = ["cpu", "cuda", "meta"]
    headers = ["op", *devices]
    rows = [[op, *(kernels.get(d, "-") for d in devices)] for op, kernels in table.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for cells in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return 0


def _bench(argv) -> int:
    from . import bench
    return bench.main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    """Build the ``opsq`` argument parser with one subparser per subcommand.

    Returns:
        The parser; each subparser sets ``args.handler(args) -> int``.
    """
    parser = argparse.ArgumentParser(
        prog="opsq", description="opsq: bitsandbytes-compatible 4-bit / 8-bit quantization "
                                 "as torch.library custom ops")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_diag = sub.add_parser("diagnostics", help="torch / CUDA / per-op kernel report")
    p_diag.set_defaults(handler=lambda args: diagnostics())

    # opsq.demo imports transformers only when the demo runs (offline), so the parser and
    # `opsq diagnostics` work without the demo extra installed.
    from . import demo

    p_demo = sub.add_parser("demo", help="quantize + compile all-MiniLM-L6-v2 and compare to fp32",
                            description=demo.__doc__.splitlines()[0])
    demo.add_arguments(p_demo)
    p_demo.set_defaults(handler=demo.run_from_args)

    # `opsq bench ARGS`: main() hands ARGS to opsq.bench.main (its own parser and --help).
    sub.add_parser("bench", help="time every op on the GPU vs copy bandwidth, bf16 and "
                                 "bitsandbytes (see `opsq bench --help`)")

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``opsq`` console script.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The subcommand's exit status; 2 when no subcommand is given (the help is printed).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
