"""rnnkern modules as first-class PyTorch citizens: torch.compile, autocast, DDP, convert, state_dict,
copy/pickle/save of whole models. (Single-module copy/pickle and convert basics: tests/test_api.py.)"""

import contextlib
import copy
import io
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkern
from rnnkern import backends as rk_backends

from conftest import CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"LSTM": (rnnkern.LSTM, torch.nn.LSTM), "GRU": (rnnkern.GRU, torch.nn.GRU),
         "RNN": (rnnkern.RNN, torch.nn.RNN)}


def _compile_targets():
    """(backend, device) pairs to compile: every backend usable on the device. Triton on the CPU runs
    in its interpreter, which torch.compile does not trace through quickly; it is compiled on GPU."""
    params = []
    for name in rk_backends.names():
        backend = rk_backends.get(name)
        for device in ["cpu"] + (["cuda"] if CUDA else []):
            if name == "triton" and device == "cpu":
                continue
            if backend.unsupported_reason(torch.device(device), torch.float32) is None:
                marks = [pytest.mark.gpu] if device == "cuda" else []
                params.append(pytest.param((name, device), marks=marks, id=f"{name}-{device}"))
    return params


COMPILE_TARGETS = _compile_targets()


def _grads(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


class Net(torch.nn.Module):
    """A small model holding an rnnkern module between ordinary layers."""

    def __init__(self, kind="LSTM", backend="reference", record_grad_norms=False, **kwargs):
        super().__init__()
        self.embed = torch.nn.Linear(3, 5)
        self.rnn = KINDS[kind][0](5, 7, backend=backend, record_grad_norms=record_grad_norms, **kwargs)
        width = 7 * (2 if kwargs.get("bidirectional") else 1)
        if kwargs.get("proj_size"):
            width = kwargs["proj_size"] * (2 if kwargs.get("bidirectional") else 1)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x, hx=None):
        out, state = self.rnn(torch.tanh(self.embed(x)), hx)
        final = state[0] if isinstance(state, tuple) else state
        return self.head(out).pow(2).mean() + final.pow(2).sum()


# -- torch.compile ------------------------------------------------------------------------------------

COMPILE_CASES = {
    "lstm": dict(kind="LSTM", num_layers=2),
    "lstm-proj-bidir": dict(kind="LSTM", proj_size=3, bidirectional=True),
    "gru-batch-first": dict(kind="GRU", batch_first=True, num_layers=2),
    "rnn-relu-bidir": dict(kind="RNN", nonlinearity="relu", bidirectional=True),
}


def _compiled_vs_eager(net, x, backend="aot_eager", hx=None):
    """Loss and every gradient (and the grad norms) eagerly, then under torch.compile(fullgraph)."""
    params = list(net.parameters())
    results = []
    for compiled in (False, True):
        net.zero_grad()
        net.rnn.grad_norms = None
        fn = torch.compile(net, fullgraph=True, backend=backend) if compiled else net
        loss = fn(x, hx)
        loss.backward()
        results.append((loss.detach(), _grads(params), net.rnn.grad_norms))
    return results


@pytest.mark.parametrize("target", COMPILE_TARGETS)
@pytest.mark.parametrize("case,norms", [("lstm", False)] + [(case, True) for case in COMPILE_CASES])
def test_compile_fullgraph_matches_eager(target, case, norms):
    backend, device = target
    torch._dynamo.reset()
    torch.manual_seed(1)
    options = dict(COMPILE_CASES[case])
    net = Net(options.pop("kind"), backend=backend, record_grad_norms=norms, **options).to(device)
    x = torch.randn(6, 3, 3, device=device)  # [T, B, I] (batch_first: B=6 samples of length 3)
    (loss_e, grads_e, gn_e), (loss_c, grads_c, gn_c) = _compiled_vs_eager(net, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)
    if norms:
        assert gn_e is not None and gn_c is not None
        torch.testing.assert_close(gn_c.h_per_sample, gn_e.h_per_sample, rtol=1e-5, atol=1e-6)
        if gn_e.c_per_sample is not None:
            torch.testing.assert_close(gn_c.c_per_sample, gn_e.c_per_sample, rtol=1e-5, atol=1e-6)
    else:
        assert gn_e is None and gn_c is None


def test_compile_hooks_called_once_per_backward_with_clip_and_hx():
    torch._dynamo.reset()
    torch.manual_seed(2)
    net = Net("LSTM", record_grad_norms=True, hidden_grad_clip=0.05, num_layers=2)
    calls = []
    net.rnn.register_grad_norm_hook(lambda module, gn: calls.append((module, gn)))
    x = torch.randn(5, 2, 3, requires_grad=True)
    hx = (torch.randn(2, 2, 7, requires_grad=True), torch.randn(2, 2, 7))
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    expected = []
    for fn in (net, compiled, compiled):  # eager, then compiled twice (no recompile)
        for t in (x, hx[0], *net.parameters()):
            t.grad = None
        fn(x, hx).backward()
        expected.append((_grads([x, hx[0], *net.parameters()]), net.rnn.grad_norms))
    assert len(calls) == 3 and all(module is net.rnn for module, _ in calls)
    for i in (1, 2):
        assert calls[i][1] is expected[i][1]
        torch.testing.assert_close(calls[i][1].h_per_sample, calls[0][1].h_per_sample)
        torch.testing.assert_close(calls[i][1].c_per_sample, calls[0][1].c_per_sample)
        for g_c, g_e in zip(expected[i][0], expected[0][0]):
            torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-6)


