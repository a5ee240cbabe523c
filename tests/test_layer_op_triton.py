"""The Triton layer op against the reference backend's (docs/internals.md): outputs, final states,
every gradient, the norms (the probe's gradient) and clipping; opcheck; both kernel variants.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (slow: tiny sizes here).
The reference runs in float64 on the same (rounded) inputs, so every tolerance below is the error
of the Triton backend's own dtype alone.
"""

import os

import torch

if not torch.cuda.is_available():  # the interpreter is chosen when kernels are decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rnnkern import _cells  # noqa: E402
from rnnkern import backends as rk_backends  # noqa: E402
from rnnkern.backends.triton import BACKEND, _common  # noqa: E402
from rnnkern.backends.triton import triton_rnn_layer_backward, triton_rnn_layer_forward  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CELLS = [_cells.LSTM, _cells.GRU, _cells.RNN_TANH, _cells.RNN_RELU]
CELL_IDS = [_cells.NAMES[c] for c in CELLS]
VARIANTS = ["step", "loop"]
REFERENCE = rk_backends.get("reference")

# float32 runs exact ("ieee") dots: only rounding of float32 arithmetic over a few steps.
# float16: h/out rows are stored in float16 (relative 2^-11 each step) and the backward's dots take
# float16 operands, with float32 accumulation and cell state: ~1e-3 relative, O(1) values.
# bfloat16 (GPU only): 8 bits of mantissa (2^-8), same structure.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1.5e-2, torch.bfloat16: 8e-2}


@pytest.fixture
def settings():
    """The backend's settings, restored after the test."""
    saved = dict(vars(_common.SETTINGS))
    yield _common.SETTINGS
    for key, value in saved.items():
        setattr(_common.SETTINGS, key, value)


