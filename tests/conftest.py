"""Shared test fixtures: which (backend, device, dtype) targets run here, tolerances, model pairs."""

import os

import torch

# The Triton backend runs on CPU tensors through Triton's interpreter when no GPU is present; the
# interpreter is chosen when kernels are decorated, so set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rnnkern  # noqa: E402
from rnnkern import backends as rk_backends  # noqa: E402

CUDA = torch.cuda.is_available()

# Tolerances (rtol, atol) against torch.nn / the oracle computed in float64.
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}

# Backends whose CPU path is an interpreter: they get the reduced parameter sets (every few cases).
SLOW_ON_CPU = {"triton"}


# Backends with several kernel variants on a device, and the variable that forces one, so that the
# whole suite runs on each: CUDA's per-step and persistent recurrences, Triton's per-step and
# time-looped kernels (on the GPU; its interpreted CPU run keeps the automatic choice).
# The CPU backend's time loop runs either over all samples at once (GEMMs and pointwise passes
# parallel inside each step) or per thread over its own samples (csrc/cpu/layer_driver.cpp,
# for_sample_ranges); "auto" picks by size, the tests force each on the suite's small batches.
VARIANTS = {("cuda", "cuda"): ("RNNKERN_CUDA_KERNEL", ("step", "persistent", "cluster", "cluster-async", "wide")),
            ("triton", "cuda"): ("RNNKERN_TRITON_VARIANT", ("step", "loop")),
            ("cpu", "cpu"): ("RNNKERN_CPU_SAMPLE_SPLIT", ("0", "1"))}
VARIANT_IDS = {("RNNKERN_CPU_SAMPLE_SPLIT", "0"): "allrows", ("RNNKERN_CPU_SAMPLE_SPLIT", "1"): "split"}


def _targets():
    """pytest params (backend, device, dtype, variant variable, variant) for every backend usable
    here, with the most precise dtype it supports there."""
    params = []
    for name in rk_backends.names():
        backend = rk_backends.get(name)
        for device in ["cpu"] + (["cuda"] if CUDA else []):
            for dtype in (torch.float64, torch.float32):
                if backend.unsupported_reason(torch.device(device), dtype) is None:
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    variable, kernels = VARIANTS.get((name, device), (None, (None,)))
                    for kernel in kernels:
                        tag = f"-{VARIANT_IDS.get((variable, kernel), kernel)}" if kernel else ""
                        params.append(pytest.param((name, device, dtype, variable, kernel), marks=marks,
                                                   id=f"{name}{tag}-{device}-{str(dtype)[6:]}"))
                    break
    return params


TARGETS = _targets()


@pytest.fixture(params=TARGETS)
def target(request, monkeypatch):
    """(backend name, device, dtype) triple; selects the CUDA kernel variant where there are two."""
    name, device, dtype, variable, kernel = request.param
    if kernel is not None:
        monkeypatch.setenv(variable, kernel)
    if variable == "RNNKERN_CPU_SAMPLE_SPLIT" and torch.get_num_threads() < 2:
        threads = torch.get_num_threads()  # the split needs two threads to happen at all
        torch.set_num_threads(2)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    return name, device, dtype


def pytest_collection_modifyitems(config, items):
    # RNNKERN_TEST_SHARD=i/n keeps every n-th test from the i-th: scripts/gpu_check.sh runs n shards
    # side by side on the lent GPU machine (its time is scarce; its 16 cores idle otherwise).
    shard = os.environ.get("RNNKERN_TEST_SHARD")
    if shard:
        index, count = (int(v) for v in shard.split("/"))
        keep = items[index::count]
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep
    if CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 precision on GPU: TF32 off in every test."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make_pair(cell, input_size, hidden_size, *, backend="reference", dtype=torch.float64,
              device="cpu", **kwargs):
    """A torch.nn module and the rnnkern module with the same state_dict (random, never zero)."""
    kind = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN", "rnn_relu": "RNN"}[cell]
    if cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cell[4:]
    reference = getattr(torch.nn, kind)(input_size, hidden_size, **kwargs).to(device, dtype)
    ours = getattr(rnnkern, kind)(input_size, hidden_size, backend=backend, **kwargs).to(device, dtype)
    ours.load_state_dict(reference.state_dict())
    return reference, ours