def test_compile_unbatched_and_no_grad():
    torch._dynamo.reset()
    torch.manual_seed(3)
    m = rnnkern.GRU(3, 4, num_layers=2, backend="reference", record_grad_norms=True)
    x = torch.randn(5, 3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out_e, h_e = m(x)
    out_c, h_c = compiled(x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h_c, h_e)
    with torch.no_grad():
        out_c, _ = compiled(x)
    torch.testing.assert_close(out_c, out_e.detach())
    assert m.grad_norms is None


def _inductor_case(device):
    torch._dynamo.reset()
    torch.manual_seed(4)
    net = Net("LSTM", record_grad_norms=True, num_layers=2).to(device)
    x = torch.randn(4, 2, 3, device=device)
    (loss_e, grads_e, gn_e), (loss_c, grads_c, gn_c) = _compiled_vs_eager(net, x, backend="inductor")
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gn_c.h_per_sample, gn_e.h_per_sample, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # Inductor compiles C++ for forward and backward: ~50 s on 2 cores
def test_compile_inductor_cpu():
    """The default backend (Inductor) on a model with norms: same loss, gradients and norms."""
    _inductor_case("cpu")


@pytest.mark.gpu
def test_compile_inductor_cuda():
    _inductor_case("cuda")


def test_compile_packed_input_graph_breaks_gracefully():
    """PackedSequence input runs outside the graph (its batch sizes are host data): correct results and
    norms without fullgraph; fullgraph=True raises Dynamo's Unsupported naming the reason."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    m = rnnkern.LSTM(3, 4, backend="reference", record_grad_norms=True)
    x = torch.randn(5, 3, 3, requires_grad=True)

    def loss_fn(module, seq):
        out, (h, c) = module(seq)
        return out.data.pow(2).sum() + h.sum() * c.sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager")):
        x.grad, m.grad_norms = None, None
        packed = pack_padded_sequence(x, [5, 2, 4], enforce_sorted=False)
        fn(m, packed).backward()
        results.append((x.grad.clone(), m.grad_norms))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1].h_per_sample, results[0][1].h_per_sample)
    torch.testing.assert_close(results[1][1].c_per_sample, results[0][1].c_per_sample)
    torch._dynamo.reset()  # Dynamo's cache is per code object: forget the graph-broken compile
    with pytest.raises(torch._dynamo.exc.Unsupported, match="PackedSequence"):
        torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(m, packed)


def test_compile_leaves_torch_nn_rnns_alone():
    """Dynamo support is for rnnkern's modules only: torch.nn.LSTM keeps torch's own behaviour."""
    torch._dynamo.reset()
    m = torch.nn.LSTM(3, 4)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(m, fullgraph=True, backend="eager")(torch.randn(2, 1, 3))


# -- torch.autocast -----------------------------------------------------------------------------------

AUTOCAST_MODULES = {
    "lstm": ("LSTM", {}), "lstm-proj": ("LSTM", {"proj_size": 3}), "gru": ("GRU", {}),
    "rnn-tanh": ("RNN", {}), "rnn-relu": ("RNN", {"nonlinearity": "relu"}),
}
AUTOCAST_INPUTS = ["padded", "batch_first", "packed", "packed_one_length", "unbatched", "hx_float32",
                   "hx_low", "x_low", "x_low_hx_float32", "x_other", "x_other_hx_float32"]
# ("x_other": the input in the other 16-bit dtype: ATen picks oneDNN's LSTM from the input's own dtype,
# before autocast casts, so a float16 input takes the per-op path on a CPU without float16 LSTMs)


def _autocast_case(kind, options, how, device, low, backend):
    """(torch.nn module, rnnkern module with the same weights, make_args) for one autocast context."""
    torch.manual_seed(6)
    ours_cls, torch_cls = KINDS[kind]
    batch_first = how == "batch_first"
    ref = torch_cls(3, 5, num_layers=2, batch_first=batch_first, **options).to(device)
    ours = ours_cls(3, 5, num_layers=2, batch_first=batch_first, backend=backend,
                    record_grad_norms=True, **options).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 3, device=device)
    hidden = options.get("proj_size") or 5
    hx_shapes = [(2, 3, hidden), (2, 3, 5)] if kind == "LSTM" else [(2, 3, hidden)]
    hx = [torch.randn(s, device=device) for s in hx_shapes]

    def make_args():
        xi = x.clone().requires_grad_()
        if how == "packed":
            return xi, (pack_padded_sequence(xi, [4, 2, 3], enforce_sorted=False), None)
        if how == "packed_one_length":  # (newer torch runs a packed LSTM as a padded batch then: oneDNN)
            return xi, (pack_padded_sequence(xi, [4, 4, 4]), None)
        if how == "unbatched":
            return xi, (xi[:, 0], None)
        if how in ("hx_float32", "hx_low"):
            states = [h.to(low) if how == "hx_low" else h for h in hx]
            return xi, (xi, tuple(states) if kind == "LSTM" else states[0])
        if how.startswith(("x_low", "x_other")):
            other = torch.float16 if low == torch.bfloat16 else torch.bfloat16
            states = (tuple(hx) if kind == "LSTM" else hx[0]) if how.endswith("hx_float32") else None
            return xi, (xi.to(low if how.startswith("x_low") else other), states)
        return xi, (xi, None)

    return ref, ours, make_args


def _flat_outputs(result):
    output, hidden = result
    output = output.data if hasattr(output, "batch_sizes") else output
    return [output] + (list(hidden) if isinstance(hidden, tuple) else [hidden])


def _rel_err(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def _low_precision_call(module, args, low):
    """torch.nn's call with every floating argument and weight cast to `low` (differentiably) and
    oneDNN off: what oneDNN's LSTM computes under autocast (everything in `low`), by the per-op path."""
    def cast(t):
        if isinstance(t, PackedSequence):
            return PackedSequence(cast(t.data), t.batch_sizes, t.sorted_indices, t.unsorted_indices)
        if isinstance(t, (tuple, list)):
            return type(t)(cast(u) for u in t)
        return t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    weights = {name: cast(p) for name, p in module.named_parameters()}
    with torch.backends.mkldnn.flags(enabled=False):
        return torch.func.functional_call(module, weights, cast(args))


def _torch_nn_under_autocast(module, args, device, low):
    """torch.nn's call under autocast. Where this CPU's oneDNN has no LSTM for `low` (e.g. bfloat16 on
    a CPU without AVX-512: torch.nn raises "could not create a primitive descriptor"), what that LSTM
    would compute, everything in `low` (rnnkern computes it there as where oneDNN runs)."""
    try:
        with torch.autocast(device, dtype=low):
            return module(*args)
    except RuntimeError as error:
        if device != "cpu" or "could not create a primitive descriptor" not in str(error):
            raise
    return _low_precision_call(module, args, low)


def _check_autocast_like_torch(kind, options, how, device, low, backend):
    ref, ours, make_args = _autocast_case(kind, options, how, device, low, backend)
    results = []
    for module in (ref, ours):
        xi, args = make_args()
        if module is ref:
            outs = _flat_outputs(_torch_nn_under_autocast(module, args, device, low))
        else:
            with torch.autocast(device, dtype=low):
                outs = _flat_outputs(module(*args))
        sum(o.float().pow(2).sum() for o in outs).backward()
        results.append(([o.dtype for o in outs], outs, xi.grad, [p.grad for p in module.parameters()]))
    (dtypes_ref, outs_ref, gx_ref, gp_ref), (dtypes, outs, gx, gp) = results
    assert dtypes == dtypes_ref, f"output dtypes {dtypes} but torch.nn gives {dtypes_ref}"
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    assert gx.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gp)
    # bfloat16 keeps 8 bits of mantissa: both sides round differently, so compare relative errors.
    tol = 4e-2 if low == torch.bfloat16 else 5e-3
    for o, o_ref in zip(outs, outs_ref):
        assert _rel_err(o, o_ref) < tol
    assert _rel_err(gx, gx_ref) < tol
    for g, g_ref in zip(gp, gp_ref):
        assert _rel_err(g, g_ref) < tol
    assert ours.grad_norms is not None and torch.isfinite(ours.grad_norms.h_per_sample).all()


@pytest.mark.parametrize("how", AUTOCAST_INPUTS)
@pytest.mark.parametrize("module", list(AUTOCAST_MODULES))
def test_autocast_cpu_bfloat16_like_torch_nn(module, how):
    kind, options = AUTOCAST_MODULES[module]
    _check_autocast_like_torch(kind, options, how, "cpu", torch.bfloat16, "auto")


@pytest.mark.gpu
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("how", ["padded", "packed", "hx_float32"])
@pytest.mark.parametrize("module", list(AUTOCAST_MODULES))
def test_autocast_cuda_like_torch_nn(module, how, low):
    kind, options = AUTOCAST_MODULES[module]
    _check_autocast_like_torch(kind, options, how, "cuda", low, "auto")