def make_case(cell, steps, batch, hidden, proj, dtype, packed, bias, seed, scale=1.0):
    """Random layer-op inputs (never zero); proj > 0 adds w_hr (LSTM only)."""
    gen = torch.Generator().manual_seed(seed)
    gates = _cells.GATES[cell]
    if packed:
        lengths = [steps] + torch.randint(1, steps + 1, (batch - 1,), generator=gen).tolist()
        lengths.sort(reverse=True)
        sizes = [sum(1 for n in lengths if n > t) for t in range(steps)]
    else:
        sizes = [batch] * steps
    batch_sizes = torch.tensor(sizes, dtype=torch.int64)
    rows = sum(sizes)
    size_h = proj if (proj and cell == _cells.LSTM) else hidden

    def rand(*shape, amp=1.0):
        values = (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * amp
        values = values + torch.where(values >= 0, 1e-3, -1e-3)  # keep away from exact zeros
        return values.to(dtype).to(DEVICE)

    return dict(
        xp=rand(rows, gates * hidden, amp=2.0 * scale), batch_sizes=batch_sizes,
        h0=rand(batch, size_h), c0=rand(batch, hidden) if cell == _cells.LSTM else None,
        # weights ~ 1.5/sqrt(fan-in): a contracting recurrence at every size, so that rounding is
        # not amplified step after step (a chaotic recurrence makes every low precision "wrong")
        w_hh=rand(gates * hidden, size_h, amp=1.5 / size_h ** 0.5),
        b_hh=rand(gates * hidden) if bias else None,
        w_hr=rand(size_h, hidden, amp=1.5 / hidden ** 0.5) if (proj and cell == _cells.LSTM) else None)


def run_layer(layer, cell, case, reverse, clip, dtype, seed=7):
    """Forward + backward of a random linear loss on out, h_n (and c_n); returns every result."""
    leaves = {k: (v.detach().to(dtype).requires_grad_(True) if k != "batch_sizes" and v is not None
                  else v) for k, v in case.items()}
    probe = torch.zeros(2, case["xp"].shape[0], device=DEVICE, requires_grad=True)
    out, h_n, c_n = layer(cell, leaves["xp"], leaves["batch_sizes"], leaves["h0"], leaves["c0"],
                          leaves["w_hh"], leaves["b_hh"], leaves["w_hr"], reverse, clip, probe)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for tensor in (out, h_n) + ((c_n,) if cell == _cells.LSTM else ()):
        weight = torch.randn(tensor.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        loss = loss + (tensor.double() * weight).sum()
    loss.backward()
    result = {"out": out, "h_n": h_n, "c_n": c_n, "norm_h": probe.grad[0]}
    if cell == _cells.LSTM:
        result["norm_c"] = probe.grad[1]
    for name, leaf in leaves.items():
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            result["grad_" + name] = leaf.grad
    return result


def median_norm(cell, case, reverse):
    """A clip threshold that some rows exceed and others do not: the median unclipped ‖g_t‖."""
    norms = run_layer(REFERENCE.layer, cell, case, reverse, 0.0, torch.float64)["norm_h"]
    return float(norms.median()) + 1e-3


def check_against_reference(cell, case, reverse, clip, dtype):
    """Triton in `dtype` against the reference in float64 on the same rounded inputs."""
    rounded = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
               for k, v in case.items()}
    ours = run_layer(BACKEND.layer, cell, rounded, reverse, clip, dtype)
    ref = run_layer(REFERENCE.layer, cell, rounded, reverse, clip, torch.float64)
    assert set(ours) == set(ref)
    tol = TOLERANCE[dtype]
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        if key.startswith("norm"):
            assert ours[key].dtype == torch.float32
        elif key not in ("c_n",) or cell == _cells.LSTM:
            assert ours[key].dtype == dtype, key
        if cell == _cells.RNN_RELU and dtype in (torch.float16, torch.bfloat16):
            assert_close_but_kinks(ours[key].double(), ref[key].double(), tol, key)
        else:
            torch.testing.assert_close(ours[key].double(), ref[key].double(), rtol=tol, atol=tol,
                                       msg=lambda m, key=key: f"{key}: {m}")
    return ref


def assert_close_but_kinks(ours, ref, tol, key, max_fraction=0.02):
    """ReLU in 16-bit: a pre-activation within rounding of 0 can fall on the other side of the kink
    than in the float64 reference (which does not round h between steps); its gate gradient is then
    0 on one side and not on the other, and that one flip reaches a whole row of grad_w_hh (a unit's
    weights) and, scaled down, earlier steps. So: the whole tensor within tol in relative Frobenius
    norm, and at most max_fraction of its elements beyond tol (a flipped unit's row of a 97 x 97
    grad_w_hh is about 1 %); a real error breaks both."""
    diff = (ours - ref).abs()
    bad = int((diff > tol + tol * ref.abs()).sum())
    relative = float(torch.linalg.vector_norm(ours - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))
    assert relative <= tol and bad <= max_fraction * ref.numel(), (
        f"{key}: relative Frobenius error {relative:.3g} (allowed {tol}); {bad} of {ref.numel()} "
        f"elements beyond {tol} (allowed {max_fraction:.0%}); largest difference {float(diff.max()):.3g}")


# --------------------------------------------------------------------------------------------
# Correctness against the reference.

CASES = list(itertools.product(CELLS, VARIANTS, (False, True), (False, True)))


@pytest.mark.parametrize("cell,variant,reverse,packed", CASES,
                         ids=[f"{_cells.NAMES[c]}-{v}-{'rev' if r else 'fwd'}-{'packed' if p else 'padded'}"
                              for c, v, r, p in CASES])
def test_float64_matches_reference(settings, cell, variant, reverse, packed):
    """Every output and gradient, the norms and clipping, float64 at 1e-10; bias and projection
    alternate across the cases so that every combination of them meets both variants."""
    settings.variant = variant
    index = CASES.index((cell, variant, reverse, packed))
    bias = index % 2 == 0 or cell != _cells.LSTM and index % 3 == 0
    proj = 3 if (cell == _cells.LSTM and (reverse != packed)) else 0
    case = make_case(cell, 5, 3, 5, proj, torch.float64, packed, bias, seed=index)
    clip = median_norm(cell, case, reverse)
    ref = check_against_reference(cell, case, reverse, clip, torch.float64)
    # the clip must have acted on some rows and not on others, or the test proves nothing about it
    assert (ref["norm_h"] > clip).any() and (ref["norm_h"] < clip).any()


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bias_and_projection_all_combinations(settings, cell, variant):
    """No clipping; bias × projection (LSTM) exhaustively, packed, both directions."""
    settings.variant = variant
    for bias, proj, reverse in itertools.product((False, True), (0, 2) if cell == _cells.LSTM else (0,),
                                                 (False, True)):
        case = make_case(cell, 4, 3, 3, proj, torch.float64, True, bias, seed=11 + proj + bias)
        check_against_reference(cell, case, reverse, 0.0, torch.float64)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_several_tiles_per_step(settings, cell):
    """Per-step kernels with 16-wide tiles on odd sizes: several row tiles and column tiles per
    step, so g's norm is summed over tiles and the dots run over several reduction chunks."""
    settings.variant = "step"
    settings.max_block_rows = 16
    settings.max_block_cols = 16
    proj = 19 if cell == _cells.LSTM else 0
    case = make_case(cell, 3, 18, 17, proj, torch.float64, True, True, seed=5)
    check_against_reference(cell, case, True, median_norm(cell, case, True), torch.float64)
    case = make_case(cell, 3, 17, 17, proj, torch.float64, False, False, seed=6)
    check_against_reference(cell, case, False, 0.0, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lower_precision_matches_reference(settings, cell, variant, dtype):
    """float32 (exact dots) and float16 (float32 accumulation and cell state)."""
    settings.variant = variant
    proj = 2 if cell == _cells.LSTM else 0
    case = make_case(cell, 4, 3, 5, proj, torch.float64, True, True, seed=21)
    check_against_reference(cell, case, variant == "loop", median_norm(cell, case, variant == "loop"),
                            dtype)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_saturated_activations(settings, cell):
    """Pre-activations of |x| up to ~60: tanh/sigmoid saturate to ±1/0 exactly enough for 1e-10."""
    settings.variant = "loop"
    case = make_case(cell, 3, 2, 3, 0, torch.float64, False, True, seed=31, scale=30.0)
    check_against_reference(cell, case, False, 0.0, torch.float64)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_propagates_like_reference(settings, cell, variant):
    """A NaN in one input row gives NaN exactly where the reference has NaN (forward and backward);
    its norm is NaN, which leaves g unscaled by the clip."""
    settings.variant = variant
    case = make_case(cell, 3, 3, 3, 0, torch.float64, True, True, seed=41)
    case["xp"][4, 1] = float("nan")  # step 1, sample 1
    ours = run_layer(BACKEND.layer, cell, case, False, 0.5, torch.float64)
    ref = run_layer(REFERENCE.layer, cell, case, False, 0.5, torch.float64)
    for key in ref:
        assert torch.equal(ours[key].isnan(), ref[key].isnan()), key
        assert ours[key].isnan().any() or key in ("norm_c",) or not ref[key].isnan().any()
        finite = ~ref[key].isnan()
        torch.testing.assert_close(ours[key][finite].double(), ref[key][finite].double(),
                                   rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# The ops themselves.

def _op_args(cell, packed, reverse, clip, probe):
    case = make_case(cell, 3, 3, 4, 3 if cell == _cells.LSTM else 0, torch.float64, packed, True,
                     seed=51 + cell)
    leaf = lambda t: None if t is None else t.clone().requires_grad_(True)  # noqa: E731
    norm_probe = (torch.zeros(2, case["xp"].shape[0], device=DEVICE, requires_grad=True)
                  if probe else None)
    return (cell, leaf(case["xp"]), case["batch_sizes"], leaf(case["h0"]), leaf(case["c0"]),
            leaf(case["w_hh"]), leaf(case["b_hh"]), leaf(case["w_hr"]), reverse, clip, norm_probe)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(settings, cell, variant):
    """torch.library.opcheck of the forward op (schema, fake kernel, autograd registration, AOT
    dispatch) and of the backward op."""
    settings.variant = variant
    args = _op_args(cell, True, cell % 2 == 1, 0.7, True)
    torch.library.opcheck(triton_rnn_layer_forward, args)
    out, h_n, c_n, workspace = triton_rnn_layer_forward(*args)
    (_, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, _) = args
    gen = torch.Generator().manual_seed(3)
    grad = lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(DEVICE)  # noqa: E731
    backward_args = (cell, grad(out), grad(h_n), grad(c_n) if cell == _cells.LSTM else None,
                     batch_sizes, h0.detach(), None if c0 is None else c0.detach(), w_hh.detach(),
                     b_hh.detach(), None if w_hr is None else w_hr.detach(), reverse, clip, True,
                     out.detach(), workspace.detach())
    torch.library.opcheck(triton_rnn_layer_backward, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_record_norms_off_gives_zeros_and_same_gradients(settings, cell):
    settings.variant = "step"
    args = _op_args(cell, True, False, 0.7, False)
    out, h_n, c_n, workspace = triton_rnn_layer_forward(*args)
    (_, xp, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse, clip, _) = args
    grads = (torch.randn_like(out), torch.randn_like(h_n),
             torch.randn_like(c_n) if cell == _cells.LSTM else None)
    common = (batch_sizes, h0.detach(), None if c0 is None else c0.detach(), w_hh.detach(),
              b_hh.detach(), None if w_hr is None else w_hr.detach(), reverse, clip)
    off = triton_rnn_layer_backward(cell, *grads, *common, False, out, workspace)
    on = triton_rnn_layer_backward(cell, *grads, *common, True, out, workspace)
    assert torch.count_nonzero(off[-1]) == 0 and off[-1].shape == (2, out.shape[0])
    assert torch.all(on[-1][0] > 0)
    for a, b in zip(off[:-1], on[:-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cell", [_cells.LSTM, _cells.GRU], ids=["lstm", "gru"])
def test_gradcheck(settings, cell):
    """torch.autograd.gradcheck of the layer op in float64 (norm_probe None, clip off)."""
    settings.variant = "loop"
    case = make_case(cell, 2, 2, 2, 0, torch.float64, True, True, seed=61)
    leaf = lambda t: None if t is None else t.clone().requires_grad_(True)  # noqa: E731
    xp, h0, c0, w_hh, b_hh = (leaf(case[k]) for k in ("xp", "h0", "c0", "w_hh", "b_hh"))
    inputs = tuple(t for t in (xp, h0, c0, w_hh, b_hh) if t is not None)

    def fn(xp, h0, *rest):
        c0 = rest[0] if cell == _cells.LSTM else None
        w_hh, b_hh = rest[-2:]
        out, h_n, c_n = BACKEND.layer(cell, xp, case["batch_sizes"], h0, c0, w_hh, b_hh, None,
                                      False, 0.0, None)
        return (out, h_n, c_n) if cell == _cells.LSTM else (out, h_n)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


@triton.jit
def apply_activations(x_ptr, tanh_ptr, sigmoid_ptr, n, BLOCK: tl.constexpr):
    # At module level: a kernel defined inside the test function was sometimes not found again by
    # the interpreter's source rewriter (KeyError) after other kernels had run in the process.
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    tl.store(tanh_ptr + i, _common.tanh(x), mask=i < n)
    tl.store(sigmoid_ptr + i, _common.sigmoid(x), mask=i < n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_activations_accurate_to_a_few_ulp_saturate_and_keep_nan(settings, dtype):
    """The tanh and sigmoid of every kernel (no tl.tanh in the interpreter) against torch's in float64,
    relative to the value: a few units in the last place from 1e-300 (tanh(x) ≈ x, where e^{-2|x|} - 1
    cancels) to saturation; exactly ±1, 0 and 1 there; sigmoid's tiny values below -87 in float32
    (denormals) kept; NaN kept."""
    tiny = torch.finfo(dtype).tiny
    smallest = -300 if dtype == torch.float64 else -37
    magnitudes = torch.cat([torch.logspace(smallest, 2, 700, dtype=torch.float64),
                            torch.linspace(0.01, 3, 300, dtype=torch.float64)])
    x = torch.cat([magnitudes, -magnitudes, torch.tensor([0.0, 1e300, -1e300, float("inf"), -float("inf"),
                                                          float("nan")], dtype=torch.float64)]).to(dtype)
    x = x[x.abs() <= torch.finfo(dtype).max]  # (1e300 is inf in float32: kept as ±inf)
    x = x.to(DEVICE)
    tanh, sigmoid = torch.empty_like(x), torch.empty_like(x)
    apply_activations[(1,)](x, tanh, sigmoid, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    ulp = torch.finfo(dtype).eps
    for got, want in ((tanh, torch.tanh(x.double())), (sigmoid, torch.sigmoid(x.double()))):
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan() & (want.abs() >= tiny)  # (denormal results: absolute, below)
        err = ((got.double() - want) / want)[finite].abs().max()
        assert err <= 4 * ulp, f"relative error {float(err):.3g} = {float(err / ulp):.1f} ulp"
        assert ((got.double() - want)[~want.isnan() & (want.abs() < tiny)].abs() <= tiny * ulp * 4).all()
    assert torch.all(tanh[x.abs() > 20].abs() == 1) and torch.equal(tanh[x == 0], x[x == 0])
    assert torch.all(sigmoid[x > 40] == 1) and torch.all(sigmoid[x == -float("inf")] == 0)
    if dtype == torch.float32:
        assert (sigmoid[(x < -88) & (x > -100)] > 0).all()  # denormals, not 0


# --------------------------------------------------------------------------------------------
# Where it runs.

def test_where_it_runs():
    assert BACKEND.name == "triton"
    assert BACKEND.unsupported_reason(torch.device("cpu"), torch.int32) is not None
    if not CUDA:
        assert BACKEND.unsupported_reason(torch.device("cpu"), torch.float32) is None
        assert "bfloat16" in BACKEND.unsupported_reason(torch.device("cpu"), torch.bfloat16)
        assert BACKEND.unsupported_reason(torch.device("cuda"), torch.float32) is not None
    else:
        assert BACKEND.unsupported_reason(torch.device("cuda"), torch.bfloat16) is None
        assert BACKEND.unsupported_reason(torch.device("cpu"), torch.float32) is not None
    # never "auto" on the CPU
    assert rk_backends.resolve("auto", torch.device("cpu"), torch.float32).name != "triton"


def test_a_faulty_interpreter_makes_the_backend_unusable(monkeypatch):
    """Where this Triton's interpreter cannot run the kernels (Triton 3.6 with NumPy 2.4 or newer), the
    backend says why instead of failing inside a kernel: backends() leaves it out, choosing it raises
    the reason. (On a GPU the kernels are compiled: the interpreter does not matter.)"""
    import rnnkern

    monkeypatch.setattr(_common, "_interpreter_probed", True)
    monkeypatch.setattr(_common, "_interpreter_fault", "the interpreter's fault")
    if CUDA:
        assert "triton" in rnnkern.backends()
        return
    assert "triton" not in rnnkern.backends()
    with pytest.raises(RuntimeError, match="the interpreter's fault"):
        rnnkern.GRU(3, 4, backend="triton")(torch.randn(2, 1, 3))


@pytest.mark.skipif(CUDA, reason="the interpreter runs the kernels only without a GPU (compiled on one)")
def test_interpreter_probe_runs_on_real_tensors_in_any_mode(monkeypatch):
    """The first caller may be under fake tensors and a meta device (opcheck, export): the probe still
    runs on real CPU tensors, and does not declare a working interpreter faulty."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_common, "_interpreter_probed", False)
    with FakeTensorMode(), torch.device("meta"):
        assert _common.interpreter_fault() is None


def test_variant_rule(settings):
    settings.variant = "auto"
    assert _common.use_loop(4, 64, 64, False, torch.float32)
    assert not _common.use_loop(4, 64, 64, False, torch.float64)
    assert not _common.use_loop(4, 64, 64, True, torch.float32)
    assert _common.use_loop(4, 128, 128, False, torch.float16) is False
    assert _common.use_loop(3, 100, 100, False, torch.bfloat16) is False
    assert _common.use_loop(3, 60, 60, False, torch.float16)
    assert not _common.use_loop(1, 256, 256, False, torch.float32)
    settings.variant = "bogus"
    with pytest.raises(ValueError, match="variant"):
        _common.use_loop(1, 4, 4, False, torch.float32)


def test_variant_from_environment(settings, monkeypatch):
    """With no attribute set, RNNKERN_TRITON_VARIANT picks the kernel at each call."""
    settings.variant = None
    monkeypatch.setenv("RNNKERN_TRITON_VARIANT", "step")
    assert not _common.use_loop(1, 4, 4, False, torch.float32)
    monkeypatch.setenv("RNNKERN_TRITON_VARIANT", "loop")
    assert _common.use_loop(1, 1024, 1024, False, torch.float32)
    monkeypatch.delenv("RNNKERN_TRITON_VARIANT")
    assert _common.use_loop(1, 4, 4, False, torch.float32)


def test_compile_fullgraph_module_cpu(settings):
    """torch.compile(fullgraph=True) over a module whose forward calls the op (opaque op on CPU)."""
    if CUDA:
        pytest.skip("the GPU variant of this test runs instead (test_compile_fullgraph_gpu)")
    _compile_check(settings, torch.float64, tol=1e-10)


class _OneLayerLSTM(torch.nn.Module):
    """A module whose forward is the driver's job in miniature: input GEMM, then the layer op."""

    def __init__(self, input_size, hidden, proj):
        super().__init__()
        self.w_ih = torch.nn.Parameter(torch.randn(4 * hidden, input_size) * 0.5)
        self.w_hh = torch.nn.Parameter(torch.randn(4 * hidden, proj) * 0.5)
        self.b_hh = torch.nn.Parameter(torch.randn(4 * hidden) * 0.5)
        self.w_hr = torch.nn.Parameter(torch.randn(proj, hidden) * 0.5)

    def forward(self, x, batch_sizes, h0, c0, probe):
        xp = torch.mm(x, self.w_ih.t())
        out, h_n, c_n = BACKEND.layer(_cells.LSTM, xp, batch_sizes, h0, c0, self.w_hh, self.b_hh,
                                      self.w_hr, False, 0.5, probe)
        return out.sum() + h_n.sum() + c_n.sum()


def _compile_check(settings, dtype, tol):
    """Compiled (fullgraph) and eager agree on the loss and on every gradient, norms included."""
    settings.variant = "step"
    torch.manual_seed(0)
    model = _OneLayerLSTM(3, 5, 2).to(DEVICE, dtype)
    batch_sizes = torch.tensor([3, 3, 2, 1])
    x = torch.randn(9, 3, device=DEVICE, dtype=dtype)
    h0 = torch.randn(3, 2, device=DEVICE, dtype=dtype)
    c0 = torch.randn(3, 5, device=DEVICE, dtype=dtype)
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for fn in (model, compiled):
        probe = torch.zeros(2, 9, device=DEVICE, requires_grad=True)
        model.zero_grad()
        loss = fn(x, batch_sizes, h0, c0, probe)
        loss.backward()
        results.append([loss.detach(), probe.grad] + [p.grad.clone() for p in model.parameters()])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------
# GPU: 16-bit dtypes, bigger sizes, TF32, compile with Inductor.

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_matches_reference(settings, cell, variant, dtype):
    settings.variant = variant
    hidden = 24 if variant == "loop" else 97  # the loop kernel must fit float64 weights on chip
    proj = 33 if cell == _cells.LSTM else 0
    case = make_case(cell, 9, 37, hidden, proj, torch.float64, True, True, seed=71)
    check_against_reference(cell, case, variant == "step", 3.0, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_gpu_tf32_option(settings, cell):
    settings.allow_tf32 = True
    settings.variant = "step"
    case = make_case(cell, 5, 9, 40, 0, torch.float64, False, True, seed=81)
    rounded = {k: (v.float() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
               for k, v in case.items()}
    ours = run_layer(BACKEND.layer, cell, rounded, False, 0.0, torch.float32)
    ref = run_layer(REFERENCE.layer, cell, rounded, False, 0.0, torch.float64)
    for key in ref:
        torch.testing.assert_close(ours[key].double(), ref[key].double(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_compile_fullgraph_gpu(settings, dtype):
    _compile_check(settings, dtype, tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_norms_and_gradients_bitwise_reproducible(settings, cell):
    """Several column tiles per row: each tile's Σ squares goes to its own slot and the tiles are
    added in a fixed order (no atomics), so two runs give identical bits (on a GPU, atomic adds
    would not)."""
    settings.variant = "step"
    settings.max_block_cols = 16
    proj = 19 if cell == _cells.LSTM else 0
    case = make_case(cell, 4, 9, 40, proj, torch.float64, True, True, seed=7)
    dtype = torch.float32 if CUDA else torch.float64
    first = run_layer(BACKEND.layer, cell, case, False, 0.5, dtype)
    second = run_layer(BACKEND.layer, cell, case, False, 0.5, dtype)
    for key in first:
        assert torch.equal(first[key], second[key]), key
