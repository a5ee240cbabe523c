"""Fake (meta) kernels and autograd for the layer ops of docs/internals.md.

Any backend whose forward and backward follow the layer-op contract registers them here once:
``register_layer_op(forward_op, backward_op)`` adds the fake kernels (so torch.compile and opcheck
can trace the ops) and connects forward to backward with ``torch.library.register_autograd``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn import Parameter

from .. import _cells, _compat


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation / cell-state dtype for an input dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def fake_layer_forward(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe):
    n = xp.shape[0]
    hidden = w_hh.shape[0] // _cells.GATES[cell]
    out = xp.new_empty((n, h0.shape[1]))
    h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
    c_n = xp.new_empty((h0.shape[0], hidden)) if cell == _cells.LSTM else _empty(xp)
    workspace = xp.new_empty((n, _cells.WORKSPACE_SLOTS[cell] * hidden), dtype=acc_dtype(xp.dtype))
    return out, h_n, c_n, workspace


def fake_layer_backward(cell, grad_out, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
                        reverse, clip, record_norms, out, workspace):
    n = out.shape[0]
    hidden = w_hh.shape[0] // _cells.GATES[cell]
    grad_xp = out.new_empty((n, w_hh.shape[0]))
    grad_h0 = torch.empty_like(h0, memory_format=torch.contiguous_format)
    grad_c0 = torch.empty_like(c0, memory_format=torch.contiguous_format) if c0 is not None else _empty(out)
    grad_w_hh = torch.empty_like(w_hh, memory_format=torch.contiguous_format)
    grad_b_hh = torch.empty_like(b_hh, memory_format=torch.contiguous_format) if b_hh is not None else _empty(out)
    grad_w_hr = torch.empty_like(w_hr, memory_format=torch.contiguous_format) if w_hr is not None else _empty(out)
    norms = out.new_empty((2, n), dtype=torch.float32)
    del hidden
    return grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, norms


class _NotTwiceDifferentiable(torch.autograd.Function):
    """The layer gradients as they are, behind a node that raises if anything differentiates them: the
    backward kernels are not differentiable, so a second derivative through them would silently miss
    their terms (torch.autograd.function.once_differentiable's idea). The node also takes the layer's
    saved tensors and incoming gradients (`anchors`: its output depends on every input), so that it lies
    on every path from the gradients back to whatever they depend on and runs (and raises) whenever
    such a path is differentiated, torch.autograd.grad's included."""

    @staticmethod
    def forward(ctx, message, count, *grads_and_anchors):
        ctx.message = message
        return tuple(g.detach() for g in grads_and_anchors[:count])  # (not views: changeable in place)

    @staticmethod
    def backward(ctx, *_grads):
        raise RuntimeError(ctx.message)


_RELEASED = "released"  # EagerLayer's xp_source after a backward with grad mode off


def _aliases(tensors):
    """detach() of each parameter or leaf that requires grad, None for the other tensors (and for
    None): the values a layer ran with, which stay when a tensor's .data is replaced before the backward
    (vector_to_parameters, Module.float()), as torch.nn's saved views do; they share the tensors' version
    counters, so in-place changes are still seen. Activations and states made by the call get none:
    held as attributes, they would outlive what checkpointing and saved-tensor hooks pack away (the
    saved tensors, which the backward then reads instead)."""
    return tuple(t.detach() if t is not None and t.is_leaf and (t.requires_grad or isinstance(t, Parameter))
                 else None for t in tensors)


class _RanWith(torch.autograd.Function):
    """The values a layer ran with (`alias`) for a tensor whose .data was replaced since, with
    gradients to the tensor (for the recomputation of a second derivative)."""

    @staticmethod
    def forward(ctx, tensor, alias):
        return alias.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _as_ran(tensor, alias):
    """`tensor` as the layer ran with it: itself, unless its .data was replaced since the forward."""
    if tensor is None or alias is None:
        return tensor
    if (tensor.dtype == alias.dtype and tensor.data_ptr() == alias.data_ptr() and tensor.shape == alias.shape
            and tensor.stride() == alias.stride()):
        return tensor
    return _RanWith.apply(tensor, alias)


def _no_double_backward_message(op_name: str, xp_source) -> str:
    """Why a layer's gradients cannot be differentiated, and what to do instead (xp_source: the
    layer's, see EagerLayer: None where the op's registered autograd runs)."""
    if xp_source is _RELEASED:
        why = ("after an earlier backward through the same graph without create_graph=True "
               "(retain_graph=True) released what it recomputes the layer from: run the first backward "
               "with create_graph=True, or")
    elif xp_source is not None:  # (EagerLayer, whose layer recomputation _differentiable_backward declined)
        why = ("while it records gradient norms or clips (record_grad_norms, hidden_grad_clip): a backward "
               "of the backward would record and clip the gradient of its two paths to h_t apart; turn "
               "them off, or")
    else:
        why = ("here (its backward kernels are not differentiable; the cpu and cuda backends recompute the "
               "layer for a second derivative in plain eager calls, not under torch.compile, tracing or "
               "dispatch modes or on tensor subclasses); for higher-order gradients there")
    return (f"rnnkern: {op_name} has no double backward {why} use backend=\"reference\", whose layers are "
            "differentiable PyTorch ops")


def _not_twice_differentiable(message, grads, anchors):
    """`grads` (tensors or None) through _NotTwiceDifferentiable, tied to `anchors` (tensors or None)."""
    present = [i for i, g in enumerate(grads) if g is not None]
    tied = [a for a in anchors if a is not None and a.requires_grad]
    wrapped = _NotTwiceDifferentiable.apply(message, len(present), *[grads[i] for i in present], *tied)
    result = list(grads)
    for i, g in zip(present, wrapped):
        result[i] = g
    return tuple(result)


def _differentiable_backward(ctx, grad_out, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
                             saved_x):
    """The layer's first-order gradients as differentiable PyTorch ops, for a backward with grad mode on
    (create_graph=True: a gradient penalty, meta-learning), where the kernels' backward, not
    differentiable, would leave out the second-order terms (as torch.nn's CPU layers, composed of ops,
    have them). The layer is recomputed by the reference backend from its saved inputs, and xp from
    (x, w_ih, b_ih), which EagerLayer keeps (x as a saved tensor, `saved_x`, where the projection's
    backward saves it too, else by reference): xp itself is not kept. With the values the layer ran
    with (a tensor whose .data was replaced since: its forward values; changed in place: autograd's
    error, since those values are gone). For a layer without norms and clipping.
    Returns (grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr), None where unused."""
    from .reference import reference_layer  # (imports this module)

    sources, aliases, versions = ctx.xp_source
    if saved_x is not None:  # (see setup_context)
        sources = (saved_x,) + sources[1:]
    names = ("input", "weight_ih", "bias_ih")
    changed = [(name, t._version, v) for name, t, v in zip(names, sources, versions)
               if t is not None and t._version != v]
    if b_hh is not None and b_hh._version != ctx.bias_version:  # (kept unversioned: see setup_context)
        changed.append(("bias_hh", b_hh._version, ctx.bias_version))
    if changed:
        name, now, then = changed[0]
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"the {name} of an rnnkern layer is at version {now}; expected version {then} instead (a second "
            "derivative recomputes the layer from it)")
    x, w_ih, b_ih = (_as_ran(t, a) for t, a in zip(sources, aliases))
    h0, c0, w_hh, b_hh, w_hr = (_as_ran(t, a) for t, a in zip((h0, c0, w_hh, b_hh, w_hr), ctx.ran_with))
    xp = torch.nn.functional.linear(x, w_ih, b_ih)
    out, h_n, c_n = reference_layer(ctx.cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, ctx.reverse, 0.0,
                                    None)
    pairs = [(o, g) for o, g in ((out, grad_out), (h_n, grad_h_n), (c_n, grad_c_n))
             if g is not None and o.requires_grad]  # (grad_c_n: None but for an LSTM)
    inputs = [xp, h0, c0, w_hh, b_hh, w_hr]
    wanted = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    grads = [None] * len(inputs)
    if pairs and wanted:
        found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                    create_graph=True, allow_unused=True)
        for i, g in zip(wanted, found):
            grads[i] = g
    return tuple(grads)


