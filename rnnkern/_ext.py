"""The compiled extension rnnkern._C, loaded once (by ``import rnnkern``).

``load()`` imports it once (registering the C++/CUDA kernels of the layer ops with the dispatcher)
and connects the ops to autograd and their fake kernels through ``register_layer_op``. Backends ask
``unavailable_reason()`` whether it is there.
"""

from __future__ import annotations

import threading
from typing import Optional

_lock = threading.Lock()
_module = None
_error: Optional[str] = None
_tried = False


def load():
    """The rnnkern._C module, or None when it is not built (see unavailable_reason())."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        try:
            import torch  # noqa: F401  (loads libtorch and its OpenMP runtime before the extension)
            from . import _C  # type: ignore[attr-defined]
        except ImportError as exc:
            _error = (f"the compiled extension rnnkern._C is not built ({exc}); build it with "
                      "`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`")
        else:
            import torch

            from .backends._layer_ops import register_layer_op

            register_layer_op(torch.ops.rnnkern.rnn_layer_forward.default,
                              torch.ops.rnnkern.rnn_layer_backward.default,
                              direct=(_C.call_layer_forward, _C.call_layer_backward))
            _module = _C
        _tried = True
    return _module


def unavailable_reason() -> Optional[str]:
    """None when rnnkern._C is importable, else why not."""
    load()
    return None if _module is not None else _error


def compiled_cuda_archs() -> str:
    """';'-separated compute capabilities of the compiled CUDA kernels ('' without CUDA or _C)."""
    module = load()
    return module.compiled_cuda_archs() if module is not None else ""


def has_cuda_kernels() -> bool:
    """Whether the extension was built with its CUDA kernels."""
    return compiled_cuda_archs() != ""
