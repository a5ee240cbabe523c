"""The public API around the modules: errors as torch.nn's, backend choice, convert, patch_torch."""

import copy
import importlib
import io
import os
import pickle
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkern

MODULES = {"LSTM": (rnnkern.LSTM, torch.nn.LSTM), "GRU": (rnnkern.GRU, torch.nn.GRU),
           "RNN": (rnnkern.RNN, torch.nn.RNN)}


def _pair(kind, **kwargs):
    ours_cls, torch_cls = MODULES[kind]
    torch.manual_seed(0)
    ref = torch_cls(3, 5, 2, **kwargs)
    ours = ours_cls(3, 5, 2, backend="reference", **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _hx(kind, *shapes, dtype=torch.float32):
    tensors = [torch.randn(s, dtype=dtype) for s in shapes]
    return tuple(tensors) if kind == "LSTM" else tensors[0]


BAD_INPUTS = {
    "4-D input": lambda k: (torch.randn(1, 4, 2, 3), None),
    "1-D input": lambda k: (torch.randn(3), None),
    "wrong input size": lambda k: (torch.randn(4, 2, 4), None),
    "float64 input": lambda k: (torch.randn(4, 2, 3, dtype=torch.float64), None),
    "integer input": lambda k: (torch.randint(0, 3, (4, 2, 3)), None),
    "zero length": lambda k: (torch.randn(0, 2, 3), None),
    "hx wrong batch": lambda k: (torch.randn(4, 2, 3), _hx(k, (2, 3, 5), (2, 3, 5))),
    "cx wrong size": lambda k: (torch.randn(4, 2, 3), _hx(k, (2, 2, 5), (2, 2, 4))),
    "hx float64": lambda k: (torch.randn(4, 2, 3), _hx(k, (2, 2, 5), (2, 2, 5), dtype=torch.float64)),
    "hx 2-D for batched": lambda k: (torch.randn(4, 2, 3), _hx(k, (2, 5), (2, 5))),
    "hx 3-D for unbatched": lambda k: (torch.randn(4, 3), _hx(k, (2, 1, 5), (2, 1, 5))),
    "packed wrong input size": lambda k: (pack_padded_sequence(torch.randn(4, 3, 4), [4, 2, 1]), None),
    "packed float64": lambda k: (pack_padded_sequence(torch.randn(4, 3, 3).double(), [4, 2, 1]), None),
    "packed cx wrong width": lambda k: (pack_padded_sequence(torch.randn(4, 2, 3), [4, 4]),
                                        _hx(k, (2, 2, 5), (2, 2, 6))),
    "packed rows wrong width, lengths differ": lambda k: (pack_padded_sequence(torch.randn(4, 2, 4), [4, 3]),
                                                          None),
    "packed hx wrong batch": lambda k: (pack_padded_sequence(torch.randn(4, 3, 3), [4, 2, 1],
                                                             enforce_sorted=False),
                                        _hx(k, (2, 2, 5), (2, 2, 5))),
    "tuple hx for GRU/RNN": lambda k: (torch.randn(4, 2, 3), (torch.randn(2, 2, 5),)),
    "not a tensor": lambda k: ([1.0, 2.0], None),
}


LSTM_ONLY = {"cx wrong size", "packed cx wrong width"}


@pytest.mark.parametrize("kind,case", [(k, c) for k in MODULES for c in BAD_INPUTS
                                       if k == "LSTM" or c not in LSTM_ONLY])
def test_bad_input_raises_exactly_like_torch_nn(kind, case):
    ref, ours = _pair(kind)
    x, hx = BAD_INPUTS[case](kind)
    with pytest.raises(Exception) as expected:
        ref(x, hx)
    with pytest.raises(Exception) as actual:
        ours(x, hx)
    assert type(actual.value) is type(expected.value)
    assert str(actual.value) == str(expected.value)


def _results_and_grads(module, x, hx, leaf):
    """Outputs (packed: their data), final states and the gradients of the input's `leaf`, hx's tensors
    that require them and every parameter."""
    module.zero_grad()
    out, state = module(x, hx)
    out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    states = list(state) if isinstance(state, tuple) else [state]
    leaves = [leaf] + [t for t in (hx if isinstance(hx, (tuple, list)) else [hx]) if t.requires_grad]
    torch.autograd.backward([out] + states, [torch.ones_like(t) for t in [out] + states])
    grads = [t.grad.clone() for t in leaves] + [p.grad.clone() for p in module.parameters()]
    for t in leaves:
        t.grad = None
    return [out.detach()] + [t.detach() for t in states] + grads


def _accepted_case(case, backend):
    """(torch.nn module, rnnkern module, input, hx, the input's leaf) of an input torch.nn accepts though it
    looks wrong."""
    torch.manual_seed(1)
    f64 = torch.float64
    if case.startswith("gru"):
        ref, ours = torch.nn.GRU(3, 5, dtype=f64), rnnkern.GRU(3, 5, dtype=f64, backend=backend)
    else:
        kwargs = dict(proj_size=2, bidirectional=True) if case == "lstm c0 narrower" else {}
        ref = torch.nn.LSTM(3, 5, 2, dtype=f64, **kwargs)
        ours = rnnkern.LSTM(3, 5, 2, dtype=f64, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 3, dtype=f64)
    h0, c0 = torch.randn(2, 3, 5, dtype=f64), torch.randn(2, 3, 5, dtype=f64)
    if case == "lstm c0 narrower":
        hx = (torch.randn(4, 3, 2, dtype=f64), torch.randn(4, 3, 5, dtype=torch.float32))
    elif case == "lstm c0 narrower in a list":
        hx = [h0, c0.float()]
    elif case == "lstm c0 integer":
        hx = (h0, torch.randint(-2, 3, (2, 3, 5)))
    elif case == "lstm c0 bool":
        hx = (h0, torch.rand(2, 3, 5) > 0.5)
    elif case == "lstm hx of three, unbatched":
        x, hx = x[:, 0], (h0[:, 0], c0[:, 0], torch.randn(7))
    elif case == "lstm hx of three, packed unsorted":
        hx = (h0, c0, torch.randn(7))
    else:  # "gru packed hx with extra rows"
        hx = torch.randn(1, 3, 5, dtype=f64)
    leaf = x
    if case.startswith("gru") or case.endswith("packed unsorted"):
        x = pack_padded_sequence(x[:, :2], torch.tensor([2, 4]), enforce_sorted=False)
        leaf = x.data
    return ref, ours, x, hx, leaf


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in rnnkern.backends()])
@pytest.mark.parametrize("case", ["lstm c0 narrower", "lstm c0 narrower in a list", "lstm c0 integer",
                                  "lstm c0 bool", "lstm hx of three, unbatched",
                                  "lstm hx of three, packed unsorted",
                                  "gru packed hx with extra rows"])
