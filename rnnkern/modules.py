"""Drop-in replacements for torch.nn.LSTM, torch.nn.GRU and torch.nn.RNN.

They subclass torch's classes and override ``forward`` only: the constructor, parameters, names,
initialisation and ``state_dict`` are torch's own. torch's classes are bound here at import time, so
rnnkern keeps working while ``patch_torch()`` has replaced ``torch.nn.LSTM`` and friends.
"""

from __future__ import annotations

import numbers
import types
import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.modules.rnn as _torch_rnn
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from . import _cells, _compat
from . import backends as _backends
from .functional import rows_to_time_batch, run_stack
from .gradnorms import GradNorms

TorchLSTM = _torch_rnn.LSTM
TorchGRU = _torch_rnn.GRU
TorchRNN = _torch_rnn.RNN

_OPTION_DEFAULTS = {"backend": "auto", "record_grad_norms": False, "hidden_grad_clip": None}


class _InvalidInput(Exception):
    """Raised by our checks; the module then lets torch.nn raise its own exception."""


class _InconsistentModule(_InvalidInput):
    """The module's parameters do not match its attributes (changed after it was built)."""


def _require(condition: bool, error=_InvalidInput) -> None:
    if not condition:
        raise error()


def _packed_rows(data: Tensor, batch_sizes) -> tuple:
    """(the rows a PackedSequence's batch sizes cover, its batch size), as torch.nn reads them: batch
    sizes a 1-D int64 CPU tensor, non-negative and non-increasing (trailing zeros allowed; all zeros: no
    sequence), covering at most data's rows (torch.nn ignores the rows past them); _InvalidInput
    otherwise (torch.nn then raises its own error for a hand-made PackedSequence that breaks these)."""
    _require(isinstance(batch_sizes, Tensor) and batch_sizes.dim() == 1 and batch_sizes.numel() > 0
             and batch_sizes.dtype == torch.int64 and batch_sizes.device.type == "cpu")
    sizes = batch_sizes.tolist()
    _require(sizes[-1] >= 0 and all(a >= b for a, b in zip(sizes, sizes[1:])))
    rows = sum(sizes)
    _require(rows <= data.shape[0])
    # (a trace takes the batch size as torch.nn's forward reads it, a tensor: the zero states made with
    # it then follow the traced input's batch size, where a Python int would be a constant of the trace)
    batch = batch_sizes[0] if torch.jit.is_tracing() else sizes[0]
    return (data if rows == data.shape[0] else data[:rows]), batch


def _lstm_states(input, hx) -> list:
    """The states torch.nn.LSTM hands on for hx: [hx[0], hx[1]] where it rebuilds the pair from them (an
    unbatched input: unsqueezed; a packed unsorted one: reordered), so that it reads nothing past them;
    else hx's elements as given (ATen takes a tuple or list of exactly two). _InvalidInput where hx is
    neither."""
    packed = isinstance(input, PackedSequence)
    unbatched = not packed and isinstance(input, Tensor) and input.dim() == 2
    if unbatched or (packed and input.sorted_indices is not None):
        _require(isinstance(hx, (tuple, list)) or (isinstance(hx, Tensor) and hx.dim() > 0))
        _require(len(hx) >= 2)
        return [hx[0], hx[1]]
    _require(isinstance(hx, (tuple, list)))
    return list(hx)


def _one_dnn_may_run(data: Tensor, batch_sizes: Tensor) -> bool:
    """Whether ATen's packed LSTM may hand these rows to oneDNN (as one padded batch): on the CPU with
    oneDNN on, float32 or 16-bit rows, all sequences of one length (ATen's use_mkldnn; its 16-bit
    conditions depend on the CPU, so 16-bit counts as may)."""
    return (data.device.type == "cpu" and _compat._library_flags()[1]
            and data.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and data.numel() > 0 and _compat.all_one_length(batch_sizes))


