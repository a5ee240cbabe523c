"""rnnkern modules against torch.nn with the same state_dict: every option, every backend.

One suite, parametrised over the `target` fixture (backend, device, dtype) of conftest.py, so every
backend that lands runs all of it.
"""

import copy
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkern
from conftest import SLOW_ON_CPU, TOLERANCE, make_pair
from rnnkern.functional import concurrent_directions, layer_wavefront_steps

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
KINDS = ["padded", "packed_sorted", "packed_unsorted", "unbatched"]


def _configs():
    """Every kind × layers × direction, with batch_first / bias / hx / proj varied across them."""
    out = []
    for i, (kind, layers, bidir) in enumerate(itertools.product(KINDS, (1, 2), (False, True))):
        out.append(dict(kind=kind, num_layers=layers, bidirectional=bidir,
                        batch_first=bool(i % 2), bias=(i % 3 != 2), hx=(i % 4 < 2),
                        proj=(i % 2 == 0)))
    return out


CONFIGS = _configs()


def _case_id(cfg):
    return "".join([cfg["kind"], f"-L{cfg['num_layers']}",
                    "-bi" if cfg["bidirectional"] else "", "-bf" if cfg["batch_first"] else "",
                    "-nobias" if not cfg["bias"] else "", "-hx" if cfg["hx"] else "",
                    "-proj" if cfg["proj"] else ""])


def _skip_if_reduced(target, index):
    """Interpreted backends on the CPU run every fourth case (all kinds and cells stay covered)."""
    name, device, _ = target
    if device == "cpu" and name in SLOW_ON_CPU and index % 4 != 0:
        pytest.skip("reduced set for an interpreted backend on CPU (full set: on GPU)")


def _inputs(cell, cfg, mod, device, dtype, gen):
    """Random input (padded/packed/unbatched), optional hx, and the batch lengths."""
    steps, batch, isize = 5, 3, mod.input_size
    lengths = [5, 4, 2]
    if cfg["kind"] == "packed_unsorted":
        lengths = [2, 5, 4]
    x = torch.randn(steps, batch, isize, generator=gen, dtype=torch.float64).to(device, dtype)
    if cfg["kind"] == "unbatched":
        x = x[:, 0]
    elif cfg["batch_first"]:
        x = x.transpose(0, 1).contiguous()
    layers_dirs = mod.num_layers * (2 if mod.bidirectional else 1)
    real = mod.proj_size if mod.proj_size > 0 else mod.hidden_size
    hx = None
    if cfg["hx"]:
        shape_b = () if cfg["kind"] == "unbatched" else (batch,)
        h0 = torch.randn(layers_dirs, *shape_b, real, generator=gen, dtype=torch.float64).to(device, dtype)
        hx = h0
        if cell == "lstm":
            c0 = torch.randn(layers_dirs, *shape_b, mod.hidden_size, generator=gen,
                             dtype=torch.float64).to(device, dtype)
            hx = (h0, c0)
    return x, hx, lengths


def _run(mod, x, hx, cfg, lengths):
    """Forward through `mod`; returns (flat outputs list, leaf inputs list) for comparison."""
    x = x.detach().clone().requires_grad_(True)
    leaves = [x]
    if hx is not None:
        hx = tuple(t.detach().clone().requires_grad_(True) for t in hx) if isinstance(hx, tuple) \
            else hx.detach().clone().requires_grad_(True)
        leaves += list(hx) if isinstance(hx, tuple) else [hx]
    inp = x
    if cfg["kind"].startswith("packed"):
        inp = pack_padded_sequence(x, lengths, batch_first=cfg["batch_first"],
                                   enforce_sorted=cfg["kind"] == "packed_sorted")
    out, hidden = mod(inp) if hx is None else mod(inp, hx)
    if cfg["kind"].startswith("packed"):
        out, _ = pad_packed_sequence(out, batch_first=cfg["batch_first"])
    hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return [out] + hidden, leaves


