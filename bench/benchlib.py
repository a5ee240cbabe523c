"""Shared pieces of the benchmark suite: the case grid, the physical floor of each case (FLOPs and
minimum bytes, formulas in bench/NOTES.md), the device's measured ceilings, timers and the results
writer (bench/results/<device-slug>.json).

Nothing here asserts speed; it measures and records.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "bench" / "results"

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
PASSES = ("fwd", "fwdbwd", "infer")  # infer: a forward under torch.no_grad (no graph recorded)
DEFAULT_PASSES = ("fwd", "fwdbwd")  # those of a grid that names none
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}

# Every key of a case record, in the order the JSON lists them (the schema of the issue).
CASE_KEYS = ("cell", "backend", "dtype", "T", "B", "H", "pass", "norms", "ms", "torch_nn_ms", "ratio",
             "peak_mem_mb", "flops", "min_bytes", "fraction_of_floor", "norm_cost")
OPTIONAL_CASE_KEYS = ("norm_cost",)  # absent from results files written before it existed
TOP_KEYS = ("device", "torch", "cuda", "commit", "date", "ceilings", "cases")


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: cell type, sequence length T, batch B, hidden size H (input size = H)."""

    cell: str
    T: int
    B: int
    H: int

    @property
    def id(self) -> str:
        return f"{self.cell}-T{self.T}-B{self.B}-H{self.H}"


# ---------------------------------------------------------------------------------------------------
# Grids

def _product(cells, Ts, Bs, Hs) -> List[Shape]:
    return [Shape(c, t, b, h) for c in cells for t in Ts for b in Bs for h in Hs]


GRIDS: Dict[str, Dict[str, object]] = {
    # A smoke test of the suite itself (seconds; numbers meaningless at this size).
    "tiny": {
        "device": "cpu",
        "shapes": [Shape("lstm", 8, 3, 16), Shape("gru", 8, 3, 16), Shape("rnn_tanh", 8, 3, 16)],
        "dtypes": ["float32"],
    },
    # The issue-4 CPU target shapes; float32 only. About 5 minutes on a 2-core x86 machine.
    "cpu": {
        "device": "cpu",
        "shapes": [Shape("lstm", 100, 64, 256), Shape("gru", 100, 64, 256), Shape("rnn_tanh", 100, 64, 256),
                   Shape("lstm", 200, 16, 512), Shape("lstm", 50, 32, 128)],
        "dtypes": ["float32"],
    },
    # What a call costs beyond its arithmetic (argument checks, dispatch, the Python around the ops), where
    # that is most of it: one step at a time (autoregressive decoding, RL rollouts) and short sequences,
    # inference and training; float32, its own results file. Seconds.
    "cpu-small": {
        "device": "cpu",
        "shapes": [Shape("lstm", 1, 1, 64), Shape("gru", 1, 1, 64), Shape("rnn_tanh", 1, 1, 64),
                   Shape("lstm", 1, 32, 128), Shape("lstm", 1, 8, 256), Shape("gru", 1, 8, 256),
                   Shape("lstm", 4, 8, 256), Shape("lstm", 16, 8, 64), Shape("gru", 16, 8, 64)],
        "dtypes": ["float32"],
        "passes": ["infer", "fwdbwd"],
        "own_file": True,
    },
    # The CPU backend's 16-bit layers (rows in the layer's dtype, float accumulation) against torch.nn's
    # own CPU float16 / bfloat16 paths, two of the "cpu" shapes; its own results file.
    "cpu-16bit": {
        "device": "cpu",
        "shapes": [Shape("lstm", 50, 32, 128), Shape("gru", 100, 64, 256)],
        "dtypes": ["bfloat16", "float16"],
        "passes": ["fwdbwd"],
        "own_file": True,
    },
    # The issue-9 shapes (B=16: T=256 H=256 for each cell, T=1024 H=768 LSTM), two in between (they
    # place the persistent/per-step crossover that `auto` uses) and one large-batch, large-H shape where
    # the per-step kernels' GEMMs dominate; float32 and float16 (torch.nn's fastest).
    # Sized for the 15-minute device lease: it stops cleanly after RNNKERN_BENCH_BUDGET_S (170 s by
    # default, inside scripts/gpu_check.sh's 200 s box), the cases left out counted in the results file.
    "gpu-quick": {
        "device": "cuda",
        # (In this order, so that a time-boxed run reaches the shapes beyond one cluster, which only the
        # wide kernels run persistently, before the crossover shapes measured in earlier runs.)
        "shapes": [Shape("lstm", 256, 16, 256), Shape("gru", 256, 16, 256), Shape("rnn_tanh", 256, 16, 256),
                   Shape("lstm", 1024, 16, 768), Shape("lstm", 512, 64, 1024), Shape("lstm", 256, 256, 256),
                   Shape("gru", 256, 16, 512), Shape("lstm", 256, 64, 256)],
        "dtypes": ["float32", "float16"],
        "budget_s": 170.0,
    },
    # A smoke test of the GPU path (CUDA events, fp16, peak memory) in seconds.
    "gpu-smoke": {
        "device": "cuda",
        "shapes": [Shape("lstm", 64, 16, 128), Shape("gru", 64, 16, 128), Shape("rnn_tanh", 64, 16, 128)],
        "dtypes": ["float32", "float16"],
    },
    # Issue 9's targets as it states them: forward+backward, norms off and on, B in {16, 64}, H in
    # {256, 512, 768, 1024}, T = 512, and T = 2048 (the longer of its two lengths, four times the
    # time a case) at B = 16 H = 256, every cell and dtype: `auto` (the backend "cuda", no forced
    # variants) against torch.nn in the same dtype and in float16 (its fastest), nothing else. 64 s
    # on an H200 at T = 512 alone; its own results file (<device>-gpu-targets.json).
    "gpu-targets": {
        "device": "cuda",
        "shapes": (_product(("lstm", "gru", "rnn_tanh"), (512,), (16, 64), (256, 512, 768, 1024))
                   + _product(("lstm", "gru", "rnn_tanh"), (2048,), (16,), (256,))),
        "dtypes": ["float16", "float32", "bfloat16"],
        "backends": ["cuda"],
        "passes": ["fwdbwd"],
        "own_file": True,  # <device>-<grid>.json
        "budget_s": 170.0,
    },
    # The whole grid of the issue: B in {1,16,64,256}, H in {128..1024}, T in {64,512,2048}; hours.
    "gpu-full": {
        "device": "cuda",
        "shapes": _product(("lstm", "gru", "rnn_tanh"), (64, 512, 2048), (1, 16, 64, 256), (128, 256, 512, 1024)),
        "dtypes": ["float32", "bfloat16", "float16"],
    },
}