def test_inputs_torch_nn_accepts_though_they_look_wrong(backend, case):
    """torch.nn takes an LSTM's c0 in another dtype that promotes to a float64 input's (a narrower float,
    an integer, bool: its CPU LSTM promotes c0 in the first cell update); an LSTM's hx of more than two
    tensors where it rebuilds the pair from the first two (an unbatched input, a packed unsorted one);
    and a packed unsorted batch with an hx of more rows than the batch (it reorders hx before checking
    its shape, so the extra rows drop out): the same results and gradients, dtypes included."""
    ref, ours, x, hx, leaf = _accepted_case(case, backend)
    states = [t for t in (hx[:2] if isinstance(hx, (tuple, list)) else [hx]) if t.is_floating_point()]
    for t in [leaf] + states:
        t.requires_grad_()
    want = _results_and_grads(ref, x, hx, leaf)
    got = _results_and_grads(ours, x, hx, leaf)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", ["c0 of fewer layers", "h0 of more layers", "c0 of four dimensions",
                                  "rows narrower", "rows wider"])
def test_packed_lstm_input_torch_nn_leaves_unchecked(case):
    """torch.nn.LSTM runs check_forward_args for every input but a PackedSequence (and its other cells for
    that one too); ATen then reads past c0 (a segfault: c0 of fewer layers than h0, or of four
    dimensions) or its oneDNN path reads the rows with the module's width (float32, sequences of one
    length: past their end where they are narrower). rnnkern raises what check_forward_args raises."""
    ref, ours = _pair("LSTM", bidirectional=True)
    width = {"rows narrower": 2, "rows wider": 4}.get(case, 3)
    x = pack_padded_sequence(torch.randn(4, 2, width), [4, 4])
    shapes = {"c0 of fewer layers": ((4, 2, 5), (3, 2, 5)), "h0 of more layers": ((5, 2, 5), (4, 2, 5)),
              "c0 of four dimensions": ((4, 2, 5), (4, 2, 5, 2))}
    hx = tuple(torch.randn(s) for s in shapes[case]) if case in shapes else None
    with pytest.raises(RuntimeError) as expected:
        states = hx if hx is not None else _hx("LSTM", (4, 2, 5), (4, 2, 5))
        ref.check_forward_args(x.data, states, x.batch_sizes)
    with pytest.raises(RuntimeError) as actual:
        ours(x, hx)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("kind", list(MODULES))