def _assert_close(actual, expected, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.to(expected.dtype).cpu(), expected.cpu(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_case_id(c) for c in CONFIGS])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_torch_nn(target, cell, cfg):
    """Outputs, final states and every gradient equal torch.nn's (float64 at 1e-10)."""
    _skip_if_reduced(target, CONFIGS.index(cfg) + CELLS.index(cell))
    name, device, dtype = target
    gen = torch.Generator().manual_seed(1234 + CONFIGS.index(cfg))
    torch.manual_seed(CONFIGS.index(cfg))
    kwargs = dict(num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"],
                  batch_first=cfg["batch_first"], bias=cfg["bias"])
    if cell == "lstm" and cfg["proj"]:
        kwargs["proj_size"] = 2
    ref, ours = make_pair(cell, 3, 4, backend=name, dtype=torch.float64, device=device, **kwargs)
    ours.to(dtype)
    x, hx, lengths = _inputs(cell, cfg, ref, device, torch.float64, gen)
    ref_outs, ref_leaves = _run(ref, x, hx, cfg, lengths)
    cast = (lambda t: t.to(dtype)) if dtype != torch.float64 else (lambda t: t)
    hx_ours = None if hx is None else (tuple(map(cast, hx)) if isinstance(hx, tuple) else cast(hx))
    our_outs, our_leaves = _run(ours, cast(x), hx_ours, cfg, lengths)
    for what, a, e in zip(["output", "h_n", "c_n"], our_outs, ref_outs):
        assert a.shape == e.shape and a.dtype == dtype
        _assert_close(a, e, dtype, what)
    upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device) for o in ref_outs]
    torch.autograd.backward(ref_outs, upstream)
    torch.autograd.backward(our_outs, [cast(u) for u in upstream])
    for i, (a, e) in enumerate(zip(our_leaves, ref_leaves)):
        _assert_close(a.grad, e.grad, dtype, f"grad of input {i}")
    ref_params = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        _assert_close(p.grad, ref_params[pname].grad, dtype, f"grad of {pname}")


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_between_layers(target, cell):
    """Training-mode dropout: the same RNG draws as torch.nn's CPU implementation (on a GPU: as the
    reference backend's); eval: none."""
    name, device, dtype = target
    _skip_if_reduced(target, CELLS.index(cell))
    ref, ours = make_pair(cell, 3, 5, backend=name, num_layers=3, dropout=0.4, dtype=torch.float64,
                          device=device)
    if device != "cpu":
        # torch.nn's CUDA dropout (cuDNN) draws other random numbers than its CPU one: compare with
        # rnnkern's reference backend on the same device instead (same driver, so the same draws;
        # its layers match torch.nn's in test_matches_torch_nn).
        _, ref = make_pair(cell, 3, 5, backend="reference", num_layers=3, dropout=0.4,
                           dtype=torch.float64, device=device)
        ref.load_state_dict(ours.state_dict())
    ours.to(dtype)
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=device)
    torch.manual_seed(7)
    expected = ref(x)[0]
    torch.manual_seed(7)
    actual = ours(x.to(dtype))[0]
    _assert_close(actual, expected, dtype, "training output")
    ref.eval(), ours.eval()
    _assert_close(ours(x.to(dtype))[0], ref(x)[0], dtype, "eval output")
    assert not torch.allclose(actual.double(), ours(x.to(dtype))[0].double())  # dropout did act


@pytest.mark.parametrize("cell", CELLS)
def test_zero_batch(target, cell):
    """An empty batch gives torch.nn's empty outputs and gradients."""
    name, device, dtype = target
    ref, ours = make_pair(cell, 3, 4, backend=name, num_layers=2, dtype=dtype, device=device)
    x = torch.randn(3, 0, 3, dtype=dtype, device=device, requires_grad=True)
    out, hidden = ours(x)
    ref_out, ref_hidden = ref(x)
    assert out.shape == ref_out.shape
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    ref_hidden = ref_hidden if isinstance(ref_hidden, tuple) else (ref_hidden,)
    assert [h.shape for h in hidden] == [h.shape for h in ref_hidden]
    (out.sum() + sum(h.sum() for h in hidden)).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(target, cell):
    """torch.autograd.gradcheck through the whole module in float64 (bidirectional, 2 layers)."""
    name, device, dtype = target
    if dtype != torch.float64:
        pytest.skip(f"gradcheck needs float64; {name} runs {dtype} here")
    if device == "cpu" and name in SLOW_ON_CPU:
        pytest.skip("hundreds of interpreted forwards; the op-level gradcheck of "
                    "test_layer_op_triton.py covers this backend on CPU, this test covers it on GPU")
    kwargs = dict(num_layers=2, bidirectional=True)
    if cell == "lstm":
        kwargs["proj_size"] = 2
    _, ours = make_pair(cell, 2, 3, backend=name, dtype=dtype, device=device, **kwargs)
    names = [n for n, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in ours.parameters()]
    x = torch.randn(3, 2, 2, dtype=dtype, device=device, requires_grad=True)

    def fn(x, *ps):
        out, hidden = torch.func.functional_call(ours, dict(zip(names, ps)), (x,))
        hidden = hidden if isinstance(hidden, tuple) else (hidden,)
        return (out,) + hidden

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)