def default_grid_name() -> str:
    return "gpu-quick" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------
# The floor of a case: FLOPs and the minimum bytes moved (see bench/NOTES.md)

def case_flops(cell: str, T: int, B: int, H: int, pass_: str, input_size: Optional[int] = None) -> float:
    """Matrix-multiply FLOPs of one single-layer, unidirectional pass (pointwise gate math not counted).

    Forward: the input projection (2*T*B*I*G*H) and the recurrent products (2*T*B*H*G*H).
    Backward: four products of the same sizes (dX, dW_ih, dh_{t-1}, dW_hh), i.e. twice the forward.
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    I = H if input_size is None else input_size
    G = GATES[cell]
    fwd = 2.0 * T * B * G * H * (I + H)
    return 3.0 * fwd if pass_ == "fwdbwd" else fwd


def case_min_bytes(cell: str, T: int, B: int, H: int, pass_: str, dtype_bytes: int, norms: bool,
                   input_size: Optional[int] = None) -> float:
    """Bytes a pass must move at the least: every input read once and every output written once.

    Forward reads x [T,B,I], h0 [B,H] (and c0 for LSTM), W_ih [GH,I], W_hh [GH,H], b_ih, b_hh [GH] and
    writes out [T,B,H], h_n (and c_n). Forward+backward additionally reads dout [T,B,H] and writes
    dx [T,B,I], dh0 (and dc0), dW_ih, dW_hh, db_ih, db_hh, plus, with norm recording, the float32 norms
    [T,B] (and [T,B] for the LSTM cell state). Saved activations are not counted: the floor is a lower
    bound that any implementation, even one that recomputed everything, has to pay.
    """
    I = H if input_size is None else input_size
    G = GATES[cell]
    n_states = 2 if cell == "lstm" else 1
    weights = G * H * I + G * H * H + 2 * G * H
    fwd = T * B * I + n_states * B * H + weights + T * B * H + n_states * B * H
    if pass_ in ("fwd", "infer"):
        return float(fwd * dtype_bytes)
    if pass_ != "fwdbwd":
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    bwd = T * B * H + T * B * I + n_states * B * H + weights
    total = (fwd + bwd) * dtype_bytes
    if norms:
        total += 4 * T * B * n_states
    return float(total)


def fraction_of_floor(flops: float, min_bytes: float, ms: float, gemm_flops_per_s: float,
                      copy_bytes_per_s: float) -> float:
    """floor time / measured time, the floor being max(FLOPs / GEMM rate, bytes / copy bandwidth)."""
    floor_s = max(flops / gemm_flops_per_s, min_bytes / copy_bytes_per_s)
    return floor_s / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------------
# Device description

def gpu_slug(name: str) -> str:
    """"NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA A100-SXM4-80GB" -> "a100"; else the name, lowercased,
    non-alphanumerics as dashes."""
    name = name.lower().replace("nvidia", "").strip()
    m = re.search(r"\b([a-z]+\d+[a-z]*)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def device_slug(device: torch.device) -> str:
    """File name stem for a device kind: "cpu-x86-2core", "h100", "h200", "a100", ..."""
    if device.type == "cuda":
        return gpu_slug(torch.cuda.get_device_name(device))
    machine = platform.machine().lower()
    arch = {"x86_64": "x86", "amd64": "x86", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return f"cpu-{arch}-{cores}core"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


# Kernel variants timed as backends of their own: "name:variant" runs backend `name` with these
# environment variables: the CUDA backend's persistent recurrences forced: the grid-wide kernels (which
# `auto` picks where they measured faster) and the thread-block-cluster kernels, with the cluster
# barrier or with the st.async exchange ("cluster-async"), and the same kernels spread over more blocks
# than a cluster holds ("wide"). A case whose shape the forced kernel declines is skipped, not timed on
# the per-step fallback (bench_rnn.py).
BACKEND_VARIANTS = {"cuda:persistent": ("cuda", {"RNNKERN_CUDA_KERNEL": "persistent"}),
                    "cuda:cluster": ("cuda", {"RNNKERN_CUDA_KERNEL": "cluster"}),
                    "cuda:cluster-async": ("cuda", {"RNNKERN_CUDA_KERNEL": "cluster-async"}),
                    "cuda:wide": ("cuda", {"RNNKERN_CUDA_KERNEL": "wide"})}
# Variants timed only where another kernel choice declines the layer: "wide" is for layers too large
# for one cluster (elsewhere the cluster kernels run; the smoke stage of scripts/gpu_check.sh times
# both at B=16 H=256), which keeps the time-boxed grid's budget for the cases that decide `auto`.
ONLY_WHERE_DECLINED = {"cuda:wide": "cluster"}


def backend_variant(label: str):
    """(backend name, environment variables) of a backend label ("cuda" or "cuda:persistent")."""
    return BACKEND_VARIANTS.get(label, (label, {}))


def git_commit() -> str:
    """The checkout's commit; RNNKERN_COMMIT when set (a copied tree without .git, e.g. the GPU machine)."""
    if os.environ.get("RNNKERN_COMMIT"):
        return os.environ["RNNKERN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# Timers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda_ms(fn: Callable[[], object], rep_ms: float = 150.0, min_reps: int = 3, max_reps: int = 100,
                 flush_bytes: int = 256 << 20, stat: Callable = statistics.median,
                 estimate_ms: Optional[float] = None) -> float:
    """Median (or `stat`) of CUDA-event timings of fn() (already warmed up), the L2 cache flushed before
    each rep.

    n = clamp(rep_ms / estimate, min_reps, max_reps) reps, the estimate from one timed run unless the
    caller already has one (estimate_ms).
    """
    flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda")
    if estimate_ms is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end)
    n = int(min(max_reps, max(min_reps, rep_ms / max(estimate_ms, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return stat([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu_ms(fn: Callable[[], object], min_time_s: float = 0.5, min_reps: int = 3, max_reps: int = 50,
                stat: Callable = statistics.median) -> float:
    """Median (or `stat`) wall-clock time of fn() (already warmed up) over reps filling about min_time_s."""
    t0 = time.perf_counter()
    fn()
    estimate = time.perf_counter() - t0
    n = int(min(max_reps, max(min_reps, min_time_s / max(estimate, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return stat(times) * 1e3


# ---------------------------------------------------------------------------------------------------
# Ceilings: the device's GEMM rate and copy bandwidth, measured in the same run

def measure_ceilings(device: torch.device, dtypes: Iterable[str]) -> Dict[str, object]:
    """Measured peak rates: square GEMM FLOP/s per dtype and device copy bandwidth (bytes/s, counting
    read + write), each from the fastest of its reps (a ceiling is the best the device showed, and the
    fastest rep is the one least disturbed by anything else running). TF32 is assumed already disabled
    by the caller for float32."""
    is_cuda = device.type == "cuda"
    n = 8192 if is_cuda else 1024
    gemm = {}
    for name in dtypes:
        dtype = DTYPES[name]
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)

        def mm():
            torch.mm(a, b, out=c)

        mm()
        sync(device)
        ms = (time_cuda_ms(mm, rep_ms=300.0, flush_bytes=1 << 20, stat=min) if is_cuda
              else time_cpu_ms(mm, min_time_s=1.0, stat=min))
        gemm[name] = 2.0 * n ** 3 / (ms * 1e-3)
        del a, b, c
    numel = (1 << 28) if is_cuda else (1 << 25)  # 1 GiB / 128 MiB of float32: far beyond any cache
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    copy()
    sync(device)
    ms = (time_cuda_ms(copy, rep_ms=300.0, flush_bytes=1 << 20, stat=min) if is_cuda
          else time_cpu_ms(copy, min_time_s=1.0, stat=min))
    bandwidth = 2.0 * numel * 4 / (ms * 1e-3)
    return {
        "gemm_flops_per_s": gemm,
        "copy_bytes_per_s": bandwidth,
        "method": (f"torch.mm of two {n}x{n} matrices per dtype (TF32 off); copy_ of a {numel * 4 >> 20} MiB "
                   "float32 tensor, read + write bytes; fastest rep"
                   + (" of CUDA-event timings" if is_cuda else " of wall-clock timings")),
    }


# ---------------------------------------------------------------------------------------------------
# Results

def make_case(shape: Shape, backend: str, dtype: str, pass_: str, norms: bool, ms: float, torch_nn_ms: float,
              peak_mem_mb: Optional[float], ceilings: Dict[str, object],
              norm_cost: Optional[float] = None) -> Dict[str, object]:
    """One case record of the results file (all keys of CASE_KEYS; `norm_cost`, the paired measurement
    of what recording the norms adds, only on the +norms forward+backward cases)."""
    dtype_bytes = torch.empty((), dtype=DTYPES[dtype]).element_size()
    flops = case_flops(shape.cell, shape.T, shape.B, shape.H, pass_)
    min_bytes = case_min_bytes(shape.cell, shape.T, shape.B, shape.H, pass_, dtype_bytes, norms)
    frac = fraction_of_floor(flops, min_bytes, ms, ceilings["gemm_flops_per_s"][dtype],
                             ceilings["copy_bytes_per_s"])
    return {"cell": shape.cell, "backend": backend, "dtype": dtype, "T": shape.T, "B": shape.B, "H": shape.H,
            "pass": pass_, "norms": bool(norms), "ms": float(ms), "torch_nn_ms": float(torch_nn_ms),
            "ratio": float(ms) / float(torch_nn_ms), "peak_mem_mb": peak_mem_mb, "flops": flops,
            "min_bytes": min_bytes, "fraction_of_floor": frac,
            "norm_cost": None if norm_cost is None else float(norm_cost)}


class ResultsWriter:
    """Collects case records and (re)writes the device's results file after every case, so that a run
    cut short still leaves everything it measured. A run replaces the file: one file = one run."""

    def __init__(self, device: torch.device, ceilings: Dict[str, object], out_dir: Optional[Path] = None,
                 extra: Optional[Dict[str, object]] = None, suffix: str = ""):
        out_dir = Path(out_dir or os.environ.get("RNNKERN_BENCH_OUT") or DEFAULT_OUT_DIR)
        self.path = out_dir / f"{device_slug(device)}{suffix}.json"  # (suffix: a grid's own file)
        self.header = {
            "device": device_description(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "ceilings": ceilings,
        }
        self.extra = dict(extra or {})
        self.cases: List[Dict[str, object]] = []

    def add(self, case: Dict[str, object]) -> None:
        missing = [k for k in CASE_KEYS if k not in case]
        if missing:
            raise ValueError(f"case record lacks {missing}")
        self.cases.append(case)
        self.write()

    def document(self) -> Dict[str, object]:
        return {**self.header, "cases": list(self.cases), **self.extra}

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.document(), indent=1) + "\n")
        tmp.replace(self.path)
        return self.path


def validate_results(doc: Dict[str, object]) -> None:
    """Raise ValueError unless doc follows the results schema."""
    for key in TOP_KEYS:
        if key not in doc:
            raise ValueError(f"results lack {key!r}")
    types = {"cell": str, "backend": str, "dtype": str, "T": int, "B": int, "H": int, "pass": str,
             "norms": bool, "ms": float, "torch_nn_ms": float, "ratio": float, "flops": float,
             "min_bytes": float, "fraction_of_floor": float}
    for i, case in enumerate(doc["cases"]):
        for key in CASE_KEYS:
            if key not in case and key not in OPTIONAL_CASE_KEYS:
                raise ValueError(f"case {i} lacks {key!r}")
        for key, typ in types.items():
            if not isinstance(case[key], typ) or (typ is int and isinstance(case[key], bool)):
                raise ValueError(f"case {i}: {key} = {case[key]!r} is not {typ.__name__}")
        if case["peak_mem_mb"] is not None and not isinstance(case["peak_mem_mb"], float):
            raise ValueError(f"case {i}: peak_mem_mb must be float or null")
        if case.get("norm_cost") is not None and not isinstance(case["norm_cost"], float):
            raise ValueError(f"case {i}: norm_cost must be float or null")
        if case["cell"] not in CELLS or case["pass"] not in PASSES:
            raise ValueError(f"case {i}: bad cell or pass")