def test_subclass_state_dict_and_repr(kind):
    ours_cls, torch_cls = MODULES[kind]
    m = ours_cls(3, 5, num_layers=2, bidirectional=True)
    assert isinstance(m, torch_cls)
    t = torch_cls(3, 5, num_layers=2, bidirectional=True)
    assert list(m.state_dict()) == list(t.state_dict())
    t.load_state_dict(m.state_dict())
    m.load_state_dict(t.state_dict())
    assert repr(m) == repr(t).replace(torch_cls.__name__, ours_cls.__name__)
    m.hidden_grad_clip = 1.5
    assert "hidden_grad_clip=1.5" in repr(m)


def test_unknown_backend_names_valid_ones():
    with pytest.raises(ValueError, match="'reference'") as err:
        rnnkern.LSTM(3, 4, backend="cudnn")
    for name in ["auto", "cpu", "cuda", "triton", "reference"]:
        assert repr(name) in str(err.value)
    m = rnnkern.LSTM(3, 4)
    m.backend = "nope"
    with pytest.raises(ValueError, match="valid backends"):
        m(torch.randn(2, 1, 3))


def test_backend_unusable_for_input_raises_runtime_error():
    m = rnnkern.GRU(3, 4, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        m(torch.randn(2, 1, 3))


@pytest.mark.parametrize("bad", [0, -1.0, "1", True])
def test_bad_clip_raises(bad):
    with pytest.raises(ValueError, match="hidden_grad_clip"):
        rnnkern.RNN(3, 4, hidden_grad_clip=bad)


def test_auto_and_backends_and_build_info():
    usable = rnnkern.backends()
    assert usable[-1] == "reference"  # (preference order: the oracle last)
    assert usable == [n for n in ("cuda", "triton", "cpu", "reference") if n in usable]
    info = rnnkern.build_info()
    for key in ["rnnkern", "torch", "torch_cuda", "extension", "cuda_kernels", "cuda_archs", "backends"]:
        assert key in info
    if info["extension"]:
        assert "cpu" in usable
    m = rnnkern.LSTM(3, 4)  # auto
    out, _ = m(torch.randn(2, 1, 3))
    assert out.shape == (2, 1, 4)


def test_options_are_plain_attributes():
    m = rnnkern.LSTM(3, 4, backend="reference", record_grad_norms=True, hidden_grad_clip=2.0)
    assert (m.backend, m.record_grad_norms, m.hidden_grad_clip) == ("reference", True, 2.0)
    m.record_grad_norms = False
    m(torch.randn(2, 1, 3))[0].sum().backward()
    assert m.grad_norms is None


def test_convert_in_place_keeps_everything():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.Identity())
            self.dec = torch.nn.GRU(4, 2, batch_first=True)
            self.head = torch.nn.Linear(2, 1)

    net = Net().double().eval()
    lstm, gru = net.enc[0], net.dec
    calls = []
    gru.register_forward_hook(lambda *a: calls.append(1))
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = net.dec(net.enc[0](x)[0].transpose(0, 1))[0]
    assert rnnkern.convert(net, backend="reference", record_grad_norms=True) is net
    assert net.enc[0] is lstm and net.dec is gru
    assert type(lstm) is rnnkern.LSTM and type(gru) is rnnkern.GRU
    assert not gru.training and lstm.weight_hh_l0.dtype == torch.float64
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    actual = net.dec(net.enc[0](x)[0].transpose(0, 1))[0]
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2 and gru.record_grad_norms