def _second_derivatives(module, x, h0):
    """A gradient penalty's gradients: d/d(x, h0, parameters) of |d(out²)/dx|² + |d(out²)/dh0|² + Σout."""
    hx = (h0, h0.cos()) if isinstance(module, torch.nn.LSTM) else h0
    out = module(x, hx)[0]
    first = torch.autograd.grad(out.pow(2).sum(), [x, h0], create_graph=True)
    penalty = first[0].pow(2).sum() + first[1].pow(2).sum() + out.sum()
    return [f.detach() for f in first] + list(torch.autograd.grad(penalty, [x, h0, *module.parameters()]))


@pytest.mark.parametrize("cell", CELLS)
def test_double_backward(target, cell):
    """Second derivatives (create_graph=True, e.g. a gradient penalty or meta-learning), as torch.nn's CPU
    layers have them: the reference backend's layers are differentiable PyTorch ops; the cpu and cuda
    backends' eager calls recompute the layer with them for a backward with grad mode on (their kernels'
    backward is not differentiable): gradgradcheck in float64 and the same second derivatives as the
    reference backend. Where that is not done (Triton's op; a layer recording norms or clipping, whose
    backward of the backward would record and clip the two paths to h_t apart), differentiating the
    gradients raises, by torch.autograd.grad or .backward(), never a silently incomplete second
    derivative. The first-order gradients are the same with create_graph."""
    name, device, dtype = target
    _, ours = make_pair(cell, 2, 3, backend=name, num_layers=2, dtype=dtype, device=device)
    x = torch.randn(4, 2, 2, dtype=dtype, device=device, requires_grad=True)
    plain, = torch.autograd.grad(ours(x)[0].pow(2).sum(), x)
    first, = torch.autograd.grad(ours(x)[0].pow(2).sum(), x, create_graph=True)
    _assert_close(first.detach(), plain, dtype, "first-order gradient with create_graph")
    if name in ("reference", "cpu", "cuda"):
        if dtype == torch.float64:
            assert torch.autograd.gradgradcheck(lambda t: ours(t)[0], (x,))
        reference = copy.deepcopy(ours)
        reference.backend = "reference"
        h0 = torch.randn(2, 2, 3, dtype=dtype, device=device, requires_grad=True)
        for got, want in zip(_second_derivatives(ours, x, h0), _second_derivatives(reference, x, h0)):
            _assert_close(got, want, dtype, "second derivative")
        if name == "reference":
            return
        first.add_(1.0)  # (the gradients are no views: changeable in place, as torch.nn's)
        ours.record_grad_norms = True
        message = "has no double backward while it records gradient norms or clips"
        first, = torch.autograd.grad(ours(x)[0].pow(2).sum(), x, create_graph=True)
    else:
        message = "has no double backward"
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(first.pow(2).sum(), x, retain_graph=True)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(first.pow(2).sum(), ours.weight_hh_l0, retain_graph=True)
    with pytest.raises(RuntimeError, match=message):
        first.pow(2).sum().backward(retain_graph=True)
    # a derivative w.r.t. the incoming gradient (torch.autograd.functional.jvp's double-backward trick)
    ours.record_grad_norms, ours.hidden_grad_clip = False, 0.5
    u = torch.ones_like(ours(x)[0], requires_grad=True)
    through_u, = torch.autograd.grad(ours(x)[0], x, u, create_graph=True)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(through_u.sum(), u, allow_unused=True)
    first.add_(1.0)  # (the gradients are no views: changeable in place, as torch.nn's)


# Both directions of a bidirectional layer at once (rnnkern/functional.py, concurrent_directions): the
# reverse direction's forward, and through autograd its backward, on a side stream.
_CUDA_BACKEND = torch.cuda.is_available() and "cuda" in rnnkern.backends()
BIDIRECTIONAL = [c for c in CONFIGS if c["bidirectional"]]


