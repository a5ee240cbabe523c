"""The CUDA C++ backend: csrc/cuda (cuBLAS GEMMs + one fused kernel per step)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from ._compiled import CompiledBackend


class CudaBackend(CompiledBackend):
    name = "cuda"
    device_type = "cuda"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    dtype_names = "float32, float64, float16 and bfloat16"

    def unavailable_reason(self) -> Optional[str]:
        reason = _ext.unavailable_reason()
        if reason is not None:
            return reason
        if not _ext.has_cuda_kernels():
            return ("rnnkern._C was built without its CUDA kernels (no CUDA toolkit or CPU-only "
                    "torch at build time, or RNNKERN_BUILD_CUDA=0)")
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None


BACKEND = CudaBackend()
