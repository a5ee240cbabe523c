"""rnnkern: fused LSTM/GRU/RNN kernels for PyTorch that record the gradient norm at every timestep.

    import rnnkern
    m = rnnkern.LSTM(32, 64, record_grad_norms=True)   # a torch.nn.LSTM, run by rnnkern's kernels
    out, (h, c) = m(x); out.sum().backward()
    m.grad_norms.h                                     # [layers, directions, T]: ‖∂L/∂h_t‖
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from . import backends
from ._patch import convert, patch_torch
from ._version import __version__
from .explain import explain
from .gradnorms import GradNorms
from .modules import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "GradNorms", "convert", "patch_torch", "backends", "build_info", "explain",
           "__version__"]

# The compiled ops (and their autograd, registered from Python) at import rather than at first use: a
# program holding them that was saved elsewhere (torch.export.save, AOTInductor's package, a
# torch.jit.save of a trace) then loads and runs in a new process after `import rnnkern`. (Without
# the extension this notes why, for the backends to say.)
from . import _ext  # noqa: E402

_ext.load()


def build_info() -> Dict[str, Any]:
    """What this install has: the compiled extension, its CUDA architectures, torch/CUDA versions."""
    info: Dict[str, Any] = {
        "rnnkern": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": False,
        "extension_error": None,
        "cuda_kernels": False,
        "cuda_archs": [],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        from . import _C  # noqa: F401  (loads the compiled kernels)
    except ImportError as error:
        info["extension_error"] = str(error)
    else:
        info["extension"] = True
        archs = _C.compiled_cuda_archs()
        info["cuda_archs"] = [a for a in archs.split(";") if a]
        info["cuda_kernels"] = bool(info["cuda_archs"])
        info["per_step_gemm"] = _C.gemm_paths()
    info["backends"] = backends()
    return info
