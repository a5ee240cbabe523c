"""What makes rnnkern modules first-class PyTorch citizens: torch.compile and autocast support.

torch.compile
    * Dynamo refuses every instance of torch.nn.RNN/GRU/LSTM ("Attempted to wrap RNN, GRU, or LSTM")
      unless ``torch._dynamo.config.allow_rnn`` is set, because torch's own forward is not traceable.
      rnnkern's forward is, so ``install_dynamo_support`` lets Dynamo wrap *rnnkern* modules (and only
      them) as if that flag were set. torch.nn's own modules keep torch's behaviour.
    * Gradient norms travel as the gradient of a "norm probe" (docs/internals.md). A leaf tensor with
      a hook cannot be created inside a compiled graph, so the probe is instead the output of
      ``_ProbeSource``, an autograd.Function of a tensor that already requires grad; its backward
      receives the summed probe gradient (all norms, once per backward) and hands it to the op
      ``rnnkern::deliver_grad_norms``. That op is opaque to the compiler and registered as
      side-effectful, so compiled backward graphs keep it; at run time it builds the GradNorms, sets
      ``module.grad_norms`` and calls the module's grad-norm hooks. Eager mode runs the same path.

autocast
    ``autocast_plan`` says, for a module call inside ``torch.autocast``, in which dtype torch.nn would
    run the recurrence and which dtypes its outputs would have (measured from torch.nn; see the
    function), so that rnnkern modules give the same output dtypes in the same contexts.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import itertools
import sys
import weakref
from typing import Optional

import torch
from torch import Tensor

# -- module tokens: how the backward finds the module whose norms it delivers ------------------------

_modules: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_token_counter = itertools.count(1)


def register_module(module: torch.nn.Module) -> int:
    """A fresh token naming ``module`` for ``deliver_grad_norms`` (a copy gets its own token)."""
    token = next(_token_counter)
    _modules[token] = module
    return token


@torch.library.custom_op("rnnkern::deliver_grad_norms", mutates_args=())
def deliver_grad_norms(norms: Tensor, batch_sizes: Tensor, unsorted_indices: Optional[Tensor],
                       token: int, has_cell_state: bool) -> None:
    """Hand the norms of one backward to module ``token``: set its grad_norms, call its hooks.

    norms: [L, D, 2, N] float32, per row of the packed layout (row 1 = cell-state norms);
    batch_sizes: [T] int64 (CPU); unsorted_indices: [B] or None (PackedSequence order).
    """
    module = _modules.get(token)
    if module is None:  # the module is gone: nobody to tell
        return
    module._deliver_grad_norms(norms.detach().clone(), batch_sizes, unsorted_indices, has_cell_state)


@deliver_grad_norms.register_fake
def _(norms, batch_sizes, unsorted_indices, token, has_cell_state):
    return None


# Keep the op in compiled (backward) graphs although nothing uses its (absent) output.
torch.library._register_effectful_op(deliver_grad_norms._opoverload,
                                     torch._library.effects.EffectType.ORDERED)


class _ProbeSource(torch.autograd.Function):
    """probe = zeros(shape) that is differentiable w.r.t. `anchor` (any tensor requiring grad), so
    that the gradient autograd accumulates for the probe reaches this backward, which delivers it."""

    @staticmethod
    def forward(ctx, anchor, batch_sizes, unsorted_indices, shape, token, has_cell_state):
        ctx.token, ctx.has_cell_state = token, has_cell_state
        ctx.save_for_backward(batch_sizes, unsorted_indices)
        return anchor.new_zeros(shape, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_probe):
        batch_sizes, unsorted_indices = ctx.saved_tensors
        torch.ops.rnnkern.deliver_grad_norms(grad_probe.contiguous(), batch_sizes, unsorted_indices,
                                             ctx.token, ctx.has_cell_state)
        return None, None, None, None, None, None


def norm_probe(anchor: Tensor, shape, batch_sizes: Tensor, unsorted_indices: Optional[Tensor],
               token: int, has_cell_state: bool) -> Tensor:
    """The float32 probe [L, D, 2, N] whose gradient (the norms) goes to module ``token`` once per
    backward. ``anchor`` must require grad (the probe's gradient only flows if it does)."""
    return _ProbeSource.apply(anchor, batch_sizes, unsorted_indices, tuple(shape), token,
                              has_cell_state)


# -- Dynamo: wrap rnnkern modules although they are torch.nn.RNN/GRU/LSTM instances -----------------

_DYNAMO = "torch._dynamo"

# Runs a module's forward outside the compiled graph (a graph break); set once Dynamo is loaded.
eager_forward = None

_PACKED_REASON = ("rnnkern runs PackedSequence input outside the compiled graph: its batch sizes are "
                  "data that the time loop needs on the host (padded input compiles fullgraph)")


def _call_forward(module, input, hx):
    return module._forward(input, hx)


def _on_dynamo_loaded(dynamo) -> None:
    """Let Dynamo wrap rnnkern modules (and only them) as if ``config.allow_rnn`` were set."""
    global eager_forward
    from torch._dynamo import config
    from torch._dynamo.variables import builder

    from .modules import _RnnkernMixin

    if eager_forward is None:
        eager_forward = dynamo.disable(_call_forward, reason=_PACKED_REASON)
    variable_builder = builder.VariableBuilder
    original = variable_builder.wrap_module
    if getattr(original, "_rnnkern_patched", False):
        return

    def wrap_module(self, value):
        if isinstance(value, _RnnkernMixin) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._rnnkern_patched = True
    variable_builder.wrap_module = wrap_module


class _OnDynamoImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs _on_dynamo_loaded right after torch._dynamo is imported (importing Dynamo ourselves
    would add seconds to ``import rnnkern``); Dynamo traces nothing before its import completes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _DYNAMO:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        except Exception:
            sys.meta_path.insert(0, self)
            raise
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _on_dynamo_loaded(module)


def install_dynamo_support() -> None:
    """Let torch.compile trace rnnkern modules (now if Dynamo is loaded, else once it loads)."""
    dynamo = sys.modules.get(_DYNAMO)
    if dynamo is not None and hasattr(dynamo, "disable"):
        _on_dynamo_loaded(dynamo)
    elif not any(isinstance(f, _OnDynamoImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnDynamoImport())
