"""The Triton backend: the layer op of docs/internals.md in Triton kernels.

On a CUDA GPU it runs float16, bfloat16, float32 and float64 CUDA tensors. Without one it runs CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported), which is
how the CPU test suite checks it. Switches: ``BACKEND.settings`` (see _common.Settings).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import Backend
from . import _common
from ._ops import triton_rnn_layer_backward, triton_rnn_layer_forward

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class TritonBackend(Backend):
    """Fused Triton step kernels (or one time-looped kernel for small H), forward and backward."""

    name = "triton"
    settings = _common.SETTINGS
    saves_output = True

    def unavailable_reason(self) -> Optional[str]:
        if not _common.INTERPRETER and not torch.cuda.is_available():
            return ("no CUDA GPU, and the Triton interpreter is off (set TRITON_INTERPRET=1 before "
                    "importing triton to run it on CPU tensors)")
        if _common.INTERPRETER:
            return _common.interpreter_fault()
        return None

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        device = torch.device(device)
        if dtype not in _DTYPES:
            return f"dtype {dtype} is not supported (float16, bfloat16, float32, float64 are)"
        if device.type == "cpu":
            if not _common.INTERPRETER:
                return "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"
            if dtype == torch.bfloat16:
                return "the Triton interpreter computes bfloat16 incorrectly; use a GPU"
            return None
        if device.type == "cuda":
            if _common.INTERPRETER:
                return "TRITON_INTERPRET=1 is set: the kernels run on CPU tensors only"
            return None
        return f"device type {device.type!r} is not supported (cuda, or cpu under the interpreter)"

    def layer(self, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe,
              xp_source=None):
        # (xp_source unused: the op's registered autograd, which has no second derivative, runs these)
        out, h_n, c_n, _workspace = triton_rnn_layer_forward(
            cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, bool(reverse), float(clip), norm_probe)
        return out, h_n, c_n


BACKEND = TritonBackend()

__all__ = ["BACKEND", "TritonBackend", "triton_rnn_layer_forward", "triton_rnn_layer_backward"]
