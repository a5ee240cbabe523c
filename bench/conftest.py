"""pytest-benchmark configuration of the rnnkern benchmark suite (`make bench`).

Grid: `--grid NAME` or `RNNKERN_BENCH_GRID=cpu|gpu-quick|gpu-targets|gpu-full` (default: gpu-quick with a
GPU, else cpu).
Backends: every backend of `rnnkern.backends()` that runs on the grid's device and dtype, except
"reference" (add it with `--bench-reference` or `RNNKERN_BENCH_REFERENCE=1`), plus torch.nn in the same run;
a grid that names its backends (gpu-targets: "cuda", i.e. auto) times those alone.
Output: bench/results/<device-slug>.json (gpu-targets: <device-slug>-gpu-targets.json), or under
`RNNKERN_BENCH_OUT`.
CPU threads: `RNNKERN_BENCH_THREADS` (default: torch's default, one per core).
Time budget: `RNNKERN_BENCH_BUDGET_S` seconds (gpu-quick: 170 by default); once spent, the remaining cases
are skipped with a message and the results file says how many were left out.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("rnnkern-bench")
    group.addoption("--grid", default=None, choices=sorted(benchlib.GRIDS),
                    help="benchmark grid (default: $RNNKERN_BENCH_GRID, else gpu-quick with a GPU, else cpu)")
    group.addoption("--bench-reference", action="store_true", default=False,
                    help="also time the (slow) reference backend")


def _grid_name(config) -> str:
    name = config.getoption("--grid") or os.environ.get("RNNKERN_BENCH_GRID") or benchlib.default_grid_name()
    if name not in benchlib.GRIDS:
        raise pytest.UsageError(f"unknown benchmark grid {name!r}; choose one of {sorted(benchlib.GRIDS)}")
    return name


def _with_reference(config) -> bool:
    return config.getoption("--bench-reference") or os.environ.get("RNNKERN_BENCH_REFERENCE") == "1"


def _backend_plan(config):
    """{dtype: [backend names]} to time on the grid's device, and {(backend, dtype): reason} left out."""
    import importlib

    import rnnkern

    registry = importlib.import_module("rnnkern.backends")  # the module; rnnkern.backends is a function

    grid = benchlib.GRIDS[_grid_name(config)]
    device = torch.device(grid["device"])
    names = [n for n in rnnkern.backends() if n != "reference" or _with_reference(config)]
    only = grid.get("backends")  # a grid that names its backends times those alone, without variants
    if only is not None:
        names = [n for n in names if n in only]
    # RNNKERN_BENCH_SKIP: comma-separated labels left out (scripts/gpu_check.sh: kernels that hung).
    skipped = set(filter(None, os.environ.get("RNNKERN_BENCH_SKIP", "").split(",")))
    plan, excluded = {}, {}
    for dtype in grid["dtypes"]:
        plan[dtype] = []
        for name in names:
            reason = registry.get(name).unsupported_reason(device, benchlib.DTYPES[dtype])
            if reason is None:
                plan[dtype].append(name)
                plan[dtype] += [label for label, (base, _) in benchlib.BACKEND_VARIANTS.items()
                                if base == name and device.type == "cuda" and only is None]
            else:
                excluded[(name, dtype)] = reason
        for label in skipped.intersection(plan[dtype]):
            plan[dtype].remove(label)
            excluded[(label, dtype)] = "left out by RNNKERN_BENCH_SKIP"
    return plan, excluded


def pytest_configure(config):
    config._rnnkern_bench_items = []


def pytest_report_header(config):
    try:
        name = _grid_name(config)
        plan, excluded = _backend_plan(config)
    except Exception as exc:  # the header must never hide the real error, which collection reports
        return [f"rnnkern bench: cannot plan the grid: {exc}"]
    lines = [f"rnnkern bench grid: {name} on {benchlib.GRIDS[name]['device']}; backends per dtype: "
             + "; ".join(f"{d}: {', '.join(b) or '(none)'} + torch.nn" for d, b in plan.items())]
    for (backend, dtype), reason in excluded.items():
        lines.append(f"  not timed: backend {backend!r} in {dtype}: {reason}")
    return lines


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    grid = benchlib.GRIDS[_grid_name(config)]
    plan, _ = _backend_plan(config)
    params, ids = [], []
    for shape in grid["shapes"]:  # shape outermost: a time-boxed run covers the first shapes in every dtype
        for dtype in grid["dtypes"]:
            for pass_ in grid.get("passes", benchlib.DEFAULT_PASSES):
                # (no norms under torch.no_grad: nothing to record)
                norm_options = (False,) if pass_ == "infer" else (False, True)
                variants = [("torch.nn", False)] + [(b, n) for b in plan[dtype] for n in norm_options]
                for backend, norms in variants:
                    params.append((shape, dtype, pass_, backend, norms))
                    ids.append(f"{shape.id}-{dtype}-{pass_}-{backend}" + ("-norms" if norms else ""))
    metafunc.parametrize("bench_case", params, ids=ids)


@pytest.fixture(scope="session")
def bench_device(request):
    grid = benchlib.GRIDS[_grid_name(request.config)]
    device = torch.device(grid["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.exit(f"grid {_grid_name(request.config)!r} needs a CUDA GPU and none is available", returncode=2)
    threads = os.environ.get("RNNKERN_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if device.type == "cuda":
        # Plain float32 everywhere: the same arithmetic for torch.nn (cuDNN) and rnnkern.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


class Session:
    """Per-run state: ceilings, the writer, the torch.nn timings shared by all backends, the budget."""

    def __init__(self, config, device):
        name = _grid_name(config)
        grid = benchlib.GRIDS[name]
        self.device = device
        self.start = time.monotonic()
        budget = os.environ.get("RNNKERN_BENCH_BUDGET_S")
        self.budget_s = float(budget) if budget else grid.get("budget_s")
        self.ceilings = benchlib.measure_ceilings(device, grid["dtypes"])
        self.skipped_for_budget = 0
        self.writer = benchlib.ResultsWriter(device, self.ceilings, extra={
            "grid": name, "threads": torch.get_num_threads(), "skipped_for_budget": 0,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
            suffix=f"-{name}" if grid.get("own_file") else "")
        self.torch_nn_ms = {}

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.start > self.budget_s

    def add(self, case):
        if hasattr(os, "getloadavg"):
            self.writer.extra["load_average_at_last_case"] = list(os.getloadavg())
        self.writer.add(case)

    def note_budget_skip(self):
        self.skipped_for_budget += 1
        self.writer.extra["skipped_for_budget"] = self.skipped_for_budget
        self.writer.write()


@pytest.fixture(scope="session")
def bench_session(request, bench_device):
    return Session(request.config, bench_device)


def pytest_collect_file(file_path, parent):
    # The suites are named bench_*.py (not test_*.py) so that `make test` never collects them.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == Path(__file__).parent:
        return pytest.Module.from_parent(parent, path=file_path)
    return None
