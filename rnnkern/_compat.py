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

import contextlib
import importlib.abc
import importlib.util
import itertools
import sys
import warnings
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .gradnorms import GradNorms

# -- module tokens: how the backward finds the module whose norms it delivers ------------------------

_modules: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
_token_counter = itertools.count(1)


def register_module(module: torch.nn.Module) -> int:
    """A fresh token naming ``module`` for ``deliver_grad_norms`` (a copy gets its own token)."""
    token = next(_token_counter)
    _modules[token] = module
    return token


def _deliver(norms: Tensor, batch_sizes: Tensor, unsorted_indices: Optional[Tensor], token: int,
             has_cell_state: bool, owned: bool = False) -> None:
    """Hand the norms of one backward to module ``token``: set its grad_norms, call its hooks.

    norms: [L, D, 2, N] float32, per row of the packed layout (row 1 = cell-state norms);
    batch_sizes: [T] int64 (CPU); unsorted_indices: [B] or None (PackedSequence order); owned: whether
    nothing else holds `norms` (else the GradNorms get a copy: a compiled graph may reuse its buffers).
    """
    module = _modules.get(token)
    if module is None:  # the module is gone: nobody to tell
        return
    module._deliver_grad_norms(norms.detach() if owned else norms.detach().clone(), batch_sizes,
                               unsorted_indices, has_cell_state)


@torch.library.custom_op("rnnkern::deliver_grad_norms", mutates_args=())
def deliver_grad_norms(norms: Tensor, batch_sizes: Tensor, unsorted_indices: Optional[Tensor],
                       token: int, has_cell_state: bool) -> None:
    """The delivery (_deliver) as an op, so that a compiled backward graph keeps it."""
    _deliver(norms, batch_sizes, unsorted_indices, token, has_cell_state)


try:
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # a torch without it: the delivery always goes through the op (correct, slower)
    _get_current_dispatch_mode = None


def _being_traced(tensor: Tensor) -> bool:
    """Whether a backward runs under a tracer (Dynamo, AOTAutograd's make_fx, fake or functional
    tensors), where the delivery must be the op to be recorded, rather than in plain eager autograd."""
    return (_get_current_dispatch_mode is None or torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None or type(tensor) is not Tensor)


@deliver_grad_norms.register_fake
def _(norms, batch_sizes, unsorted_indices, token, has_cell_state):
    return None


try:
    from torch._C._functorch import is_batchedtensor as _is_batchedtensor
    from torch._C._functorch import is_legacy_batchedtensor as _is_legacy_batchedtensor
except ImportError:  # a torch without them
    _is_batchedtensor = _is_legacy_batchedtensor = None


def _refused_as_batched(norms: Tensor) -> bool:
    """Whether norms come from a batched backward (torch.autograd.grad(..., is_grads_batched=True), which
    torch.autograd.functional.jacobian/hessian(vectorize=True) use), warning that they are not
    delivered: autograd then runs the backward under vmap, once for a batch of cotangents, and the norms
    are a batched tensor, one value per cotangent, that cannot leave it. The forward ran outside any
    transform, so it could not refuse."""
    if _is_batchedtensor is None or torch.compiler.is_compiling():  # (Dynamo traces no such check)
        return False
    if not (_is_batchedtensor(norms) or _is_legacy_batchedtensor(norms)):
        return False
    warnings.warn("record_grad_norms: a batched backward (is_grads_batched=True, e.g. "
                  "torch.autograd.functional.jacobian(vectorize=True)) records no norms: each of its "
                  "cotangents is a backward of its own; grad_norms keeps its previous value and no hook "
                  "runs (the gradients are unaffected; clipping applies to each cotangent)", stacklevel=3)
    return True


def _hand_over(norms: Tensor, batch_sizes: Tensor, unsorted_indices: Optional[Tensor], token: int,
               has_cell_state: bool) -> None:
    """Deliver one backward's norms [L, D, 2, N] (a tensor of their own): through the op where a tracer
    records the backward (compiled graphs keep it), else _deliver directly (the op's Python dispatch
    costs tens of µs per backward)."""
    if _refused_as_batched(norms):
        return
    args = (norms, batch_sizes, unsorted_indices, token, has_cell_state)
    if _being_traced(norms):
        torch.ops.rnnkern.deliver_grad_norms(*args)
    else:
        _deliver(*args, owned=True)