def test_autocast_float64_input_raises_like_torch_nn():
    ref = torch.nn.LSTM(3, 4)
    ours = rnnkern.LSTM(3, 4, backend="reference")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError) as expected:
            ref(x)
        with pytest.raises(RuntimeError) as actual:
            ours(x)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_autocast_leaves_float64_modules_alone_like_torch_nn(kind):
    """Autocast casts no float64 tensor: a float64 module computes and returns float64, as torch.nn."""
    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(3)
    ref = ref_cls(3, 4, dtype=torch.float64)
    ours = ours_cls(3, 4, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = _flat_outputs(ref(x)), _flat_outputs(ours(x))
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("default", ["device-meta", "float64"])
def test_autocast_cpu_under_other_defaults_like_torch_nn(default, monkeypatch):
    """What torch.nn's CPU LSTM does under autocast is learnt once, from a call of its own: its tensors
    name their device and dtype, so neither a default device (`with torch.device("meta")`, the
    learning call's first) nor torch.set_default_dtype(torch.float64) changes it (before: float32
    outputs, also for every later call of the process; "get_mkldnn_dtype: unsupported data type")."""
    from rnnkern import _compat

    monkeypatch.setattr(_compat, "_ONEDNN_LSTM_RUNS", {})  # (the first call, which learns)
    torch.manual_seed(8)
    ref = torch.nn.LSTM(3, 5)
    ours = rnnkern.LSTM(3, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    default_dtype = torch.get_default_dtype()
    try:
        if default == "float64":
            torch.set_default_dtype(torch.float64)
        with torch.device("meta") if default == "device-meta" else contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                actual = _flat_outputs(ours(x))
                expected = _flat_outputs(_torch_nn_under_autocast(ref, (x,), "cpu", torch.bfloat16))
    finally:
        torch.set_default_dtype(default_dtype)
    assert [t.dtype for t in actual] == [t.dtype for t in expected]
    for a, e in zip(actual, expected):
        assert _rel_err(a, e) < 4e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (and what it learnt holds after)
        assert [t.dtype for t in _flat_outputs(ours(x))] == [t.dtype for t in expected]


@pytest.mark.skipif("triton" not in rnnkern.backends(), reason="needs a backend without bfloat16 on the CPU: the "
                    "Triton interpreter's")
def test_autocast_explicit_backend_without_the_dtype_says_so():
    m = rnnkern.LSTM(3, 4, backend="triton")  # (the interpreter computes bfloat16 wrongly: it declines it)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match="cannot run on cpu tensors of dtype torch.bfloat16.*torch.autocast "
                                               "runs this call in torch.bfloat16"):
            m(torch.randn(5, 2, 3))


def test_autocast_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(7)
    net = Net("LSTM", record_grad_norms=True)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x)

    x = torch.randn(4, 2, 3)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        net.zero_grad()
        fn(x).backward()
        results.append(([p.grad.clone() for p in net.parameters()], net.rnn.grad_norms))
    for g_c, g_e in zip(*[r[0] for r in results]):
        assert _rel_err(g_c, g_e) < 2e-2
    assert _rel_err(results[1][1].h_per_sample, results[0][1].h_per_sample) < 2e-2


