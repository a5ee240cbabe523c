"""The C++ CPU backend: csrc/cpu (ATen GEMMs + one fused, parallel, vectorised pass per step)."""

from __future__ import annotations

import torch

from ._compiled import CompiledBackend


class CpuBackend(CompiledBackend):
    name = "cpu"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float64)
    dtype_names = "float32 and float64"


BACKEND = CpuBackend()
