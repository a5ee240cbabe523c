"""Per-timestep gradient norms and clipping against an independent unrolled oracle (tests/oracle.py)."""

import math

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import rnnkern
from conftest import SLOW_ON_CPU, TOLERANCE, make_pair
from oracle import unrolled_norms

CASES = [  # (cell, layers, bidirectional, proj, packed)
    ("lstm", 2, True, 0, True),
    ("lstm", 1, False, 2, False),
    ("lstm", 2, True, 2, True),
    ("gru", 2, True, 0, True),
    ("gru", 1, False, 0, False),
    ("rnn_tanh", 2, True, 0, True),
    ("rnn_relu", 1, True, 0, False),
    ("rnn_tanh", 1, False, 0, True),  # one layer, one direction, packed: an eager call's NormSink
]


def _run_case(target, cell, layers, bidir, proj, packed, clip):
    name, device, dtype = target
    if device == "cpu" and name in SLOW_ON_CPU and not packed:
        pytest.skip("reduced set for an interpreted backend on CPU")
    gen = torch.Generator().manual_seed(99)
    kwargs = dict(num_layers=layers, bidirectional=bidir)
    if proj:
        kwargs["proj_size"] = proj
    _, ours = make_pair(cell, 3, 4, backend=name, **kwargs)  # float64 on CPU: the oracle's copy
    lengths = [4, 6, 1, 5] if packed else [5, 5, 5]
    seqs = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in lengths]
    dirs = 2 if bidir else 1
    real = proj or 4
    h0 = torch.randn(layers * dirs, len(seqs), real, generator=gen, dtype=torch.float64)
    c0 = torch.randn(layers * dirs, len(seqs), 4, generator=gen, dtype=torch.float64)
    w_out = [torch.randn(n, dirs * real, generator=gen, dtype=torch.float64) for n in lengths]
    w_h = torch.randn_like(h0)
    w_c = torch.randn_like(c0)
    is_lstm = cell == "lstm"
    exp_h, exp_c, exp_dx, cells = unrolled_norms(ours, seqs, h0, c0 if is_lstm else None, w_out,
                                                 w_h, w_c, clip=clip)

    ours.to(device, dtype).record_grad_norms = True
    ours.hidden_grad_clip = clip
    xs = [s.to(device, dtype).requires_grad_(True) for s in seqs]
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    if packed:
        inp = pack_sequence(xs, enforce_sorted=False)
    else:
        inp = torch.stack(xs, 1)
    hx = (cast(h0), cast(c0)) if is_lstm else cast(h0)
    out, hidden = ours(inp, hx)
    if packed:
        out, _ = pad_packed_sequence(out)
    loss = sum((out[:n, b] * cast(w_out[b])).sum() for b, n in enumerate(lengths))
    if is_lstm:
        loss = loss + (hidden[0] * cast(w_h)).sum() + (hidden[1] * cast(w_c)).sum()
    else:
        loss = loss + (hidden * cast(w_h)).sum()
    loss.backward()
    gn = ours.grad_norms
    assert gn is not None
    rtol, atol = TOLERANCE[dtype]
    rtol, atol = max(rtol, 1e-6), max(atol, 1e-6)  # norms are recorded in float32
    assert gn.h_per_sample.shape == (layers, dirs, max(lengths), len(lengths))
    assert gn.h_per_sample.dtype == torch.float32
    torch.testing.assert_close(gn.h_per_sample.double().cpu(), exp_h, rtol=rtol, atol=atol)
    torch.testing.assert_close(gn.h.double().cpu(), exp_h.norm(dim=-1), rtol=rtol, atol=atol)
    if is_lstm:
        torch.testing.assert_close(gn.c_per_sample.double().cpu(), exp_c, rtol=rtol, atol=atol)
    else:
        assert gn.c_per_sample is None and gn.c is None
    rtol, atol = TOLERANCE[dtype]
    for x, e in zip(xs, exp_dx):
        torch.testing.assert_close(x.grad.double().cpu(), e, rtol=rtol, atol=atol)
    for (layer, d), (cell_mod, w_hr) in cells.items():
        suffix = f"_l{layer}" + ("_reverse" if d else "")
        torch.testing.assert_close(getattr(ours, "weight_hh" + suffix).grad.double().cpu(),
                                   cell_mod.weight_hh.grad, rtol=rtol, atol=atol)
        torch.testing.assert_close(getattr(ours, "weight_ih" + suffix).grad.double().cpu(),
                                   cell_mod.weight_ih.grad, rtol=rtol, atol=atol)
        if w_hr is not None:
            torch.testing.assert_close(getattr(ours, "weight_hr" + suffix).grad.double().cpu(),
                                       w_hr.grad, rtol=rtol, atol=atol)
    return exp_h


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_norms_match_unrolled_oracle(target, case):
    """‖∂L/∂h_t‖ and ‖∂L/∂c_t‖ per layer, direction, step, sample; caller's batch order; packed."""
    _run_case(target, *case, clip=None)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_clipping_matches_rescaling_hooks(target, case):
    """hidden_grad_clip rescales each ∂L/∂h_t to min(‖g‖, c); norms are recorded before clipping."""
    norms = _run_case(target, *case, clip=0.3)
    assert (norms > 0.3).any(), "the clip must actually fire in this case"


