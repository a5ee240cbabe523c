"""Forward and forward+backward timings of rnnkern's backends and of torch.nn, in the same run.

Each item is one (shape, dtype, pass, backend, norms) case; see bench/conftest.py for the grid and
options and bench/NOTES.md for what is timed and how the floor is computed.

- "fwd": a training-mode forward (parameters and input require grad, so the graph is recorded).
- "fwdbwd": the same forward and `out.backward(dout)` (gradients of the input, the initial state and all
  parameters).
- "infer": a forward under torch.no_grad() (nothing recorded for a backward), e.g. a decoding step.
- CPU: pytest-benchmark's median over rounds of wall-clock time. GPU: the median of CUDA-event timings with
  the L2 cache flushed before each rep (pytest-benchmark records one synchronised run, which also gives
  the peak memory and sizes the reps, so that the case shows in its table; the JSON holds the CUDA-event
  median).
- Inputs are random and, when one set is at most 32 MiB, three sets are rotated between repetitions.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import time

import pytest
import torch

import rnnkern
from bench import benchlib

_TORCH_CLASSES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN, "rnn_relu": torch.nn.RNN}
_RNNKERN_CLASSES = {"lstm": rnnkern.LSTM, "gru": rnnkern.GRU, "rnn_tanh": rnnkern.RNN, "rnn_relu": rnnkern.RNN}
_ROTATE_MAX_BYTES = 32 << 20


def build_module(shape: benchlib.Shape, backend: str, dtype: torch.dtype, device: torch.device, norms: bool):
    """A one-layer, unidirectional module with input size = hidden size = shape.H."""
    kwargs = {"device": device, "dtype": dtype}
    if shape.cell.startswith("rnn_"):
        kwargs["nonlinearity"] = shape.cell[4:]
    torch.manual_seed(0)
    if backend == "torch.nn":
        return _TORCH_CLASSES[shape.cell](shape.H, shape.H, **kwargs)
    return _RNNKERN_CLASSES[shape.cell](shape.H, shape.H, backend=backend, record_grad_norms=norms, **kwargs)


def make_inputs(shape: benchlib.Shape, dtype: torch.dtype, device: torch.device):
    """Rotating input sets: (x [T,B,H] requiring grad, hx, dout [T,B,H])."""
    one_set = (2 * shape.T * shape.B * shape.H + 2 * shape.B * shape.H) * torch.empty((), dtype=dtype).element_size()
    n_sets = 3 if one_set <= _ROTATE_MAX_BYTES else 1
    gen = torch.Generator(device=device).manual_seed(1)  # drawn where they live: no host-side copies
    sets = []
    for _ in range(n_sets):
        def rand(*size):
            return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)

        x = rand(shape.T, shape.B, shape.H).requires_grad_()
        h0 = (0.5 * rand(1, shape.B, shape.H)).requires_grad_()
        hx = (h0, (0.5 * rand(1, shape.B, shape.H)).requires_grad_()) if shape.cell == "lstm" else h0
        sets.append((x, hx, rand(shape.T, shape.B, shape.H)))
    return sets


def make_step(module, pass_: str):
    if pass_ == "fwd":
        def step(x, hx, dout):
            with torch.enable_grad():
                module(x, hx)
    elif pass_ == "infer":
        def step(x, hx, dout):
            with torch.no_grad():
                module(x, hx)
    else:
        def step(x, hx, dout):
            with torch.enable_grad():
                out, _ = module(x, hx)
            out.backward(dout)
    return step


def measure(benchmark, step, sets, device: torch.device):
    """(median ms, peak memory MiB or None) of step over rotating input sets; also feeds pytest-benchmark."""
    cycle = itertools.cycle(sets)
    step(*next(cycle))  # warm-up: first-call costs (allocations, kernel compilation)
    benchlib.sync(device)
    peak_mb = None
    if device.type == "cuda":
        # One synchronised call serves three ends (the GPU budget is tight): pytest-benchmark's record of
        # the case, the peak memory, and the estimate that sizes the CUDA-event reps.
        def synced():
            step(*next(cycle))
            torch.cuda.synchronize(device)

        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        benchmark.pedantic(synced, rounds=1, iterations=1)
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        ms = benchlib.time_cuda_ms(lambda: step(*next(cycle)), estimate_ms=benchmark.stats.stats.median * 1e3)
        return ms, peak_mb
    estimate_ms = benchlib.time_cpu_ms(lambda: step(*next(cycle)), min_time_s=0.0, min_reps=1, max_reps=1)
    rounds = int(min(30, max(3, 1500.0 / max(estimate_ms, 1e-3))))
    if estimate_ms < 1.0:
        # Sub-millisecond calls (grid cpu-small): a round of single calls would time the timer and the
        # setup's scheduling as much as the call; rounds of ~2 ms of calls instead (pytest-benchmark
        # reports per call). The inputs still rotate, inside the round.
        iterations = int(2.0 / max(estimate_ms, 1e-3)) + 1
        benchmark.pedantic(lambda: step(*next(cycle)), rounds=rounds, iterations=iterations, warmup_rounds=1)
    else:
        benchmark.pedantic(step, setup=lambda: (next(cycle), {}), rounds=rounds, warmup_rounds=0)
    return benchmark.stats.stats.median * 1e3, peak_mb


def torch_nn_ms(session, shape, dtype_name, pass_, benchmark=None):
    """torch.nn's time for a case, measured once per run and shared by every backend."""
    key = (shape, dtype_name, pass_)
    if key not in session.torch_nn_ms:
        device, dtype = session.device, benchlib.DTYPES[dtype_name]
        step = make_step(build_module(shape, "torch.nn", dtype, device, False), pass_)
        sets = make_inputs(shape, dtype, device)
        if benchmark is not None:
            session.torch_nn_ms[key] = measure(benchmark, step, sets, device)
        else:
            cycle = itertools.cycle(sets)
            step(*next(cycle))
            benchlib.sync(device)
            timer = benchlib.time_cuda_ms if device.type == "cuda" else benchlib.time_cpu_ms
            session.torch_nn_ms[key] = (timer(lambda: step(*next(cycle))), None)
    return session.torch_nn_ms[key]