def _weight_elements(w_hh, w_hr) -> int:
    return w_hh[0] * w_hh[1] + (0 if w_hr is None else w_hr[0] * w_hr[1])


def layer_forward_flops(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe,
                        out_shape=None) -> int:
    """FlopCounterMode's count for a layer's forward (the op's arguments, shapes in place of tensors),
    as torch counts torch.nn's per-op layers: the products, h_{t-1} @ W_hhᵀ (and the projection) for
    each of the N rows; no pointwise op (torch counts none); the input projection is counted as the
    matmul it is."""
    return 2 * xp[0] * _weight_elements(w_hh, w_hr)


def layer_backward_flops(cell, grad_out, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse,
                         clip, record_norms, out, workspace, out_shape=None) -> int:
    """FlopCounterMode's count for a layer's backward: each forward product's two, the gradient of its
    input and of its weight (as torch counts a matmul's backward)."""
    return 4 * grad_out[0] * _weight_elements(w_hh, w_hr)


def _register_flop_formulas(forward_name: str, backward_name: str) -> None:
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # a torch without it: FlopCounterMode counts the input projections only
        return
    for name, formula in ((forward_name, layer_forward_flops), (backward_name, layer_backward_flops)):
        namespace, op = name.split("::")
        register_flop_formula(getattr(getattr(torch.ops, namespace), op))(formula)