def test_norms_off_by_default_and_hooks():
    m = rnnkern.GRU(3, 4, backend="reference")
    m(torch.randn(5, 2, 3))[0].sum().backward()
    assert m.grad_norms is None
    seen = []
    m.record_grad_norms = True
    handle = m.register_grad_norm_hook(lambda mod, gn: seen.append((mod, gn)))
    m(torch.randn(5, 2, 3))[0].sum().backward()
    assert len(seen) == 1 and seen[0][0] is m and seen[0][1] is m.grad_norms
    assert m.grad_norms.h.shape == (1, 1, 5)
    handle.remove()
    m(torch.randn(5, 2, 3))[0].sum().backward()
    assert len(seen) == 1


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in rnnkern.backends()])
def test_norms_delivered_whatever_inputs_a_backward_asks_for(backend, layers):
    """A backward that asks autograd for some inputs only (torch.autograd.grad(..., inputs), or
    backward(inputs=...)) still delivers the latest norms, of the whole stack: the same as a full
    backward's. (One layer on the cpu backend: its layer's backward delivers, without a probe.)"""
    torch.manual_seed(5)
    m = rnnkern.LSTM(3, 4, num_layers=layers, backend=backend, record_grad_norms=True)
    x = torch.randn(5, 2, 3, requires_grad=True)
    h0, c0 = torch.randn(layers, 2, 4, requires_grad=True), torch.randn(layers, 2, 4)
    out, _ = m(x, (h0, c0))
    (out * out).sum().backward(retain_graph=True)
    full = m.grad_norms
    top = getattr(m, f"weight_hh_l{layers - 1}")
    for ask in ([top], [h0], [m.weight_ih_l0], [m.bias_ih_l0]):
        m.grad_norms = None
        torch.autograd.grad((out * out).sum(), ask, retain_graph=True)
        assert m.grad_norms is not None and m.grad_norms is not full
        for name in ("h_per_sample", "c_per_sample"):
            torch.testing.assert_close(getattr(m.grad_norms, name), getattr(full, name))
    previous = m.grad_norms
    out, _ = m(10 * x, (h0, c0))
    (out * out).sum().backward(inputs=[top])
    assert m.grad_norms is not previous
    assert not torch.allclose(m.grad_norms.h_per_sample, previous.h_per_sample)


@pytest.mark.parametrize("clip", [1e-300, 1e-41])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_clipping_at_float32_extremes(kind, clip):
    """A clip below float32's smallest positive number stays on (it rounded to 0, the kernels' "off",
    and the gradients came back unclipped): they vanish, as the definition says; a clip in float32's subnormal range, with gradients
    there too, clips alike on every backend (the reference backend's 1 / ‖g‖ overflowed to inf there)."""
    results = []
    for backend in [b for b in ("reference", "cpu") if b in rnnkern.backends()]:
        torch.manual_seed(8)
        m = getattr(rnnkern, kind)(2, 3, num_layers=2, backend=backend, hidden_grad_clip=clip)
        x = torch.randn(4, 2, 2, requires_grad=True)
        (m(x)[0] * 1e-41).sum().backward()
        grads = [x.grad] + [p.grad for p in m.parameters()]
        assert all(torch.isfinite(g).all() for g in grads)
        if clip < 1e-45:  # (clipped to norm 2^-149: a few subnormal units at most)
            assert all(g.abs().max() < 1e-43 for g in grads)
        results.append(grads)
    for got, want in zip(results[-1], results[0]):  # (subnormals: equal to a few units of 2^-149)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-44)