def test_patch_torch_builds_rnnkern_modules():
    original = torch.nn.LSTM
    with rnnkern.patch_torch(backend="reference", record_grad_norms=True):
        m = torch.nn.LSTM(3, 4)
        g = torch.nn.modules.rnn.GRU(3, 4)
        assert isinstance(m, rnnkern.LSTM) and isinstance(g, rnnkern.GRU)
        assert m.record_grad_norms and m.backend == "reference"
        # rnnkern itself still runs while patched
        out, _ = rnnkern.LSTM(3, 4)(torch.randn(2, 1, 3))
        out.sum().backward()
        m(torch.randn(2, 1, 3))[0].sum().backward()
        assert m.grad_norms is not None
    assert torch.nn.LSTM is original
    patch = rnnkern.patch_torch().start()
    assert torch.nn.RNN is not rnnkern.modules.TorchRNN
    patch.stop()
    assert torch.nn.RNN is rnnkern.modules.TorchRNN


@pytest.mark.parametrize("order", ["last_first", "first_first"])
def test_patch_torch_nested_patches_stopped_in_any_order(order):
    """torch.nn holds the newest started patch's classes; once every patch is stopped, torch's own,
    whichever order they were stopped in."""
    original = torch.nn.GRU
    outer = rnnkern.patch_torch(backend="reference").start()
    inner = rnnkern.patch_torch(backend="cpu", record_grad_norms=True).start()
    try:
        assert torch.nn.GRU(2, 3).record_grad_norms
        first, second = (inner, outer) if order == "last_first" else (outer, inner)
        first.stop()
        remaining = torch.nn.modules.rnn.GRU(2, 3)
        assert isinstance(remaining, rnnkern.GRU)
        assert remaining.backend == ("reference" if first is inner else "cpu")
        second.stop()
        assert torch.nn.GRU is original and torch.nn.modules.rnn.GRU is original
        assert type(torch.nn.GRU(2, 3)) is original
        first.stop()  # (stopping twice: nothing)
        assert torch.nn.GRU is original
    finally:
        inner.stop()
        outer.stop()


def test_deepcopy_pickle_and_save():
    m = rnnkern.LSTM(3, 4, backend="reference", record_grad_norms=True, hidden_grad_clip=0.5)
    x = torch.randn(3, 2, 3)
    m(x)[0].sum().backward()
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is rnnkern.LSTM and clone.hidden_grad_clip == 0.5
        torch.testing.assert_close(clone(x)[0], m(x)[0])
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], m(x)[0])


def test_nan_propagates_like_torch_nn():
    ref, ours = _pair("LSTM")
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    out_ref, _ = ref(x)
    out, _ = ours(x)
    assert torch.equal(torch.isnan(out), torch.isnan(out_ref))


def test_explain_names_the_backend_and_why():
    m = rnnkern.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    text = rnnkern.explain(m, x)
    expected = "cpu" if "cpu" in rnnkern.backends() else "reference"
    assert f"backend '{expected}' (chosen by auto) for cpu float32 input" in text
    m.backend = "reference"
    assert "backend 'reference' (requested)" in rnnkern.explain(m, x)
    m.backend = "cuda"
    with pytest.raises(RuntimeError, match="cuda"):
        rnnkern.explain(m, x)