def _kernel_clip(clip: float, dtype: torch.dtype) -> float:
    """hidden_grad_clip as the backends take it for `dtype`: they compare and scale in their accumulation
    dtype (float32 for 16-bit and float32), where a positive value below its smallest positive number
    (2^-149) would round to 0, their "off": such a value is raised to that number (a gradient of that
    norm is zero in float32 anyway), so that the clipping stays on."""
    if clip <= 0 or dtype == torch.float64:
        return clip
    return max(clip, 2.0 ** -149)


def _check_clip(value) -> float:
    """hidden_grad_clip as the float the kernels take (0 = off); ValueError if not positive."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"hidden_grad_clip must be a positive number or None, got {value!r}")
    return float(value)


def _parameter_shapes(mode, input_size, hidden_size, num_layers, bias, bidirectional, proj_size):
    """([names], [shapes]) of the parameters torch.nn gives a module of this configuration, in order."""
    gate_rows = {"LSTM": 4, "GRU": 3}.get(mode, 1) * hidden_size
    real_hidden = proj_size if proj_size > 0 else hidden_size
    directions = 2 if bidirectional else 1
    names, shapes = [], []
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else real_hidden * directions
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            parameters = [("weight_ih", (gate_rows, layer_input)), ("weight_hh", (gate_rows, real_hidden))]
            if bias:
                parameters += [("bias_ih", (gate_rows,)), ("bias_hh", (gate_rows,))]
            if proj_size > 0:
                parameters.append(("weight_hr", (proj_size, hidden_size)))
            names += [kind + suffix for kind, _ in parameters]
            shapes += [torch.Size(shape) for _, shape in parameters]
    return names, shapes


_expected_parameters = {}  # _parameter_shapes by configuration (eager calls only)


def _weights_already_read():
    """Stands for torch.nn's _update_flat_weights where the call has read its weights already."""