_HUGE_CLIP_TARGETS = [("reference", "cpu", None), ("cpu", "cpu", None), ("triton", "cpu", None)] + (
    [pytest.param("cuda", "cuda", kernel, marks=pytest.mark.gpu)
     for kernel in ("step", "persistent", "cluster", "cluster-async", "wide")]
    + [pytest.param("triton", "cuda", None, marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend,device,kernel", _HUGE_CLIP_TARGETS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_clipping_a_float32_gradient_whose_norm_passes_float32s_range(kind, backend, device, kernel,
                                                                       monkeypatch):
    """Finite float32 gradients whose row norm exceeds float32's largest number (exploding gradients,
    what clipping is for): rescaled to norm `clip` as in float64, recorded as inf (before: the cpu and
    reference backends and the CUDA kernels rounded the norm to float32 first, and its scale
    clip / inf = 0 zeroed every gradient through that step)."""
    if rnnkern.backends.get(backend).unsupported_reason(torch.device(device), torch.float32):
        pytest.skip(f"{backend} backend cannot run on {device} float32 here")
    if kernel is not None:
        monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    torch.manual_seed(12)
    x = torch.randn(3, 2, 3)
    upstream = torch.zeros(3, 2, 5)
    upstream[2] = 2e38  # (the last step's rows: norm 4.5e38; finite elements)
    results = []
    for dtype in (torch.float32, torch.float64):
        m = getattr(rnnkern, kind)(3, 5, backend=backend if dtype == torch.float32 else "reference",
                                   record_grad_norms=True, hidden_grad_clip=1.0)
        if results:
            m.load_state_dict(state)
        state = m.state_dict()
        m = m.to(device, dtype)
        xs = x.to(device, dtype).detach().requires_grad_()
        out, _ = m(xs)
        out.backward(upstream.to(device, dtype))
        results.append([xs.grad, *(p.grad for p in m.parameters())])
        assert torch.isinf(m.grad_norms.h_per_sample[0, 0, 2]).all()
    for got, want in zip(*results):
        assert got.abs().max() > 0
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_batch_norms_keep_tiny_and_huge_per_sample_norms():
    """h = sqrt(Σ_b h_per_sample²) in float64: float32 squares lose norms below ~1e-19 (a vanishing
    gradient read 0) and above ~1e19 (inf), where the per-sample norms are exact."""
    g = rnnkern.GradNorms(torch.tensor([3e-30, 4e-30, 3e30, 4e30]).view(1, 1, 2, 2),
                          torch.tensor([6e-25, 8e-25, 1.0, 0.0]).view(1, 1, 2, 2))
    torch.testing.assert_close(g.h, torch.tensor([[[5e-30, 5e30]]]))
    torch.testing.assert_close(g.c, torch.tensor([[[1e-24, 1.0]]]))
    assert g.h.dtype == torch.float32


def test_clip_takes_any_real_number():
    import numpy as np

    m = rnnkern.GRU(3, 4, backend="reference")
    for value in (np.float32(0.5), np.float64(0.5), 1, 0.5):
        m.hidden_grad_clip = value
        m(torch.randn(2, 1, 3))[0].sum().backward()
    for bad in (np.float32(-1.0), True, "1", torch.tensor(0.5)):
        m.hidden_grad_clip = bad
        with pytest.raises(ValueError, match="hidden_grad_clip must be a positive number"):
            m(torch.randn(2, 1, 3))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in rnnkern.backends()])