# -- DistributedDataParallel --------------------------------------------------------------------------

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    """2 gloo ranks, each on half the batch: the parameters after a few SGD steps equal one process's on
    the whole batch, and each rank's grad norms are those of its own shard."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        import ddp_worker
    finally:
        sys.path.pop(0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ddp_worker.py"), str(tmp_path),
                          str(_free_port())], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(ddp_worker.WORLD_SIZE)]

    # One process: the whole batch for the update; each shard alone (same parameters) for its norms.
    model = ddp_worker.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=ddp_worker.LR)
    x, y = ddp_worker.make_data()
    for step in range(ddp_worker.STEPS):
        for rank, saved in enumerate(ranks):
            probe = copy.deepcopy(model)
            ddp_worker.loss_fn(probe, ddp_worker.shard(x, rank), ddp_worker.shard(y, rank)).backward()
            expected = probe.rnn.grad_norms.h_per_sample
            actual = torch.tensor(saved["norms"][step]["h_per_sample"], dtype=expected.dtype)
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)
            expected_c = probe.rnn.grad_norms.c_per_sample
            actual_c = torch.tensor(saved["norms"][step]["c_per_sample"], dtype=expected_c.dtype)
            torch.testing.assert_close(actual_c, expected_c, rtol=1e-6, atol=1e-7)
        optimizer.zero_grad()
        ddp_worker.loss_fn(model, x, y).backward()
        optimizer.step()
    for saved in ranks:
        assert saved["hook_calls"] == ddp_worker.STEPS
        for name, value in model.state_dict().items():
            torch.testing.assert_close(saved["state_dict"][name], value, rtol=1e-10, atol=1e-12)
    # The shards' norms differ (the check above is not vacuous).
    assert not torch.allclose(torch.tensor(ranks[0]["norms"][0]["h_per_sample"]),
                              torch.tensor(ranks[1]["norms"][0]["h_per_sample"]))


# -- convert, state_dict, copies of whole models ------------------------------------------------------

class Seq2Seq(torch.nn.Module):
    """Nested torch.nn recurrent modules (in a ModuleList, a Sequential, a ModuleDict)."""

    def __init__(self):
        super().__init__()
        self.encoders = torch.nn.ModuleList([
            torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()),
            torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True, dropout=0.0),
        ])
        self.blocks = torch.nn.ModuleDict({
            "gru": torch.nn.GRU(10, 4, batch_first=True),
            "rnn": torch.nn.RNN(4, 3, nonlinearity="relu"),
        })
        self.proj_lstm = torch.nn.LSTM(3, 6, proj_size=2)
        self.head = torch.nn.Linear(2, 1)

    def forward(self, x):
        h = self.encoders[0](x)
        h, _ = self.encoders[1](h)
        h, _ = self.blocks["gru"](h.transpose(0, 1))
        h, _ = self.blocks["rnn"](h.transpose(0, 1))
        h, (hn, cn) = self.proj_lstm(h)
        return self.head(h).pow(2).mean() + hn.sum() * cn.mean()


def _loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _recurrent(model):
    return [m for m in model.modules() if isinstance(m, (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_convert_nested_model_keeps_device_dtype_mode_hooks_and_results(device):
    torch.manual_seed(8)
    model = Seq2Seq().to(device, torch.float64)
    model.train()
    model.blocks["gru"].eval()
    x = torch.randn(5, 2, 3, device=device, dtype=torch.float64)
    # torch.nn's reference without cuDNN, whose backward refuses eval mode (the GRU here is in eval).
    with torch.backends.cudnn.flags(enabled=False):
        expected_loss, expected_grads = _loss_and_grads(model, x)
    params_before = [id(p) for p in model.parameters()]
    modules_before = _recurrent(model)
    events = []
    model.blocks["gru"].register_forward_pre_hook(lambda *a: events.append("pre"))
    model.encoders[1].register_forward_hook(lambda *a: events.append("fwd"))
    model.proj_lstm.register_full_backward_hook(lambda *a: events.append("bwd"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert rnnkern.convert(model, backend="reference", record_grad_norms=True) is model
    converted = _recurrent(model)
    assert [id(m) for m in converted] == [id(m) for m in modules_before]
    assert [type(m) for m in converted] == [rnnkern.LSTM, rnnkern.GRU, rnnkern.RNN, rnnkern.LSTM]
    assert [id(p) for p in model.parameters()] == params_before  # the optimizer still holds them
    assert model.training and not model.blocks["gru"].training and model.encoders[1].training
    assert all(p.device.type == device and p.dtype == torch.float64 for p in model.parameters())

    loss, grads = _loss_and_grads(model, x)
    assert events == ["fwd", "pre", "bwd"]
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads, expected_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)
    for module in converted:
        gn = module.grad_norms
        assert gn is not None and gn.h_per_sample.device.type == device
        assert gn.num_layers == module.num_layers and gn.seq_len == 5
    before = model.proj_lstm.weight_hr_l0.detach().clone()
    optimizer.step()  # the optimizer built before convert still updates the converted modules
    assert not torch.equal(model.proj_lstm.weight_hr_l0.detach(), before)


@pytest.mark.parametrize("how", ["weight_norm", "orthogonal"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_convert_parametrized_modules(kind, how):
    """A torch.nn RNN with a torch.nn.utils.parametrize parametrization (its class is parametrize's
    subclass) converts (before: left alone, silently): rnnkern's module with the same parametrization,
    results, gradients and state_dict, norms recorded; removing the parametrization leaves rnnkern's
    class."""
    from torch.nn.utils import parametrizations, parametrize

    _, ref_cls = KINDS[kind]
    torch.manual_seed(17)
    ref = ref_cls(3, 4, num_layers=2, dtype=torch.float64)
    getattr(parametrizations, how)(ref, "weight_hh_l1")
    ours = copy.deepcopy(ref)
    assert rnnkern.convert(torch.nn.Sequential(ours), record_grad_norms=True)[0] is ours
    assert isinstance(ours, KINDS[kind][0]) and parametrize.is_parametrized(ours, "weight_hh_l1")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for module in (ref, ours):
        out = module(x)[0]
        out.pow(2).sum().backward()
        results.append([out] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert ours.grad_norms is not None and ours.grad_norms.h_per_sample.shape == (2, 1, 5, 2)
    parametrize.remove_parametrizations(ours, "weight_hh_l1")
    assert type(ours) is KINDS[kind][0]


def test_convert_top_level_module_and_options_of_rnnkern_modules():
    lstm = torch.nn.LSTM(3, 4)
    assert rnnkern.convert(lstm, backend="reference") is lstm and type(lstm) is rnnkern.LSTM
    model = torch.nn.Sequential(rnnkern.GRU(3, 4, backend="reference"))
    rnnkern.convert(model, backend="reference", record_grad_norms=True, hidden_grad_clip=0.5)
    assert model[0].record_grad_norms and model[0].hidden_grad_clip == 0.5

    class CustomLSTM(torch.nn.LSTM):  # its own forward may differ: left alone
        pass

    custom = torch.nn.Sequential(CustomLSTM(3, 4))
    rnnkern.convert(custom)
    assert type(custom[0]) is CustomLSTM
    with pytest.raises(ValueError, match="valid backends"):
        rnnkern.convert(torch.nn.Sequential(torch.nn.LSTM(3, 4)), backend="cudnn")


def _rnnkern_twin():
    """Seq2Seq built with rnnkern classes (no conversion), to load state_dicts into."""
    with rnnkern.patch_torch(backend="reference"):
        return Seq2Seq().double()


def test_state_dict_loads_both_ways_between_torch_nn_and_rnnkern_models():
    torch.manual_seed(9)
    plain = Seq2Seq().double()
    ours = _rnnkern_twin()
    assert all(type(m).__module__.startswith("torch.nn") for m in _recurrent(plain))
    assert all(isinstance(m, rnnkern.modules._RnnkernMixin) for m in _recurrent(ours))
    assert list(plain.state_dict()) == list(ours.state_dict())
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    ours.load_state_dict(plain.state_dict())
    torch.testing.assert_close(ours(x), plain(x), rtol=1e-10, atol=1e-12)
    torch.manual_seed(10)
    other = _rnnkern_twin()
    plain.load_state_dict(other.state_dict())
    torch.testing.assert_close(plain(x), other(x), rtol=1e-10, atol=1e-12)
    buffer = io.BytesIO()
    torch.save(other.state_dict(), buffer)
    buffer.seek(0)
    fresh = Seq2Seq().double()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), other(x), rtol=1e-10, atol=1e-12)


def _model_copies(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model)),
            "torch.save": torch.load(buffer, weights_only=False)}


@pytest.mark.parametrize("how", ["built", "converted"])
def test_copy_pickle_and_save_whole_models(how):
    torch.manual_seed(11)
    model = Seq2Seq().double()
    if how == "built":
        model = _rnnkern_twin()
    rnnkern.convert(model, backend="reference", record_grad_norms=True, hidden_grad_clip=3.0)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    loss, grads = _loss_and_grads(model, x)
    norms = [m.grad_norms for m in _recurrent(model)]
    for name, clone in _model_copies(model).items():
        for m, m_clone in zip(_recurrent(model), _recurrent(clone)):
            assert type(m_clone) is type(m), name
            assert (m_clone.backend, m_clone.record_grad_norms, m_clone.hidden_grad_clip) == \
                ("reference", True, 3.0)
        clone_loss, clone_grads = _loss_and_grads(clone, x)
        torch.testing.assert_close(clone_loss, loss, rtol=1e-10, atol=1e-12)
        for g, g_ref in zip(clone_grads, grads):
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)
        # The copy's backward fills the copy's grad_norms, not the original's.
        for m, m_clone, gn in zip(_recurrent(model), _recurrent(clone), norms):
            assert m.grad_norms is gn
            assert m_clone.grad_norms is not gn
            torch.testing.assert_close(m_clone.grad_norms.h_per_sample, gn.h_per_sample)


def test_patch_torch_instances_are_plain_rnnkern_modules():
    with rnnkern.patch_torch(backend="reference", hidden_grad_clip=2.0):
        m = torch.nn.GRU(3, 4)

        class UserGRU(torch.nn.GRU):  # user code subclassing the patched class keeps its class
            def extra(self):
                return 1

        u = UserGRU(3, 4)
        assert isinstance(m, torch.nn.GRU) and isinstance(rnnkern.modules.TorchGRU(3, 4), torch.nn.GRU)
        assert not isinstance(m, torch.nn.LSTM)
    assert type(m) is rnnkern.GRU and m.hidden_grad_clip == 2.0
    assert type(u) is UserGRU and u.extra() == 1 and u.backend == "reference"
    clone = pickle.loads(pickle.dumps(m))
    x = torch.randn(2, 1, 3)
    torch.testing.assert_close(clone(x)[0], m(x)[0])


def test_torch_nn_model_loaded_while_patched_is_of_rnnkern_modules():
    """torch.load of a whole torch.nn model while patched (pickle finds the patched class under torch's
    name and runs no __init__): plain rnnkern modules with the patch's options, which pickle again
    after the patch (they were instances of the patch's own class, which claimed rnnkern's name)."""
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.LSTM(3, 5), torch.nn.GRU(5, 2)).double()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with rnnkern.patch_torch(backend="reference", record_grad_norms=True):
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert [type(m) for m in loaded] == [rnnkern.LSTM, rnnkern.GRU]
    assert all(m.backend == "reference" and m.record_grad_norms for m in loaded)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    again = pickle.loads(pickle.dumps(loaded))
    out = loaded[1](loaded[0](x)[0])[0]
    torch.testing.assert_close(out, model[1](model[0](x)[0])[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(again[1](again[0](x)[0])[0], out)
    out.sum().backward()
    assert loaded[0].grad_norms is not None


@pytest.mark.skipif("cpu" not in rnnkern.backends(), reason="needs the compiled cpu backend")
def test_saved_programs_load_in_a_new_process_after_import_rnnkern(tmp_path):
    """A torch.export'ed program and a torch.jit.save'd trace hold rnnkern's op: in a new process,
    `import rnnkern` (which registers the compiled ops at import, not at first use) is all they need,
    forward and backward."""
    torch.manual_seed(13)
    model = rnnkern.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    steps = torch.export.Dim("steps", min=2, max=64)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({1: steps},)), tmp_path / "lstm.pt2")
    torch.jit.save(torch.jit.trace(model, (x,), check_trace=False), tmp_path / "lstm.jit")
    y = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    out = model(y)[0]
    out.pow(2).sum().backward()
    torch.save({"y": y.detach(), "out": out.detach(), "dy": y.grad}, tmp_path / "want.pt")
    script = f"""