def _keep_in_compiled_graphs(op) -> None:
    """Mark ``op`` side-effectful so compiled graphs keep it although nothing uses its (absent)
    output: torch's effect system where it has it (torch >= 2.9), else the FX side-effect set.

    With the effect system a compiled backward holds the op as a ``with_effects`` node whose only
    output is the effect token. Compiled autograd copies a compiled forward's backward graph into its
    own, drops the tokens, and its dead-code pass then removed that node (the norms of a compiled
    module were never delivered under compiled autograd): ``with_effects`` is marked side-effectful
    too, which is what the node stands for (torch 2.14 reads that mark; 2.11's dead-code pass reads
    compiled autograd's own list, see _on_dynamo_loaded)."""
    try:
        from torch._library.effects import EffectType

        torch.library._register_effectful_op(op, EffectType.ORDERED)
    except (ImportError, AttributeError):
        torch.fx.node.has_side_effect(op)
        return
    with_effects = getattr(torch.ops.higher_order, "with_effects", None)
    if with_effects is not None:
        torch.fx.node.has_side_effect(with_effects)


_keep_in_compiled_graphs(deliver_grad_norms._opoverload)


def _in_compiled_autograd() -> bool:
    """Whether compiled autograd (torch._dynamo.compiled_autograd) is tracing the backward."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    return compiled_autograd is not None and getattr(compiled_autograd, "in_compiled_autograd_region", False)


class _ProbeSource(torch.autograd.Function):
    """probes = zeros [2, N], one per layer and direction, differentiable w.r.t. `anchors` (every tensor
    the module call depends on that requires grad), so that the gradients autograd computes for the
    probes reach this backward, which delivers them. With every such tensor as an input, this node (and
    through the probes every layer's backward) lies on the path to whichever of them a backward asks for
    (torch.autograd.grad(..., inputs), backward(inputs=...)): autograd never prunes the delivery, and
    the norms delivered are the whole stack's. (One output per layer and direction rather than views of
    one [L, D, 2, N] tensor: each view's backward made a zero-filled [L, D, 2, N] and autograd summed
    them.)"""

    @staticmethod
    def forward(ctx, batch_sizes, unsorted_indices, shape, token, has_cell_state, *anchors):
        layers, directions, _, rows = shape
        ctx.token, ctx.has_cell_state, ctx.shape = token, has_cell_state, shape
        ctx.anchors = tuple((a.shape, a.dtype) for a in anchors)  # (for compiled autograd, below)
        ctx.save_for_backward(batch_sizes, unsorted_indices)
        ctx.probe_device = anchors[0].device
        return tuple(anchors[0].new_zeros((2, rows), dtype=torch.float32) for _ in range(layers * directions))

    @staticmethod
    def backward(ctx, *grad_probes):
        batch_sizes, unsorted_indices = ctx.saved_tensors
        norms = torch.stack(grad_probes).view(ctx.shape)  # [L, D, 2, N], a tensor of its own
        _hand_over(norms, batch_sizes, unsorted_indices, ctx.token, ctx.has_cell_state)
        if _in_compiled_autograd():
            # Compiled autograd adds each input's gradient from here to its other ones without checking
            # for None (torch 2.14: "add(): argument 'other' must be Tensor, not NoneType"): zeros there.
            return (None,) * 5 + tuple(torch.zeros(shape, dtype=dtype, device=ctx.probe_device)
                                       for shape, dtype in ctx.anchors)
        return (None,) * (5 + len(ctx.anchors))


class _DualProbeSource(_ProbeSource):
    """_ProbeSource with a forward-mode formula, for calls inside a forward-mode AD level (Dynamo traces
    no autograd.Function that defines jvp, so the plain one goes without)."""

    @staticmethod
    def jvp(ctx, *_tangents):
        layers, directions, _, rows = ctx.shape  # zeros, always
        return tuple(torch.zeros((2, rows), dtype=torch.float32, device=ctx.probe_device)
                     for _ in range(layers * directions))


class NormSink:
    """Where the norms of an eager call of a one-layer, one-direction module go without a probe: the
    layer's own backward (EagerLayer, rnnkern/backends/_layer_ops.py) hands them here. That node lies on
    every path from the module's outputs to whatever it depends on, as the probe's does, so it delivers
    exactly when the probe would, once per backward; it spares the probe's autograd node, its zeros and
    the stacking (~0.1 ms of a one-step forward+backward on a 2-core CPU, most of what recording cost
    there). Only calls that run EagerLayer get one (Backend.delivers_norms_directly): everything else
    (torch.compile, dispatch modes, stacks, the reference backend) takes the probes."""

    __slots__ = ("batch_sizes", "unsorted_indices", "token", "has_cell_state", "padded_shape")

    def __init__(self, batch_sizes: Tensor, unsorted_indices: Optional[Tensor], token: int,
                 has_cell_state: bool, padded_shape: Optional[Tuple[int, int]]):
        """padded_shape: (T, B) when the rows are T steps of B samples each (padded input), else None."""
        self.batch_sizes, self.unsorted_indices = batch_sizes, unsorted_indices
        self.token, self.has_cell_state, self.padded_shape = token, has_cell_state, padded_shape

    def deliver(self, norms: Tensor) -> None:
        """norms: the layer's [2, N] float32, a tensor of its own (the backward op's output)."""
        if _refused_as_batched(norms):
            return
        if self.padded_shape is not None and not _being_traced(norms):
            # [2, N] is already [2, 1, 1, T, B]: the GradNorms are views of it (no copies, no scatter)
            module = _modules.get(self.token)
            if module is not None:
                rows = norms.view(2, 1, 1, *self.padded_shape)  # (made without grad: nothing to detach)
                h, c = rows.unbind(0) if self.has_cell_state else (rows[0], None)
                module._publish_grad_norms(GradNorms(h, c))
            return
        _hand_over(norms.view(1, 1, 2, norms.shape[1]), self.batch_sizes, self.unsorted_indices, self.token,
                   self.has_cell_state)


def norm_probes(anchors, shape, batch_sizes: Tensor, unsorted_indices: Optional[Tensor],
                token: int, has_cell_state: bool) -> List[List[Tensor]]:
    """The float32 probes ``probes[layer][direction]`` [2, N] whose gradients (the norms; shape
    [L, D, 2, N]) go to module ``token`` once per backward. ``anchors``: the tensors the call depends on
    that require grad (at least one: the probes' gradients only flow if one does)."""
    source = _DualProbeSource if forward_ad_active() else _ProbeSource
    probes = source.apply(batch_sizes, unsorted_indices, tuple(shape), token, has_cell_state, *anchors)
    directions = shape[1]
    return [list(probes[layer * directions:(layer + 1) * directions]) for layer in range(shape[0])]


# -- Dynamo: wrap rnnkern modules although they are torch.nn.RNN/GRU/LSTM instances -----------------

_DYNAMO = "torch._dynamo"

# Runs a module's forward outside the compiled graph (a graph break); set once Dynamo is loaded.
eager_forward = None

_PACKED_REASON = ("rnnkern runs PackedSequence input outside the compiled graph: its batch sizes are "
                  "data that the time loop needs on the host (padded input compiles fullgraph)")


def _call_forward(module, input, hx):
    return module._forward(input, hx)


def records_no_side_effects() -> Optional[str]:
    """What captures this call without running Python during its backward ("torch.jit.trace",
    "torch.export"), where the norms (delivered by Python) cannot be recorded; None otherwise.
    Under torch.compile it is read once per trace, outside the graph (see _on_dynamo_loaded): the
    Dynamo of torch 2.11 folds torch.compiler.is_exporting() to True in every trace
    (pytorch/pytorch#176347, fixed in 2.14), so every compiled module with record_grad_norms warned
    and dropped its norms (a graph break under fullgraph=True)."""
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    exporting = getattr(torch.compiler, "is_exporting", None)
    if exporting is not None and exporting():
        return "torch.export"
    return None


try:  # torch.func's interpreter stack (what transforms a call runs under)
    from torch._C._functorch import peek_interpreter_stack as _peek_interpreter_stack
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_interpreters
except ImportError:  # a torch without it
    _peek_interpreter_stack = None


def functorch_transforms() -> List[str]:
    """The torch.func transforms the current call runs under, outermost first ("vmap", "grad" for grad,
    vjp, jacrev..., "jvp" for jvp, jacfwd...; "functionalize"); [] outside them. Under torch.compile
    it is read once per trace, outside the graph (Dynamo cannot trace the interpreter stack, see
    _on_dynamo_loaded): Dynamo runs a transform it traces (torch.compile(torch.func.grad(f)), or f
    compiled inside one) with the transform's interpreter on the stack, so the fused backends decline
    there as in eager mode (reading [] instead ran them on the transform's tensors: an obscure error
    under grad, a wrong tangent under jvp)."""
    if _peek_interpreter_stack is None or _peek_interpreter_stack() is None:
        return []
    return [interpreter.key().name.lower() for interpreter in _functorch_interpreters()]


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level (``torch.autograd.forward_ad.dual_level()``) is open."""
    return _forward_ad._current_level >= 0


def has_forward_tangents(tensors) -> bool:
    """Whether any of ``tensors`` (None entries allowed) carries a tangent of the current forward-mode AD
    level (torch.autograd.forward_ad's dual tensors; torch.func.jvp is functorch_transforms' "jvp").
    Free outside a ``forward_ad.dual_level()`` block."""
    if not forward_ad_active():
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype):
    """rnnkern.backends.resolve (the Backend object to run). Under torch.compile the choice is made
    once per trace, outside the graph: it reads host-side facts, such as the compiled CUDA
    architectures, that Dynamo cannot trace."""
    from . import backends

    backends.validate_name(name)  # (outside the constant below, so that an unknown name is a ValueError)
    return backends.get(_resolve_backend_name(name, device, dtype))


def _resolve_backend_name(name: str, device: torch.device, dtype: torch.dtype) -> str:
    from . import backends

    return backends.resolve(backends.check_name(name), device, dtype).name


def _keep_effects_in_compiled_autograd() -> None:
    """Compiled autograd's dead-code pass keeps the nodes of its own list of impure targets and those
    Node.is_impure calls impure, which in torch 2.11 asks a higher-order op's registered effect only:
    ``with_effects`` (the norms' delivery in a compiled backward, _keep_in_compiled_graphs) joins the
    list."""
    try:
        from torch._dynamo import compiled_autograd
    except ImportError:
        return
    targets = getattr(compiled_autograd, "_impure_targets", None)
    with_effects = getattr(torch.ops.higher_order, "with_effects", None)
    if targets is not None and with_effects is not None and hasattr(targets, "add"):
        targets.add(with_effects)


def _on_dynamo_loaded(dynamo) -> None:
    """Let Dynamo wrap rnnkern modules (and only them) as if ``config.allow_rnn`` were set."""
    global eager_forward
    from torch._dynamo import config
    from torch._dynamo.variables import builder

    from .modules import _RnnkernMixin

    if eager_forward is None:
        try:
            eager_forward = dynamo.disable(_call_forward, reason=_PACKED_REASON)
        except TypeError:  # torch without disable(reason=...)
            eager_forward = dynamo.disable(_call_forward)
        globals()["_library_flags"] = dynamo.assume_constant_result(_library_flags)
        globals()["_resolve_backend_name"] = dynamo.assume_constant_result(_resolve_backend_name)
        globals()["functorch_transforms"] = dynamo.assume_constant_result(functorch_transforms)
        globals()["records_no_side_effects"] = dynamo.assume_constant_result(records_no_side_effects)
        globals()["_onednn_lstm_runs"] = dynamo.assume_constant_result(_onednn_lstm_runs)
        _keep_effects_in_compiled_autograd()
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


# -- autocast ------------------------------------------------------------------------------------------

# The dtypes torch.autocast casts (float64 is left alone, so it fails the dtype checks as in torch.nn).
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _cast(tensor, dtype):
    if isinstance(tensor, Tensor) and tensor.dtype in _AUTOCAST_ELIGIBLE and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor


class AutocastPlan(NamedTuple):
    """How to run one module call under torch.autocast: the kernels run in ``compute_dtype`` (autocast
    itself disabled inside); the outputs then get torch.nn's dtypes: ``h_dtype`` for the output and
    h_n, ``c_dtype`` for an LSTM's c_n. Every cast is differentiable, so float32 weights get float32
    gradients. (Also a call outside autocast whose LSTM c0 is wider than its input, which torch.nn's
    CPU LSTM keeps: modules._wider_cell_state_plan.)"""

    device_type: str
    compute_dtype: torch.dtype
    h_dtype: torch.dtype
    c_dtype: torch.dtype

    def cast_inputs(self, input, hx):
        """The input (Tensor or PackedSequence) and hx with every eligible tensor in compute_dtype."""
        if isinstance(input, PackedSequence):
            input = PackedSequence(_cast(input.data, self.compute_dtype), input.batch_sizes,
                                   input.sorted_indices, input.unsorted_indices)
        else:
            input = _cast(input, self.compute_dtype)
        if isinstance(hx, tuple):
            hx = tuple(_cast(t, self.compute_dtype) for t in hx)
        elif isinstance(hx, list):
            hx = [_cast(t, self.compute_dtype) for t in hx]
        else:
            hx = _cast(hx, self.compute_dtype)
        return input, hx

    def cast_outputs(self, output, hidden):
        if isinstance(output, PackedSequence):
            output = PackedSequence(output.data.to(self.h_dtype), output.batch_sizes,
                                    output.sorted_indices, output.unsorted_indices)
        else:
            output = output.to(self.h_dtype)
        if isinstance(hidden, tuple):
            hidden = (hidden[0].to(self.h_dtype), hidden[1].to(self.c_dtype))
        else:
            hidden = hidden.to(self.h_dtype)
        return output, hidden


def _cast_all_dtype(module, device_type: str, packed: Optional[PackedSequence], input_dtype: torch.dtype,
                    low: torch.dtype) -> Optional[torch.dtype]:
    """The dtype to which torch.nn, under autocast, casts *every* argument of this call (`packed`: the
    input where it is a PackedSequence; `input_dtype`: the input's own dtype), or None.

    Measured (tests/test_ecosystem.py checks it against torch.nn in every context): CUDA: the cuDNN RNN
    (every mode, packed or not, with projections) is on autocast's float16 list: float16 even under
    autocast(dtype=bfloat16) (seen on torch 2.11, cuDNN 9.19). CPU: only the oneDNN LSTM (mode LSTM, no
    projection, oneDNN enabled) is, in the autocast dtype, where ATen picks oneDNN for the input's own
    dtype (_onednn_lstm_runs: float32 input, or bfloat16 where the CPU has oneDNN's bfloat16 LSTM;
    not float16 input on a CPU without float16 LSTMs, which runs the per-op path): for a padded input,
    and on newer torch (2.14; not 2.11) for a packed one whose sequences all have one length (ATen
    hands it on as a padded batch); every other CPU call runs torch's per-op implementation, in which
    only the matmuls autocast.
    """
    cudnn, onednn = _library_flags()
    if device_type == "cuda":
        return torch.float16 if cudnn else None
    if device_type != "cpu" or module.mode != "LSTM" or module.proj_size != 0 or not onednn:
        return None
    if packed is not None and not all_one_length(packed.batch_sizes):
        return None
    return low if _onednn_lstm_runs(input_dtype, low, packed is not None, torch.is_grad_enabled()) else None


def all_one_length(batch_sizes) -> bool:
    """Whether a PackedSequence's batch_sizes say that all its sequences have one length (then ATen may
    run it as a padded batch)."""
    return (isinstance(batch_sizes, Tensor) and batch_sizes.numel() > 0
            and bool((batch_sizes == batch_sizes[0]).all()))


_ONEDNN_LSTM_RUNS = {}

try:
    from torch.utils._python_dispatch import _disable_current_modes as _no_dispatch_modes
except ImportError:  # a torch without it
    _no_dispatch_modes = contextlib.nullcontext


def _onednn_lstm_runs(input_dtype: torch.dtype, low: torch.dtype, packed: bool, grad: bool) -> bool:
    """Whether torch's CPU LSTM under autocast(`low`) runs oneDNN's LSTM (everything cast to `low`) for an
    input of `input_dtype` (`packed`: a PackedSequence whose sequences all have one length) in this grad
    mode: ATen decides from the input's own dtype and this CPU's oneDNN, before autocast casts. Learnt
    once per case from a one-step, one-unit LSTM through the op torch.nn calls, with float32 states
    (the per-op path would promote the state to float32; oneDNN's is in `low`); no module: building one
    would draw from the random generator. Where oneDNN has no LSTM for `low` on this CPU ("could not
    create a primitive descriptor", which torch.nn raises for such a call), the call went to oneDNN:
    True. Under torch.compile it is read outside the graph (_on_dynamo_loaded)."""
    key = (input_dtype, low, packed, grad)
    known = _ONEDNN_LSTM_RUNS.get(key)
    if known is None:
        try:
            # (every tensor's device and dtype given: not the defaults, which torch.set_default_dtype,
            # set_default_device or a `with torch.device(...)` may have changed; and none of the caller's
            # dispatch modes, e.g. FakeTensorMode or a FlopCounterMode, sees the probe)
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=low), _no_dispatch_modes():
                f32 = dict(device="cpu", dtype=torch.float32)
                x = torch.zeros(1, 1, device="cpu", dtype=input_dtype)
                state = torch.zeros(1, 1, 1, **f32)
                # w_ih, w_hh [4, 1]; b_ih, b_hh [4] (torch 2.11's per-op LSTM checks the biases' shape)
                weights = [torch.zeros(4, 1, **f32), torch.zeros(4, 1, **f32), torch.zeros(4, **f32),
                           torch.zeros(4, **f32)]
                if packed:
                    one_step = torch.ones(1, device="cpu", dtype=torch.int64)
                    out = torch._VF.lstm(x, one_step, (state, state), weights, True, 1, 0.0, False, False)[0]
                else:
                    out = torch._VF.lstm(x[None], (state, state), weights, True, 1, 0.0, False, False,
                                         False)[0]
            known = out.dtype == low
        except RuntimeError as error:
            if "could not create a primitive descriptor" not in str(error):
                raise
            known = True
        _ONEDNN_LSTM_RUNS[key] = known
    return known


def _library_flags():
    """(cuDNN enabled and available, oneDNN enabled and available). torch.compile takes the values
    of the first trace as constants (Dynamo cannot trace these reads), see _on_dynamo_loaded."""
    return (bool(torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()),
            bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled))


def autocast_plan(module, input, hx) -> Optional[AutocastPlan]:
    """The AutocastPlan of this call, or None outside autocast."""
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    if not isinstance(data, Tensor):
        return None
    device_type = data.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):  # (autocast knows no meta)
        return None
    if data.dtype == torch.float64:
        return None  # autocast leaves float64 alone: torch.nn computes (or rejects) as without it
    low = torch.get_autocast_dtype(device_type)
    everything = _cast_all_dtype(module, device_type, input if packed else None, data.dtype, low)
    if everything is not None:
        return AutocastPlan(device_type, everything, everything, everything)
    # torch's per-op implementation: the gate pre-activations come out of autocast matmuls in `low`;
    # a state mixed with the previous state (GRU: z * h_prev; LSTM: f * c_prev) takes the promoted dtype
    # of `low` and the initial state's dtype (hx's, or the input's when hx is None).
    given = list(hx) if isinstance(hx, (tuple, list)) else [hx]
    states = [t.dtype if isinstance(t, Tensor) else data.dtype for t in given] + [data.dtype] * 2
    h0_dtype, c0_dtype = states[0], states[1] if len(given) > 1 else data.dtype
    if module.mode == "GRU":
        h_dtype = c_dtype = torch.promote_types(low, h0_dtype)
    elif module.mode == "LSTM":
        c_dtype = torch.promote_types(low, c0_dtype)
        h_dtype = low if module.proj_size > 0 else c_dtype  # h = o * tanh(c), then the projection matmul
    else:  # RNN_TANH / RNN_RELU: h = act(matmul + matmul)
        h_dtype = c_dtype = low
    # Run in `low` when torch.nn's output is in `low`; otherwise in float32 (torch.nn then keeps the
    # state in float32 and so, more precisely, do we).
    compute = low if h_dtype == low else torch.float32
    return AutocastPlan(device_type, compute, h_dtype, c_dtype)
