"""Builds rnnkern and its extension rnnkern._C.

Build switches (design §4):
  RNNKERN_BUILD_CUDA=auto|0|1  auto (default): build the CUDA kernels when nvcc (CUDA_HOME) and a CUDA
                               build of torch are present, with or without a GPU; 1: require them.
  RNNKERN_CUDA_ARCHS="80;90"   compute capabilities to compile for.
  MAX_JOBS                     parallel compile jobs (read by torch's ninja build).
Install: pip install --no-build-isolation .
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    scope = {}
    with open(os.path.join(ROOT, "rnnkern", "_version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _want_cuda():
    """Decide whether to build the CUDA kernels; explain the decision on stderr."""
    import torch
    from torch.utils import cpp_extension

    mode = os.environ.get("RNNKERN_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"RNNKERN_BUILD_CUDA must be auto, 0 or 1, not {mode!r}")
    if mode == "0":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    home = cpp_extension.CUDA_HOME
    if home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME, e.g. CUDA_HOME=/usr/local/cuda)")
    elif not os.path.exists(os.path.join(home, "bin", "nvcc")):
        reasons.append(f"CUDA_HOME={home} has no bin/nvcc")
    if not reasons:
        return True
    message = "rnnkern: not building the CUDA kernels: " + "; ".join(reasons)
    if mode == "1":
        sys.exit(message + " (RNNKERN_BUILD_CUDA=1)")
    print(message, file=sys.stderr)
    return False


def _cuda_archs():
    archs = os.environ.get("RNNKERN_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not archs:
        sys.exit("RNNKERN_CUDA_ARCHS is empty")
    return archs


def _extensions():
    from torch.utils import cpp_extension

    include = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-fopenmp", "-DNDEBUG"]
    sources = ["csrc/ops.cpp", "csrc/direct_calls.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if not _want_cuda():
        return [cpp_extension.CppExtension(
            "rnnkern._C", sources, include_dirs=include,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    archs = _cuda_archs()
    cxx += ["-DRNNKERN_WITH_CUDA", f'-DRNNKERN_CUDA_ARCHS="{";".join(archs)}"']
    # (3357: lambdas capturing structured bindings, C++20; torch 2.11 compiles CUDA as C++17, where
    # nvcc accepts them with this warning, 264 times per build)
    nvcc = ["-O3", "-DNDEBUG", "-lineinfo", "--diag-suppress=3357"]
    for arch in archs:
        nvcc.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return [cpp_extension.CUDAExtension(
        "rnnkern._C", sources, include_dirs=include,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
    )]


def _cmdclass():
    from torch.utils import cpp_extension

    return {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


setup(
    name="rnnkern",
    version=_version(),
    packages=find_packages(include=["rnnkern", "rnnkern.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
