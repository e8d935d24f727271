"""Build hook for opsq's optional CUDA extension.

The extension (``opsq/csrc``) is built only when the installed torch was built with CUDA
(``torch.version.cuda``) and a CUDA toolkit is found (``CUDA_HOME``); otherwise the package
installs as pure Python and every op runs on its reference kernel. ``OPSQ_CUDA_ARCH_LIST``
overrides the architectures (default: ``9.0`` for development). ``OPSQ_NO_CUDA=1`` skips it.
"""
import glob
import os
import sys

from setuptools import setup


def _skip(reason: str):
    """No extension: say so where pip shows it (the package still installs, pure Python)."""
    sys.stderr.write(f"\n*** opsq: the CUDA extension is NOT built ({reason}); every op runs "
                     "on its reference kernel. ***\n\n")
    return [], {}


def _ext_modules():
    if os.environ.get("OPSQ_NO_CUDA", "0") == "1":
        return _skip("OPSQ_NO_CUDA=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # torch missing or without cpp_extension: pure-Python install
        return _skip("torch is not importable in the build environment: with a CUDA torch, "
                     "install with `pip install -e . --no-build-isolation`")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} has no CUDA")
    if CUDA_HOME is None:
        return _skip("no CUDA toolkit (CUDA_HOME / nvcc) found")
    sources = sorted(glob.glob("opsq/csrc/*.cu") + glob.glob("opsq/csrc/*.cpp"))
    if not sources:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("OPSQ_CUDA_ARCH_LIST", "9.0"))
    ext = CUDAExtension(
        name="opsq._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
