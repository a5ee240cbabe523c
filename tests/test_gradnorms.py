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


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in rnnkern.backends()])
def test_norms_delivered_whatever_inputs_a_backward_asks_for(backend):
    """A backward that asks autograd for some inputs only (torch.autograd.grad(..., inputs), or
    backward(inputs=...)) still delivers the latest norms, of the whole stack: the same as a full
    backward's."""
    torch.manual_seed(5)
    m = rnnkern.LSTM(3, 4, num_layers=2, backend=backend, record_grad_norms=True)
    x = torch.randn(5, 2, 3, requires_grad=True)
    h0, c0 = torch.randn(2, 2, 4, requires_grad=True), torch.randn(2, 2, 4)
    out, _ = m(x, (h0, c0))
    (out * out).sum().backward(retain_graph=True)
    full = m.grad_norms
    for ask in ([m.weight_hh_l1], [h0], [m.weight_ih_l0]):
        m.grad_norms = None
        torch.autograd.grad((out * out).sum(), ask, retain_graph=True)
        assert m.grad_norms is not None and m.grad_norms is not full
        for name in ("h_per_sample", "c_per_sample"):
            torch.testing.assert_close(getattr(m.grad_norms, name), getattr(full, name))
    previous = m.grad_norms
    out, _ = m(10 * x, (h0, c0))
    (out * out).sum().backward(inputs=[m.weight_hh_l1])
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


def test_module_called_twice_in_one_graph_delivers_once_per_call():
    """Each call's recurrence delivers its own norms (the later call's first, as backward runs):
    the hooks see both, grad_norms keeps the first call's."""
    m = rnnkern.GRU(3, 4, backend="reference", record_grad_norms=True)
    seen = []
    m.register_grad_norm_hook(lambda module, gn: seen.append(gn.h_per_sample.shape[2]))
    a, _ = m(torch.randn(5, 2, 3))
    b, _ = m(torch.randn(7, 2, 3))
    (a.sum() + b.sum()).backward()
    assert seen == [7, 5] and m.grad_norms.h_per_sample.shape[2] == 5


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


def test_plot_returns_axes(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    gn = rnnkern.GradNorms(torch.rand(2, 2, 7, 3) + 0.1, torch.rand(2, 2, 7, 3) + 0.1)
    ax = gn.plot()
    assert len(ax.get_lines()) == 4
    ax.figure.savefig(tmp_path / "norms.png")
    assert gn.plot(which="c", layer=0, direction=1).get_yscale() == "log"


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
