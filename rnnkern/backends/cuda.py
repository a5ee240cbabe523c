"""The CUDA C++ backend: csrc/cuda (cuBLAS GEMMs + one fused kernel per step)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from . import Backend

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class CudaBackend(Backend):
    name = "cuda"

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

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if torch.device(device).type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, not {torch.device(device).type}"
        if dtype not in _DTYPES:
            return f"the cuda backend supports float32, float64, float16 and bfloat16, not {dtype}"
        return None

    def layer(self, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe):
        """One layer and direction (docs/internals.md): xp [N, G*H] -> out [N, P], h_n [B, P],
        c_n [B, H] (LSTM) or [0]."""
        _ext.load()
        out, h_n, c_n, _workspace = torch.ops.rnnkern.rnn_layer_forward(
            cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse,
            float(clip) if clip is not None else 0.0, norm_probe)
        return out, h_n, c_n


BACKEND = CudaBackend()