def test_explain_checks_the_input_as_forward_does():
    """explain raises torch.nn's exception for input the module rejects, accepts what it accepts (an
    LSTM's narrower c0, promoted), says what torch.autocast changes, and names what it takes."""
    m = rnnkern.LSTM(5, 7)
    for x in (torch.randn(4, 3, 6), torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(5)):
        with pytest.raises(Exception) as expected:
            torch.nn.LSTM(5, 7)(x)
        with pytest.raises(type(expected.value)) as actual:
            rnnkern.explain(m, x)
        assert str(actual.value) == str(expected.value)
    m64 = rnnkern.LSTM(5, 7).double()
    x64 = torch.randn(4, 3, 5, dtype=torch.float64)
    assert "float64 input" in rnnkern.explain(m64, x64, (torch.zeros(1, 3, 7, dtype=torch.float64),
                                                          torch.zeros(1, 3, 7)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "torch.autocast runs this call in bfloat16" in rnnkern.explain(m, torch.randn(4, 3, 5))
    with pytest.raises(TypeError, match="takes an rnnkern module"):
        rnnkern.explain(torch.nn.GRU(3, 4), torch.randn(2, 1, 3))


CHANGED_ATTRIBUTES = [("dropout", -0.1), ("dropout", 1.5), ("num_layers", 3), ("num_layers", 1),
                      ("bias", False), ("bidirectional", True), ("hidden_size", 6), ("input_size", 4),
                      # (not numbers: ATen's argument parser raises its TypeError, in any mode and for one
                      # layer too; rnnkern read them with float(): it ran with "0.3", raised other errors)
                      ("dropout", "0.3"), ("dropout", None), ("dropout", torch.tensor([0.3]))]


@pytest.mark.parametrize("attribute,value", CHANGED_ATTRIBUTES)
@pytest.mark.parametrize("kind", list(MODULES))
def test_attributes_changed_after_construction(kind, attribute, value):
    """torch.nn's exception where it raises; where it computes with parameters that no longer match
    the module's attributes (some LSTM cases), rnnkern raises a clear error instead of guessing."""
    ref, ours = _pair(kind, dropout=0.2)
    setattr(ref, attribute, value)
    setattr(ours, attribute, value)
    x = torch.randn(4, 2, 3)
    try:
        ref(x)
    except Exception as error:
        with pytest.raises(type(error)) as actual:
            ours(x)
        assert str(actual.value) == str(error)
    else:
        with pytest.raises(RuntimeError, match="do not match its configuration"):
            ours(x)


@pytest.mark.parametrize("subclassed", [False, True], ids=["own-class", "user-subclass"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_replaced_and_swapped_weights_are_used_like_torch_nn(kind, subclassed):
    """Weights replaced between calls (a new Parameter set on the module), changed in place, or swapped
    for one call by torch.func.functional_call: every call computes with the weights torch.nn's would,
    and the module's _flat_weights follow as torch.nn's do (rnnkern re-reads them without Module's
    attribute lookups where only the registered parameters can be found; a user's subclass takes
    torch's own path)."""
    ours_cls, ref_cls = MODULES[kind]
    if subclassed:
        ours_cls = type("UserSubclass", (ours_cls,), {})
    torch.manual_seed(8)
    ref = ref_cls(3, 5, num_layers=2)
    ours = ours_cls(3, 5, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)

    def same():
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-6, atol=1e-6)

    same()
    fresh = torch.randn_like(ref.weight_hh_l1)
    for m in (ref, ours):
        m.weight_hh_l1 = torch.nn.Parameter(fresh.clone())
    same()
    assert ours._flat_weights[ours._flat_weights_names.index("weight_hh_l1")] is ours.weight_hh_l1
    for m in (ref, ours):
        with torch.no_grad():
            m.bias_ih_l0.mul_(-3.0)
    same()
    swapped = {"weight_ih_l0": torch.randn_like(ref.weight_ih_l0),
               "bias_hh_l1": torch.randn_like(ref.bias_hh_l1)}
    torch.testing.assert_close(torch.func.functional_call(ours, swapped, (x,))[0],
                               torch.func.functional_call(ref, swapped, (x,))[0], rtol=1e-6, atol=1e-6)
    same()  # (the module's own weights again after the swap)


def test_parametrized_weights_are_evaluated_as_often_as_in_torch_nn():
    """A parametrization runs as many times per forward as in torch.nn: spectral_norm's power iteration
    then advances alike, and the results stay equal call after call."""
    torch.manual_seed(6)
    ref = torch.nn.GRU(3, 4)
    ours = rnnkern.GRU(3, 4, backend="reference")
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        torch.manual_seed(7)
        torch.nn.utils.parametrizations.spectral_norm(m, "weight_hh_l0")
    x = torch.randn(5, 2, 3)
    for _ in range(3):
        torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.parametrizations.weight_hh_l0[0]._u, ref.parametrizations.weight_hh_l0[0]._u)


def test_explain_names_the_layer_schedule(monkeypatch):
    """The layer wavefront where it applies (not for one layer, nor bidirectional stacks)."""
    x = torch.randn(5, 2, 3)
    deep, one = rnnkern.LSTM(3, 4, num_layers=3), rnnkern.LSTM(3, 4)
    assert "wavefront" not in rnnkern.explain(deep, x)
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", "16")
    assert "layers: a wavefront of 16-step chunks (one after another on the CPU" in rnnkern.explain(deep, x)
    assert "wavefront" not in rnnkern.explain(one, x)
    assert "wavefront" not in rnnkern.explain(rnnkern.LSTM(3, 4, num_layers=3, bidirectional=True), x)


def test_explain_says_how_the_wide_kernels_exchange(monkeypatch):
    """The wide kernels' exchange (explain's text, here without a GPU): tagged words in the forward by
    default, the grid barrier with RNNKERN_WIDE_EXCHANGE=barrier; the cluster kernels' either way."""
    explain = importlib.import_module("rnnkern.explain")  # (rnnkern.explain is the function)
    monkeypatch.delenv("RNNKERN_WIDE_EXCHANGE", raising=False)
    assert "h_t as tagged words" in explain._exchange_text(2)
    monkeypatch.setenv("RNNKERN_WIDE_EXCHANGE", "barrier")
    assert explain._exchange_text(2).startswith("through L2 with grid barriers")
    assert "st.async" in explain._exchange_text(1)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and "cuda" in rnnkern.backends()),
                    reason="needs a CUDA GPU and rnnkern's CUDA kernels")