def test_concurrent_directions_only_when_asked(monkeypatch):
    """Off by default, never for CPU tensors or one direction."""
    rows = torch.randn(4, 3)
    monkeypatch.setenv("RNNKERN_CONCURRENT_DIRECTIONS", "1")
    assert not concurrent_directions(rows, 2)
    if torch.cuda.is_available():
        assert concurrent_directions(rows.cuda(), 2) and not concurrent_directions(rows.cuda(), 1)
        monkeypatch.delenv("RNNKERN_CONCURRENT_DIRECTIONS")
        assert not concurrent_directions(rows.cuda(), 2)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA_BACKEND, reason="needs a CUDA GPU and rnnkern's CUDA kernels")
@pytest.mark.parametrize("kernel", ["step", "cluster-async"])
@pytest.mark.parametrize("cfg", BIDIRECTIONAL, ids=[_case_id(c) for c in BIDIRECTIONAL])
@pytest.mark.parametrize("cell", CELLS)
def test_concurrent_directions_match_torch_nn(cell, cfg, kernel, monkeypatch):
    """test_matches_torch_nn (float64) with the directions on two streams, on the per-step and on a
    persistent recurrence."""
    monkeypatch.setenv("RNNKERN_CONCURRENT_DIRECTIONS", "1")
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    test_matches_torch_nn(("cuda", "cuda", torch.float64), cell, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA_BACKEND, reason="needs a CUDA GPU and rnnkern's CUDA kernels")
@pytest.mark.parametrize("kernel", ["step", "cluster", "cluster-async"])
@pytest.mark.parametrize("cell", CELLS)
def test_concurrent_directions_identical(cell, kernel, monkeypatch):
    """The same kernels on two streams: outputs, every gradient and the recorded norms bit for bit
    equal to the one-stream run (float32, packed unsorted input, clipping, 3 layers)."""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    _, ours = make_pair(cell, 6, 33, backend="cuda", dtype=torch.float32, device="cuda", num_layers=3,
                        bidirectional=True)
    ours.record_grad_norms, ours.hidden_grad_clip = True, 0.7
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randn(n, 6, generator=gen).cuda() for n in (7, 3, 9, 5)]
    upstream = torch.randn(sum(len(s) for s in seqs), 66, generator=gen).cuda()

    def run(flag):
        monkeypatch.setenv("RNNKERN_CONCURRENT_DIRECTIONS", flag)
        return _norms_and_grads(ours, seqs, upstream)

    one_stream, two_streams = run("0"), run("1")
    for i, (a, b) in enumerate(zip(two_streams, one_stream)):
        assert torch.equal(a, b), i


# How a forward + backward is scheduled: one stream; a bidirectional layer's directions on two; a
# 3-layer stack as a wavefront of 2-step chunks, each layer on its own stream.
SCHEDULES = {"one-stream": (dict(num_layers=2), {}),
             "directions": (dict(bidirectional=True), {"RNNKERN_CONCURRENT_DIRECTIONS": "1"}),
             "wavefront": (dict(num_layers=3), {"RNNKERN_LAYER_WAVEFRONT": "2"})}


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA_BACKEND, reason="needs a CUDA GPU and rnnkern's CUDA kernels")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("kernel", ["step", "persistent", "cluster", "cluster-async", "wide"])
def test_cuda_queues_without_waiting(kernel, schedule, packed, monkeypatch):
    """A forward and backward on the CUDA backend never make the host wait for the GPU (torch's sync
    debug mode "error" raises at any synchronising call, e.g. a copy from pageable host memory), so
    the host queues the next launches while a recurrence runs and streams meant to overlap do. With
    recorded norms and clipping, on every kernel and schedule."""
    module_args, env = SCHEDULES[schedule]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    _, ours = make_pair("lstm", 6, 40, backend="cuda", dtype=torch.float32, device="cuda", **module_args)
    ours.record_grad_norms, ours.hidden_grad_clip = True, 0.5
    gen = torch.Generator().manual_seed(11)
    if packed:
        seqs = [torch.randn(n, 6, generator=gen).cuda() for n in (7, 3, 9, 5)]
        x = torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    else:
        x = torch.randn(9, 5, 6, generator=gen).cuda()

    def step():
        out, _ = ours(x)
        (out.data if packed else out).square().sum().backward()

    step()  # first call: plans, handles, allocator pools
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ours.grad_norms.h_per_sample.isfinite().all()