class _RnnkernMixin:
    """What rnnkern adds to torch's RNN modules: backend choice, gradient norms, clipping."""

    _torch_class: type

    def _init_rnnkern(self, backend="auto", record_grad_norms=False, hidden_grad_clip=None):
        self.backend = _backends.check_name(backend)
        self.record_grad_norms = bool(record_grad_norms)
        _check_clip(hidden_grad_clip)
        self.hidden_grad_clip = hidden_grad_clip
        self.grad_norms: Optional[GradNorms] = None
        self._grad_norm_hooks: "OrderedDict[int, Callable]" = OrderedDict()
        self._rnnkern_token = _compat.register_module(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        for name, default in _OPTION_DEFAULTS.items():
            self.__dict__.setdefault(name, default)
        self.__dict__.setdefault("grad_norms", None)
        self.__dict__.setdefault("_grad_norm_hooks", OrderedDict())
        self._rnnkern_token = _compat.register_module(self)  # a copy's norms are its own

    def register_grad_norm_hook(self, hook: Callable[["torch.nn.Module", GradNorms], None]) -> RemovableHandle:
        """Call ``hook(module, grad_norms)`` after every backward that recorded norms.

        Norms are recorded only while ``record_grad_norms`` is True. Returns a handle whose
        ``remove()`` unregisters the hook.
        """
        handle = RemovableHandle(self._grad_norm_hooks)
        self._grad_norm_hooks[handle.id] = hook
        return handle

    def extra_repr(self) -> str:
        text = super().extra_repr()
        for name, default in _OPTION_DEFAULTS.items():
            value = getattr(self, name, default)
            if value != default:
                text += f", {name}={value!r}"
        return text

    def _deliver_grad_norms(self, norms: Tensor, batch_sizes: Tensor, unsorted_indices, has_cell_state):
        """Called once per backward and call of the module (a module called twice in one graph delivers
        twice, the later call first) with the norm probes' gradients [L, D, 2, N]: set grad_norms, run
        hooks."""
        norms = rows_to_time_batch(norms, batch_sizes)  # [L, D, 2, T, B]
        if unsorted_indices is not None:
            norms = norms.index_select(-1, unsorted_indices.to(norms.device))
        self._publish_grad_norms(GradNorms(norms.select(2, 0).contiguous(),
                                           norms.select(2, 1).contiguous() if has_cell_state else None))

    def _publish_grad_norms(self, grad_norms: GradNorms):
        """Set grad_norms, run the hooks."""
        # straight into __dict__: torch.nn.RNNBase.__setattr__ (flat-weight bookkeeping) and
        # Module.__setattr__ (parameter/buffer checks) cost more than the rest of the delivery
        self.__dict__["grad_norms"] = grad_norms
        for hook in list(self._grad_norm_hooks.values()):
            hook(self, grad_norms)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, input, hx=None):
        """torch.nn's forward (same arguments, results and exceptions), run by rnnkern's kernels."""
        if isinstance(input, PackedSequence) and torch.compiler.is_compiling():
            # A graph break: packed input needs its batch sizes on the host (rnnkern/_compat.py).
            return _compat.eager_forward(self, input, hx)
        return self._forward(input, hx)

    def _forward(self, input, hx):
        autocast, parsed = self._prepare(input, hx)
        if autocast is None:
            return self._run(*parsed)
        # torch.autocast: run in the dtype torch.nn would (rnnkern/_compat.py) with autocast off inside,
        # so the kernels see one dtype; the casts are differentiable.
        with torch.autocast(autocast.device_type, enabled=False):
            output, hidden = self._run(*parsed)
        return autocast.cast_outputs(output, hidden)

    def _prepare(self, input, hx, weights=None):
        """(the AutocastPlan of this call or None, the parsed call for _run): forward's checks, without
        running it. Input torch.nn rejects raises torch.nn's own exception; an LSTM's narrower c0 is
        promoted as torch.nn promotes it, a wider one kept as torch.nn keeps it. weights: the call's
        weights, read once per call (as torch.nn does: a parametrized weight is evaluated there, e.g.
        spectral_norm's power iteration) unless given."""
        if weights is None:
            weights = self._call_weights()
        try:
            autocast = _compat.autocast_plan(self, input, hx)
            if autocast is None:
                return None, self._parse(input, hx, weights)
            with torch.autocast(autocast.device_type, enabled=False):
                cast_input, cast_hx = autocast.cast_inputs(input, hx)
                parsed = self._parse(cast_input, cast_hx, weights, autocast.compute_dtype)
                own = (input.data if isinstance(input, PackedSequence) else input).dtype
                self._check_backend_under_autocast(parsed[3].device, autocast.compute_dtype, own)
                return autocast, parsed
        except _InvalidInput as invalid:
            promoted = None if isinstance(invalid, _InconsistentModule) else self._promoted_cell_state(input, hx)
            if promoted is not None and promoted[0].device.type == "cpu" and promoted[0].dtype == torch.float64:
                # torch.nn's CPU LSTM in float64 (its per-op path) takes this c0 and promotes it; elsewhere
                # whether torch.nn takes it is learnt from torch.nn below.
                return self._prepare(input, promoted, weights)
            # torch.nn raises its own exception (type and message) for this input.
            self._check_packed_lstm(input, hx)
            self._torch_forward_on_weights_read(input, hx)
            if isinstance(invalid, _InconsistentModule):
                raise RuntimeError(
                    f"rnnkern: the parameters of this {self._torch_class.__name__} do not match its configuration "
                    f"(num_layers, bidirectional, bias, input_size, hidden_size or proj_size changed after it "
                    f"was built, or a parameter replaced by one of another shape); torch.nn computes with them "
                    f"regardless, rnnkern does not: build the module anew") from None
            if promoted is not None:
                return self._prepare(input, promoted, weights)
            wider = self._wider_cell_state_plan(input, hx)
            if wider is not None:
                with torch.autocast(wider.device_type, enabled=False):
                    return wider, self._parse(*wider.cast_inputs(input, hx), weights, wider.compute_dtype)
            data = input.data if isinstance(input, PackedSequence) else input
            if any(isinstance(t, Tensor) and t.is_complex() for t in [data, *weights]):
                raise RuntimeError(
                    f"rnnkern does not support complex dtypes ({data.dtype} here), which torch.nn's CPU "
                    f"{self._torch_class.__name__} runs with its per-op implementation: use torch.nn."
                    f"{self._torch_class.__name__} for complex input") from None
            raise RuntimeError(
                f"rnnkern rejected an input that torch.nn.{self._torch_class.__name__} accepts; "
                "please report this as a bug") from None

    def _torch_forward_on_weights_read(self, input, hx):
        """torch.nn's forward, on the weights this call has read (_call_weights left them in
        _flat_weights): its refresh, which reads them again, is skipped, so that a parametrization
        (spectral_norm's power iteration, say) runs as often as in torch.nn's own call, not twice."""
        if torch.compiler.is_compiling():  # (there _call_weights reads without refreshing)
            return self._torch_class.forward(self, input, hx)
        self.__dict__["_update_flat_weights"] = _weights_already_read
        try:
            return self._torch_class.forward(self, input, hx)
        finally:
            del self.__dict__["_update_flat_weights"]

    def _call_weights(self):
        """The weights of this call, in _flat_weights_names order, as torch.nn's _update_flat_weights reads
        them. While torch.compile traces, the module is left unchanged: torch.func.functional_call swaps
        the parameters without updating _flat_weights, so torch.nn's refresh would store the swapped-in
        tensors there, and Dynamo would carry them out of the graph to store them; inside a torch.func
        transform they are the transform's wrapped tensors, which cannot leave it (AOTAutograd's
        "Cannot access storage of TensorWrapper")."""
        if torch.compiler.is_compiling():
            return [getattr(self, name) if hasattr(self, name) else None for name in self._flat_weights_names]
        self._refresh_flat_weights()
        # (read once: reading them again would evaluate a parametrized weight once more than torch.nn does)
        return list(self._flat_weights)

    def _refresh_flat_weights(self):
        """torch.nn's _update_flat_weights (re-read the weights if any was replaced, e.g. by
        torch.func.functional_call), without its hasattr + getattr through Module.__getattr__ per weight
        where those can only return the registered parameters: a module of rnnkern's own classes (no
        parametrization, whose class is a subclass with properties; no subclass of the user's) whose
        weights are all in _parameters and none shadowed by an instance attribute. The same comparison
        with the weights' references, the same re-initialisation (torch's method cost 66k instructions a
        call here, a sixth of a one-step call's). Anything else: torch's own method."""
        own = self.__dict__
        names, refs = own.get("_flat_weights_names"), own.get("_flat_weight_refs")
        parameters = own.get("_parameters")
        if (type(self) not in _PLAIN_CLASSES or names is None or refs is None or parameters is None
                or len(names) != len(refs)):
            self._update_flat_weights()
            return
        for ref, name in zip(refs, names):  # (in torch's order: the first replaced weight re-initialises)
            if name not in parameters or name in own:
                self._update_flat_weights()
                return
            weight = parameters[name]
            if weight is not None and ref is not None and ref() is not weight:
                self._init_flat_weights()
                return

    def _check_parameters(self, params):
        """_InconsistentModule unless the parameters are those of the module's configuration: the names
        and shapes torch.nn gives a module built with its current attributes."""
        if torch.jit.is_tracing():
            return  # (the shapes are constants of the trace: comparing them would only warn)
        config = (self.mode, self.input_size, self.hidden_size, self.num_layers, self.bias, self.bidirectional,
                  self.proj_size)
        if torch.compiler.is_compiling():  # (no cache: Dynamo would guard on it and recompile once it changes)
            names, shapes = _parameter_shapes(*config)
        else:
            names, shapes = _expected_parameters.get(config) or _expected_parameters.setdefault(
                config, _parameter_shapes(*config))
        _require(self._flat_weights_names == names and
                 [p.shape if isinstance(p, Tensor) else None for p in params] == shapes, _InconsistentModule)

    def _check_backend_under_autocast(self, device, dtype, own_dtype):
        """An explicit backend that can run the input's own dtype but not the one torch.autocast asks for:
        its error, saying that autocast asked for it (other errors come from _run, as without autocast)."""
        try:
            _compat.resolve_backend(self.backend, device, dtype)
        except RuntimeError as error:
            try:
                _compat.resolve_backend(self.backend, device, own_dtype)
            except RuntimeError:
                return
            raise RuntimeError(f"{error} (torch.autocast runs this call in {dtype}; backend=\"auto\" picks a "
                               "backend that can)") from None

    def _check_packed_lstm(self, input, hx):
        """torch.nn.LSTM runs check_forward_args for every input but a PackedSequence (its other cells check
        that one too): ATen then takes the rows and states as they are (where cuDNN does not run it).
        With another input size its oneDNN path (_one_dnn_may_run) reads the rows with the module's
        (past their end, where they are narrower; elsewhere a matmul fails); it reads h0's and c0's
        size(2) (projections where they differ) and then computes with them, which with shapes it does
        not expect may read past c0 (a crash) or compute from the wrong elements. Where it would get
        that far, raises what torch.nn's checks raise elsewhere: check_input's (the rows' width; not
        their dtype, which ATen checks) and, reordered as torch.nn reorders them, the states'
        hidden-size checks. Elsewhere ATen's own error follows."""
        if self.mode != "LSTM" or not isinstance(input, PackedSequence):
            return
        data, batch_sizes = input.data, input.batch_sizes
        if isinstance(data, Tensor) and data.is_cuda and torch.backends.cudnn.is_acceptable(data):
            return  # (cuDNN's LSTM checks them)
        states = None
        if hx is not None:
            try:
                states = _lstm_states(input, self.permute_hidden(hx, input.sorted_indices))
            except Exception:
                return  # (torch.nn's own error, in its order)
            if len(states) != 2 or not all(isinstance(t, Tensor) and t.dim() >= 3 for t in states):
                return
        weight = self._flat_weights[0] if self._flat_weights else None
        projections = states is not None and states[0].shape[2] != states[1].shape[2]
        if (isinstance(data, Tensor) and isinstance(weight, Tensor) and data.dtype == weight.dtype
                and _one_dnn_may_run(data, batch_sizes) and not projections):
            self.check_input(data, batch_sizes)
        if states is not None and projections == (self.proj_size > 0):
            self.check_hidden_size(states[0], self.get_expected_hidden_size(data, batch_sizes),
                                   "Expected hidden[0] size {}, got {}")
            self.check_hidden_size(states[1], self.get_expected_cell_size(data, batch_sizes),
                                   "Expected hidden[1] size {}, got {}")

    def _cell_state_of_its_own_dtype(self, input, hx):
        """(input rows, h0, c0) of an LSTM call whose c0 alone has another (real) dtype than the input,
        on the input's device; else None."""
        if self.mode != "LSTM" or not isinstance(hx, (tuple, list)):
            return None
        try:
            states = _lstm_states(input, hx)
        except _InvalidInput:
            return None
        if len(states) != 2:
            return None
        data = input.data if isinstance(input, PackedSequence) else input
        h0, c0 = states
        if not all(isinstance(t, Tensor) for t in (data, h0, c0)) or c0.is_complex():
            return None
        if h0.dtype != data.dtype or c0.dtype == data.dtype or c0.device != data.device:
            return None
        return data, h0, c0

    def _promoted_cell_state(self, input, hx):
        """An LSTM's (h0, c0) with c0 in the input's dtype where c0 alone is in another dtype that promotes
        to it (a narrower floating one, an integer or bool), for an input torch.nn accepted: its non-fused
        LSTM (e.g. float64 on the CPU) promotes c0 in the first cell update, i.e. computes with c0 cast
        up; else None."""
        found = self._cell_state_of_its_own_dtype(input, hx)
        if found is None or torch.promote_types(found[2].dtype, found[0].dtype) != found[0].dtype:
            return None
        data, h0, c0 = found
        return h0, c0.to(data.dtype)

    def _wider_cell_state_plan(self, input, hx):
        """For an LSTM call that torch.nn accepted with c0 alone in a wider floating dtype than the input
        (oneDNN's CPU LSTM takes a bfloat16 input with a float32 c0, and keeps the cell state and c_n in
        float32): an AutocastPlan that computes in c0's dtype (the cell state exact, as torch.nn's; the
        recurrence's h more precise than torch.nn's bfloat16) and returns the output and h_n in the
        input's dtype, c_n in c0's; else None."""
        found = self._cell_state_of_its_own_dtype(input, hx)
        if found is None:
            return None
        data, _h0, c0 = found
        if (not data.is_floating_point() or not c0.is_floating_point()
                or torch.promote_types(c0.dtype, data.dtype) != c0.dtype):
            return None
        return _compat.AutocastPlan(data.device.type, c0.dtype, data.dtype, c0.dtype)

    def _parse(self, input, hx, weights, weight_dtype=None):
        """Validate like torch.nn and bring the input to rows + sorted hx; _InvalidInput if bad.
        weights: the call's (_call_weights); weight_dtype: cast the (float32/16-bit) weights to it,
        differentiably (autocast)."""
        # (torch.nn hands dropout to ATen's argument parser, which takes a real number or a 0-dim tensor,
        # whatever the layers and mode: anything else, e.g. a string set after construction, raises there)
        dropout = self.dropout
        _require(isinstance(dropout, numbers.Real) or (isinstance(dropout, Tensor) and dropout.dim() == 0))
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        num_directions = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        is_batched, sorted_indices, unsorted_indices = True, None, None
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            _require(isinstance(data, Tensor) and data.dim() == 2 and not data.is_nested)
            data, batch = _packed_rows(data, batch_sizes)
        else:
            # (a nested tensor: torch.nn's error, that it has no size along the ragged dimension)
            _require(isinstance(input, Tensor) and input.dim() in (2, 3) and not input.is_nested)
            is_batched = input.dim() == 3
            x = input if is_batched else input.unsqueeze(1 if not self.batch_first else 0)
            if self.batch_first:
                x = x.transpose(0, 1)
            steps, batch = x.shape[0], x.shape[1]
            _require(steps > 0)
            data = x.reshape(steps * batch, x.shape[2])
            # (on the CPU where the layer ops read it, also inside a `with torch.device(...)` block)
            batch_sizes = torch.full((steps,), batch, dtype=torch.int64, device="cpu")
        _require(data.is_floating_point())
        _require(data.shape[1] == self.input_size)
        params = list(weights)
        self._check_parameters(params)
        if weight_dtype is not None:
            params = [_compat._cast(p, weight_dtype) for p in params]
        dtype, device = data.dtype, data.device  # (read once: each .device makes an object)
        _require(all(p.dtype == dtype and p.device == device for p in params))

        states = []
        if hx is None:
            states.append(data.new_zeros(self.num_layers * num_directions, batch, real_hidden))
            if is_lstm:
                states.append(data.new_zeros(self.num_layers * num_directions, batch, self.hidden_size))
        else:
            given = _lstm_states(input, hx) if is_lstm else [hx]
            _require(all(isinstance(s, Tensor) for s in given) and len(given) == (2 if is_lstm else 1))
            _require(all(s.dim() == (3 if is_batched else 2) for s in given))
            sizes = [real_hidden, self.hidden_size] if is_lstm else [real_hidden]
            for state, size in zip(given, sizes):
                if not is_batched:
                    state = state.unsqueeze(1)
                if sorted_indices is not None:
                    # Reordered before the checks, as torch.nn does (rows past the batch then drop out).
                    try:
                        state = state.index_select(1, sorted_indices)
                    except (RuntimeError, IndexError):
                        raise _InvalidInput() from None
                if packed and is_lstm and len(states) == 1 and state.shape[1] == 1:
                    # c0 of batch 1: torch.nn's packed LSTM (unchecked there) broadcasts it in the first
                    # cell update, which is computing with it expanded
                    state = state.expand(state.shape[0], batch, state.shape[2])
                _require(tuple(state.shape) == (self.num_layers * num_directions, batch, size))
                _require(state.dtype == data.dtype and state.device == data.device)
                states.append(state)
        return (input, packed, is_batched, data, batch_sizes, sorted_indices, unsorted_indices,
                states[0], states[1] if is_lstm else None, params)

    def _call_backend(self, data, tensors, transforms):
        """(the backend that runs a call on `data`, and the differentiation context that chose it instead
        of the module's backend setting, or None): `tensors` are the call's (data, states, weights),
        `transforms` the torch.func transforms it runs under (_compat.functorch_transforms)."""
        differentiating = [t for t in transforms if t in ("grad", "jvp")]
        if differentiating:
            context = f"torch.func.{differentiating[-1]} (or the transforms built on it)"
        elif _compat.has_forward_tangents(tensors):
            context = "forward-mode AD (torch.autograd.forward_ad's dual tensors)"
        else:
            return _compat.resolve_backend(self.backend, data.device, data.dtype), None
        return self._backend_under_transform(context, data.device, data.dtype), context

    def _backend_under_transform(self, context: str, device: torch.device, dtype: torch.dtype):
        """The backend under torch.func's grad or jvp (and what is built on them: vjp, jacrev, jacfwd,
        hessian), or for input with forward-mode AD tangents (`context` names which, for the error): the
        reference backend, whose plain PyTorch ops have the formulas those transforms compose; the fused
        kernels' derivatives are registered with autograd's backward only (under jvp the op would give a
        zero tangent; dual weights got no tangent from it). An explicit fused backend raises instead."""
        name = _backends.validate_name(self.backend)
        if name not in ("auto", "reference"):
            raise RuntimeError(
                f"rnnkern backend {name!r} cannot run under {context}: its fused kernels' derivatives are "
                f"registered with autograd's backward only; use backend=\"reference\" (or \"auto\", which "
                f"picks it there)")
        # (through resolve_backend: under torch.compile, loading the backend's module is no graph break)
        return _compat.resolve_backend("reference", device, dtype)

    def __prepare_scriptable__(self):
        """torch.jit.script: a clear error (TorchScript cannot run rnnkern's Python-side dispatch, and a
        torch.nn stand-in would replace this module in the scripted parent's eager model for good)."""
        raise RuntimeError(
            f"rnnkern.{type(self).__name__} cannot be scripted (torch.jit.script is deprecated): use torch.compile "
            f"or torch.export, which run rnnkern's kernels, or script a torch.nn.{self._torch_class.__name__} "
            f"built with the same arguments and this module's state_dict")

    def _layer_weights(self, params):
        """weights[layer][direction] = (w_ih, w_hh, b_ih, b_hh, w_hr) (None where absent), by position:
        _parse checked that the parameters are named and ordered as torch.nn lays out this configuration
        (per layer and direction: weight_ih, weight_hh, then bias_ih, bias_hh, then weight_hr)."""
        bias, proj = bool(self.bias), self.proj_size > 0
        per = 2 + 2 * bias + proj
        directions = 2 if self.bidirectional else 1
        layers = []
        for layer in range(self.num_layers):
            group = []
            for direction in range(directions):
                base = (layer * directions + direction) * per
                group.append((params[base], params[base + 1], params[base + 2] if bias else None,
                              params[base + 3] if bias else None, params[base + per - 1] if proj else None))
            layers.append(group)
        return layers

    def _run(self, input, packed, is_batched, data, batch_sizes, sorted_indices, unsorted_indices,
             h0, c0, params):
        cell = _cells.from_mode(self.mode)
        clip = _kernel_clip(_check_clip(self.hidden_grad_clip), data.dtype)
        recording = self.record_grad_norms and torch.is_grad_enabled()
        transforms = _compat.functorch_transforms()
        if recording and transforms:
            raise RuntimeError(
                f"record_grad_norms is not supported under torch.func.{transforms[-1]}: the norms are recorded "
                f"by a backward through autograd (loss.backward() or torch.autograd.grad)")
        backend, _context = self._call_backend(data, [data, h0, c0, *params], transforms)
        num_directions = 2 if self.bidirectional else 1
        probes = None
        capture = _compat.records_no_side_effects() if recording else None
        if capture is not None:
            warnings.warn(f"record_grad_norms: {capture} records no norms (they are delivered by Python during "
                          "backward); the module runs without recording them", stacklevel=3)
        elif recording:
            # The norms come back as the probes' gradients (see rnnkern/_compat.py); they can only flow
            # if something the stack depends on requires grad.
            anchors = [t for t in [data, h0, c0, *params] if t is not None and t.requires_grad]
            if anchors and self.num_layers * num_directions == 1 and backend.delivers_norms_directly(
                    [data, batch_sizes, h0, c0, *params]):
                # (one layer node, on every path: its backward delivers, see _compat.NormSink)
                probes = [[_compat.NormSink(batch_sizes, unsorted_indices, self._rnnkern_token,
                                            cell == _cells.LSTM,
                                            None if packed else (batch_sizes.numel(), h0.shape[1]))]]
            elif anchors:
                probes = _compat.norm_probes(
                    anchors, (self.num_layers, num_directions, 2, data.shape[0]), batch_sizes,
                    unsorted_indices, self._rnnkern_token, cell == _cells.LSTM)
        out, h_n, c_n = run_stack(
            cell, data.contiguous(), batch_sizes, h0.contiguous(),
            None if c0 is None else c0.contiguous(), self._layer_weights(params),
            dropout=float(self.dropout), training=self.training, backend=backend, clip=clip,
            norm_probes=probes)
        if packed:
            hidden = (h_n, c_n) if c_n is not None else h_n
            output = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        steps, batch = batch_sizes.numel(), h0.shape[1]
        output = out.view(steps, batch, out.shape[1])
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        return output, ((h_n, c_n) if c_n is not None else h_n)


