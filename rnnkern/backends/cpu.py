"""The C++ CPU backend: csrc/cpu (ATen GEMMs + one fused, parallel, vectorised pass per step).
float16 and bfloat16 layers compute in float (the workspace and the cell state in float), as on the GPU."""

from __future__ import annotations

import torch

from ._compiled import CompiledBackend


class CpuBackend(CompiledBackend):
    name = "cpu"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    dtype_names = "float32, float64, float16 and bfloat16"


BACKEND = CpuBackend()