# The layer wavefront (rnnkern/functional.py, layer_wavefront_steps): a one-direction stack in chunks
# of steps, each layer on its own stream on CUDA; on the CPU the same chunks one after another.
WAVEFRONT = [c for c in CONFIGS if not c["bidirectional"] and c["num_layers"] > 1]


def test_layer_wavefront_only_where_it_applies(monkeypatch):
    """Off by default; only for one direction, several layers and no training-mode dropout; a value
    that is not a number of steps is an error."""
    rows = torch.randn(4, 3)
    assert layer_wavefront_steps(rows, 3, 1, 0.0, True) == 0
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", "4")
    assert layer_wavefront_steps(rows, 3, 1, 0.0, True) == 4
    assert layer_wavefront_steps(rows, 3, 1, 0.5, False) == 4
    assert layer_wavefront_steps(rows, 3, 2, 0.0, True) == 0
    assert layer_wavefront_steps(rows, 1, 1, 0.0, True) == 0
    assert layer_wavefront_steps(rows, 3, 1, 0.5, True) == 0
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", "many")
    with pytest.raises(ValueError, match="RNNKERN_LAYER_WAVEFRONT"):
        layer_wavefront_steps(rows, 3, 1, 0.0, True)


@pytest.mark.parametrize("steps", ["1", "2", "4"])
@pytest.mark.parametrize("cfg", WAVEFRONT, ids=[_case_id(c) for c in WAVEFRONT])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_layer_wavefront_matches_torch_nn(backend, cell, cfg, steps, monkeypatch):
    """test_matches_torch_nn (float64) with the stack run in chunks of 1, 2 and 4 steps (5-step
    sequences: chunks that split it evenly or not, and packed samples that end inside a chunk)."""
    if backend not in rnnkern.backends():
        pytest.skip(f"{backend} is not available here")
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", steps)
    test_matches_torch_nn((backend, "cpu", torch.float64), cell, cfg)


def _norms_and_grads(module, seqs, upstream):
    """Outputs, every gradient and the recorded norms of one forward + backward on packed input."""
    module.zero_grad()
    xs = [s.clone().requires_grad_(True) for s in seqs]
    out, hidden = module(torch.nn.utils.rnn.pack_sequence(xs, enforce_sorted=False))
    hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
    (out.data * upstream).sum().add(sum(h.square().sum() for h in hidden)).backward()
    norms = module.grad_norms
    got = [out.data, *hidden, *(x.grad for x in xs), *(p.grad for p in module.parameters()),
           norms.h_per_sample] + ([norms.c_per_sample] if norms.c_per_sample is not None else [])
    return [t.detach().clone() for t in got]