import torch, rnnkern
want = torch.load({str(tmp_path / "want.pt")!r})
for name, load in (("export", lambda p: torch.export.load(p).module()), ("jit", torch.jit.load)):
    program = load({str(tmp_path)!r} + ("/lstm.pt2" if name == "export" else "/lstm.jit"))
    y = want["y"].clone().requires_grad_()
    out = program(y)[0]
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, want["out"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, want["dy"], rtol=1e-10, atol=1e-12)
print("both loaded")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0 and "both loaded" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]


# -- packaging ----------------------------------------------------------------------------------------

@pytest.mark.slow  # builds the sdist, a fresh venv with the CPU torch, compiles: several minutes
def test_sdist_installs_and_works_in_a_fresh_venv():
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_sdist.sh")], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "OK: the sdist installs and works" in run.stdout


def test_compile_unusable_backend_raises_with_the_reason():
    torch._dynamo.reset()
    m = rnnkern.LSTM(3, 4, backend="reference")
    m.backend = "nope"
    with pytest.raises(Exception, match="unknown rnnkern backend 'nope'"):
        torch.compile(m, fullgraph=True, backend="aot_eager")(torch.randn(2, 1, 3))


def test_compile_unknown_backend_is_a_value_error():
    """Without fullgraph the error reaches the caller as in eager (Dynamo falls back for the frame)."""
    torch._dynamo.reset()
    m = rnnkern.GRU(3, 4)
    m.backend = "bogus"
    with pytest.raises(ValueError, match="unknown rnnkern backend 'bogus'; valid backends are: 'auto'"):
        torch.compile(m, backend="aot_eager")(torch.randn(2, 1, 3))


@pytest.mark.parametrize("kind", list(KINDS))
def test_meta_device_like_torch_nn(kind):
    """Modules on the meta device (shape inference, deferred initialisation) run as torch.nn's."""
    ours_cls, ref_cls = KINDS[kind]
    x = torch.randn(5, 2, 3, device="meta")
    got, want = ours_cls(3, 4, 2, device="meta")(x), ref_cls(3, 4, 2, device="meta")(x)
    assert [(t.shape, t.device) for t in _flat_outputs(got)] == [(t.shape, t.device) for t in _flat_outputs(want)]


@pytest.mark.parametrize("capture", ["trace", "export"])
def test_captures_without_backward_side_effects_warn_about_norms(capture):
    """torch.jit.trace and torch.export capture the forward; the norms, delivered by Python during
    backward, cannot be recorded there: a warning says so (before: an obscure error under trace, nothing
    under export), and the captured module computes as the eager one."""
    m = rnnkern.GRU(3, 4, record_grad_norms=True)
    x = torch.randn(5, 2, 3)
    with pytest.warns(UserWarning, match=f"record_grad_norms: torch.{'jit.trace' if capture == 'trace' else 'export'}"
                                         " records no norms"):
        if capture == "trace":
            captured = torch.jit.trace(m, (x,), check_trace=False)
        else:
            captured = torch.export.export(m, (x,), strict=False).module()
    torch.testing.assert_close(captured(x)[0], m(x)[0])


