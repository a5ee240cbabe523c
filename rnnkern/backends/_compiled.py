"""What the two backends of the compiled extension (cpu, cuda) share: the op call and the checks."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _ext
from . import Backend
from ._layer_ops import call_layer_op, runs_eager


class CompiledBackend(Backend):
    """A backend running ``torch.ops.rnnkern.rnn_layer_forward`` on one device type."""

    device_type = "?"
    saves_output = True
    dtypes: Sequence[torch.dtype] = ()
    dtype_names = "?"  # for messages, e.g. "float32 and float64"

    def unavailable_reason(self) -> Optional[str]:
        return _ext.unavailable_reason()

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if torch.device(device).type != self.device_type:
            return (f"the {self.name} backend runs on {self.device_type.upper()} tensors only, "
                    f"not {torch.device(device).type}")
        if dtype not in self.dtypes:
            return f"the {self.name} backend supports {self.dtype_names}, not {dtype}"
        return None

    def layer(self, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe,
              xp_source=None):
        """One layer and direction (docs/internals.md): xp [N, G*H] -> out [N, P], h_n [B, P],
        c_n [B, H] (LSTM) or [0]. xp_source: (x, w_ih, b_ih) of xp, for second derivatives (call_layer_op)."""
        _ext.load()
        out, h_n, c_n, _workspace = call_layer_op(
            torch.ops.rnnkern.rnn_layer_forward.default, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
            reverse, float(clip) if clip is not None else 0.0, norm_probe, xp_source=xp_source)
        return out, h_n, c_n

    def delivers_norms_directly(self, tensors) -> bool:
        return runs_eager(tensors)  # (EagerLayer's backward delivers to a NormSink)
