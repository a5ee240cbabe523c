"""Backend registry: which implementations of the layer op exist, which are usable, and "auto".

A backend implements one method, ``layer`` (the layer-op contract of docs/internals.md, with autograd):

    layer(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe, xp_source=None)
        -> (out [N, P], h_n [B, P], c_n [B, H] or [0])

xp_source: (x [N, I], w_ih, b_ih or None) with xp = linear(x, w_ih, b_ih), or None: what a backend whose
backward is not differentiable needs to recompute the layer differentiably for a second derivative.

and says where it runs through ``unsupported_reason(device, dtype)`` (None when it can run there).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Dict, List, Optional

import torch

# Preference order for backend="auto", per device type. A backend only appears in `auto` once it
# passes the whole comparison suite on that device.
_AUTO_ORDER = {"cuda": ["cuda", "triton", "reference"], "cpu": ["cpu", "reference"]}
# name -> module path of the backend object `BACKEND`
_MODULES = {
    "reference": "rnnkern.backends.reference",
    "cpu": "rnnkern.backends.cpu",
    "cuda": "rnnkern.backends.cuda",
    "triton": "rnnkern.backends.triton",
}
_loaded: Dict[str, object] = {}


class Backend:
    """Base class: a name, where it can run, and the layer op."""

    name = "?"
    # Whether ``layer`` saves its output ``out`` for its backward (the fused backends: autograd then
    # raises if the caller changes it in place before the backward).
    saves_output = False

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run on this machine at all (None if it can)."""
        return None

    def unsupported_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """Why this backend cannot run on tensors of this device and dtype (None if it can)."""
        return self.unavailable_reason()

    def layer(self, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe,
              xp_source=None):
        raise NotImplementedError

    def delivers_norms_directly(self, tensors) -> bool:
        """Whether ``layer`` takes a _compat.NormSink as ``norm_probe`` for a call that requires grad
        on ``tensors`` (all that the layer's inputs derive from: the module call's data, batch sizes,
        states and weights): its backward then hands the norms over itself, with no probe. ``layer``
        trusts a sink to mean True here (and skips asking again)."""
        return False


class _Unavailable(Backend):
    """Stands for a backend whose module cannot be imported here."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def unavailable_reason(self) -> Optional[str]:
        return self.reason


def names() -> List[str]:
    """Every backend name rnnkern knows, usable here or not."""
    return list(_MODULES)


def _unknown(name) -> ValueError:
    return ValueError(f"unknown rnnkern backend {name!r}; valid backends are: "
                      + ", ".join(repr(n) for n in ["auto"] + names()))


def validate_name(name: str) -> str:
    """ValueError naming the valid ones for a name that is neither "auto" nor a backend's (no import:
    plain Python that torch.compile traces, so the error reaches the caller as a ValueError there too)."""
    if name != "auto" and name not in _MODULES:
        raise _unknown(name)
    return name


def get(name: str) -> Backend:
    """The backend object for a name; ValueError naming the valid ones for an unknown name."""
    if name not in _MODULES:
        raise _unknown(name)
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        except ImportError as error:  # e.g. triton not installed: unusable, with the reason
            _loaded[name] = _Unavailable(name, f"cannot import {_MODULES[name]}: {error}")
    return _loaded[name]


def check_name(name: str) -> str:
    """Validate a backend name ("auto" or a known one) and return it."""
    if name != "auto":
        get(name)
    return name


# Fastest first: the GPU backends, then the CPU's, then the oracle (design.md's example order).
_PREFERENCE = ["cuda", "triton", "cpu", "reference"]


def usable() -> List[str]:
    """The backends usable on this machine (for some device), in preference order: fastest first,
    the reference backend last."""
    return [n for n in _PREFERENCE if get(n).unavailable_reason() is None]


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend to run for `name` ("auto" or explicit) on tensors of this device and dtype.

    An explicit backend that cannot run there raises RuntimeError saying why: never a silent
    fallback to another implementation.
    """
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ["reference"]):
            if candidate in _MODULES and get(candidate).unsupported_reason(device, dtype) is None:
                return get(candidate)
        return get("reference")
    backend = get(name)
    reason = backend.unsupported_reason(device, dtype)
    if reason is not None:
        raise RuntimeError(
            f"rnnkern backend {name!r} cannot run on {device.type} tensors of dtype {dtype}: {reason}")
    return backend


class _CallableModule(types.ModuleType):
    """Lets ``rnnkern.backends()`` (the public API) and ``rnnkern.backends.get(...)`` (the registry)
    be one object: this package, callable."""

    def __call__(self) -> List[str]:
        """The backends usable on this machine, e.g. ["cuda", "triton", "cpu", "reference"]."""
        return usable()


sys.modules[__name__].__class__ = _CallableModule