_DOC = """Drop-in replacement for :class:`torch.nn.{name}` whose forward and backward run in rnnkern's
fused kernels (same constructor arguments, parameters, state_dict, inputs, outputs and errors).

Extra keyword-only arguments (also plain attributes, changeable between calls):
    backend: "auto" (fastest correct backend for the input's device and dtype) or one of
        rnnkern.backends(); a backend that cannot run on the input raises RuntimeError.
    record_grad_norms: record ‖∂L/∂h_t‖ (and ‖∂L/∂c_t‖ for LSTM) per layer, direction, timestep
        and sample during backward; read ``module.grad_norms`` (a GradNorms) afterwards or use
        ``register_grad_norm_hook``.
    hidden_grad_clip: None or a positive float c: rescale each backpropagated ∂L/∂h_t to norm
        min(‖∂L/∂h_t‖, c) before it flows back through step t (per sample, per timestep).
"""


def _forward_named(name: str):
    """_RnnkernMixin.forward as ``<name>.forward``: Python's errors for wrong arguments name a function
    by its __qualname__ (torch.nn's: "LSTM.forward() missing 1 required positional argument: 'input'")."""
    mixin = _RnnkernMixin.forward
    forward = types.FunctionType(mixin.__code__, mixin.__globals__, "forward", mixin.__defaults__,
                                 mixin.__closure__)
    forward.__qualname__, forward.__doc__ = f"{name}.forward", mixin.__doc__
    return forward