def test_explain_names_the_cuda_kernel_and_why(monkeypatch):
    """auto: for a small layer the cluster kernels with the st.async exchange on sm_90 (float32 and
    16-bit; float64 the grid-wide persistent kernel), the grid-wide persistent kernel elsewhere; for a
    layer too large for one cluster the wide kernels (tiles of up to 16 rows); for a large layer whose tiles
    would be larger the per-step kernels, with the layer's work per block and step against auto's
    limit; a forced choice names the variable."""
    clusters = torch.cuda.get_device_capability()[0] >= 9
    small = rnnkern.LSTM(8, 256, backend="cuda").cuda()
    text = rnnkern.explain(small, torch.randn(5, 16, 8, device="cuda"))
    if clusters:
        # exact float32: four tiles of 4 rows (the FMA products scale with a tile's rows)
        assert "persistent cluster kernel (chosen by auto" in text and "4 cluster(s) of 16 blocks" in text, text
        assert "one per tile of up to 4 batch rows" in text and "st.async" in text, text
        assert "TF32" not in text, text
        monkeypatch.setenv("RNNKERN_TILE_ROWS", "16")
        text = rnnkern.explain(small, torch.randn(5, 16, 8, device="cuda"))
        assert "1 cluster(s) of 16 blocks" in text and "RNNKERN_TILE_ROWS=16" in text, text
        # TF32 allowed: auto keeps the exact products on small tiles (exact_beats_tf32), takes TF32 on
        # 16-row ones
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            text = rnnkern.explain(small, torch.randn(5, 16, 8, device="cuda"))
            assert "on TF32 tensor cores" in text and "1 cluster(s) of 16 blocks" in text, text
            monkeypatch.delenv("RNNKERN_TILE_ROWS")
            text = rnnkern.explain(small, torch.randn(5, 16, 8, device="cuda"))
            assert "exact float32 products although torch allows TF32" in text, text
            assert "4 cluster(s) of 16 blocks" in text, text
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    else:
        assert "persistent kernel, one launch per layer and direction" in text, text
    wide_auto = rnnkern.LSTM(8, 768, backend="cuda").cuda().half()
    text = rnnkern.explain(wide_auto, torch.randn(5, 16, 8, device="cuda", dtype=torch.float16))
    if clusters:
        assert "persistent wide kernel (chosen by auto" in text and "h_t as tagged words" in text, text
    small64 = rnnkern.LSTM(8, 256, backend="cuda").cuda().double()
    text = rnnkern.explain(small64, torch.randn(5, 16, 8, device="cuda", dtype=torch.float64))
    assert "persistent kernel, one launch per layer and direction" in text, text
    large = rnnkern.LSTM(8, 1024, backend="cuda").cuda()
    text = rnnkern.explain(large, torch.randn(5, 64, 8, device="cuda"))
    assert "per-step kernels" in text and "multiply-adds, is above" in text
    half = rnnkern.LSTM(8, 256, backend="cuda").cuda().half()
    text = rnnkern.explain(half, torch.randn(5, 16, 8, device="cuda", dtype=torch.float16))
    if clusters:
        # 16-bit: two tiles of 8 rows (each still one 16-row tensor-core tile)
        assert "persistent cluster kernel (chosen by auto" in text and "2 cluster(s) of 16 blocks" in text, text
        assert "one per tile of up to 8 batch rows" in text, text
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", "step")
    assert "RNNKERN_CUDA_KERNEL=step" in rnnkern.explain(small, torch.randn(5, 16, 8, device="cuda"))
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", "cluster")
    monkeypatch.setenv("RNNKERN_TILE_ROWS", "16")
    text = rnnkern.explain(half, torch.randn(5, 40, 8, device="cuda", dtype=torch.float16))
    monkeypatch.delenv("RNNKERN_TILE_ROWS")
    if torch.cuda.get_device_capability()[0] >= 9:
        # 40 rows: 3 tiles of at most 16; H = 256 over 16 blocks.
        assert "3 cluster(s) of 16 blocks" in text and "16 hidden units" in text, text
        assert "with the cluster barrier" in text, text
    else:
        assert "no thread-block clusters" in text, text
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", "cluster-async")
    text = rnnkern.explain(small, torch.randn(5, 16, 8, device="cuda"))
    if clusters:
        assert "RNNKERN_CUDA_KERNEL=cluster-async" in text and "st.async" in text, text
    else:
        assert "no thread-block clusters" in text, text
    monkeypatch.setenv("RNNKERN_CUDA_KERNEL", "wide")
    wide = rnnkern.LSTM(8, 768, backend="cuda").cuda().half()
    text = rnnkern.explain(wide, torch.randn(5, 16, 8, device="cuda", dtype=torch.float16))
    if clusters:
        # Too large for one cluster; 16 units (64 rows of W_hh) per block: 48 blocks a tile of 8 rows
        # through L2.
        assert "persistent wide kernel (RNNKERN_CUDA_KERNEL=wide)" in text, text
        assert "2 group(s) of 48 blocks" in text and "h_t as tagged words" in text, text
        monkeypatch.setenv("RNNKERN_WIDE_EXCHANGE", "barrier")
        text = rnnkern.explain(wide, torch.randn(5, 16, 8, device="cuda", dtype=torch.float16))
        assert "through L2 with grid barriers" in text and "WIDE_EXCHANGE=barrier" in text, text
    else:
        assert "no thread-block clusters" in text, text
    assert "per-step kernels" in rnnkern.explain(large, torch.randn(5, 64, 8, device="cuda"))
    monkeypatch.setenv("RNNKERN_CONCURRENT_DIRECTIONS", "1")
    both = rnnkern.LSTM(8, 16, bidirectional=True, backend="cuda").cuda()
    assert "directions: both at once" in rnnkern.explain(both, torch.randn(5, 3, 8, device="cuda"))
    monkeypatch.setenv("RNNKERN_LAYER_WAVEFRONT", "8")
    deep = rnnkern.LSTM(8, 16, num_layers=2, backend="cuda").cuda()
    assert "each layer on its own CUDA stream" in rnnkern.explain(deep, torch.randn(5, 3, 8, device="cuda"))