def test_module_called_twice_in_one_graph_delivers_once_per_call(backend):
    """Each call's recurrence delivers its own norms (the later call's first, as backward runs):
    the hooks see both, grad_norms keeps the first call's."""
    m = rnnkern.GRU(3, 4, backend=backend, record_grad_norms=True)
    seen = []
    m.register_grad_norm_hook(lambda module, gn: seen.append(gn.h_per_sample.shape[2]))
    a, _ = m(torch.randn(5, 2, 3))
    b, _ = m(torch.randn(7, 2, 3))
    (a.sum() + b.sum()).backward()
    assert seen == [7, 5] and m.grad_norms.h_per_sample.shape[2] == 5


@pytest.mark.parametrize("backend,layers", [("cpu", 1), ("cpu", 2), ("reference", 1)])
def test_batched_backward_records_no_norms_and_gets_torch_nns_gradients(backend, layers):
    """A batched backward (is_grads_batched, as jacobian(vectorize=True) runs it) is a backward per
    cotangent under vmap: norms cannot leave it, so it warns, keeps grad_norms and runs no hook, and
    its gradients are torch.nn's (before: an error, or grad_norms left holding a batched tensor)."""
    reference, ours = make_pair("gru", 2, 5, backend=backend, num_layers=layers)
    ours.record_grad_norms = True
    seen = []
    ours.register_grad_norm_hook(lambda module, gn: seen.append(gn))
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    ours(x)[0].sum().backward()  # a plain backward first: its norms must stay
    before = ours.grad_norms
    assert len(seen) == 1
    cotangents = torch.randn(3, 4, 3, 5, dtype=torch.float64)
    expected = torch.autograd.grad(reference(x)[0], x, cotangents, is_grads_batched=True)[0]
    with pytest.warns(UserWarning, match="batched backward"):
        got = torch.autograd.grad(ours(x)[0], x, cotangents, is_grads_batched=True)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert ours.grad_norms is before and len(seen) == 1
    before.h.sum().item()  # (a plain tensor, readable)
    with pytest.warns(UserWarning, match="batched backward"):
        jacobian = torch.autograd.functional.jacobian(lambda t: ours(t)[0], x, vectorize=True)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(lambda t: reference(t)[0], x),
                               rtol=1e-10, atol=1e-12)


def test_unbatched_norms_have_batch_one():
    m = rnnkern.LSTM(3, 4, backend="reference", record_grad_norms=True, bidirectional=True)
    out, _ = m(torch.randn(6, 3))
    out.pow(2).sum().backward()
    assert m.grad_norms.h_per_sample.shape == (1, 2, 6, 1)


def test_vanishing_tanh_vs_lstm_with_forget_bias():
    """The textbook claim, measured: a tanh RNN's ‖∂L/∂h_t‖ decays geometrically away from the
    loss; an LSTM with a positive forget-gate bias keeps it within a few orders of magnitude."""
    torch.manual_seed(0)
    steps, hidden = 80, 32
    x = torch.randn(steps, 4, 8)
    rnn = rnnkern.RNN(8, hidden, record_grad_norms=True)
    lstm = rnnkern.LSTM(8, hidden, record_grad_norms=True)
    with torch.no_grad():
        lstm.bias_ih_l0[hidden:2 * hidden].fill_(5.0)  # forget gate ≈ σ(5) ≈ 0.993
    for m in (rnn, lstm):
        out, _ = m(x)
        out[-1].pow(2).sum().backward()  # the loss sits at the last step only
    rnn_summary, lstm_summary = rnn.grad_norms.summary(), lstm.grad_norms.summary()
    assert rnn_summary["first_last_ratio"] < 1e-8
    assert rnn_summary["decay_per_step"] < 0.85
    assert lstm_summary["first_last_ratio"] > 1e-3
    assert lstm_summary["decay_per_step"] > 0.9


def test_summary_on_constructed_norms():
    decay = 0.8
    curve = torch.tensor([decay ** (9 - t) for t in range(10)], dtype=torch.float32)
    gn = rnnkern.GradNorms(curve.view(1, 1, 10, 1))
    s = gn.summary()
    assert math.isclose(s["decay_per_step"], decay, rel_tol=1e-5)
    assert math.isclose(s["first_last_ratio"], decay ** 9, rel_tol=1e-5)
    assert s["last"] == pytest.approx(1.0) and s["min"] == pytest.approx(decay ** 9)
    # the reverse direction measures distance from t = 0
    gn2 = rnnkern.GradNorms(curve.flip(0).view(1, 1, 10, 1).repeat(1, 2, 1, 1))
    assert math.isclose(gn2.summary(direction=1)["decay_per_step"], decay, rel_tol=1e-5)
    d = gn.to_dict()
    assert d["c"] is None and len(d["h"][0][0]) == 10
    with torch.device("meta"):  # (a default device elsewhere: the fit still runs on the CPU)
        assert gn.summary() == s