class LSTM(_RnnkernMixin, TorchLSTM):
    __doc__ = _DOC.format(name="LSTM")
    _torch_class = TorchLSTM

    def __init__(self, *args, backend="auto", record_grad_norms=False, hidden_grad_clip=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_rnnkern(backend, record_grad_norms, hidden_grad_clip)

    forward = _forward_named("LSTM")


class GRU(_RnnkernMixin, TorchGRU):
    __doc__ = _DOC.format(name="GRU")
    _torch_class = TorchGRU

    def __init__(self, *args, backend="auto", record_grad_norms=False, hidden_grad_clip=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_rnnkern(backend, record_grad_norms, hidden_grad_clip)

    forward = _forward_named("GRU")


class RNN(_RnnkernMixin, TorchRNN):
    __doc__ = _DOC.format(name="RNN")
    _torch_class = TorchRNN

    def __init__(self, *args, backend="auto", record_grad_norms=False, hidden_grad_clip=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_rnnkern(backend, record_grad_norms, hidden_grad_clip)

    forward = _forward_named("RNN")


RNNKERN_CLASSES = {TorchLSTM: LSTM, TorchGRU: GRU, TorchRNN: RNN}
_PLAIN_CLASSES = frozenset(RNNKERN_CLASSES.values())  # (_refresh_flat_weights' fast path)


_compat.install_dynamo_support()