def _assert_wavefront_keeps_results(cell, backend, device, dtype, hidden, clip, tol, monkeypatch):
    """A 3-layer stack with recorded norms and clipping, on packed input, run whole and in chunks
    of 3 steps: the same outputs, gradients and norms (within `tol`)."""
    _, ours = make_pair(cell, 6, hidden, backend=backend, dtype=dtype, device=device, num_layers=3)
    ours.record_grad_norms, ours.hidden_grad_clip = True, clip
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randn(n, 6, generator=gen, dtype=dtype).to(device) for n in (7, 2, 9, 5)]
    upstream = torch.randn(sum(len(s) for s in seqs), hidden, generator=gen, dtype=dtype).to(device)
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", "0")
    whole = _norms_and_grads(ours, seqs, upstream)
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", "3")
    chunked = _norms_and_grads(ours, seqs, upstream)
    for i, (a, b) in enumerate(zip(chunked, whole)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_layer_wavefront_keeps_norms_and_clipping(cell, monkeypatch):
    """Recorded norms and per-step clipping across chunk boundaries (where the gradient arrives as
    the chunk's grad_h_n): the same as without chunks, on the CPU backend in float64."""
    _assert_wavefront_keeps_results(cell, "cpu", "cpu", torch.float64, 9, 0.4, 1e-10, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA_BACKEND, reason="needs a CUDA GPU and rnnkern's CUDA kernels")
@pytest.mark.parametrize("kernel", ["step", "cluster", "cluster-async"])
@pytest.mark.parametrize("cfg", WAVEFRONT, ids=[_case_id(c) for c in WAVEFRONT])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_wavefront_on_streams_matches_torch_nn(cell, cfg, kernel, monkeypatch):
    """The wavefront on CUDA, each layer on its own stream (chunks of 2 steps), against torch.nn."""
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", "2")
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    test_matches_torch_nn(("cuda", "cuda", torch.float64), cell, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA_BACKEND, reason="needs a CUDA GPU and rnnkern's CUDA kernels")
@pytest.mark.parametrize("kernel", ["step", "cluster-async"])
@pytest.mark.parametrize("cell", CELLS)
def test_layer_wavefront_on_streams_keeps_norms(cell, kernel, monkeypatch):
    """Norms, clipping and every gradient with the layers on streams (float32, 3 layers, chunks of 3
    steps), as without chunks."""
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", kernel)
    _assert_wavefront_keeps_results(cell, "cuda", "cuda", torch.float32, 33, 0.7, 1e-4, monkeypatch)


@pytest.mark.parametrize("split", ["0", "1"], ids=["all-samples", "per-thread"])
@pytest.mark.parametrize("dtype,native", [(torch.float16, "1"), (torch.bfloat16, "1"), (torch.bfloat16, "0")],
                         ids=["fp16", "bf16", "bf16-float-weights"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cpu_16bit_modules_within_torch_nn(cell, dtype, native, split, monkeypatch, request):
    """The cpu backend's float16/bfloat16 modules (two bidirectional layers, a projection for the LSTM,
    packed unsorted input, hx, the time loop over all samples or per thread; bfloat16 products by MKL's
    bfloat16 GEMM where the CPU has bfloat16 dot products, and on float32 weights as elsewhere,
    RNNKERN_CPU_NATIVE_16BIT=0): the error of the output, the final states and every gradient against
    float64 is at most twice torch.nn's own in the same dtype (plus a few units of its resolution).
    (ReLU's kink flips: tests/test_layer_op_compiled.py.)"""
    from torch.nn.utils.rnn import pack_sequence

    monkeypatch.setenv("RNNKERN_CPU_SAMPLE_SPLIT", split)
    monkeypatch.setenv("RNNKERN_CPU_NATIVE_16BIT", native)
    if split == "1" and torch.get_num_threads() < 2:  # (the split needs two threads to happen at all)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(23)
    kind = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[cell]
    options = dict(num_layers=2, bidirectional=True, **({"proj_size": 5} if cell == "lstm" else {}))
    ref64 = getattr(torch.nn, kind)(6, 12, dtype=torch.float64, **options)
    lengths = [7, 9, 4, 9, 2]
    seqs = [torch.randn(n, 6, dtype=torch.float64) for n in lengths]
    h0 = torch.randn(4, 5, options.get("proj_size", 12), dtype=torch.float64)
    c0 = torch.randn(4, 5, 12, dtype=torch.float64)

    def run(module, dt):
        module.zero_grad()
        leaves = [s.detach().to(dt).requires_grad_() for s in seqs]
        states = (h0.to(dt), c0.to(dt)) if kind == "LSTM" else h0.to(dt)
        out, final = module(pack_sequence(leaves, enforce_sorted=False), states)
        finals = list(final) if kind == "LSTM" else [final]
        loss = (out.data.double() ** 2).sum() + sum((f.double() ** 3).sum() for f in finals)
        loss.backward()
        results = [out.data, *finals] + [s.grad for s in leaves] + [p.grad for p in module.parameters()]
        return [r.detach().double() for r in results]

    ref16 = getattr(torch.nn, kind)(6, 12, dtype=dtype, **options)
    ours = getattr(rnnkern, kind)(6, 12, dtype=dtype, backend="cpu", record_grad_norms=True, **options)
    ref16.load_state_dict(ref64.state_dict())
    ours.load_state_dict(ref64.state_dict())
    want, theirs, got = run(ref64, torch.float64), run(ref16, dtype), run(ours, dtype)
    floor = 4 * torch.finfo(dtype).eps
    for i, (w, t, g) in enumerate(zip(want, theirs, got)):
        scale = max(1.0, w.abs().max().item())
        ours_err, theirs_err = (g - w).abs().max().item() / scale, (t - w).abs().max().item() / scale
        assert ours_err <= 2 * theirs_err + floor, (i, ours_err, theirs_err)
    assert ours.grad_norms is not None and torch.isfinite(ours.grad_norms.h_per_sample).all()
