"""The C++ CPU backend: csrc/cpu (ATen GEMMs + one fused, parallel, vectorised pass per step)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from . import Backend

_DTYPES = (torch.float32, torch.float64)


class CpuBackend(Backend):
    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        return _ext.unavailable_reason()

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if torch.device(device).type != "cpu":
            return f"the cpu backend runs on CPU tensors only, not {torch.device(device).type}"
        if dtype not in _DTYPES:
            return f"the cpu backend supports float32 and float64, not {dtype}"
        return None

    def layer(self, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe):
        """One layer and direction (docs/internals.md): xp [N, G*H] -> out [N, P], h_n [B, P],
        c_n [B, H] (LSTM) or [0]."""
        _ext.load()
        out, h_n, c_n, _workspace = torch.ops.rnnkern.rnn_layer_forward(
            cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse,
            float(clip) if clip is not None else 0.0, norm_probe)
        return out, h_n, c_n


BACKEND = CpuBackend()