def test_built_extension_loads():
    """A built rnnkern._C that fails to load (an undefined symbol, say) would otherwise only show as
    skipped compiled-backend tests. `make test` builds it and sets RNNKERN_REQUIRE_EXTENSION=1; any
    _C file present in the package also means it must load."""
    from pathlib import Path

    from rnnkern import _ext

    built = list(Path(_ext.__file__).parent.glob("_C*.so")) + list(Path(_ext.__file__).parent.glob("_C*.pyd"))
    if os.environ.get("RNNKERN_REQUIRE_EXTENSION") == "1" or built:
        assert _ext.unavailable_reason() is None, _ext.unavailable_reason()
    else:
        assert _ext.unavailable_reason() is not None  # nothing built: the compiled backends say why


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in rnnkern.backends()])
@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_bias_gradients_are_separate_tensors(backend, kind):
    """LSTM/RNN layers hand b_ih + b_hh to the step kernels, so both biases get their gradient from
    one tensor: each .grad must still be its own storage (an in-place op on one, e.g. clipping,
    must not change the other), equal to torch.nn's."""
    torch.manual_seed(3)
    ours = getattr(rnnkern, kind)(3, 4, num_layers=2, backend=backend).double()
    ref = getattr(torch.nn, kind)(3, 4, num_layers=2).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for m in (ours, ref):
        m(x)[0].pow(2).sum().backward()
    for layer in range(2):
        b_ih, b_hh = getattr(ours, f"bias_ih_l{layer}").grad, getattr(ours, f"bias_hh_l{layer}").grad
        assert b_ih.data_ptr() != b_hh.data_ptr()
        torch.testing.assert_close(b_ih, getattr(ref, f"bias_ih_l{layer}").grad, rtol=1e-10, atol=1e-10)
        b_ih.mul_(0.5)
        torch.testing.assert_close(b_hh, getattr(ref, f"bias_hh_l{layer}").grad, rtol=1e-10, atol=1e-10)