def test_which_must_name_h_or_c(monkeypatch):
    """summary/plot's `which` is "h" or "c": another string raises ValueError (before: any other string
    read the c norms); c of a GRU says c exists for LSTM only; plot without matplotlib says what to
    install."""
    import sys

    lstm = rnnkern.GradNorms(torch.rand(1, 1, 4, 2) + 0.1, torch.rand(1, 1, 4, 2) + 0.1)
    gru = rnnkern.GradNorms(torch.rand(1, 1, 4, 2) + 0.1)
    for gn in (lstm, gru):
        for call in (gn.summary, gn.plot):
            with pytest.raises(ValueError, match="which must be 'h' or 'c', not 'H'"):
                call(which="H")
    with pytest.raises(ValueError, match="c norms exist for LSTM only"):
        gru.summary(which="c")
    assert lstm.summary(which="c")["first"] == pytest.approx(float(lstm.c[0, 0, 0]))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # (import then raises ImportError)
    with pytest.raises(ImportError, match="GradNorms.plot needs matplotlib.*rnnkern\\[plot\\]"):
        lstm.plot()


def test_plot_returns_axes(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    gn = rnnkern.GradNorms(torch.rand(2, 2, 7, 3) + 0.1, torch.rand(2, 2, 7, 3) + 0.1)
    ax = gn.plot()
    assert len(ax.get_lines()) == 4
    ax.figure.savefig(tmp_path / "norms.png")
    assert gn.plot(which="c", layer=0, direction=1).get_yscale() == "log"
    last = gn.plot(layer=-1, direction=0).get_lines()[0]
    assert last.get_label() == "layer 1"
    torch.testing.assert_close(torch.tensor(last.get_ydata()), gn.h[1, 0])
    for bad in [dict(layer=2), dict(layer=-3), dict(direction=2)]:
        with pytest.raises(IndexError, match="out of range: these norms have 2"):
            gn.plot(**bad)
    labels = [line.get_label() for line in gn.plot(label="run a", direction=1).get_lines()]
    assert labels == ["run a, layer 0 reverse", "run a, layer 1 reverse"]
    single = gn.plot(label="run a", layer=0, direction=0).get_lines()
    assert [line.get_label() for line in single] == ["run a"]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_tiny_norms_do_not_underflow_in_float32(backend):
    """Vanishing gradients are what the norms are for: ‖g‖ ≈ 1e-25 in float32 (whose squares underflow)
    is recorded, not 0. (On CPU tensors; the CUDA kernels still square in float32: see issue #7.)"""
    if rnnkern.backends.get(backend).unsupported_reason(torch.device("cpu"), torch.float32):
        pytest.skip(f"{backend} backend cannot run on CPU float32 here")
    torch.manual_seed(3)
    m = rnnkern.GRU(3, 5, backend=backend, record_grad_norms=True)
    x = torch.randn(4, 2, 3)
    out, _ = m(x)
    scale = 1e-25
    upstream = torch.randn_like(out) * scale
    out.backward(upstream)
    ref = rnnkern.GRU(3, 5, backend="reference", record_grad_norms=True).double()
    ref.load_state_dict(m.state_dict())
    out_ref, _ = ref(x.double())
    out_ref.backward(upstream.double())
    got, expected = m.grad_norms.h_per_sample, ref.grad_norms.h_per_sample
    assert (got > 0).all() and (expected.double() < 1e-23).all()
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=0)


CPU_BACKEND = "cpu" in rnnkern.backends()
needs_cpu_backend = pytest.mark.skipif(not CPU_BACKEND, reason="the cpu backend (rnnkern._C) is not built")