def register_layer_op(forward_op, backward_op, *, register_fake: bool = True, direct=None) -> None:
    """Register fake kernels (unless the op's definer already did) and autograd for one backend.

    direct: None, or (forward, backward): callables taking the ops' arguments positionally that run
    them below autograd without the Python-side operator call (rnnkern._C.call_layer_forward and
    call_layer_backward); EagerLayer then calls those (plain eager calls only, see call_layer_op)."""
    if register_fake:
        torch.library.register_fake(forward_op)(fake_layer_forward)
        torch.library.register_fake(backward_op)(fake_layer_backward)

    # e.g. rnnkern::rnn_layer_forward (an OpOverload), rnnkern::triton_rnn_layer_forward (a triton_op)
    op_name, backward_name = (op.name() if hasattr(op, "name") and callable(op.name) else
                              getattr(op, "_qualname", str(op)) for op in (forward_op, backward_op))
    _register_flop_formulas(op_name, backward_name)

    def setup_context(ctx, inputs, output, versioned_bias=True, xp_source=None):
        cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe = inputs
        out, _h_n, _c_n, workspace = output
        ctx.cell, ctx.reverse, ctx.clip = cell, reverse, clip
        ctx.record_norms = norm_probe is not None
        ctx.has = (c0 is not None, b_hh is not None, w_hr is not None)
        # The backward reads b_hh's shape only (GRU's b_hn share is in the workspace). EagerLayer keeps
        # it without autograd's version check, so that a bias changed in place between forward and
        # backward (GRU's is the module's parameter) does not raise, as it does not in torch.nn; the op's
        # registered autograd saves it (torch.compile traces saved tensors, not tensor attributes).
        ctx.unversioned_bias = None if versioned_bias else b_hh
        # EagerLayer's xp_source (x, w_ih, b_ih), for a second derivative: x among the saved tensors,
        # which checkpointing and saved-tensor hooks manage, where the input projection's backward saves
        # it too (w_ih requires grad: an in-place change of x raises there anyway); else by reference
        # (as torch.nn, which then saves no x, an in-place change of x must not raise)
        ctx.saves_x = xp_source is not None and xp_source[1] is not None and xp_source[1].requires_grad
        ctx.save_for_backward(batch_sizes, h0, c0, w_hh, b_hh if versioned_bias else None, w_hr, out,
                              workspace, *((xp_source[0],) if ctx.saves_x else ()))
        if not versioned_bias or _plain_eager((xp, h0, c0, w_hh, b_hh, w_hr)):
            # The values the backward computes with (EagerLayer; the op's registered autograd in eager
            # mode, e.g. the Triton backend's; not while tracing, whose graphs hold saved tensors, not
            # attributes)
            ctx.ran_with = _aliases((h0, c0, w_hh, b_hh, w_hr))
        # No zero-filled gradients for unused outputs: the workspace ([N, S*H], never differentiated)
        # would cost a full-size fill per backward. Absent gradients are made below, where needed.
        ctx.set_materialize_grads(False)

    if direct is None:
        def forward_below_autograd(*inputs):
            with torch._C._AutoDispatchBelowAutograd():  # (what the op's autograd kernel does here)
                return forward_op(*inputs)
        direct_backward = None
    else:
        forward_below_autograd, direct_backward = direct

    def backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_workspace, run_backward=backward_op):
        batch_sizes, h0, c0, w_hh, b_hh, w_hr, out, workspace, *saved_x = ctx.saved_tensors
        has_c0, has_b_hh, has_w_hr = ctx.has
        if b_hh is None:
            b_hh = ctx.unversioned_bias
        # One step whose h is not used (only c_n is): w_hr (applied to h_1 alone) is not on any path
        # to what is differentiated, so its gradient is None, as torch.nn's autograd leaves it (an
        # optimizer skips a None gradient but applies weight decay and momentum to a zero one).
        if has_w_hr and grad_out is None and grad_h_n is None and batch_sizes.shape[0] == 1:
            has_w_hr = False
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_h_n is None:
            grad_h_n = torch.zeros_like(h0)
        grad_c_n = grad_c_n if ctx.cell == _cells.LSTM else None
        # create_graph=True runs this with grad mode on; the op has no autograd of its own, so it runs
        # without, and the results raise if differentiated (below), unless the layer can be recomputed.
        twice = torch.is_grad_enabled() and any(ctx.needs_input_grad)
        xp_source = getattr(ctx, "xp_source", None)
        if not twice and xp_source is not None:
            # (a plain backward frees the graph's saved tensors; holding x past it would keep it alive as
            # long as the graph's nodes, e.g. while the caller keeps the output)
            ctx.xp_source = _RELEASED
        if (twice and xp_source is not None and xp_source is not _RELEASED and not ctx.record_norms
                and ctx.clip <= 0):
            grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr = _differentiable_backward(
                ctx, grad_out, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
                saved_x[0] if saved_x else None)
            return (None, grad_xp, None, grad_h0, grad_c0 if has_c0 else None, grad_w_hh,
                    grad_b_hh if has_b_hh else None, grad_w_hr if has_w_hr else None, None, None, None)
        ran_with = getattr(ctx, "ran_with", None)  # (see setup_context)
        h0_, c0_, w_hh_, b_hh_, w_hr_ = (h0, c0, w_hh, b_hh, w_hr) if ran_with is None else (
            t if alias is None else alias for t, alias in zip((h0, c0, w_hh, b_hh, w_hr), ran_with))
        args = (ctx.cell, grad_out.contiguous(), grad_h_n.contiguous(),
                None if grad_c_n is None else grad_c_n.contiguous(),
                batch_sizes, h0_, c0_, w_hh_, b_hh_, w_hr_, ctx.reverse, ctx.clip, ctx.record_norms, out,
                workspace)
        with torch.no_grad() if twice else contextlib.nullcontext():
            (grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, norms) = run_backward(*args)
        grads = (grad_xp, grad_h0, grad_c0 if has_c0 else None, grad_w_hh, grad_b_hh if has_b_hh else None,
                 grad_w_hr if has_w_hr else None)
        if twice:
            # (the incoming gradients too: a derivative w.r.t. them, e.g. autograd.functional.jvp's
            # double-backward trick, must also reach the node)
            grads = _not_twice_differentiable(_no_double_backward_message(op_name, xp_source), grads,
                                              (out, h0, c0, w_hh, b_hh, w_hr, grad_out, grad_h_n, grad_c_n))
        grad_xp, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr = grads
        return (None, grad_xp, None, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr, None, None,
                norms if ctx.record_norms else None)

    def register_autograd_backward(ctx, grad_out, grad_h_n, grad_c_n, grad_workspace):
        return backward(ctx, grad_out, grad_h_n, grad_c_n, grad_workspace)

    torch.library.register_autograd(forward_op, register_autograd_backward, setup_context=setup_context)

    class EagerLayer(torch.autograd.Function):
        """The op with the autograd above (setup_context, backward) as a plain autograd.Function, for
        eager calls (call_layer_op): torch.library's autograd wrapper (the Python dispatcher's hop, a
        fill_defaults over the schema, a redispatch) costs ~60 µs a call on a 2-core CPU, the op's
        whole work at small sizes; this costs ~5."""

        @staticmethod
        def forward(ctx, *inputs_and_source):
            *inputs, xp_source = inputs_and_source  # (the op's inputs, then call_layer_op's xp_source)
            # norm_probe may be a NormSink here (the op itself never sees one): the norms go to it
            sink = inputs[-1] if isinstance(inputs[-1], _compat.NormSink) else None
            output = forward_below_autograd(*inputs[:-1], None) if sink is not None else \
                forward_below_autograd(*inputs)
            setup_context(ctx, inputs, output, versioned_bias=False, xp_source=xp_source)
            ctx.norm_sink = sink
            b_hh = inputs[6]
            ctx.bias_version = None if b_hh is None else b_hh._version
            # (with their versions and values: a second derivative recomputes xp from x, w_ih, b_ih)
            ctx.xp_source = None if xp_source is None else (
                (None if ctx.saves_x else xp_source[0], *xp_source[1:]), _aliases(xp_source),
                tuple(None if t is None else t._version for t in xp_source))
            return output

        @staticmethod
        def backward(ctx, *grads):
            # (the forward ran plainly; a mode or a tensor subclass may still meet the backward)
            plain = direct_backward is not None and _plain_eager(grads)
            result = backward(ctx, *grads, run_backward=direct_backward if plain else backward_op)
            if ctx.norm_sink is None:
                return result + (None,)
            ctx.norm_sink.deliver(result[-1])
            return result[:-1] + (None, None)

    EagerLayer.forward_below_autograd = staticmethod(forward_below_autograd)
    _EAGER[forward_op] = EagerLayer