def test_per_step_products_call_the_blas_directly():
    """The per-step GEMMs reach torch's own BLAS (and cuBLAS) through dlsym; if the symbols were not
    found they would silently take the slower at::mm_out path, so where torch ships them, say so."""
    info = rnnkern.build_info()
    if not info["extension"]:
        pytest.skip("the compiled extension is not built")
    paths = info["per_step_gemm"]
    assert paths["cpu"] in ("blas", "aten")
    if sys.platform.startswith("linux") and torch.backends.mkl.is_available():
        assert paths["cpu"] == "blas"  # torch's bundled MKL exports sgemm_/dgemm_
    if info["cuda_kernels"]:
        assert paths["cuda"] == "cublas"  # torch's CUDA build has loaded libcublas
    assert paths["cpu_bfloat16"] in ("mkl-bfloat16", "float32-weights")
    assert paths["cpu_packed"] in ("mkl-packed", "none")
    if sys.platform.startswith("linux") and torch.backends.mkl.is_available():
        assert paths["cpu_packed"] == "mkl-packed"  # torch's MKL exports cblas_sgemm_pack/_compute
    bf16_dot = False
    if sys.platform.startswith("linux"):  # (elsewhere there is no /proc/cpuinfo to read)
        with open("/proc/cpuinfo") as cpuinfo:
            bf16_dot = " avx512_bf16" in cpuinfo.read()
    if bf16_dot and torch.backends.mkl.is_available() and os.environ.get("RNNKERN_CPU_NATIVE_16BIT") != "0":
        assert paths["cpu_bfloat16"] == "mkl-bfloat16"  # torch's MKL exports cblas_gemm_bf16bf16f32
    m = rnnkern.LSTM(3, 4, dtype=torch.bfloat16)
    said = "MKL's bfloat16 GEMM" if paths["cpu_bfloat16"] == "mkl-bfloat16" else "float32 copies of the weights"
    assert said in rnnkern.explain(m, torch.randn(5, 2, 3, dtype=torch.bfloat16))
