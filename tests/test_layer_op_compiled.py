"""Op-level tests of the compiled backends (cpu: csrc/cpu, cuda: csrc/cuda).

Each backend's ``layer`` (docs/internals.md) is compared with
  * an unrolled autograd oracle written here (per-step PyTorch ops on the packed rows, norms and
    clipping through tensor hooks on h_t / c_t), itself checked against torch.nn;
  * torch.nn single-layer modules directly (outputs, final states, every gradient);
  * the reference backend, when it exists on this branch;
and checked with torch.autograd.gradcheck and torch.library.opcheck.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rnnkern import _cells, _ext
from rnnkern.backends import get as get_backend

pytestmark = pytest.mark.skipif(_ext.unavailable_reason() is not None,
                                reason=str(_ext.unavailable_reason()))

CELLS = [_cells.LSTM, _cells.GRU, _cells.RNN_TANH, _cells.RNN_RELU]
CELL_IDS = [_cells.NAMES[c] for c in CELLS]
HAS_GPU = torch.cuda.is_available() and _ext.has_cuda_kernels()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and rnnkern's CUDA kernels")
needs_clusters = pytest.mark.skipif(not HAS_GPU or torch.cuda.get_device_capability()[0] < 9,
                                    reason="thread-block clusters need an sm_90 GPU")


# ---------------------------------------------------------------------------------------------
# Cases
def make_case(cell, *, T=5, B=3, H=4, P=0, packed=False, bias=True, dtype=torch.float64,
              device="cpu", seed=0, input_scale=1.0):
    """Random layer-op inputs. packed: distinct lengths 1..T (longest first), so the batch shrinks."""
    gen = torch.Generator().manual_seed(seed)
    G = _cells.GATES[cell]
    Pe = P if P > 0 else H
    if packed:
        lengths = sorted([T] + [int(torch.randint(1, T + 1, (1,), generator=gen)) for _ in range(B - 1)],
                         reverse=True)
    else:
        lengths = [T] * B
    batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)], dtype=torch.long)
    N = int(batch_sizes.sum())

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    k = 1.0 / math.sqrt(H)
    case = dict(
        cell=cell,
        xp=rnd(N, G * H, scale=input_scale),
        batch_sizes=batch_sizes,
        h0=rnd(B, Pe, scale=0.5),
        c0=rnd(B, H, scale=0.5) if cell == _cells.LSTM else None,
        w_hh=rnd(G * H, Pe, scale=k),
        b_hh=rnd(G * H, scale=k) if bias else None,
        w_hr=rnd(P, H, scale=k) if P > 0 else None,
    )
    grads = dict(
        grad_out=rnd(N, Pe),
        grad_h_n=rnd(B, Pe),
        grad_c_n=rnd(B, H) if cell == _cells.LSTM else None,
    )
    return case, grads, lengths


DIFF_KEYS = ["xp", "h0", "c0", "w_hh", "b_hh", "w_hr"]


def leaves(case):
    """A copy of the case whose float tensors are fresh leaves requiring grad."""
    out = dict(case)
    for key in DIFF_KEYS:
        if case[key] is not None:
            out[key] = case[key].detach().clone().requires_grad_(True)
    return out


# ---------------------------------------------------------------------------------------------
# The oracle: the recurrence unrolled with autograd, on rows, with norm/clip hooks.
def oracle_layer(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip):
    """Returns out, h_n, c_n and norms [2, N] (filled in by the backward's hooks)."""
    bs = batch_sizes.tolist()
    T = len(bs)
    offsets = [sum(bs[:t]) for t in range(T)]
    N = sum(bs)
    G = _cells.GATES[cell]
    H = w_hh.shape[0] // G
    norms = torch.zeros(2, N, dtype=torch.float64)
    outs = [None] * T
    cs = [None] * T

    def h_hook(t):
        def hook(g):
            n = g.detach().double().norm(dim=1)
            norms[0, offsets[t]:offsets[t] + bs[t]] = n
            if clip is not None and clip > 0:
                scale = torch.where(n > clip, clip / n, torch.ones_like(n))
                return g * scale.to(g.dtype)[:, None]
            return g
        return hook

    def c_hook(t):
        def hook(g):
            norms[1, offsets[t]:offsets[t] + bs[t]] = g.detach().double().norm(dim=1)
        return hook

    order = range(T - 1, -1, -1) if reverse else range(T)
    prev = None
    for t in order:
        rows = bs[t]
        n_prev = 0 if prev is None else min(rows, bs[prev])
        h_prev = torch.cat([outs[prev][:n_prev], h0[n_prev:rows]]) if n_prev else h0[:rows]
        x = xp[offsets[t]:offsets[t] + rows]
        hp = h_prev @ w_hh.t()
        if b_hh is not None:
            hp = hp + b_hh
        if cell == _cells.LSTM:
            c_prev = torch.cat([cs[prev][:n_prev], c0[n_prev:rows]]) if n_prev else c0[:rows]
            i, f, g, o = (x + hp).chunk(4, dim=1)
            c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                h = h @ w_hr.t()
            if c.requires_grad:
                c.register_hook(c_hook(t))
            cs[t] = c
        elif cell == _cells.GRU:
            xr, xz, xn = x.chunk(3, dim=1)
            hr, hz, hn = hp.chunk(3, dim=1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (1 - z) * n + z * h_prev
        else:
            pre = x + hp
            h = torch.tanh(pre) if cell == _cells.RNN_TANH else torch.relu(pre)
        if h.requires_grad:
            h.register_hook(h_hook(t))
        outs[t] = h
        prev = t
    out = torch.cat(outs) if T else xp.new_zeros(0, h0.shape[1])
    # Final states: forward direction, sample b ends at its last step; reverse, at t = 0.
    h_parts, c_parts = [], []
    if reverse or T == 0:
        h_parts, c_parts = [outs[0]] if T else [h0], [cs[0]] if T else [c0]
    else:
        for t in range(T):
            lo = bs[t + 1] if t + 1 < T else 0
            h_parts.append(outs[t][lo:])
            c_parts.append(cs[t][lo:] if cell == _cells.LSTM else None)
        h_parts, c_parts = h_parts[::-1], c_parts[::-1]
    h_n = torch.cat(h_parts)
    c_n = torch.cat(c_parts) if cell == _cells.LSTM else xp.new_zeros(0)
    return out, h_n, c_n, norms


def run_layer(layer_fn, case, grads, reverse, clip, record=True):
    """Forward + backward of one implementation; returns outputs, gradients and norms [2, N]."""
    c = leaves(case)
    N = c["xp"].shape[0]
    probe = torch.zeros(2, N, dtype=torch.float32, device=c["xp"].device, requires_grad=True) if record else None
    result = layer_fn(c["cell"], c["xp"], c["batch_sizes"], c["h0"], c["c0"], c["w_hh"], c["b_hh"],
                      c["w_hr"], reverse, clip, probe)
    out, h_n, c_n = result[:3]
    loss = (out * grads["grad_out"]).sum() + (h_n * grads["grad_h_n"]).sum()
    if case["cell"] == _cells.LSTM:
        loss = loss + (c_n * grads["grad_c_n"]).sum()
    loss.backward()
    res = {"out": out.detach(), "h_n": h_n.detach(), "c_n": c_n.detach()}
    for key in DIFF_KEYS:
        if c[key] is not None:
            res["grad_" + key] = c[key].grad
    if len(result) > 3:  # the oracle returns its norms
        res["norms"] = result[3].float()
    elif probe is not None:
        res["norms"] = probe.grad if probe.grad is not None else torch.zeros_like(probe)
    return res


def oracle_fn(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, probe):
    return oracle_layer(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip)


def backend_fn(name):
    return get_backend(name).layer


def assert_results_close(got, want, *, rtol, atol, keys=None):
    keys = keys or want.keys()
    for key in keys:
        assert key in got, key
        g, w = got[key].detach().cpu().double(), want[key].detach().cpu().double()
        assert g.shape == w.shape, (key, g.shape, w.shape)
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{key}: {m}")


def pick_clip(case, grads, reverse):
    """A clip value between the smallest and the largest unclipped norm, so both cases occur."""
    ref = run_layer(oracle_fn, case, grads, reverse, 0.0)
    n = ref["norms"][0]
    return float(n.median())


# ---------------------------------------------------------------------------------------------
# CPU: the main comparison sweep (float64, ~1e-10)
SWEEP = list(itertools.product(CELLS, [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("cell,reverse,packed,bias", SWEEP,
                         ids=[f"{_cells.NAMES[c]}-{'rev' if r else 'fwd'}-{'packed' if p else 'padded'}-"
                              f"{'bias' if b else 'nobias'}" for c, r, p, b in SWEEP])
@pytest.mark.parametrize("clipping", [False, True], ids=["noclip", "clip"])
def test_cpu_matches_oracle(cell, reverse, packed, bias, clipping):
    case, grads, _ = make_case(cell, T=6, B=5, H=7, packed=packed, bias=bias, seed=hash((cell, reverse, packed)) % 1000)
    clip = pick_clip(case, grads, reverse) if clipping else 0.0
    want = run_layer(oracle_fn, case, grads, reverse, clip)
    got = run_layer(backend_fn("cpu"), case, grads, reverse, clip)
    assert_results_close(got, want, rtol=1e-10, atol=1e-10)
    if clipping:  # the clip really bit on some rows and not on others
        n = want["norms"][0]
        assert (n > clip).any() and (n < clip).any()


def _to(case, device, dtype=None):
    """The floating-point tensors of a case (or grads) on `device`, in `dtype` if given."""
    def conv(v):
        if torch.is_tensor(v) and v.is_floating_point():
            v = v.to(device)
            return v.to(dtype) if dtype is not None else v
        return v
    return {k: conv(v) for k, v in case.items()}


# Sequences shorter than 8 steps read the recurrent weights transposed in place, longer ones through a
# transposed copy, or in float32 packed by MKL (csrc/cpu/layer_driver.cpp, StepWeight): both sides of
# that length.
STEP_COUNTS = [5, 9]


@pytest.mark.parametrize("T", STEP_COUNTS)
@pytest.mark.parametrize("reverse,packed", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("clipping", [False, True], ids=["noclip", "clip"])
def test_cpu_lstm_projection_matches_oracle(reverse, packed, clipping, T):
    case, grads, _ = make_case(_cells.LSTM, T=T, B=4, H=9, P=5, packed=packed, seed=7)
    clip = pick_clip(case, grads, reverse) if clipping else 0.0
    want = run_layer(oracle_fn, case, grads, reverse, clip)
    got = run_layer(backend_fn("cpu"), case, grads, reverse, clip)
    assert_results_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cpu_float32_and_vector_tails(cell):
    """float32 and a hidden size with a vector body and a scalar tail (H = 37)."""
    case, grads, _ = make_case(cell, T=4, B=3, H=37, packed=True, seed=3)
    clip = pick_clip(case, grads, False)
    want = run_layer(oracle_fn, case, grads, False, clip)
    case32, grads32 = _to(case, "cpu", torch.float32), _to(grads, "cpu", torch.float32)
    got = run_layer(backend_fn("cpu"), case32, grads32, False, clip)
    assert_results_close(got, want, rtol=1e-4, atol=1e-5)


# (T, RNNKERN_CPU_PACKED_WEIGHTS): below 8 steps the weights as they are; from there packed by MKL (=1:
# at every size; by default only large weights, test_cpu_float32_packed_weights_by_default), or (=0, and
# where torch's BLAS has no packing) a transposed copy
STEP_WEIGHTS = [(STEP_COUNTS[0], "auto"), (STEP_COUNTS[1], "1"), (STEP_COUNTS[1], "0")]


@pytest.mark.parametrize("T,pack", STEP_WEIGHTS, ids=["short", "packed", "copy"])
@pytest.mark.parametrize("split", ["0", "1"], ids=["allrows", "split"])
@pytest.mark.parametrize("reverse,packed", list(itertools.product([False, True], [False, True])))
@pytest.mark.parametrize("cell,P", [(c, 0) for c in CELLS] + [(_cells.LSTM, 6)],
                         ids=CELL_IDS + ["lstm-proj"])
def test_cpu_float32_per_step_products(cell, P, reverse, packed, split, T, pack, monkeypatch):
    """float32 per-step products (BLAS sgemm, the weights read transposed in place, from a transposed
    copy or packed by MKL) and kernels for every step size met (packed input shrinks), in both
    directions, with a projection, on one range of samples or per thread (the sample split): against
    the float64 oracle."""
    monkeypatch.setenv("RNNKERN_CPU_SAMPLE_SPLIT", split)
    monkeypatch.setenv("RNNKERN_CPU_PACKED_WEIGHTS", pack)
    case, grads, _ = make_case(cell, T=T, B=9, H=21, P=P, packed=packed, seed=13)
    clip = pick_clip(case, grads, reverse)
    want = run_layer(oracle_fn, case, grads, reverse, clip)
    case32, grads32 = _to(case, "cpu", torch.float32), _to(grads, "cpu", torch.float32)
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))  # the split needs two threads to happen
    try:
        got = run_layer(backend_fn("cpu"), case32, grads32, reverse, clip)
    finally:
        torch.set_num_threads(old)
    assert_results_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cpu_float32_packed_weights_by_default(cell, monkeypatch):
    """W_hh large enough to be packed by default (128K elements or more: csrc/cpu/layer_cpu.cpp), in a
    packed sequence (its batch shrinks): against the float64 oracle."""
    monkeypatch.delenv("RNNKERN_CPU_PACKED_WEIGHTS", raising=False)
    H = {_cells.LSTM: 182, _cells.GRU: 210}.get(cell, 363)  # G * H * H >= 2**17
    case, grads, _ = make_case(cell, T=9, B=3, H=H, packed=True, seed=5)
    clip = pick_clip(case, grads, False)
    want = run_layer(oracle_fn, case, grads, False, clip)
    case32, grads32 = _to(case, "cpu", torch.float32), _to(grads, "cpu", torch.float32)
    got = run_layer(backend_fn("cpu"), case32, grads32, False, clip)
    assert_results_close(got, want, rtol=2e-4, atol=2e-5)


def _relu_of_a_denormal_state():
    """The bits of relu(0.5 * h0) of one step over 8 samples (each OpenMP thread its own, with
    RNNKERN_CPU_SAMPLE_SPLIT=1) whose h0 is a float32 denormal: 0 where flushed, not 0 where kept.
    (Bits: under flush-denormal the calling thread's own float comparisons would read a denormal
    as 0.)"""
    B, H, T = 8, 16, 3
    out = torch.ops.rnnkern.rnn_layer_forward(_cells.RNN_RELU, torch.zeros(T * B, H),
                                              torch.full((T,), B, dtype=torch.long),
                                              torch.full((B, H), 1e-39), None, 0.5 * torch.eye(H), None,
                                              None, False, 0.0, None)[0]
    return out[:B].view(torch.int32)


def test_cpu_flush_denormal_reaches_every_thread(monkeypatch):
    """torch.set_flush_denormal(True) sets the mode of the calling thread only; the CPU ops hand it to
    the OpenMP workers that run parts of the time loop (here: each thread its own samples), so that
    every row flushes alike (denormals are what vanishing gradients become, and cost ~100 cycles per
    operation). Switching it off again reaches them too."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-denormal mode")
    monkeypatch.setenv("RNNKERN_CPU_SAMPLE_SPLIT", "1")
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        assert (_relu_of_a_denormal_state() != 0).all()  # flushing off: every row keeps its denormal
        torch.set_flush_denormal(True)
        assert (_relu_of_a_denormal_state() == 0).all()  # on: every thread's rows flush
        torch.set_flush_denormal(False)
        assert (_relu_of_a_denormal_state() != 0).all()  # off again, on every thread
    finally:
        torch.set_flush_denormal(False)
        _relu_of_a_denormal_state()
        torch.set_num_threads(old)


def test_cpu_flush_denormal_reaches_a_second_python_threads_workers():
    """OpenMP keeps a team of workers per calling thread: a second Python thread's ops hand its mode
    to its own workers, also after the main thread handed the same mode to its team (the mode handed
    on was remembered once per process: the second thread's workers kept their denormals, and the
    samples they ran recorded norms of ~1e-38 where the main thread's read 0)."""
    import threading

    import rnnkern

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-denormal mode")
    old = torch.get_num_threads()

    def vanishing_norms():
        torch.manual_seed(3)
        m = rnnkern.RNN(5, 64, backend="cpu", record_grad_norms=True)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.3)
        x = torch.randn(300, 16, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
        m(x)[0][-1].sum().backward()
        return m.grad_norms.h_per_sample, x.grad

    seen, team_started, go = {}, threading.Event(), threading.Event()

    def second_thread():
        try:
            torch.set_num_threads(max(2, old))
            torch.set_flush_denormal(False)
            vanishing_norms()  # this thread's team, told "off"
            team_started.set()
            go.wait(120)
            torch.set_flush_denormal(True)
            seen["second"] = vanishing_norms()
        finally:
            torch.set_flush_denormal(False)
            team_started.set()

    torch.set_num_threads(max(2, old))
    thread = threading.Thread(target=second_thread)
    try:
        thread.start()
        team_started.wait(120)
        torch.set_flush_denormal(True)
        seen["main"] = vanishing_norms()  # the main thread's team, told "on"
        go.set()
        thread.join(120)
        (norms, dx), (norms_2, dx_2) = seen["main"], seen["second"]
        assert (norms == 0).any() and (norms[norms > 0] >= torch.finfo(torch.float32).tiny).all()
        assert torch.equal(norms_2, norms) and torch.equal(dx_2, dx)
    finally:
        go.set()
        torch.set_flush_denormal(False)
        torch.set_num_threads(old)


def test_cpu_norms_not_recorded():
    """record_norms=False: the norms output is all zeros, and clipping still applies."""
    case, grads, _ = make_case(_cells.LSTM, T=4, B=3, H=5, seed=11)
    clip = pick_clip(case, grads, False)
    want = run_layer(oracle_fn, case, grads, False, clip)
    got = run_layer(backend_fn("cpu"), case, grads, False, clip, record=False)
    assert_results_close(got, want, rtol=1e-10, atol=1e-10, keys=[k for k in want if k != "norms"])
    c = leaves(case)
    out, h_n, c_n, ws = torch.ops.rnnkern.rnn_layer_forward(
        c["cell"], c["xp"], c["batch_sizes"], c["h0"], c["c0"], c["w_hh"], c["b_hh"], None, False, clip, None)
    norms = torch.ops.rnnkern.rnn_layer_backward(
        c["cell"], grads["grad_out"], grads["grad_h_n"], grads["grad_c_n"], c["batch_sizes"], c["h0"],
        c["c0"], c["w_hh"], c["b_hh"], None, False, clip, False, out.detach(), ws.detach())[-1]
    assert norms.shape == (2, out.shape[0]) and norms.dtype == torch.float32
    assert (norms == 0).all()


# ---------------------------------------------------------------------------------------------
# The oracle and the cpu backend against torch.nn itself
def _torch_module(cell, H, P, bias, reverse):
    G = _cells.GATES[cell]
    kw = dict(input_size=G * H, hidden_size=H, bias=bias, bidirectional=reverse, dtype=torch.float64)
    if cell == _cells.LSTM:
        return torch.nn.LSTM(proj_size=P, **kw)
    if cell == _cells.GRU:
        return torch.nn.GRU(**kw)
    return torch.nn.RNN(nonlinearity="tanh" if cell == _cells.RNN_TANH else "relu", **kw)


def torch_nn_fn(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, probe):
    """The layer op through a torch.nn module: W_ih = I, b_ih = 0 (so its input is xp); the reverse
    direction is the second half of a bidirectional module whose forward half is ignored."""
    G = _cells.GATES[cell]
    H = w_hh.shape[0] // G
    P = w_hr.shape[0] if w_hr is not None else 0
    m = _torch_module(cell, H, P, b_hh is not None, reverse)
    sfx = "_reverse" if reverse else ""
    params = {n: p for n, p in m.named_parameters()}
    for name in list(params):
        delattr(m, name)
    for name, p in params.items():
        setattr(m, name, p.detach().clone())
    setattr(m, "weight_ih_l0" + sfx, torch.eye(G * H, dtype=xp.dtype))
    setattr(m, "weight_hh_l0" + sfx, w_hh)
    if b_hh is not None:
        setattr(m, "bias_ih_l0" + sfx, torch.zeros(G * H, dtype=xp.dtype))
        setattr(m, "bias_hh_l0" + sfx, b_hh)
    if w_hr is not None:
        setattr(m, "weight_hr_l0" + sfx, w_hr)
    D = 2 if reverse else 1
    h0_full = torch.cat([torch.zeros_like(h0)[None]] * (D - 1) + [h0[None]])
    packed = torch.nn.utils.rnn.PackedSequence(xp, batch_sizes)
    if cell == _cells.LSTM:
        c0_full = torch.cat([torch.zeros_like(c0)[None]] * (D - 1) + [c0[None]])
        out, (h_n, c_n) = m(packed, (h0_full, c0_full))
        c_n = c_n[-1]
    else:
        out, h_n = m(packed, h0_full)
        c_n = xp.new_zeros(0)
    Pe = h0.shape[1]
    return out.data[:, -Pe:], h_n[-1], c_n


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("reverse,packed", list(itertools.product([False, True], [False, True])))
def test_oracle_and_cpu_match_torch_nn(cell, reverse, packed):
    case, grads, _ = make_case(cell, T=5, B=4, H=6, packed=packed, seed=5)
    want = run_layer(torch_nn_fn, case, grads, reverse, 0.0, record=False)
    oracle = run_layer(oracle_fn, case, grads, reverse, 0.0)
    got = run_layer(backend_fn("cpu"), case, grads, reverse, 0.0)
    keys = [k for k in want if k != "norms"]
    assert_results_close(oracle, want, rtol=1e-10, atol=1e-10, keys=keys)
    assert_results_close(got, want, rtol=1e-10, atol=1e-10, keys=keys)


@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_lstm_projection_matches_torch_nn(reverse):
    case, grads, _ = make_case(_cells.LSTM, T=5, B=4, H=6, P=3, packed=True, seed=9)
    want = run_layer(torch_nn_fn, case, grads, reverse, 0.0, record=False)
    got = run_layer(backend_fn("cpu"), case, grads, reverse, 0.0)
    assert_results_close(got, want, rtol=1e-10, atol=1e-10, keys=[k for k in want if k != "norms"])


def _reference_backend():
    try:
        return get_backend("reference")
    except (ImportError, ModuleNotFoundError):
        return None


@pytest.mark.skipif(_reference_backend() is None, reason="the reference backend is not on this branch yet")
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_matches_reference_backend(cell, reverse):
    case, grads, _ = make_case(cell, T=5, B=4, H=6, P=3 if cell == _cells.LSTM else 0, packed=True, seed=13)
    clip = pick_clip(case, grads, reverse)
    want = run_layer(backend_fn("reference"), case, grads, reverse, clip)
    got = run_layer(backend_fn("cpu"), case, grads, reverse, clip)
    assert_results_close(got, want, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Edge cases
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("batch_sizes,B", [([], 2), ([], 0), ([0, 0, 0], 0)], ids=["T0", "T0B0", "B0"])
def test_cpu_zero_size(cell, batch_sizes, B):
    G, H = _cells.GATES[cell], 3
    bs = torch.tensor(batch_sizes, dtype=torch.long)
    xp = torch.randn(0, G * H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, H, dtype=torch.float64, requires_grad=True) if cell == _cells.LSTM else None
    w_hh = torch.randn(G * H, H, dtype=torch.float64, requires_grad=True)
    b_hh = torch.randn(G * H, dtype=torch.float64, requires_grad=True)
    probe = torch.zeros(2, 0, requires_grad=True)
    out, h_n, c_n = get_backend("cpu").layer(cell, xp, bs, h0, c0, w_hh, b_hh, None, False, 0.5, probe)
    assert out.shape == (0, H) and h_n.shape == (B, H)
    torch.testing.assert_close(h_n, h0.detach())
    if c0 is not None:
        torch.testing.assert_close(c_n, c0.detach())
    else:
        assert c_n.shape == (0,)
    g = torch.randn(B, H, dtype=torch.float64)
    loss = (h_n * g).sum() + out.sum() + (c_n.sum() if c0 is not None else 0)
    loss.backward()
    torch.testing.assert_close(h0.grad, g)
    assert (w_hh.grad == 0).all() and (b_hh.grad == 0).all() and xp.grad.shape == xp.shape
    if c0 is not None:
        torch.testing.assert_close(c0.grad, torch.ones_like(c0))


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cpu_nan_propagates_like_oracle(cell):
    case, grads, _ = make_case(cell, T=4, B=3, H=5, seed=17)
    case["xp"] = case["xp"].clone()
    case["xp"][4, 1] = float("nan")  # step 1, sample 1
    clip = 0.5
    want = run_layer(oracle_fn, case, grads, False, clip)
    got = run_layer(backend_fn("cpu"), case, grads, False, clip)
    assert torch.isnan(want["out"]).any()
    assert_results_close(got, want, rtol=1e-10, atol=1e-10)


def test_cpu_rejects_bad_input():
    case, _, _ = make_case(_cells.LSTM, T=3, B=2, H=4)
    with pytest.raises(RuntimeError, match="xp must be"):
        torch.ops.rnnkern.rnn_layer_forward(0, case["xp"][:, :5], case["batch_sizes"], case["h0"], case["c0"],
                                            case["w_hh"], case["b_hh"], None, False, 0.0, None)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.rnnkern.rnn_layer_forward(0, case["xp"], case["batch_sizes"], case["h0"].float(), case["c0"],
                                            case["w_hh"], case["b_hh"], None, False, 0.0, None)
    assert "supports float32, float64, float16 and bfloat16, not torch.int32" in \
        get_backend("cpu").unsupported_reason(torch.device("cpu"), torch.int32)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert get_backend("cpu").unsupported_reason(torch.device("cpu"), dtype) is None
    assert "CPU tensors" in get_backend("cpu").unsupported_reason(torch.device("cuda"), torch.float32)


# ---------------------------------------------------------------------------------------------
# gradcheck and opcheck
def _op_args(case, reverse=False, clip=0.0, probe=None):
    return (case["cell"], case["xp"], case["batch_sizes"], case["h0"], case["c0"], case["w_hh"],
            case["b_hh"], case["w_hr"], reverse, clip, probe)


GRADCHECK_CASES = [(c, r, p, 0) for c in CELLS for r in (False, True) for p in (False, True)] + [
    (_cells.LSTM, False, True, 2), (_cells.LSTM, True, True, 2)]


@pytest.mark.parametrize("cell,reverse,packed,P", GRADCHECK_CASES,
                         ids=[f"{_cells.NAMES[c]}-{'rev' if r else 'fwd'}-{'packed' if p else 'padded'}-P{P}"
                              for c, r, p, P in GRADCHECK_CASES])
def test_cpu_gradcheck(cell, reverse, packed, P):
    case, _, _ = make_case(cell, T=3, B=3, H=3, P=P, packed=packed, seed=21)
    c = leaves(case)
    names = [k for k in DIFF_KEYS if c[k] is not None]

    def fn(*tensors):
        kw = dict(c)
        kw.update(zip(names, tensors))
        out, h_n, c_n = get_backend("cpu").layer(*_op_args(kw, reverse))
        return out, h_n, c_n

    assert torch.autograd.gradcheck(fn, tuple(c[k] for k in names), eps=1e-6, atol=1e-7)


def _opcheck_cases(device, dtype=torch.float64):
    cases = []
    for cell, P in [(_cells.LSTM, 0), (_cells.LSTM, 2), (_cells.GRU, 0), (_cells.RNN_TANH, 0), (_cells.RNN_RELU, 0)]:
        case, grads, _ = make_case(cell, T=4, B=3, H=4, P=P, packed=True, dtype=dtype, device=device, seed=31)
        cases.append((case, grads))
    return cases


def _run_opcheck(device, dtype=torch.float64):
    fwd = torch.ops.rnnkern.rnn_layer_forward.default
    bwd = torch.ops.rnnkern.rnn_layer_backward.default
    for case, grads in _opcheck_cases(device, dtype):
        c = leaves(case)
        N = c["xp"].shape[0]
        probe = torch.zeros(2, N, device=device, requires_grad=True)
        torch.library.opcheck(fwd, _op_args(c, reverse=True, clip=0.7, probe=probe))
        out, h_n, c_n, ws = fwd(*_op_args(case, reverse=True, clip=0.7))
        bargs = (case["cell"], grads["grad_out"], grads["grad_h_n"], grads["grad_c_n"], case["batch_sizes"],
                 case["h0"], case["c0"], case["w_hh"], case["b_hh"], case["w_hr"], True, 0.7, True, out, ws)
        torch.library.opcheck(bwd, bargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["fp64", "bf16", "fp16"])
def test_cpu_opcheck(dtype):
    _run_opcheck("cpu", dtype)


def test_cpu_threads_agree():
    """The parallel pointwise pass gives the same result with one thread as with several."""
    case, grads, _ = make_case(_cells.LSTM, T=4, B=64, H=64, packed=True, dtype=torch.float32, seed=41)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_layer(backend_fn("cpu"), case, grads, False, 0.0)
        torch.set_num_threads(max(2, old))
        many = run_layer(backend_fn("cpu"), case, grads, False, 0.0)
    finally:
        torch.set_num_threads(old)
    assert_results_close(many, one, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# GPU (cuda backend)
GPU_SWEEP = list(itertools.product(CELLS, [False, True], [False, True]))


def _assert_cuda_matches_oracle(case, grads, reverse, clip, tol=1e-10, dtype=None):
    """The CUDA backend (on the case converted to `dtype`, if given) against the float64 oracle."""
    want = run_layer(oracle_fn, case, grads, reverse, clip)
    got = run_layer(backend_fn("cuda"), _to(case, "cuda", dtype), _to(grads, "cuda", dtype), reverse, clip)
    assert_results_close(got, want, rtol=tol, atol=tol)


@gpu
@needs_gpu
@pytest.mark.parametrize("cell,reverse,packed", GPU_SWEEP,
                         ids=[f"{_cells.NAMES[c]}-{'rev' if r else 'fwd'}-{'packed' if p else 'padded'}"
                              for c, r, p in GPU_SWEEP])
@pytest.mark.parametrize("clipping", [False, True], ids=["noclip", "clip"])
def test_cuda_float64_matches_oracle(cell, reverse, packed, clipping):
    case, grads, _ = make_case(cell, T=6, B=5, H=37, P=0, packed=packed, seed=51)
    clip = pick_clip(case, grads, reverse) if clipping else 0.0
    _assert_cuda_matches_oracle(case, grads, reverse, clip)


PERSISTENT_KERNELS = ["persistent", "cluster", "cluster-async", "wide"]
# csrc/cuda/persistent.h, enum Exchange (plan[8]) of each kernel on clusters.
EXCHANGE = {"cluster": 0, "cluster-async": 1, "wide": 2}


@gpu
@needs_gpu
@pytest.mark.parametrize("kernel", PERSISTENT_KERNELS)
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("B,H", [(37, 37), (3, 5)], ids=["B37-H37", "B3-H5"])
@pytest.mark.parametrize("clipping", [True, False], ids=["clip", "noclip"])
def test_cuda_persistent_kernels_float64(kernel, cell, reverse, B, H, clipping, monkeypatch):
    """Each persistent kernel, forced, against the oracle: packed lengths, clipping, and shapes that
    leave some blocks without hidden units (grid kernels: H = 37 over 16 blocks of 3, H = 5 over 4
    blocks of 2; cluster kernels: H = 37 in 10 of 16 blocks of 4 units, the last one part-filled; wide:
    the last block part-filled) and, for the kernels on clusters, several batch tiles (B = 37: 10 tiles
    of 4 rows or 5 of 8 where the device runs that many clusters at once, else 3 of 13). With and without
    clipping: the kernels on clusters exchange the norms before the cell only to clip (without, one
    exchange per backward step). The plan must accept the layer: a silent
    fallback to the per-step kernels would test nothing."""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    plan = torch.ops.rnnkern.cuda_kernel_plan(cell, torch.float64, B, H, False, torch.cuda.current_device())
    if kernel in EXCHANGE and torch.cuda.get_device_capability()[0] < 9:
        assert not plan[0]
        pytest.skip("the kernels on clusters need sm_90")
    assert plan[0], plan
    # the kernel asked for, not another one: clusters (plan[7]) and their exchange (plan[8])
    assert (plan[7] > 0, plan[8]) == (kernel in EXCHANGE, EXCHANGE.get(kernel, 0)), plan
    case, grads, _ = make_case(cell, T=7, B=B, H=H, P=0, packed=True, seed=65)
    clip = pick_clip(case, grads, reverse) if clipping else 0.0
    _assert_cuda_matches_oracle(case, grads, reverse, clip)


@gpu
@needs_clusters
@pytest.mark.parametrize("kernel", ["cluster", "cluster-async", "wide"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cuda_cluster_tf32(kernel, cell, monkeypatch):
    """float32 with torch's TF32 matmuls allowed and a cluster kernel forced: the plan takes TF32
    tensor cores (plan[9]); every result within TF32's precision of the float64 oracle (normalised
    error <= 1e-2: a wrong fragment layout errs by O(1)), and `out` (the recurrence alone: xp is an
    input) measurably less exact than the exact float32 kernel's (TF32 rounding did happen)."""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    B, H = 13, 37
    case, grads, _ = make_case(cell, T=8, B=B, H=H, P=0, packed=True, seed=67)
    clip = pick_clip(case, grads, False)
    want = run_layer(oracle_fn, case, grads, False, clip)
    c32, g32 = _to(case, "cuda", torch.float32), _to(grads, "cuda", torch.float32)
    exact = run_layer(backend_fn("cuda"), c32, g32, False, clip)  # TF32 off (conftest's _no_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        plan = torch.ops.rnnkern.cuda_kernel_plan(cell, torch.float32, B, H, False, torch.cuda.current_device())
        assert plan[0] and plan[7] > 0 and plan[9] == 1, plan
        got = run_layer(backend_fn("cuda"), c32, g32, False, clip)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    keys = [k for k in want if want[k].numel() > 0]
    scale = {k: want[k].abs().max().item() or 1.0 for k in keys}
    err = {k: v / scale[k] for k, v in _max_err(got, want, keys).items()}
    exact_err = {k: v / scale[k] for k, v in _max_err(exact, want, keys).items()}
    assert all(e <= 1e-2 for e in err.values()), err
    assert err["out"] > 10 * exact_err["out"], (err["out"], exact_err["out"])


@gpu
@needs_gpu
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("clipping", [False, True], ids=["noclip", "clip"])
def test_cuda_lstm_projection_float64(reverse, clipping):
    case, grads, _ = make_case(_cells.LSTM, T=6, B=5, H=40, P=17, packed=True, seed=53)
    clip = pick_clip(case, grads, reverse) if clipping else 0.0
    _assert_cuda_matches_oracle(case, grads, reverse, clip)


@gpu
@needs_gpu
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cuda_large_hidden_float64(cell):
    """A hidden size larger than one block's threads, and a batch larger than one row per block."""
    case, grads, _ = make_case(cell, T=3, B=70, H=1100, packed=True, seed=55)
    clip = pick_clip(case, grads, False)
    _assert_cuda_matches_oracle(case, grads, False, clip, tol=1e-9)


@gpu
@needs_gpu
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("P", [0, 5])
def test_cuda_float32_matches_oracle(cell, P):
    if P and cell != _cells.LSTM:
        pytest.skip("projection is LSTM only")
    case, grads, _ = make_case(cell, T=8, B=6, H=64, P=P, packed=True, seed=57)
    clip = pick_clip(case, grads, True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _assert_cuda_matches_oracle(case, grads, True, clip, tol=1e-5, dtype=torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _max_err(res, want, keys):
    return {k: (res[k].detach().cpu().double() - want[k].detach().cpu().double()).abs().max().item() for k in keys}


@gpu
@needs_gpu
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_16bit_error_within_torch_nn(cell, dtype):
    """16-bit: the error against a float64 oracle is at most 2x torch.nn's own 16-bit error (plus a
    floor of a few units of the dtype's resolution). ReLU: a pre-activation within rounding of 0 can
    land on the other side of the kink than in the oracle, in our kernels or in cuDNN, and its gradient
    is then 0 on one side only; which units flip is chance, so there at most 5 % of the elements may
    exceed that bound (a flipped unit is one row of grad_w_hh, 1.6 %); a real error breaks most."""
    case, grads, _ = make_case(cell, T=8, B=8, H=64, packed=False, seed=59)
    _assert_16bit_within_torch_nn(cell, dtype, case, grads)


def _assert_16bit_within_torch_nn(cell, dtype, case, grads, device="cuda"):
    """test_cuda_16bit_error_within_torch_nn's criterion for one case (packed or padded), for the
    backend of the device's name (cuda; cpu) against torch.nn on the same device."""
    want = run_layer(oracle_fn, case, grads, False, 0.0)
    lo_case, lo_grads = _to(case, device, dtype), _to(grads, device, dtype)
    got = run_layer(backend_fn(device), lo_case, lo_grads, False, 0.0)
    nn_res = run_layer(torch_nn_fn_cuda, lo_case, lo_grads, False, 0.0, record=False)
    keys = [k for k in nn_res if k not in ("norms", "c_n") or (k == "c_n" and cell == _cells.LSTM)]
    ours, theirs = _max_err(got, want, keys), _max_err(nn_res, want, keys)
    floor = 4 * torch.finfo(dtype).eps
    for k in keys:
        if cell == _cells.RNN_RELU:
            diff = (got[k].detach().cpu().double() - want[k].detach().cpu().double()).abs()
            beyond = int((diff > 2 * theirs[k] + floor).sum())
            assert beyond <= 0.05 * diff.numel(), (k, beyond, diff.numel(), ours[k], theirs[k])
        else:
            assert ours[k] <= 2 * theirs[k] + floor, (k, ours[k], theirs[k])
    # norms in 16-bit: close to the float64 ones (bfloat16 has 3 fewer mantissa bits than float16)
    tol = 3e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(got["norms"].cpu().double(), want["norms"].double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_16bit_error_within_torch_nn(dtype, cell, packed):
    """The cpu backend in float16 and bfloat16 (rows in the layer's dtype; the gate math, workspace and
    cell state in float, as on the GPU): test_cuda_16bit_error_within_torch_nn's criterion against
    torch.nn's own 16-bit error on the CPU."""
    case, grads, _ = make_case(cell, T=8, B=8, H=64, packed=packed, seed=61)
    _assert_16bit_within_torch_nn(cell, dtype, case, grads, device="cpu")


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_16bit_clipping_reverse_projection(dtype, cell):
    """The cpu backend in 16 bits with what torch.nn cannot compare: clipping (a small clip, so that it
    changes every gradient), the reverse direction, packed rows and (LSTM) a projection, against the
    float64 oracle within the dtype's error; the 16-bit run and the float64 one differ by far less than
    clipping changes."""
    P = 5 if cell == _cells.LSTM else 0
    case, grads, _ = make_case(cell, T=7, B=5, H=24, P=P, packed=True, seed=67)
    want = run_layer(oracle_fn, case, grads, True, 0.05)
    unclipped = run_layer(oracle_fn, case, grads, True, 0.0)
    got = run_layer(backend_fn("cpu"), _to(case, "cpu", dtype), _to(grads, "cpu", dtype), True, 0.05)
    tol = 3e-2 if dtype == torch.float16 else 1e-1
    if cell == _cells.RNN_RELU:  # (kink flips: see test_cuda_16bit_error_within_torch_nn)
        keys = ["out", "h_n", "norms"]
    else:
        keys = [k for k in want if want[k].numel() > 0]
    scale = {k: max(1.0, want[k].abs().max().item()) for k in keys}
    for k in keys:
        err = (got[k].detach().double() - want[k].double()).abs().max().item() / scale[k]
        assert err <= tol, (k, err)
    changed = (unclipped["grad_xp"] - want["grad_xp"]).abs().max().item()
    assert changed > 3 * tol * max(1.0, want["grad_xp"].abs().max().item()), changed


@gpu
@needs_clusters
@pytest.mark.parametrize("kernel", ["cluster", "cluster-async"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("capped", [False, True], ids=["smaller-clusters", "larger-tiles"])
def test_cuda_cluster_large_batch(kernel, dtype, cell, capped, monkeypatch):
    """A batch that needs more clusters of 16-row tiles than the device runs at once (H = 64, float16 on
    clusters of 8 blocks, float64 on clusters of 16). How many the device runs depends on it (and on
    the kernels' registers and shared memory: an H100 runs 19 or more clusters of 8 of the float16 LSTM,
    two blocks per SM), so the batch is found from the plan itself: the smallest number of 16-row tiles
    that with the cluster size fixed (RNNKERN_CLUSTER_BLOCKS) no longer all fit, less 3 rows (an odd
    last tile). By default the plan keeps 16-row tiles on smaller clusters (more of W_hh per block),
    all resident; with the cluster size fixed it takes larger tiles instead (30 rows or more: two MMA
    row tiles per block; float64: 29 or 50 rows on the FMA register tiles). Against the oracle (float64
    at 1e-10; float16 within torch.nn's own error, as test_cuda_16bit_error_within_torch_nn)."""
    device, H, cap = torch.cuda.current_device(), 64, (8 if dtype == torch.float16 else 16)
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    monkeypatch.setenv("RNNKERN_CLUSTER_BLOCKS", str(cap))
    for tiles_of_16 in range(2, 257):
        plan = torch.ops.rnnkern.cuda_kernel_plan(cell, dtype, 16 * tiles_of_16, H, False, device)
        assert plan[0] and plan[7] == cap, plan
        if plan[2] // plan[7] < tiles_of_16:
            break
    else:
        raise AssertionError(f"256 tiles of 16 rows on clusters of {cap} all resident: {plan}")
    B = 16 * tiles_of_16 - 3
    if not capped:
        monkeypatch.delenv("RNNKERN_CLUSTER_BLOCKS")
    plan = torch.ops.rnnkern.cuda_kernel_plan(cell, dtype, B, H, False, device)
    assert plan[0] and plan[7] > 0, plan
    tiles = plan[2] // plan[7]
    if capped:
        assert tiles < tiles_of_16 and plan[7] == cap, (B, plan)  # tiles of more than 16 rows
    else:
        assert tiles == tiles_of_16 and plan[7] < cap, (B, plan)  # smaller clusters
    case, grads, _ = make_case(cell, T=6, B=B, H=H, P=0, packed=True, seed=71)
    if dtype == torch.float64:
        clip = pick_clip(case, grads, True)
        _assert_cuda_matches_oracle(case, grads, True, clip)
    else:
        _assert_16bit_within_torch_nn(cell, dtype, case, grads)


@gpu
@needs_clusters
@pytest.mark.parametrize("dtype,B,H", [(torch.float64, 20, 300), (torch.float32, 37, 300),
                                       (torch.float16, 37, 600), (torch.float16, 200, 600)],
                         ids=["fp64-B20-H300", "fp32-B37-H300", "fp16-B37-H600", "fp16-B200-H600"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cuda_wide(dtype, B, H, cell, monkeypatch):
    """RNNKERN_CUDA_KERNEL=wide (Exchange::Grid): layers spread over more blocks than one cluster holds,
    exchanging through L2 (the forward's h_t as tagged words, the backward's partials with grid
    barriers), on each product path (float64 and float32 FMA register
    tiles, float16 tensor cores), with several batch tiles (B = 20: 2 tiles; 37: 3; 200: for the LSTM
    and GRU fewer tiles of more than 16 rows, i.e. two or more MMA row tiles, since 13 tiles of 16 would
    leave each too few blocks), packed lengths, reverse direction and clipping. float16 LSTM at H = 600
    is a layer the cluster kernels decline (W_hh too large for one cluster). Against the oracle: float64
    at 1e-10, float32 at 1e-4 (H = 300 products), float16 within torch.nn's own error."""
    device = torch.cuda.current_device()
    if dtype == torch.float16 and cell == _cells.LSTM:
        monkeypatch.setenv("RNNKERN_CUDA_KERNEL", "cluster")
        assert not torch.ops.rnnkern.cuda_kernel_plan(cell, dtype, B, H, False, device)[0]
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", "wide")
    plan = torch.ops.rnnkern.cuda_kernel_plan(cell, dtype, B, H, False, device)
    assert plan[0] and plan[8] == EXCHANGE["wide"] and plan[7] > 1, plan  # several blocks per tile
    if B == 200 and cell in (_cells.LSTM, _cells.GRU):
        assert plan[2] // plan[7] < -(-B // 16), plan  # tiles of more than 16 rows
    case, grads, _ = make_case(cell, T=6, B=B, H=H, P=0, packed=True, seed=73)
    if dtype == torch.float16:
        _assert_16bit_within_torch_nn(cell, dtype, case, grads)
        return
    clip = pick_clip(case, grads, True)
    _assert_cuda_matches_oracle(case, grads, True, clip, tol=1e-10 if dtype == torch.float64 else 1e-4, dtype=dtype)


@gpu
@needs_clusters
@pytest.mark.parametrize("dtype,B,H", [(torch.float64, 20, 300), (torch.float16, 37, 600)],
                         ids=["fp64-B20-H300", "fp16-B37-H600"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cuda_wide_forward_with_grid_barriers(dtype, B, H, cell, monkeypatch):
    """RNNKERN_WIDE_EXCHANGE=barrier: the wide forward hands h_t on through `out` and a grid barrier
    every step (what the tagged words replace; kept to measure one against the other), as
    test_cuda_wide checks the default; an unknown value is an error."""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", "wide")
    monkeypatch.setenv("RNNKERN_WIDE_EXCHANGE", "barrier")
    case, grads, _ = make_case(cell, T=6, B=B, H=H, P=0, packed=True, seed=79)
    if dtype == torch.float16:
        _assert_16bit_within_torch_nn(cell, dtype, case, grads)
    else:
        _assert_cuda_matches_oracle(case, grads, True, pick_clip(case, grads, True), tol=1e-10, dtype=dtype)
    monkeypatch.setenv("RNNKERN_WIDE_EXCHANGE", "sometimes")
    with pytest.raises(RuntimeError, match="RNNKERN_WIDE_EXCHANGE must be tagged or barrier"):
        run_layer(backend_fn("cuda"), _to(case, "cuda", dtype), _to(grads, "cuda", dtype), False, 0.0)


@gpu
@needs_clusters
@pytest.mark.parametrize("kernel", ["cluster", "cluster-async"])
@pytest.mark.parametrize("clipping", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("cell,B,packed", [(_cells.GRU, 16, False), (_cells.LSTM, 8, True)], ids=["gru", "lstm"])
def test_cuda_cluster_single_copy(kernel, clipping, cell, B, packed, monkeypatch):
    """Layers whose backward has room for one copy of its exchanged buffers only (Plan::copies = 1,
    plan[10]: float64 GRU B=16 and LSTM B=8 (packed: rows vary by step; Σ dc² on the inbox's one
    copy) at H=280 on clusters of 16 blocks), where the norms are exchanged before the cell with or
    without clipping; against the float64 oracle, norms included. (Tiles of 16 rows: float64's default
    of 4 would leave room for two copies.)"""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    monkeypatch.setenv("RNNKERN_TILE_ROWS", "16")
    H = 280
    plan = torch.ops.rnnkern.cuda_kernel_plan(cell, torch.float64, B, H, False, torch.cuda.current_device())
    assert plan[0] and plan[7] == 16 and plan[10] == 1, plan
    case, grads, _ = make_case(cell, T=6, B=B, H=H, P=0, packed=packed, seed=75)
    clip = pick_clip(case, grads, False) if clipping else 0.0
    _assert_cuda_matches_oracle(case, grads, False, clip)


@gpu
@needs_clusters
@pytest.mark.parametrize("kernel", ["cluster", "cluster-async"])
@pytest.mark.parametrize("blocks", [1, 2, 4])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("clipping", [True, False], ids=["clip", "noclip"])
def test_cuda_cluster_blocks(kernel, blocks, cell, clipping, monkeypatch):
    """RNNKERN_CLUSTER_BLOCKS caps the blocks of a cluster (float64 H=37: one block of 40 units, two
    of 20, four of 12, the last part-filled; B=13 packed): the plan takes that many (plan[7]), and the
    results match the float64 oracle, norms included. One block exchanges nothing with another."""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    monkeypatch.setenv("RNNKERN_CLUSTER_BLOCKS", str(blocks))
    B, H = 13, 37
    plan = torch.ops.rnnkern.cuda_kernel_plan(cell, torch.float64, B, H, False, torch.cuda.current_device())
    assert plan[0] and plan[7] == blocks and plan[8] == EXCHANGE[kernel], plan
    case, grads, _ = make_case(cell, T=7, B=B, H=H, P=0, packed=True, seed=77)
    clip = pick_clip(case, grads, True) if clipping else 0.0
    _assert_cuda_matches_oracle(case, grads, True, clip)


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="rnnkern was built without its CUDA kernels")
@pytest.mark.parametrize("value", ["3", "32", "0", "four", "2x"])
def test_cuda_cluster_blocks_rejects_bad_values(value, monkeypatch):
    """RNNKERN_CLUSTER_BLOCKS other than a power of two from 1 to 16 is an error naming the variable,
    not a silent default (the plan is made without a GPU too: it then declines)."""
    monkeypatch.setenv("RNNKERN_CLUSTER_BLOCKS", value)
    with pytest.raises(RuntimeError, match="RNNKERN_CLUSTER_BLOCKS must be 1, 2, 4, 8 or 16"):
        torch.ops.rnnkern.cuda_kernel_plan(_cells.LSTM, torch.float16, 16, 256, False, 0)
    monkeypatch.setenv("RNNKERN_CLUSTER_BLOCKS", "4")
    torch.ops.rnnkern.cuda_kernel_plan(_cells.LSTM, torch.float16, 16, 256, False, 0)


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="rnnkern was built without its CUDA kernels")
@pytest.mark.parametrize("value", ["3", "128", "0", "eight", "8x"])
def test_cuda_tile_rows_rejects_bad_values(value, monkeypatch):
    """RNNKERN_TILE_ROWS other than a power of two from 1 to 64 is an error naming the variable."""
    monkeypatch.setenv("RNNKERN_TILE_ROWS", value)
    with pytest.raises(RuntimeError, match="RNNKERN_TILE_ROWS must be 1, 2, 4, 8, 16, 32 or 64"):
        torch.ops.rnnkern.cuda_kernel_plan(_cells.LSTM, torch.float32, 16, 256, False, 0)
    monkeypatch.setenv("RNNKERN_TILE_ROWS", "4")
    torch.ops.rnnkern.cuda_kernel_plan(_cells.LSTM, torch.float32, 16, 256, False, 0)


@gpu
@needs_clusters
@pytest.mark.parametrize("kernel", ["cluster", "cluster-async"])
@pytest.mark.parametrize("dtype,rows,B,tile", [(torch.float32, 0, 16, 4), (torch.float32, 2, 7, 2),
                                                (torch.float16, 0, 16, 8), (torch.float16, 4, 13, 4)],
                         ids=["fp32-default", "fp32-2rows", "fp16-default", "fp16-4rows"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cuda_cluster_small_tiles(kernel, dtype, rows, B, tile, cell, monkeypatch):
    """Batch tiles below 16 rows on clusters of several blocks: exact float32's default (B = 16: four
    tiles of 4), RNNKERN_TILE_ROWS=2 (B = 7: 4 tiles, the last of one row), float16's default (B = 16:
    two tiles of 8) and float16 tiles of 4 rows (B = 13), each 16-bit tile padded to one 16-row
    tensor-core tile; packed lengths, clipping. Against the oracle: float32 at 1e-4, float16 within
    torch.nn's own error."""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    if rows:
        monkeypatch.setenv("RNNKERN_TILE_ROWS", str(rows))
    H = 64
    plan = torch.ops.rnnkern.cuda_kernel_plan(cell, dtype, B, H, False, torch.cuda.current_device())
    assert plan[0] and plan[7] > 1 and plan[2] // plan[7] == -(-B // tile), plan
    case, grads, _ = make_case(cell, T=6, B=B, H=H, P=0, packed=True, seed=79)
    if dtype == torch.float16:
        _assert_16bit_within_torch_nn(cell, dtype, case, grads)
        return
    clip = pick_clip(case, grads, True)
    _assert_cuda_matches_oracle(case, grads, True, clip, tol=1e-4, dtype=dtype)


def torch_nn_fn_cuda(cell, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, probe):
    """torch_nn_fn on the inputs' device and dtype (cuDNN on CUDA; on the CPU, ATen's 16-bit paths)."""
    G = _cells.GATES[cell]
    H = w_hh.shape[0] // G
    m = _torch_module(cell, H, 0, b_hh is not None, False).to(device=xp.device, dtype=xp.dtype)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.eye(G * H))
        if b_hh is not None:
            m.bias_ih_l0.zero_()
    params = {n: p for n, p in m.named_parameters()}
    for name in list(params):
        delattr(m, name)
    for name, p in params.items():
        setattr(m, name, p.detach())
    m.weight_hh_l0 = w_hh
    if b_hh is not None:
        m.bias_hh_l0 = b_hh
    packed = torch.nn.utils.rnn.PackedSequence(xp, batch_sizes)
    if cell == _cells.LSTM:
        out, (h_n, c_n) = m(packed, (h0[None], c0[None]))
        c_n = c_n[0]
    else:
        out, h_n = m(packed, h0[None])
        c_n = xp.new_zeros(0)
    return out.data, h_n[0], c_n


@gpu
@needs_gpu
def test_cuda_opcheck():
    _run_opcheck("cuda")
    _run_opcheck("cuda", torch.float32)


@gpu
@needs_gpu
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_cuda_zero_size_and_streams(cell):
    G, H = _cells.GATES[cell], 3
    for batch_sizes, B in [([], 2), ([0, 0], 0)]:
        bs = torch.tensor(batch_sizes, dtype=torch.long)
        h0 = torch.randn(B, H, device="cuda", dtype=torch.float64)
        c0 = torch.randn(B, H, device="cuda", dtype=torch.float64) if cell == _cells.LSTM else None
        out, h_n, c_n = get_backend("cuda").layer(
            cell, torch.randn(0, G * H, device="cuda", dtype=torch.float64), bs, h0, c0,
            torch.randn(G * H, H, device="cuda", dtype=torch.float64), None, None, False, 0.0, None)
        assert out.shape == (0, H)
        torch.testing.assert_close(h_n, h0)
    # A side stream: results equal the default stream's.
    case, grads, _ = make_case(cell, T=5, B=4, H=33, packed=True, seed=61)
    cuda_case, cuda_grads = _to(case, "cuda"), _to(grads, "cuda")
    base = run_layer(backend_fn("cuda"), cuda_case, cuda_grads, False, 0.0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side = run_layer(backend_fn("cuda"), cuda_case, cuda_grads, False, 0.0)
    torch.cuda.current_stream().wait_stream(stream)
    # cuBLAS guarantees bitwise reproducibility only per stream; the step kernels are deterministic.
    assert_results_close(side, base, rtol=1e-12, atol=1e-12)


@gpu
@needs_gpu
def test_cuda_deterministic_norms():
    case, grads, _ = make_case(_cells.LSTM, T=5, B=9, H=300, packed=True, dtype=torch.float32, device="cuda", seed=63)
    a = run_layer(backend_fn("cuda"), case, grads, False, 0.0)
    b = run_layer(backend_fn("cuda"), case, grads, False, 0.0)
    assert torch.equal(a["norms"], b["norms"])