@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True}, {"backend": "reference"}],
                         ids=["one-layer", "stack", "reference"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_jit_trace_checks_and_generalises_like_torch_nn(kind, options):
    """torch.jit.trace with its default check (it retraces under no_grad and compares the graphs; before,
    the CPU's copy of a saved output, taken only where grad was required, made them differ) and the
    trace run at other lengths and batch sizes: outputs and gradients as torch.nn's."""
    import warnings

    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(11)
    ref = ref_cls(3, 5, **{k: v for k, v in options.items() if k != "backend"})
    ours = ours_cls(3, 5, **options)
    ours.load_state_dict(ref.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (deprecation, and torch.nn's own TracerWarnings)
        traced = torch.jit.trace(ours, (torch.randn(4, 3, 3),))
    unrolled = [w for w in caught if "runs the time loop in Python" in str(w.message)]
    assert bool(unrolled) == (options.get("backend") == "reference")
    # (the reference backend's trace is unrolled: it runs the example's shapes only)
    for steps, batch in [(4, 3)] if unrolled else [(6, 2), (1, 5)]:
        x = torch.randn(steps, batch, 3)
        got, want = traced(x.requires_grad_()), ref(x)
        for a, b in zip(_flat_outputs(got), _flat_outputs(want)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        loss_got = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in _flat_outputs(got))
        loss_want = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in _flat_outputs(want))
        got_grads = torch.autograd.grad(loss_got, [x, *ours.parameters()])
        for a, b in zip(got_grads, torch.autograd.grad(loss_want, [x, *ref.parameters()])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _PackedModel(torch.nn.Module):
    """pad -> pack (unsorted) -> the RNN -> pad, as a model fed batches of padded sequences does."""

    def __init__(self, rnn, with_hx):
        super().__init__()
        self.rnn, self.with_hx = rnn, with_hx

    def forward(self, x, lengths):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        if self.with_hx:
            h0 = torch.ones(self.rnn.num_layers * 2, x.shape[1], self.rnn.hidden_size) * 0.1
            out, hidden = self.rnn(packed, (h0, h0.tanh()) if isinstance(self.rnn, torch.nn.LSTM) else h0)
        else:
            out, hidden = self.rnn(packed)
        return torch.nn.utils.rnn.pad_packed_sequence(out)[0], hidden


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("kind", list(KINDS))
def test_jit_trace_of_packed_input_runs_other_batch_sizes_like_torch_nn(kind, with_hx):
    """A trace of a model feeding packed sequences runs other batch sizes and lengths, as torch.nn's does
    (before, without hx: the zero states' batch size was a constant of the trace, and another batch size
    raised)."""
    import warnings

    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(13)
    ref = ref_cls(3, 4, num_layers=2, bidirectional=True)
    ours = ours_cls(3, 4, num_layers=2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (deprecation, and torch.nn's own TracerWarnings)
        traced = torch.jit.trace(_PackedModel(ours, with_hx), (torch.randn(5, 3, 3), torch.tensor([3, 5, 2])),
                                 check_trace=False)
        for steps, lengths in [(6, [6, 1, 4, 2]), (2, [2, 1])]:
            x = torch.randn(steps, len(lengths), 3)
            got = traced(x, torch.tensor(lengths))
            want = _PackedModel(ref, with_hx)(x, torch.tensor(lengths))
            for a, b in zip(_flat_outputs(got), _flat_outputs(want)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_torchscript_is_a_clear_error(kind):
    """torch.jit.script (deprecated) of an rnnkern module, alone or inside a model: a clear error naming
    the alternatives, and the eager model is left as it was (a torch.nn stand-in would have replaced the
    module in the parent for good)."""
    import warnings

    ours_cls, _ = KINDS[kind]
    parent = torch.nn.Sequential(ours_cls(3, 4, 2, record_grad_norms=True))
    for target in (parent[0], parent):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.raises(RuntimeError, match=f"rnnkern.{kind} cannot be scripted.*torch.compile"):
                torch.jit.script(target)
    assert isinstance(parent[0], ours_cls) and parent[0].record_grad_norms


TRANSFORM_BACKENDS = ["auto", "reference"] + [b for b in ("cpu",) if b in rnnkern.backends()]


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_func_transforms(kind, backend):
    """torch.func: jvp (forward mode) and grad (over functional_call's parameters) as torch.nn's where
    the backend can (auto runs the reference backend's differentiable ops there); a fused backend asked
    for explicitly raises (its derivatives are autograd's only: under jvp the op would otherwise give a
    zero tangent); vmap runs every backend; norms cannot be recorded inside a transform."""
    from torch.func import functional_call, grad, jvp

    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(4)
    ref = ref_cls(3, 4, num_layers=2, dtype=torch.float64)
    ours = ours_cls(3, 4, num_layers=2, dtype=torch.float64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x, v = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    batched = torch.vmap(lambda t: ours(t)[0])(xs)
    torch.testing.assert_close(batched, torch.stack([ref(t)[0] for t in xs]), rtol=1e-10, atol=1e-10)

    def loss(module):
        return lambda params: functional_call(module, params, (x,))[0].pow(2).sum()

    if backend not in ("auto", "reference"):
        with pytest.raises(RuntimeError, match=f"rnnkern backend '{backend}' cannot run under torch.func.jvp"):
            jvp(lambda t: ours(t)[0], (x,), (v,))
        with pytest.raises(RuntimeError, match=f"rnnkern backend '{backend}' cannot run under torch.func.grad"):
            grad(loss(ours))(dict(ours.named_parameters()))
        return
    tangent = jvp(lambda t: ours(t)[0], (x,), (v,))[1]
    torch.testing.assert_close(tangent, jvp(lambda t: ref(t)[0], (x,), (v,))[1], rtol=1e-10, atol=1e-10)
    assert tangent.abs().max() > 0
    got, want = grad(loss(ours))(dict(ours.named_parameters())), grad(loss(ref))(dict(ref.named_parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10)
    ours.record_grad_norms = True
    with pytest.raises(RuntimeError, match="record_grad_norms is not supported under torch.func.grad"):
        grad(loss(ours))(dict(ours.named_parameters()))


FORWARD_AD_CASES = {
    "lstm-proj-bidir-packed": ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2), True),
    "gru-batch-first": ("GRU", dict(num_layers=2, batch_first=True), False),
    "rnn-relu-bidir": ("RNN", dict(nonlinearity="relu", bidirectional=True), False),
}


@pytest.mark.parametrize("backend", TRANSFORM_BACKENDS)
@pytest.mark.parametrize("case", list(FORWARD_AD_CASES))
def test_forward_mode_ad(case, backend):
    """torch.autograd.forward_ad's dual tensors (forward-mode AD without torch.func) in the input, h0 and
    the weights: tangents as torch.nn's where the backend can (auto runs the reference backend there, as
    under torch.func.jvp, and rnnkern.explain says so); an explicit fused backend raises a clear error
    (before: autograd.Function's NotImplementedError about a missing jvp, with backend="auto" too). With
    norms recorded and clipping on, the tangent is unchanged and a backward inside the dual level gives
    the gradients and norms of one outside it."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    kind, options, packed = FORWARD_AD_CASES[case]
    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(7)
    ref = ref_cls(3, 4, dtype=torch.float64, **options)
    ours = ours_cls(3, 4, dtype=torch.float64, backend=backend, **options)
    ours.load_state_dict(ref.state_dict())
    batch_first = options.get("batch_first", False)
    x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3), dtype=torch.float64)
    states = (2 if options.get("bidirectional") else 1) * options.get("num_layers", 1)
    h0 = torch.randn(states, 2, options.get("proj_size") or 4, dtype=torch.float64)
    hx = (h0, torch.randn(states, 2, 4, dtype=torch.float64)) if kind == "LSTM" else h0
    tangents = {"x": torch.randn_like(x), "h0": torch.randn_like(h0)}
    tangents.update({name: torch.randn_like(p) for name, p in ref.named_parameters()})

    def run(module):
        """(output primal, output tangent) with every input dual."""
        with fwAD.dual_level():
            if packed:  # (torch packs no dual tensors: the packed rows made dual)
                rows = pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)
                row_tangents = pack_padded_sequence(tangents["x"], torch.tensor([5, 3]), enforce_sorted=False)
                data = rows._replace(data=fwAD.make_dual(rows.data, row_tangents.data))
            else:
                data = fwAD.make_dual(x, tangents["x"])
            dual_h0 = fwAD.make_dual(h0, tangents["h0"])
            state = (dual_h0, hx[1]) if kind == "LSTM" else dual_h0
            params = {name: fwAD.make_dual(p.detach(), tangents[name])
                      for name, p in module.named_parameters()}
            out = functional_call(module, params, (data, state))[0]
            out = out.data if packed else out
            if module is ours:
                explained = rnnkern.explain(module, data, state)
            primal, tangent = fwAD.unpack_dual(out)
        return primal, tangent, (explained if module is ours else None)

    if backend not in ("auto", "reference"):
        message = f"rnnkern backend '{backend}' cannot run under forward-mode AD"
        with pytest.raises(RuntimeError, match=message):
            run(ours)
        return
    want, want_tangent, _ = run(ref)
    got, got_tangent, explained = run(ours)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-10, atol=1e-10)
    assert got_tangent.abs().max() > 0
    if backend == "auto":
        assert "backend 'reference' (chosen by auto under forward-mode AD" in explained, explained

    # norms and clipping: the tangent as before; a backward in the dual level as one outside it
    ours.record_grad_norms, ours.hidden_grad_clip = True, 0.05
    leaf = x.clone().requires_grad_()
    results = []
    for dual in (True, False):
        with fwAD.dual_level():
            data = fwAD.make_dual(leaf, tangents["x"]) if dual else leaf
            out = ours(data, hx)[0]
            primal, tangent = fwAD.unpack_dual(out)
            (primal.pow(2).sum()).backward()
        results.append((tangent, leaf.grad.clone(), ours.grad_norms.h_per_sample.clone(),
                        [p.grad.clone() for p in ours.parameters()]))
        leaf.grad = None
        ours.zero_grad()
    (tangent, *dual_grads), (_, *plain_grads) = results
    assert tangent is not None and tangent.abs().max() > 0
    for a, b in zip(dual_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert results[0][2].abs().max() > ours.hidden_grad_clip  # the norms before clipping


@pytest.mark.parametrize("arrangement", ["compile(transform)", "transform(compile)"])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_func_transforms_under_compile(kind, compiler, arrangement):
    """torch.func's grad and jvp (and vmap of grad) combined with torch.compile, either way round, as
    in eager mode: auto runs the reference backend there and gives torch.nn's results, a fused backend
    asked for explicitly raises the same clear error. Before: Dynamo traces the transforms with their
    interpreters active, but the detection read nothing while compiling, so the fused op ran on the
    transform's tensors: a silent wrong tangent under jvp, obscure errors under grad; and the
    reference backend's compiled graph stored functional_call's wrapped weights on the module
    (AOTAutograd: "Cannot access storage of TensorWrapper")."""
    from torch.func import functional_call, grad, jvp, vmap

    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(5)
    ref = ref_cls(3, 4, dtype=torch.float64)
    x, tx = torch.randn(3, 2, 3, dtype=torch.float64), torch.randn(3, 2, 3, dtype=torch.float64)
    xs = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    params = {name: p.detach().clone() for name, p in ref.named_parameters()}
    tangents = {name: torch.randn_like(p) for name, p in params.items()}

    def output(module):
        return lambda p, x: functional_call(module, p, (x,))[0]

    def loss(module):
        return lambda p, x: functional_call(module, p, (x,))[0].pow(2).sum()

    def grads(fn):
        return lambda p, x: grad(fn, argnums=(0, 1))(p, x)

    def tangent(fn):
        return lambda p, x: jvp(fn, (p, x), (tangents, tx))[1]

    def per_sample_grads(fn):
        return lambda p, xs: vmap(grad(fn), in_dims=(None, 0))(p, xs)

    def compiled(transform, fn):
        if arrangement == "compile(transform)":
            return torch.compile(transform(fn), backend=compiler)
        return transform(torch.compile(fn, backend=compiler))

    want_grads = grads(loss(ref))(params, x)
    want_tangent = tangent(output(ref))(params, x)
    want_per_sample = [grad(loss(ref))(params, sample) for sample in xs]
    for backend in TRANSFORM_BACKENDS:
        torch._dynamo.reset()
        ours = ours_cls(3, 4, dtype=torch.float64, backend=backend)
        ours.load_state_dict(ref.state_dict())
        if backend not in ("auto", "reference"):
            for name, transform, fn in [("grad", grads, loss(ours)), ("jvp", tangent, output(ours))]:
                with pytest.raises(RuntimeError, match=f"rnnkern backend '{backend}' cannot run under torch.func.{name}"):
                    compiled(transform, fn)(params, x)
            continue
        got_grads = compiled(grads, loss(ours))(params, x)
        for name in want_grads[0]:
            torch.testing.assert_close(got_grads[0][name], want_grads[0][name], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_grads[1], want_grads[1], rtol=1e-10, atol=1e-10)
        got_tangent = compiled(tangent, output(ours))(params, x)
        torch.testing.assert_close(got_tangent, want_tangent, rtol=1e-10, atol=1e-10)
        got_per_sample = compiled(per_sample_grads, loss(ours))(params, xs)
        for name in params:
            torch.testing.assert_close(got_per_sample[name], torch.stack([g[name] for g in want_per_sample]),
                                       rtol=1e-10, atol=1e-10)


def test_torch_func_grad_compiles_fullgraph():
    """torch.compile(torch.func.grad(f), fullgraph=True) traces auto's reference backend into one graph
    (before: the fused op ran on grad's tensors; loading the reference backend's module broke the
    graph); norms cannot be recorded there either (the eager error, Dynamo falls back for the frame)."""
    from torch.func import functional_call, grad

    torch._dynamo.reset()
    torch.manual_seed(6)
    ref = torch.nn.GRU(3, 4, dtype=torch.float64)
    ours = rnnkern.GRU(3, 4, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    params = {name: p.detach().clone() for name, p in ref.named_parameters()}

    def loss(module):
        return lambda p: functional_call(module, p, (x,))[0].pow(2).sum()

    got = torch.compile(lambda p: grad(loss(ours))(p), backend="aot_eager", fullgraph=True)(params)
    want = grad(loss(ref))(params)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10)
    ours.record_grad_norms = True
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="record_grad_norms is not supported under torch.func.grad"):
        torch.compile(lambda p: grad(loss(ours))(p), backend="aot_eager")(params)


@pytest.mark.parametrize("module,how", [
    *((module, how) for module in ("lstm-proj", "gru", "rnn-tanh")
      for how in ("padded", "packed", "hx_float32")),
    *(("lstm", how) for how in ("x_low", "x_low_hx_float32", "x_other", "x_other_hx_float32"))])
def test_autocast_cpu_float16_like_torch_nn(module, how):
    """CPU float16 autocast, in the contexts where torch.nn runs (its oneDNN LSTM has no float16 here,
    nor on most CPUs; a float16 input takes the per-op path, which does run)."""
    kind, options = AUTOCAST_MODULES[module]
    _check_autocast_like_torch(kind, options, how, "cpu", torch.float16, "auto")


def _grad_fn_names(tensor):
    """Type names of every autograd node behind `tensor`."""
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [next_node for next_node, _ in node.next_functions]
    return names


def _live_storages():
    """{data pointer: bytes} of every CPU tensor's storage that the garbage collector can see (fake,
    functorch-wrapped or meta tensors that earlier tests left have none)."""
    import gc

    gc.collect()
    found = {}
    for t in gc.get_objects():
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            try:
                found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                pass
    return found


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_checkpoint_frees_every_layers_activations(kind):
    """Under torch.utils.checkpoint (non-reentrant) a forward keeps only what the checkpoint itself
    holds: every tensor a layer's backward reads goes through the saved tensors, which the checkpoint
    drops and recomputes (before: each layer kept its input, the layer below's output, and its
    made-up initial states as attributes, out of the checkpoint's reach: a stack's activations)."""
    from torch.utils.checkpoint import checkpoint

    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(10)
    layers, steps, batch, hidden = 4, 40, 8, 32
    ref = ref_cls(6, hidden, num_layers=layers)
    ours = ours_cls(6, hidden, num_layers=layers)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(steps, batch, 6, requires_grad=True)
    kept = {}
    for name, module in (("torch.nn", ref), ("rnnkern", ours)):
        before = _live_storages()
        out = checkpoint(lambda t: module(t)[0], x, use_reentrant=False)
        after = _live_storages()
        made = {p: n for p, n in after.items() if p not in before}
        kept[name] = sum(made.values()) - made[out.untyped_storage().data_ptr()]
        out.pow(2).sum().backward()
        del out
    activation = steps * batch * hidden * 4
    # (what both keep: the checkpoint's RNG state, and rnnkern a stack's bias sums, G*H floats a layer)
    assert kept["torch.nn"] < activation and kept["rnnkern"] < kept["torch.nn"] + activation // 4, kept
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in rnnkern.backends()])
@pytest.mark.parametrize("kind,options", [("LSTM", dict(proj_size=2)), ("GRU", {}), ("RNN", {})])
def test_flop_counter_counts_like_torch_nn(kind, options, backend):
    """torch.utils.flop_counter.FlopCounterMode counts an rnnkern module's matmuls as torch.nn's (its
    per-op CPU layers: float64 here, where oneDNN's LSTM, which has no formula, does not run): the
    layer ops have formulas (before: 0, only the input projections were counted). The backward
    counts each recurrent product's two, also for the first step's h0, which torch.nn's autograd skips
    where h0 needs no gradient: up to one step's more."""
    from torch.utils.flop_counter import FlopCounterMode

    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(9)
    shape = dict(num_layers=2, bidirectional=True, dtype=torch.float64, **options)
    ref = ref_cls(3, 5, **shape)
    ours = ours_cls(3, 5, backend=backend, **shape)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(7, 4, 3, dtype=torch.float64, requires_grad=True)

    def flops(module):
        with FlopCounterMode(display=False) as forward:
            out = module(x)[0]
        with FlopCounterMode(display=False) as backward:
            out.sum().backward()
        return forward.get_total_flops(), backward.get_total_flops()

    (forward, backward), (ref_forward, ref_backward) = flops(ours), flops(ref)
    assert forward == ref_forward > 0
    weights = ref.weight_hh_l0.numel() + getattr(ref, "weight_hr_l0", torch.empty(0)).numel()
    one_step = 4 * 2 * 2 * 4 * weights  # (4 flops a weight and row, 2 layers, 2 directions, 4 rows)
    assert ref_backward <= backward <= ref_backward + one_step


@pytest.mark.parametrize("kind", list(KINDS))
def test_eager_calls_skip_the_op_dispatch_with_the_same_results(kind):
    """Eager calls of the compiled backends' layer op go through a plain autograd.Function (EagerLayer:
    torch.library's autograd wrapper cost ~60 µs a call); under a dispatch mode (what make_fx, export,
    fake tensors and FlopCounterMode use) the registered op runs as before and the mode sees it, and
    with RNNKERN_EAGER_OP=0 (for comparisons) eager calls run it too. All
    give the same bits: outputs, every gradient and the norms (with clipping); torch.device's mode keeps
    the eager path, and no_grad calls make no node."""
    from torch.utils._python_dispatch import TorchDispatchMode

    if "cpu" not in rnnkern.backends():
        pytest.skip("needs the compiled extension's cpu backend")

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    ours_cls, _ = KINDS[kind]
    torch.manual_seed(11)
    module = ours_cls(3, 5, num_layers=2, bidirectional=True, backend="cpu", record_grad_norms=True,
                      hidden_grad_clip=0.2)
    x = torch.randn(6, 4, 3)
    results = []
    for how in ("eager", "device mode", "dispatch mode", "RNNKERN_EAGER_OP=0"):
        leaf = x.clone().requires_grad_()
        module.zero_grad()
        mode = Seen() if how == "dispatch mode" else torch.device("cpu")
        os.environ["RNNKERN_EAGER_OP"] = "0" if how == "RNNKERN_EAGER_OP=0" else "1"
        try:
            with mode:
                out = module(leaf)[0]
                names = _grad_fn_names(out)
                out.pow(2).sum().backward()
        finally:
            del os.environ["RNNKERN_EAGER_OP"]
        generated = any(n.startswith("GeneratedBackwardFor_rnnkern") for n in names)
        if how == "RNNKERN_EAGER_OP=0":
            assert "EagerLayerBackward" not in names and generated
        elif how == "dispatch mode":
            assert "rnnkern.rnn_layer_forward.default" in mode.ops, mode.ops
            assert "EagerLayerBackward" not in names and generated
        else:
            assert "EagerLayerBackward" in names and not generated
        grads = [p.grad for p in module.parameters()]
        results.append([out, leaf.grad, module.grad_norms.h_per_sample, *grads])
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)
    with torch.no_grad():
        assert module(x)[0].grad_fn is None


AUTOGRAD_CONTEXTS = ["checkpoint", "checkpoint-reentrant", "save_on_cpu", "saved_tensors_hooks", "anomaly"]


@pytest.mark.parametrize("stack", ["1x1", "2x2"])
@pytest.mark.parametrize("context", AUTOGRAD_CONTEXTS)
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_autograd_contexts_like_torch_nn(kind, context, stack):
    """Activation checkpointing (torch.utils.checkpoint, both kinds: the forward runs again in the
    backward), saved-tensor hooks (save_on_cpu, a hook pair that copies), anomaly detection: every
    gradient as torch.nn's, and the recorded norms as without the context, delivered once; for a stack
    (its norms come through the probe) and one layer and direction (through its layer's backward)."""
    from torch.utils.checkpoint import checkpoint

    ours_cls, ref_cls = KINDS[kind]
    torch.manual_seed(5)
    shape = dict(num_layers=int(stack[0]), bidirectional=stack == "2x2")
    ref = ref_cls(3, 5, **shape, dtype=torch.float64)
    ours = ours_cls(3, 5, **shape, dtype=torch.float64, record_grad_norms=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)

    def loss(module, inputs, within):
        if within == "checkpoint":
            out = checkpoint(lambda t: module(t)[0], inputs, use_reentrant=False)
        elif within == "checkpoint-reentrant":
            out = checkpoint(lambda t: module(t)[0], inputs, use_reentrant=True)
        elif within == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                out = module(inputs)[0]
        elif within == "saved_tensors_hooks":
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
                out = module(inputs)[0]
        elif within == "anomaly":
            with torch.autograd.detect_anomaly():
                out = module(inputs)[0]
        else:
            out = module(inputs)[0]
        return out.pow(2).sum()

    def gradients(module, within):
        leaf = x.clone().requires_grad_()
        module.zero_grad()
        loss(module, leaf, within).backward()
        return [leaf.grad] + [p.grad for p in module.parameters()]

    plain = gradients(ours, None)
    norms = ours.grad_norms
    deliveries = []
    ours.register_grad_norm_hook(lambda module, grad_norms: deliveries.append(grad_norms))
    got, want = gradients(ours, context), gradients(ref, context)
    for a, b, c in zip(got, want, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)
    assert len(deliveries) == 1 and deliveries[0] is ours.grad_norms
    torch.testing.assert_close(ours.grad_norms.h_per_sample, norms.h_per_sample, rtol=1e-6, atol=0)
    if kind == "LSTM":
        torch.testing.assert_close(ours.grad_norms.c_per_sample, norms.c_per_sample, rtol=1e-6, atol=0)