_EAGER = {}  # forward op -> its EagerLayer (register_layer_op)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # (a Parameter has no __torch_function__ of its own)

try:
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._device import DeviceContext
except ImportError:  # a torch without them: every call through the op (correct, slower)
    _get_current_function_mode_stack = None


def _plain_eager(tensors) -> bool:
    """Whether a call on `tensors` may bypass the op's dispatch (EagerLayer): plain eager autograd on
    plain tensors. Not while torch.compile, torch.jit.trace, a dispatch mode (fake tensors, make_fx,
    export, FlopCounterMode...), a torch function mode other than torch.device's, a torch.func transform
    or a forward-mode AD level is active, nor for tensor subclasses (but Parameter): those see the op,
    as registered."""
    if (_compat._get_current_dispatch_mode is None or _compat._peek_interpreter_stack is None
            or _get_current_function_mode_stack is None):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _compat.forward_ad_active():
        return False
    if _compat._get_current_dispatch_mode() is not None or _compat._peek_interpreter_stack() is not None:
        return False
    if torch._C._is_torch_function_mode_enabled() and not all(
            isinstance(mode, DeviceContext) for mode in _get_current_function_mode_stack()):
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def runs_eager(tensors) -> bool:
    """Whether call_layer_op runs a call on `tensors` (a layer's or a whole module call's, None
    allowed) through EagerLayer rather than the op (given a requirement of grad, see there)."""
    # (RNNKERN_EAGER_OP=0: always the op, to compare)
    return os.environ.get("RNNKERN_EAGER_OP", "1") != "0" and _plain_eager(tensors)