def _probe_sources(tensor):
    """How many _ProbeSource nodes (rnnkern/_compat.py) `tensor`'s autograd graph holds."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__.startswith("_ProbeSource")
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


def _norms_run(m, form, gen):
    """One forward+backward of `m` (float64, CPU) on fresh input of the given form; returns the probe
    count of the graph, the GradNorms, the hooks' deliveries and every gradient."""
    seen = []
    handle = m.register_grad_norm_hook(lambda module, gn: seen.append(gn))
    lengths = [4, 6, 1, 5]
    if form == "packed":
        seqs = [torch.randn(n, 3, generator=gen, dtype=torch.float64, requires_grad=True) for n in lengths]
        inp = pack_sequence(seqs, enforce_sorted=False)
        leaves = seqs
    else:
        shape = {"padded": (5, 3, 3), "batch_first": (3, 5, 3), "unbatched": (5, 3)}[form]
        inp = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        leaves = [inp]
    m.batch_first = form == "batch_first"
    out, hidden = m(inp)
    count = _probe_sources(out.data if form == "packed" else out)
    out = out.data if form == "packed" else out
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (out, *hidden)]
    sum((t * w).sum() for t, w in zip((out, *hidden), weights)).backward()
    handle.remove()
    grads = [t.grad for t in leaves] + [p.grad for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    return count, m.grad_norms, seen, grads


@needs_cpu_backend
@pytest.mark.parametrize("form", ["padded", "packed", "unbatched", "batch_first"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_one_layer_eager_norms_come_without_a_probe_and_equal_the_probes(cell, form, monkeypatch):
    """An eager call of a one-layer, one-direction module on the cpu backend records norms without a
    probe: its layer's backward hands them over (_compat.NormSink). They are the probe path's exactly
    (the op path, RNNKERN_EAGER_OP=0, takes the probe), delivered once per backward, as are the
    gradients; a stack of two layers still takes the probe."""
    _, m = make_pair(cell, 3, 4, backend="cpu")
    m.record_grad_norms = True
    runs = {}
    for path in ("sink", "probe"):
        monkeypatch.setenv("RNNKERN_EAGER_OP", "1" if path == "sink" else "0")
        runs[path] = _norms_run(m, form, torch.Generator().manual_seed(3))
    (sink_probes, sink_gn, sink_seen, sink_grads), (probe_probes, probe_gn, probe_seen, probe_grads) = \
        runs["sink"], runs["probe"]
    assert (sink_probes, probe_probes) == (0, 1)
    assert len(sink_seen) == len(probe_seen) == 1 and sink_seen[0] is sink_gn
    batch = 1 if form == "unbatched" else (4 if form == "packed" else 3)
    assert sink_gn.h_per_sample.shape == (1, 1, 6 if form == "packed" else 5, batch)
    assert sink_gn.h_per_sample.dtype == torch.float32 and (sink_gn.h_per_sample > 0).any()
    assert torch.equal(sink_gn.h_per_sample, probe_gn.h_per_sample)
    assert torch.equal(sink_gn.h, probe_gn.h)
    if cell == "lstm":
        assert torch.equal(sink_gn.c_per_sample, probe_gn.c_per_sample)
    else:
        assert sink_gn.c_per_sample is None and probe_gn.c_per_sample is None
    for ours, theirs in zip(sink_grads, probe_grads):
        assert torch.equal(ours, theirs)
    monkeypatch.setenv("RNNKERN_EAGER_OP", "1")
    _, stacked = make_pair(cell, 3, 4, backend="cpu", num_layers=2)
    stacked.record_grad_norms = True
    assert _norms_run(stacked, form, torch.Generator().manual_seed(3))[0] == 1


@needs_cpu_backend
def test_one_layer_norms_with_create_graph():
    """create_graph=True (the layer's backward runs with grad mode on): the norms delivered are the
    plain backward's, and differentiating the kernels' gradients still raises."""
    _, m = make_pair("lstm", 3, 4, backend="cpu")
    m.record_grad_norms = True
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.grad(m(x)[0].pow(2).sum(), x)
    plain = m.grad_norms
    first, = torch.autograd.grad(m(x)[0].pow(2).sum(), x, create_graph=True)
    assert m.grad_norms is not plain and not m.grad_norms.h_per_sample.requires_grad
    assert torch.equal(m.grad_norms.h_per_sample, plain.h_per_sample)
    assert torch.equal(m.grad_norms.c_per_sample, plain.c_per_sample)
    with pytest.raises(RuntimeError, match="has no double backward"):
        first.pow(2).sum().backward()


def _compiled_autograd():
    """torch._dynamo.compiled_autograd's context manager with an eager-backend compiler, or None."""
    from torch._dynamo import compiled_autograd

    enable = getattr(compiled_autograd, "_enable", None) or getattr(compiled_autograd, "enable", None)
    return None if enable is None else enable(torch.compile(backend="eager"))


@pytest.mark.parametrize("forward", ["eager", "compiled"])
@pytest.mark.parametrize("backend,layers", [("cpu", 1), ("cpu", 2), ("reference", 1)])
def test_norms_under_compiled_autograd(backend, layers, forward):
    """A backward traced by compiled autograd delivers the norms (once: the hooks run once) and gives
    the gradients of an eager one, with the probe (two layers; the reference backend) and without (one
    layer, cpu), after an eager or a compiled forward. (The probe's None gradients for its anchors used
    to reach compiled autograd's gradient sums and fail there; after a compiled forward, compiled
    autograd's dead-code pass dropped the delivery: no norms, no hooks.)"""
    if backend not in rnnkern.backends():
        pytest.skip(f"the {backend} backend is not built")
    torch._dynamo.reset()
    _, m = make_pair("lstm", 3, 4, backend=backend, num_layers=layers)
    m.record_grad_norms = True
    calls = []
    m.register_grad_norm_hook(lambda module, gn: calls.append(gn))
    call = torch.compile(m, fullgraph=True, backend="aot_eager") if forward == "compiled" else m
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for compiled in (False, True):
        out, _ = (call if compiled else m)(x)
        context = _compiled_autograd() if compiled else None
        if compiled and context is None:
            pytest.skip("this torch has no compiled autograd")
        with context if compiled else torch.enable_grad():
            out.pow(2).sum().backward()
        results.append((m.grad_norms, x.grad.clone(), [p.grad.clone() for p in m.parameters()]))
        x.grad = None
        m.zero_grad(set_to_none=True)
        m.grad_norms = None
    (eager_gn, eager_dx, eager_dw), (compiled_gn, compiled_dx, compiled_dw) = results
    assert compiled_gn is not None and len(calls) == 2
    torch.testing.assert_close(compiled_gn.h_per_sample, eager_gn.h_per_sample)
    torch.testing.assert_close(compiled_gn.c_per_sample, eager_gn.c_per_sample)
    torch.testing.assert_close(compiled_dx, eager_dx)
    for ours, theirs in zip(compiled_dw, eager_dw):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in rnnkern.backends()])
def test_loss_scaling_scales_norms_and_clip_threshold_alike(cell, backend):
    """With torch.amp.GradScaler the backward sees s·∂L/∂h_t. Clipping is positively homogeneous
    (rescaling s·g to s·c is s times rescaling g to c), so a threshold of c·s on the scaled loss
    gives, once unscaled, the gradients of threshold c on the plain loss, and norms s times as large:
    what the README tells GradScaler users to do."""
    gen = torch.Generator().manual_seed(31)
    _, model = make_pair(cell, 3, 5, backend=backend, dtype=torch.float32, num_layers=2)
    model.record_grad_norms = True
    x = torch.randn(7, 3, 3, generator=gen)
    target = torch.randn(7, 3, 5, generator=gen)
    clip = 0.05
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    runs = []
    for scaled in (False, True):
        model.zero_grad()
        model.hidden_grad_clip = clip * scaler.get_scale() if scaled else clip
        loss = (model(x)[0] - target).pow(2).sum()
        (scaler.scale(loss) if scaled else loss).backward()
        if scaled:
            scaler.unscale_(opt)
        runs.append(([p.grad.clone() for p in model.parameters()], model.grad_norms.h_per_sample))
    (plain, plain_norms), (unscaled, scaled_norms) = runs
    assert plain_norms.min() < clip < plain_norms.max()  # the clip bites at some steps, not all
    torch.testing.assert_close(scaled_norms, plain_norms * scaler.get_scale(), rtol=1e-5, atol=0)
    for got, want in zip(unscaled, plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