def _one_call_ms(step, args, device) -> float:
    """Wall time (CPU) or CUDA-event time (GPU) of one synchronised call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step(*args)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step(*args)
    return (time.perf_counter() - t0) * 1e3


def paired_norm_cost(plain_step, norms_step, sets, device, case_ms: float) -> float:
    """What recording the norms adds, as a fraction: the median over back-to-back pairs (the order
    alternating) of t(with norms) / t(without) - 1. Two separately timed cases differ by the drift of a
    shared machine between them (±5 % on the CPU grid); a pair's two calls see the same conditions."""
    budget_ms = 3000.0 if device.type == "cpu" else 300.0
    pairs = int(min(25, max(5, budget_ms / max(2 * case_ms, 1e-3))))
    cycle = itertools.cycle(sets)
    ratios = []
    for i in range(pairs):
        args = next(cycle)
        order = (plain_step, norms_step) if i % 2 == 0 else (norms_step, plain_step)
        times = {id(step): _one_call_ms(step, args, device) for step in order}
        ratios.append(times[id(norms_step)] / times[id(plain_step)])
    return statistics.median(ratios) - 1.0


@contextlib.contextmanager
def _environment(variables):
    """Set environment variables (a backend variant's kernel choice) for the duration of a case."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _per_step_reason(module, sets):
    """Why the CUDA backend runs `module` on the per-step kernels (rnnkern.explain's line), or None
    when a persistent kernel runs it."""
    explanation = rnnkern.explain(module, sets[0][0], sets[0][1])
    return explanation.splitlines()[-1].strip() if "per-step kernels" in explanation else None


def test_rnn(benchmark, bench_session, bench_case):
    shape, dtype_name, pass_, backend, norms = bench_case
    session = bench_session
    if session.over_budget():
        session.note_budget_skip()
        pytest.skip(f"benchmark time budget of {session.budget_s:.0f} s spent (RNNKERN_BENCH_BUDGET_S)")
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable): nothing to time")
    benchmark.group = f"{shape.id}-{dtype_name}-{pass_}"
    benchmark.extra_info.update(cell=shape.cell, T=shape.T, B=shape.B, H=shape.H, dtype=dtype_name,
                                passes=pass_, backend=backend, norms=norms)
    norm_cost = None
    if backend == "torch.nn":
        ms, peak_mb = torch_nn_ms(session, shape, dtype_name, pass_, benchmark)
        base_ms = ms
    else:
        device, dtype = session.device, benchlib.DTYPES[dtype_name]
        other = benchlib.ONLY_WHERE_DECLINED.get(backend)
        if other is not None:  # decided before anything is timed
            with _environment({"RNNKERN_CUDA_KERNEL": other}):
                module = build_module(shape, benchlib.backend_variant(backend)[0], dtype, device, False)
                if _per_step_reason(module, make_inputs(shape, dtype, device)) is None:
                    pytest.skip(f"{backend} is timed only where RNNKERN_CUDA_KERNEL={other} declines the layer")
        base_ms = torch_nn_ms(session, shape, dtype_name, pass_)[0]
        name, variables = benchlib.backend_variant(backend)
        with _environment(variables):
            module = build_module(shape, name, dtype, device, norms)
            sets = make_inputs(shape, dtype, device)
            if variables and name == "cuda":  # a forced kernel whose plan declines: not this variant
                reason = _per_step_reason(module, sets)
                if reason is not None:
                    pytest.skip(f"{backend} does not run at this shape: {reason}")
            step = make_step(module, pass_)
            ms, peak_mb = measure(benchmark, step, sets, device)
            if norms and pass_ == "fwdbwd":  # recording costs only in the backward
                plain = make_step(build_module(shape, name, dtype, device, False), pass_)
                plain(*sets[0])  # warm-up
                norm_cost = paired_norm_cost(plain, step, sets, device, ms)
    case = benchlib.make_case(shape, backend, dtype_name, pass_, norms, ms, base_ms, peak_mb, session.ceilings,
                              norm_cost)
    benchmark.extra_info.update(ms=ms, ratio=case["ratio"], fraction_of_floor=case["fraction_of_floor"],
                                norm_cost=norm_cost)
    session.add(case)
