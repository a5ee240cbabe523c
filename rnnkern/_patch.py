"""rnnkern.convert and rnnkern.patch_torch: put rnnkern under existing code."""

from __future__ import annotations

import torch
import torch.nn as nn

from . import backends as _backends
from .modules import GRU, LSTM, RNN, RNNKERN_CLASSES, _check_clip


def convert(model: nn.Module, backend: str = "auto", record_grad_norms: bool = False,
            hidden_grad_clip=None) -> nn.Module:
    """Turn every torch.nn.LSTM / GRU / RNN in ``model`` (itself included, nested too) into the
    rnnkern module, in place, and return ``model``.

    The modules keep their identity, parameters, device, dtype, training mode and registered hooks
    (the instance's class is switched to the rnnkern subclass, which only overrides ``forward``).
    Modules that already are rnnkern modules get the given options. Subclasses of torch's classes
    other than exactly LSTM/GRU/RNN are left alone, since their own forward may differ, but for the
    class torch.nn.utils.parametrize makes for a parametrized module (weight_norm, spectral_norm,
    orthogonal, ...), which becomes its counterpart over rnnkern's class.
    """
    _backends.check_name(backend)
    _check_clip(hidden_grad_clip)
    for module in model.modules():
        target = RNNKERN_CLASSES.get(type(module)) or _parametrized_counterpart(module)
        if target is not None:
            module.__class__ = target
            module._init_rnnkern(backend, record_grad_norms, hidden_grad_clip)
        elif isinstance(module, (LSTM, GRU, RNN)):
            module.backend, module.record_grad_norms = backend, bool(record_grad_norms)
            module.hidden_grad_clip = hidden_grad_clip
    return model


def _parametrized_counterpart(module: nn.Module):
    """For a module of the class torch.nn.utils.parametrize made for a torch.nn LSTM/GRU/RNN (a subclass
    of it holding the parametrized tensors' properties), the same class over rnnkern's; else None.
    (parametrize's remove_parametrizations then restores its base: rnnkern's class.)"""
    cls = type(module)
    if len(cls.__bases__) != 1 or not torch.nn.utils.parametrize.is_parametrized(module):
        return None
    target = RNNKERN_CLASSES.get(cls.__bases__[0])
    if target is None or cls.__name__ != f"Parametrized{cls.__bases__[0].__name__}":
        return None
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls.__name__, (target,), namespace)


class _PatchedMeta(type):
    """While patched, ``isinstance(m, torch.nn.LSTM)`` keeps meaning "an LSTM" (torch's or rnnkern's),
    although the instances built are of rnnkern's class, not of the patched class itself."""

    def __instancecheck__(cls, obj):
        return isinstance(obj, cls._torch_class)

    def __subclasscheck__(cls, sub):
        return issubclass(sub, cls._torch_class)


class patch_torch:
    """Make torch.nn.LSTM / GRU / RNN *be* rnnkern's classes, so unchanged code builds them.

    Use as a context manager (``with rnnkern.patch_torch(): ...``) or call ``start()`` / ``stop()``.
    Options (``backend``, ``record_grad_norms``, ``hidden_grad_clip``) become the defaults of the
    modules built while patched. Patches nest: torch.nn holds the newest started one's classes, and
    torch's own once all are stopped, in whatever order they stop.
    """

    _targets = ((torch.nn, "LSTM"), (torch.nn, "GRU"), (torch.nn, "RNN"),
                (torch.nn.modules, "LSTM"), (torch.nn.modules, "GRU"), (torch.nn.modules, "RNN"),
                (torch.nn.modules.rnn, "LSTM"), (torch.nn.modules.rnn, "GRU"),
                (torch.nn.modules.rnn, "RNN"))

    def __init__(self, backend: str = "auto", record_grad_norms: bool = False, hidden_grad_clip=None):
        _backends.check_name(backend)
        _check_clip(hidden_grad_clip)
        self.options = dict(backend=backend, record_grad_norms=record_grad_norms,
                            hidden_grad_clip=hidden_grad_clip)
        self._replacements = None

    def _patched_class(self, base):
        options = self.options

        class Patched(base, metaclass=_PatchedMeta):
            def __init__(self, *args, **kwargs):
                for key, value in options.items():
                    kwargs.setdefault(key, value)
                super().__init__(*args, **kwargs)
                # The instance is a plain rnnkern module (so it pickles, deep-copies and saves like
                # one); this class only supplies the defaults. (Subclasses defined by user code while
                # patched keep their own class.)
                if type(self) is Patched:
                    self.__class__ = base

            def __setstate__(self, state):
                # An unpickled torch.nn module (torch.load of a whole model while patched: pickle finds
                # this class under torch's name): the plain rnnkern module, with the patch's options
                # where the pickle has none.
                missing = [key for key in options if key not in state]
                super().__setstate__(state)
                if type(self) is Patched:
                    self.__class__ = base
                    for key in missing:
                        setattr(self, key, options[key])

        Patched.__name__ = Patched.__qualname__ = base.__name__
        Patched.__module__ = base.__module__
        return Patched

    # The started patches, oldest first, and torch's own classes while any is started: torch.nn then
    # holds the newest started patch's classes, whatever order they are stopped in.
    _started: list = []
    _originals = None

    def start(self) -> "patch_torch":
        if self._replacements is not None:
            raise RuntimeError("patch_torch is already started")
        self._replacements = {"LSTM": self._patched_class(LSTM), "GRU": self._patched_class(GRU),
                              "RNN": self._patched_class(RNN)}
        if not patch_torch._started:
            patch_torch._originals = [(owner, name, getattr(owner, name)) for owner, name in self._targets]
        patch_torch._started.append(self)
        self._install(self._replacements)
        return self

    def stop(self) -> None:
        if self._replacements is None:
            return
        self._replacements = None
        patch_torch._started.remove(self)
        if patch_torch._started:
            self._install(patch_torch._started[-1]._replacements)
        else:
            for owner, name, original in patch_torch._originals:
                setattr(owner, name, original)
            patch_torch._originals = None

    def _install(self, replacements) -> None:
        for owner, name in self._targets:
            setattr(owner, name, replacements[name])

    def __enter__(self) -> "patch_torch":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

