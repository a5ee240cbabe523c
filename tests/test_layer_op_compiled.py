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
