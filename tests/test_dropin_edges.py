"""Drop-in behaviour at the edges, against torch.nn with the same state_dict: outputs changed in place
before the backward, a GRU bias changed in place between forward and backward, which parameters get
no gradient (None, not zeros), the errors of wrong forward arguments, hand-made PackedSequences
(malformed batch sizes, rows past them, trailing zero batch sizes) and a packed LSTM's c0 of batch 1."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkern
from rnnkern import _ext

from conftest import make_pair

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# Backends on CPU tensors, float64 (the Triton interpreter: float32, tiny shapes, where it runs).
CPU_BACKENDS = ["cpu", "reference"]


def _backends_here():
    names = [b for b in CPU_BACKENDS if rnnkern.backends.get(b).unsupported_reason(torch.device("cpu"),
                                                                                    torch.float64) is None]
    triton = rnnkern.backends.get("triton")
    if triton.unsupported_reason(torch.device("cpu"), torch.float32) is None:
        names.append("triton")
    return names


BACKENDS = _backends_here()


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


def _grads(module):
    return {name: p.grad for name, p in module.named_parameters()}


def _assert_grads_equal(ref, ours, tol):
    ref_grads, our_grads = _grads(ref), _grads(ours)
    assert ref_grads.keys() == our_grads.keys()
    for name, g in ref_grads.items():
        if g is None:
            assert our_grads[name] is None, name
        else:
            assert our_grads[name] is not None, name
            torch.testing.assert_close(our_grads[name], g, **tol, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layout", ["padded", "batch_first", "packed", "two_layers"])
def test_output_changed_in_place_before_backward(backend, cell, layout):
    """out += residual (and other in-place ops on the output) between forward and backward: torch.nn's
    CPU GRU/RNN (and LSTM off oneDNN, e.g. float64) allow it; the same gradients here."""
    dtype = _dtype(backend)
    if backend == "triton" and layout in ("packed", "two_layers"):
        pytest.skip("the interpreter's cases stay few (padded, batch_first)")
    if cell == "lstm" and dtype == torch.float32:
        pytest.skip("torch.nn's float32 CPU LSTM runs oneDNN, which saves its output and raises here")
    torch.manual_seed(3)
    layers = 2 if layout == "two_layers" else 1
    ref, ours = make_pair(cell, 5, 5, backend=backend, dtype=dtype, num_layers=layers,
                          batch_first=layout == "batch_first")
    steps, batch = 4, 3
    x0 = torch.randn(batch, steps, 5, dtype=dtype) if layout == "batch_first" else \
        torch.randn(steps, batch, 5, dtype=dtype)
    upstream = torch.randn_like(x0)
    results = []
    for module in (ref, ours):
        x = x0.clone().requires_grad_()
        if layout == "packed":
            out, _ = module(pack_padded_sequence(x, torch.tensor([4, 3, 1]), enforce_sorted=False))
            out.data.mul_(2.0)  # in place on the packed output's rows
            value = out.data
        else:
            out, _ = module(x)
            out += x            # a residual, in place
            out.relu_()
            value = out
        loss = value.pow(2).sum() if layout == "packed" else (value * upstream).sum()
        loss.backward()
        results.append((value.detach(), x.grad))
    tol = _tol(dtype)
    torch.testing.assert_close(results[1][0], results[0][0], **tol)
    torch.testing.assert_close(results[1][1], results[0][1], **tol)
    _assert_grads_equal(ref, ours, tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("record_grad_norms", [False, True])
def test_gru_bias_changed_in_place_between_forward_and_backward(backend, record_grad_norms):
    """torch.nn's GRU backward does not read b_hh (nor does rnnkern's: its b_hn share is saved), so an
    optimizer step on it before the backward (e.g. a gradient-accumulation loop) does not raise."""
    torch.manual_seed(4)
    ref, ours = make_pair("gru", 3, 4, backend=backend)
    ours.record_grad_norms = record_grad_norms
    x0 = torch.randn(5, 2, 3, dtype=torch.float64)
    for module in (ref, ours):
        x = x0.clone().requires_grad_()
        out, h = module(x)
        with torch.no_grad():
            module.bias_hh_l0.add_(0.5)
        (out.sum() + h.pow(2).sum()).backward()
        module.x_grad = x.grad
    torch.testing.assert_close(ours.x_grad, ref.x_grad, rtol=1e-10, atol=1e-10)
    _assert_grads_equal(ref, ours, dict(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("used", ["c_n", "h_n", "out"])
def test_projection_weight_gradient_none_where_torch_nn_gives_none(backend, steps, used):
    """With one step and only c_n used, weight_hr is on no path to the loss: its .grad stays None (as
    torch.nn leaves it; an optimizer skips None but applies weight decay to zeros); otherwise it has one."""
    torch.manual_seed(5)
    ref, ours = make_pair("lstm", 2, 4, backend=backend, proj_size=3)
    x0 = torch.randn(steps, 3, 2, dtype=torch.float64)
    for module in (ref, ours):
        out, (h, c) = module(x0)
        {"c_n": c, "h_n": h, "out": out}[used].pow(2).sum().backward()
    assert (ref.weight_hr_l0.grad is None) == (steps == 1 and used == "c_n")
    _assert_grads_equal(ref, ours, dict(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_wrong_forward_arguments_raise_torch_nn_type_errors(kind):
    ref = getattr(torch.nn, kind)(3, 4)
    ours = getattr(rnnkern, kind)(3, 4)
    x = torch.randn(2, 1, 3)
    for call in (lambda m: m(), lambda m: m(x, None, None), lambda m: m(x, hidden=None)):
        with pytest.raises(TypeError) as expected:
            call(ref)
        with pytest.raises(TypeError) as got:
            call(ours)
        assert str(got.value) == str(expected.value)


def _malformed_packed_cases(dtype):
    g = torch.Generator().manual_seed(6)

    def rows(n):
        return torch.randn(n, 3, generator=g, dtype=dtype)

    return {
        "fewer rows than the batch sizes cover": PackedSequence(rows(6), torch.tensor([2, 2, 2, 1, 1])),
        "increasing batch sizes": PackedSequence(rows(8), torch.tensor([1, 1, 2, 2, 2])),
        "int32 batch sizes": PackedSequence(rows(8), torch.tensor([2, 2, 2, 1, 1], dtype=torch.int32)),
        "negative batch size": PackedSequence(rows(1), torch.tensor([2, -1])),
    }


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_malformed_packed_sequence_raises_torch_nn_error(backend, kind):
    torch.manual_seed(7)
    ref = getattr(torch.nn, kind)(3, 4, dtype=torch.float64)
    ours = getattr(rnnkern, kind)(3, 4, dtype=torch.float64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    for name, packed in _malformed_packed_cases(torch.float64).items():
        with pytest.raises(Exception) as expected:
            ref(packed)
        with pytest.raises(Exception) as got:
            ours(packed)
        assert type(got.value) is type(expected.value), name
        assert str(got.value) == str(expected.value), name


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("sizes,rows", [([2, 2, 2, 1, 1], 10), ([2, 2, 0], 4), ([3, 1, 0, 0], 4), ([0], 0),
                                        ([0, 0], 2)],
                         ids=["rows-past-the-batch-sizes", "trailing-zero", "two-trailing-zeros",
                              "no-sequence", "no-sequence-rows-past"])
def test_hand_made_packed_sequences_torch_nn_accepts(backend, cell, sizes, rows):
    """Rows past what the batch sizes cover are ignored (no output rows, zero gradient) and zero batch
    sizes at the end are steps without samples (all of them: no sequence, empty results), as in
    torch.nn; norms included."""
    torch.manual_seed(8)
    ref, ours = make_pair(cell, 3, 4, backend=backend, num_layers=2)
    ours.record_grad_norms = True
    data = torch.randn(rows, 3, dtype=torch.float64)
    results = []
    for module in (ref, ours):
        x = data.clone().requires_grad_()
        out, hidden = module(PackedSequence(x, torch.tensor(sizes)))
        h = hidden[0] if isinstance(hidden, tuple) else hidden
        (out.data.pow(2).sum() + h.sum()).backward()
        results.append((out.data.detach(), out.batch_sizes, h.detach(), x.grad))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    _assert_grads_equal(ref, ours, dict(rtol=1e-10, atol=1e-10))
    norms = ours.grad_norms.h_per_sample
    assert norms.shape == (2, 1, len(sizes), sizes[0])
    assert torch.isfinite(norms).all()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("packed", [False, True])
def test_nested_tensor_input_raises_torch_nn_error(backend, kind, packed):
    torch.manual_seed(10)
    ref = getattr(torch.nn, kind)(3, 4, dtype=torch.float64)
    ours = getattr(rnnkern, kind)(3, 4, dtype=torch.float64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    nested = torch.nested.nested_tensor([torch.randn(3, 3, dtype=torch.float64),
                                         torch.randn(2, 3, dtype=torch.float64)])
    call = (PackedSequence(nested, torch.tensor([2, 2, 1])),) if packed else (nested,)
    with pytest.raises(Exception) as expected:
        ref(*call)
    with pytest.raises(Exception) as got:
        ours(*call)
    assert type(got.value) is type(expected.value)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_packed_lstm_cell_state_of_batch_one_broadcasts(backend):
    """torch.nn's packed LSTM takes a c0 of batch 1 and computes with it expanded (ATen's broadcast)."""
    torch.manual_seed(9)
    ref, ours = make_pair("lstm", 3, 4, backend=backend, num_layers=2)
    x = pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), torch.tensor([5, 3, 2]))
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    c0_init = torch.randn(2, 1, 4, dtype=torch.float64)
    results = []
    for module in (ref, ours):
        c0 = c0_init.clone().requires_grad_()
        out, (h, c) = module(x, (h0, c0))
        (out.data.sum() + c.pow(2).sum()).backward()
        results.append((out.data.detach(), h.detach(), c.detach(), c0.grad))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(_ext.load() is None, reason="needs the compiled extension")
def test_direct_layer_calls_equal_the_ops():
    """rnnkern._C.call_layer_forward/backward (what eager calls use) return what the ops return."""
    module = _ext.load()
    torch.manual_seed(10)
    steps, batch, hidden, gates = 3, 2, 5, 4
    batch_sizes = torch.tensor([2, 2, 1])
    xp = torch.randn(5, gates * hidden, dtype=torch.float64)
    h0, c0 = torch.randn(batch, hidden, dtype=torch.float64), torch.randn(batch, hidden, dtype=torch.float64)
    w_hh = torch.randn(gates * hidden, hidden, dtype=torch.float64)
    b_hh = torch.randn(gates * hidden, dtype=torch.float64)
    forward_args = (0, xp, batch_sizes, h0, c0, w_hh, b_hh, None, True, 0.0, None)
    with torch._C._AutoDispatchBelowAutograd():
        expected = torch.ops.rnnkern.rnn_layer_forward.default(*forward_args)
    got = module.call_layer_forward(*forward_args)
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    out, _h_n, _c_n, workspace = got
    backward_args = (0, torch.randn_like(out), torch.randn_like(h0), torch.randn_like(c0), batch_sizes, h0,
                     c0, w_hh, b_hh, None, True, 0.5, True, out, workspace)
    expected = torch.ops.rnnkern.rnn_layer_backward.default(*backward_args)
    got = module.call_layer_backward(*backward_args)
    assert len(got) == len(expected) == 7
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    with pytest.raises(TypeError, match="takes 11 arguments"):
        module.call_layer_forward(*forward_args[:5])
    with pytest.raises(TypeError, match="w_hh must be a Tensor"):
        module.call_layer_forward(*forward_args[:5], "w", *forward_args[6:])
    with pytest.raises(RuntimeError, match="rnnkern: w_hh"):  # the kernel's own checks, as the op raises
        wrong_w_hh = torch.randn(3, 7, dtype=torch.float64)
        module.call_layer_forward(*forward_args[:5], wrong_w_hh, *forward_args[6:])


def _nonfinite_masks(tensors):
    return [(torch.isnan(t), torch.isposinf(t), torch.isneginf(t)) for t in tensors]


def _nonfinite_cases():
    """(backend, variant, where, value): every backend (Triton with both its kernels: time-looped and
    per step) with NaN and ±inf everywhere."""
    cases = []
    runs = [(b, None) for b in BACKENDS if b != "triton"] + [("triton", v) for v in ("loop", "step")
                                                              if "triton" in BACKENDS]
    for backend, variant in runs:
        for where in ["input", "h0", "weight_hh", "bias", "grad_out", "grad_h_n"]:
            for value, name in [(float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "-inf")]:
                tag = backend + (f"-{variant}" if variant else "")
                cases.append(pytest.param(backend, variant, where, value, id=f"{tag}-{where}-{name}"))
    return cases


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend,variant,where,value", _nonfinite_cases())
def test_nonfinite_values_propagate_like_torch_nn(backend, variant, where, value, cell, monkeypatch):
    """A NaN or ±inf in the input, h0, a weight or an incoming gradient: NaN, +inf and -inf land where
    torch.nn puts them, in the outputs and in every gradient; finite entries equal torch.nn's. (Before:
    an infinite gradient reaching a GRU step gave +-inf in the input's gradient where torch.nn, whose
    h = (h_prev - n) z + n differentiates to dh - dh z, gives NaN; Triton's time-looped kernels turned a
    sample's every output NaN after an infinite h, through the tiles' padding columns.)"""
    if variant is not None:
        monkeypatch.setenv("RNNKERN_TRITON_VARIANT", variant)
    dtype = _dtype(backend)
    torch.manual_seed(23)
    # (one layer for the incoming gradients: a second layer's input gradient would turn any infinity
    # from the first into NaN, hiding whether a step's own gate gradients hold NaN or ±inf)
    layers = 1 if where.startswith("grad") else 2
    ref, ours = make_pair(cell, 3, 4, num_layers=layers, backend=backend, dtype=dtype)
    x = torch.randn(5, 2, 3, dtype=dtype)
    h0 = torch.randn(layers, 2, 4, dtype=dtype)
    grad_out, grad_h_n = torch.randn(5, 2, 4, dtype=dtype), torch.randn(layers, 2, 4, dtype=dtype)
    target = {"input": x[2, 1], "h0": h0[0, 0], "grad_out": grad_out[3, 0], "grad_h_n": grad_h_n[-1, 1]}
    if where in target:
        target[where][1] = value
    for module in (ref, ours):
        with torch.no_grad():
            if where == "weight_hh":
                module.weight_hh_l0[2, 1] = value
            elif where == "bias":
                module.bias_hh_l1[1] = value
    results = []
    for module in (ref, ours):
        xs, hs = x.clone().requires_grad_(), h0.clone().requires_grad_()
        hx = (hs, torch.ones_like(hs)) if cell == "lstm" else hs
        out, h_n = module(xs, hx)
        h_n = h_n[0] if cell == "lstm" else h_n
        torch.autograd.backward([out, h_n], [grad_out, grad_h_n])
        results.append([out.detach(), h_n.detach(), xs.grad, hs.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*results):
        assert all(torch.equal(a, b) for a, b in zip(_nonfinite_masks([got])[0], _nonfinite_masks([want])[0]))
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], **_tol(dtype))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layout", ["padded", "packed", "stack"])
def test_second_derivatives_like_torch_nn(backend, cell, layout):
    """A gradient penalty (create_graph=True, then a backward of the gradients) and a Hessian-vector
    product through the layers: the same values as torch.nn's CPU layers, which are differentiable ops
    (the cpu backend recomputes its layers with the reference backend's ops for this)."""
    torch.manual_seed(29)
    options = {"padded": {}, "packed": {"proj_size": 2} if cell == "lstm" else {},
               "stack": {"num_layers": 2, "bidirectional": True, "dropout": 0.0}}[layout]
    ref, ours = make_pair(cell, 3, 4, backend=backend, **options)
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    directions = 2 if options.get("bidirectional") else 1
    h0 = torch.randn(options.get("num_layers", 1) * directions, 3, options.get("proj_size") or 4,
                     dtype=torch.float64, requires_grad=True)
    v = torch.randn_like(x)
    hx = (h0, torch.randn(h0.shape[0], 3, 4, dtype=torch.float64)) if cell == "lstm" else h0
    results = []
    for module in (ref, ours):
        inp = x
        if layout == "packed":
            inp = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
        out = module(inp, hx)[0]
        out = out.data if layout == "packed" else out
        first = torch.autograd.grad(out.tanh().sum(), [x, h0], create_graph=True)
        penalty = first[0].pow(2).sum() + first[1].pow(2).sum()
        second = torch.autograd.grad(penalty, [x, h0, *module.parameters()], retain_graph=True)
        hvp, = torch.autograd.grad(first[0], x, v)  # (a Hessian-vector product)
        results.append([*first, *second, hvp])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled cpu backend")
def test_second_derivative_after_input_changed_in_place_raises():
    """A backward with create_graph recomputes a layer from its input: changed in place since the forward
    (here no other node saved it: the input weights are frozen), it raises autograd's error instead of
    differentiating other values."""
    _, ours = make_pair("gru", 3, 4, backend="cpu")
    ours.weight_ih_l0.requires_grad_(False)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    loss = ours(x, h0)[0].pow(2).sum()
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*rnnkern layer"):
        torch.autograd.grad(loss, h0, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("change", ["vector_to_parameters", "module.float()", "create_graph"])
def test_weights_replaced_between_forward_and_backward_like_torch_nn(backend, cell, change):
    """A weight's .data replaced between forward and backward (torch.nn.utils.vector_to_parameters,
    Module.float()/.to(dtype)): the gradients are those of the forward that ran, as torch.nn's per-op
    layers give (their saved views keep the old values; its oneDNN float32 LSTM reads the new ones);
    the C++ backends' backward read the new W_hh (wrong gradients) or raised for its dtype, the
    Triton GRU's the new biases. Also with create_graph=True, whose recomputation reads w_ih and the
    biases too."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    if backend == "triton" and change != "vector_to_parameters":
        pytest.skip("the interpreter's cases stay few (Triton: float32, no second derivatives)")
    torch.manual_seed(37)
    dtype = _dtype(backend)
    ref, ours = make_pair(cell, 3, 4, backend=backend, num_layers=2, dtype=dtype,
                          **({"proj_size": 3} if cell == "lstm" else {}))
    x = torch.randn(5, 2, 3, dtype=dtype, requires_grad=change == "create_graph")
    results = []
    for module in (ref, ours):
        with torch.backends.mkldnn.flags(enabled=False):
            out = module(x)[0]
        loss = out.sin().sum()
        if change == "module.float()":
            module.float()
        else:
            vector_to_parameters(parameters_to_vector(module.parameters()) * 1.5, module.parameters())
        if change == "create_graph":
            grads = torch.autograd.grad(loss, [x, *module.parameters()], create_graph=True)
            second = torch.autograd.grad(grads[0].pow(2).sum(), list(module.parameters()))
            results.append([*grads, *second])
        else:
            loss.backward()
            results.append([p.grad for p in module.parameters()])
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled cpu backend")
@pytest.mark.parametrize("name", ["weight_ih_l0", "bias_ih_l0", "bias_hh_l0"])
def test_second_derivative_after_a_weight_changed_in_place_raises(name):
    """The recomputation for a second derivative needs the forward's w_ih and biases: changed in place
    since (their old values are gone), autograd's error, naming which; not other values' gradients."""
    _, ours = make_pair("gru", 3, 4, backend="cpu")
    h0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    loss = ours(torch.randn(5, 2, 3, dtype=torch.float64), h0)[0].pow(2).sum()
    with torch.no_grad():
        getattr(ours, name).mul_(1.5)
    what = {"weight_ih_l0": "weight_ih", "bias_ih_l0": "bias_ih", "bias_hh_l0": "bias_hh"}[name]
    with pytest.raises(RuntimeError,
                       match=f"modified by an inplace operation: the {what} of an rnnkern layer"):
        torch.autograd.grad(loss, h0, create_graph=True)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled cpu backend")
def test_layer_input_not_kept_past_a_plain_backward():
    """What a second derivative recomputes a layer from (its input) is let go by a plain backward, as the
    graph's saved tensors are: a caller keeping the output does not keep the input alive; a backward with
    create_graph=True after it (retain_graph=True) raises a clear error."""
    import gc
    import weakref

    _, ours = make_pair("lstm", 3, 4, backend="cpu")
    ours.weight_ih_l0.requires_grad_(False)  # (so that no other node saves the input)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    alive = weakref.ref(x)
    out = ours(x, (h0, h0))[0]
    out.pow(2).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="no double backward after an earlier backward"):
        first, = torch.autograd.grad(out.pow(2).sum(), h0, create_graph=True)
        first.sum().backward()
    del x
    gc.collect()
    assert alive() is None and out.grad_fn is not None


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in rnnkern.backends()])
@pytest.mark.parametrize("form", ["padded", "unbatched", "stack", "no_grad"])
def test_bfloat16_lstm_with_a_float32_cell_state(backend, form):
    """oneDNN's CPU LSTM takes a bfloat16 input with a float32 c0 and keeps the cell state in float32
    (c_n float32, e.g. carried between chunks of a long sequence): rnnkern computes that call in float32
    and returns torch.nn's dtypes; where this CPU's torch.nn rejects the call, rnnkern raises its error."""
    torch.manual_seed(5)
    layers, bidir = (2, True) if form == "stack" else (1, False)
    ref, ours = make_pair("lstm", 5, 7, backend=backend, dtype=torch.bfloat16, num_layers=layers,
                          bidirectional=bidir)
    states = layers * (2 if bidir else 1)
    batch = () if form == "unbatched" else (3,)
    x0 = torch.randn(4, *batch, 5).bfloat16()
    h00 = torch.randn(states, *batch, 7).bfloat16()
    c00 = torch.randn(states, *batch, 7)
    results = []
    for module in (ref, ours):
        x, h0, c0 = (t.clone().requires_grad_(form != "no_grad") for t in (x0, h00, c00))
        try:
            with torch.set_grad_enabled(form != "no_grad"):
                out, (h_n, c_n) = module(x, (h0, c0))
        except RuntimeError as error:
            results.append(str(error))
            continue
        if form != "no_grad":
            (out.float().pow(2).sum() + h_n.float().sum() + c_n.pow(2).sum()).backward()
        grads = [] if form == "no_grad" else [x.grad, h0.grad, c0.grad,
                                               *(p.grad for p in module.parameters())]
        results.append([out, h_n, c_n, *grads])
    want, got = results
    if isinstance(want, str):
        assert got == want
        return
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert got[2].dtype == torch.float32 and (form == "no_grad" or got[5].dtype == torch.float32)
    for a, b in zip(got, want):  # (both round to bfloat16 differently: relative errors)
        a, b = a.detach().double(), b.detach().double()
        assert float((a - b).norm() / b.norm()) < 3e-2
    assert "the dtype of c0" in rnnkern.explain(ours, x0, (h00, c00))


@pytest.mark.parametrize("call", ["rejected", "bfloat16_with_float32_c0"])
def test_parametrization_evaluated_as_often_as_in_torch_nn(call):
    """Where rnnkern runs torch.nn's forward (for torch.nn's exception, or to learn that torch.nn takes
    a call), it does so on the weights already read: a parametrization (spectral_norm's power
    iteration) runs as often as in torch.nn's call, not twice as often."""
    import torch.nn.utils.parametrize as parametrize

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, weight):
            self.calls += 1
            return weight

    counts = []
    for cls in (torch.nn.LSTM, rnnkern.LSTM):
        module = cls(3, 5)
        counter = Counting()
        parametrize.register_parametrization(module, "weight_hh_l0", counter)
        counter.calls = 0
        if call == "rejected":
            with pytest.raises(RuntimeError):
                module(torch.randn(4, 2, 6))  # (input size 6, not 3)
        else:
            module.bfloat16()
            counter.calls = 0
            try:
                module(torch.randn(4, 2, 3).bfloat16(),
                       (torch.randn(1, 2, 5).bfloat16(), torch.randn(1, 2, 5)))
            except RuntimeError:
                pass  # (where this CPU's torch.nn rejects it, both raise: counted alike)
        counts.append(counter.calls)
    assert counts[1] == counts[0] > 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_complex_modules_raise_a_clear_error(kind):
    """torch.nn's CPU layers run complex modules (per-op); rnnkern's kernels do not: a clear error
    saying so, not its "please report" one."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: complex modules are a new feature)
        module = getattr(rnnkern, kind)(3, 4).to(torch.complex128)
    with pytest.raises(RuntimeError, match=f"rnnkern does not support complex dtypes.*torch.nn.{kind}"):
        module(torch.randn(5, 2, 3, dtype=torch.complex128))