def call_layer_op(forward_op, cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe,
                  xp_source=None):
    """forward_op(...) (registered with register_layer_op), through EagerLayer where runs_eager allows:
    the same results, saved tensors and backward. norm_probe: a [2, N] probe, None, or (only where
    EagerLayer runs it, see Backend.delivers_norms_directly) a _compat.NormSink. xp_source: (x, w_ih,
    b_ih) with xp = linear(x, w_ih, b_ih), or None: EagerLayer's backward then has second derivatives
    (_differentiable_backward); the op's registered autograd has none."""
    sink = isinstance(norm_probe, _compat.NormSink)
    probe = None if sink else norm_probe
    inputs = (cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, norm_probe)
    eager = _EAGER.get(forward_op)
    # (a sink comes from a caller that asked runs_eager of the tensors these derive from)
    if eager is not None and (sink or runs_eager((xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, probe))):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (xp, h0, c0, w_hh, b_hh, w_hr, probe)):
            return eager.apply(*inputs, xp_source)
        if not sink:
            return eager.forward_below_autograd(*inputs)
    if sink:  # (the caller checked delivers_norms_directly: a sink elsewhere would lose the norms)
        raise RuntimeError("rnnkern internal error: a NormSink reached a layer call that has no backward")
    return forward_op(*inputs)
