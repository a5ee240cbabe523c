"""`rnnkern gradflow`: watch gradients vanish and explode through time while models train.

Trains RNN-tanh, RNN-ReLU, GRU and LSTM on long-range synthetic tasks (the adding problem and the copy
task, see :mod:`rnnkern.gradflow.tasks`), records ‖∂L/∂h_t‖ at every timestep of every backward with
``register_grad_norm_hook``, and writes figures, a summary table and (optionally) TensorBoard logs.

    python -m rnnkern gradflow                       # defaults: ~30 s on a 2-core CPU (C++ backend)
    python -m rnnkern gradflow --device cuda         # larger defaults on a GPU
    python -m rnnkern gradflow --task copy --seq-len 120 --cells lstm,gru --hidden-grad-clip 1.0

Writes into --out (default gradflow-out/): heatmap_<cell>.png and heatmaps.png (log10 ‖∂L/∂h_t‖ over
timestep × training step), norms_vs_timestep.png (every cell at chosen training steps, log scale),
training.png (task loss and metric), summary.txt (the printed table), summary.json (table, settings,
loss/metric curves) and norm_history.npz ([steps, T] per cell).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .report import cell_row, format_table
from .tasks import TASKS, make_task
from .train import CELL_LABELS, CELLS, CellRun, train_cell

__all__ = ["add_arguments", "run", "DEFAULTS"]

# Defaults per device type (flags left at None take these). On a 2-core CPU the CPU ones take about
# 30 s with the C++ backend (about 2 minutes with the reference backend) and are enough for the GRU and
# LSTM to solve the adding problem at T=100 while the plain RNNs cannot; a GPU trains longer, larger models.
DEFAULTS = {
    "cpu": {"seq_len": 100, "hidden": 64, "batch": 32, "steps": 600},
    "cuda": {"seq_len": 200, "hidden": 128, "batch": 128, "steps": 1500},
}


def _forget_bias(text: str):
    if text == "chrono":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--forget-bias takes a finite number or 'chrono', got {text!r}")
    return value


def _cells(text: str) -> List[str]:
    cells = [c.strip().lower().replace("-", "_") for c in text.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS]
    if unknown or not cells:
        raise argparse.ArgumentTypeError(f"unknown cell(s) {unknown or text!r}; choose from {','.join(CELLS)}")
    return cells


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:  # (what torch.manual_seed and torch.Generator take whatever the sign)
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**63 - 1, got {text}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return device


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `rnnkern gradflow`."""
    parser.add_argument("--task", default="adding", choices=sorted(TASKS),
                        help="adding: Hochreiter & Schmidhuber (1997) Experiment 4; adding-halves: one marker "
                             "per half (Le et al. 2015); copy: the copy task of Arjovsky et al. (2016)")
    parser.add_argument("--cells", type=_cells, default=list(CELLS),
                        help=f"comma-separated cells to train (default: {','.join(CELLS)})")
    parser.add_argument("--seq-len", type=_positive_int, help="sequence length T (default: cpu 100, cuda 200)")
    parser.add_argument("--hidden", type=_positive_int, help="hidden size (default: cpu 64, cuda 128)")
    parser.add_argument("--layers", type=_positive_int, default=1, help="recurrent layers (default 1)")
    parser.add_argument("--batch", type=_positive_int, help="batch size (default: cpu 32, cuda 128)")
    parser.add_argument("--steps", type=_positive_int, help="training steps per cell (default: cpu 600, cuda 1500)")
    parser.add_argument("--lr", type=_positive_float, default=5e-3, help="Adam learning rate (default 5e-3)")
    parser.add_argument("--forget-bias", type=_forget_bias, default="chrono",
                        help="initialisation of the gate that keeps the old state (LSTM forget gate, GRU update "
                             "gate): 'chrono' (default; Tallec & Ollivier 2018: bias log U(1, T-1), so the gated "
                             "cells start able to remember over the task's range), or a number added to torch.nn's "
                             "bias (1.0 is the classic forget-gate bias; 0 = torch.nn's own init)")
    parser.add_argument("--clip-grad-norm", type=_positive_float, default=None,
                        help="global gradient-norm clipping of all parameters (torch.nn.utils.clip_grad_norm_)")
    parser.add_argument("--hidden-grad-clip", type=_positive_float, default=None,
                        help="rnnkern's in-kernel per-timestep clipping of ∂L/∂h_t to this norm")
    parser.add_argument("--device", type=_device, default=None,
                        help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--backend", default="auto", help="rnnkern backend (default auto; see rnnkern.backends())")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="CPU intra-op threads while training (default 1: these small recurrences are "
                             "latency-bound, and one thread is faster than several fighting over busy cores)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the data and of each model's init")
    parser.add_argument("--curve-steps", default=None,
                        help="comma-separated training steps for the norm-vs-timestep plot (default: first, middle, last)")
    parser.add_argument("--out", default="gradflow-out", help="output directory (default gradflow-out/)")
    parser.add_argument("--tensorboard", metavar="DIR", default=None, help="also log norms and metrics to TensorBoard")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _tensorboard_writer(log_dir: Optional[str]):
    if log_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise SystemExit(f"rnnkern gradflow: --tensorboard needs the 'tensorboard' package ({error}); "
                         "install it with `pip install tensorboard` or drop --tensorboard") from None
    try:
        return SummaryWriter(log_dir=log_dir)
    except OSError as error:
        raise SystemExit(f"rnnkern gradflow: --tensorboard {log_dir!r} cannot be the log directory "
                         f"({error})") from None


def _curve_steps(text: Optional[str], steps: int) -> List[int]:
    if text is None:
        return sorted({0, steps // 2, steps - 1})
    try:
        chosen = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"rnnkern gradflow: --curve-steps takes comma-separated step numbers, got {text!r}") from None
    if not chosen:
        raise SystemExit(f"rnnkern gradflow: --curve-steps takes at least one step number, got {text!r}")
    bad = [s for s in chosen if not 0 <= s < steps]
    if bad:
        raise SystemExit(f"rnnkern gradflow: --curve-steps {bad} outside 0..{steps - 1}")
    return chosen


def run(args: argparse.Namespace) -> Dict[str, object]:
    """Train every requested cell, write the figures and summary.json into args.out, print the table.

    Returns {"rows": [...], "runs": {cell: CellRun}, "task": task, "paths": [...]}.
    """
    from . import plots

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rnnkern gradflow: --device cuda but no CUDA GPU is available")
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    import importlib

    registry = importlib.import_module("rnnkern.backends")  # the module (rnnkern.backends is a function)
    try:
        resolved = registry.resolve(registry.check_name(args.backend), device, torch.float32)
        task = make_task(args.task, args.seq_len)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"rnnkern gradflow: {error}") from None
    if resolved.name == "reference" and args.backend == "auto":
        print("rnnkern gradflow: note: running on the slow reference backend (the compiled kernels are not "
              "available here: `python setup.py build_ext --inplace`, or see rnnkern.build_info()); the "
              "defaults then take several minutes on a small CPU (--steps 200 for a quicker look)", flush=True)
    curve_steps = _curve_steps(args.curve_steps, args.steps)
    snapshot_steps = tuple(sorted(set(curve_steps) | {0, args.steps - 1}))
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as error:
        raise SystemExit(f"rnnkern gradflow: --out {args.out!r} cannot be the output directory ({error})") from None
    writer = _tensorboard_writer(args.tensorboard)
    print(f"rnnkern gradflow: {TASKS[args.task]}, T={args.seq_len}; cells {','.join(args.cells)}; hidden {args.hidden}, "
          f"layers {args.layers}, batch {args.batch}, {args.steps} steps, Adam lr {args.lr}; forget bias {args.forget_bias}; "
          f"global clip {args.clip_grad_norm}; per-timestep clip {args.hidden_grad_clip}; device {device}, "
          f"backend {args.backend}, {args.threads} CPU thread(s); seed {args.seed}", flush=True)

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(args.cells) * args.steps, unit="step", dynamic_ncols=True)
    probe_ts = sorted({0, args.seq_len // 4, args.seq_len // 2, (3 * args.seq_len) // 4, args.seq_len - 1})

    def on_step(cell):
        def hook(step: int, run_: CellRun) -> None:
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == args.steps - 1:
                    bar.set_postfix(cell=CELL_LABELS[cell], loss=f"{run_.losses[-1]:.4f}", refresh=False)
            if writer is not None:
                norms = run_.norm_history[-1]
                writer.add_scalar(f"{cell}/loss", run_.losses[-1], step)
                writer.add_scalar(f"{cell}/{task.metric_name}", run_.metrics[-1], step)
                for t in probe_ts:
                    writer.add_scalar(f"{cell}/grad_norm/t={t:05d}", float(norms[t]), step)
                positive = norms[norms > 0]
                if positive.numel():
                    writer.add_histogram(f"{cell}/log10_grad_norm_over_t", positive.double().log10(), step)
        return hook

    runs: Dict[str, CellRun] = {}
    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for cell in args.cells:
            runs[cell] = train_cell(
                cell, task, steps=args.steps, batch=args.batch, hidden=args.hidden, layers=args.layers, lr=args.lr,
                backend=args.backend, device=device, seed=args.seed, clip_grad_norm=args.clip_grad_norm,
                hidden_grad_clip=args.hidden_grad_clip, forget_bias=args.forget_bias,
                snapshot_steps=snapshot_steps, on_step=on_step(cell))
    finally:
        torch.set_num_threads(threads_before)
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    rows = [cell_row(r, 0, args.steps - 1, args.clip_grad_norm, args.hidden_grad_clip) for r in runs.values()]
    paths = plots.plot_all(runs, task, curve_steps, out_dir)
    table = format_table(rows, task.metric_name)
    if writer is not None:
        for row in rows:
            for key in ("decay_first", "decay_last", "first_last_ratio", "final_loss", "final_metric", "ms_per_step"):
                value = row[key]
                if value is not None and math.isfinite(value):
                    writer.add_scalar(f"{row['cell']}/summary/{key}", value, args.steps)
        writer.add_text("summary", "```\n" + table + "\n```")
        writer.close()
    summary = {
        "task": args.task, "task_definition": TASKS[args.task], "seq_len": args.seq_len,
        "baseline_loss": task.baseline_loss(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "device": str(device), "seconds": elapsed, "rows": rows,
        "norm_history_file": "norm_history.npz",
        "losses": {cell: r.losses for cell, r in runs.items()},
        "metrics": {cell: r.metrics for cell, r in runs.items()},
    }
    import numpy as np

    # [steps, T] float32 per cell: ‖∂L/∂h_t‖ of the top layer at every training step (kept out of the JSON,
    # which would grow to tens of MB on a GPU run).
    history_path = out_dir / "norm_history.npz"
    np.savez_compressed(history_path, **{cell: r.heatmap().numpy() for cell, r in runs.items()})
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, default=str) + "\n")
    (out_dir / "summary.txt").write_text(table + "\n")
    paths += [summary_path, history_path]
    print(f"\nGradient flow on {task.name} (T={args.seq_len}): ‖∂L/∂h_t‖ of the top layer; decay/step < 1 vanishes, "
          f"> 1 explodes (at the first → last training step); loss of the best constant / memoryless "
          f"predictor: {task.baseline_loss():.4f}; a ratio '<x (0)': the norm at t=0 recorded as 0 (below float32's "
          "smallest number, ~1e-45, or exactly 0, e.g. every ReLU unit off)")
    print(table)
    print(f"\n{elapsed:.1f} s of training; figures and summary.json in {out_dir}/: "
          + ", ".join(p.name for p in paths))
    return {"rows": rows, "runs": runs, "task": task, "paths": paths}
