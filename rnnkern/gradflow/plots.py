"""Figures of `rnnkern gradflow` (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterable, List

import torch

from .train import CELL_LABELS, CellRun

CELL_COLORS = {"rnn_tanh": "tab:red", "rnn_relu": "tab:orange", "gru": "tab:green", "lstm": "tab:blue"}
STEP_STYLES = ["-", "--", ":", "-."]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def matplotlib_colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].copy()


def log10_norms(history: torch.Tensor) -> torch.Tensor:
    """log10 of a [steps, T] norm history; zero or non-finite norms become NaN (blank in the plot)."""
    out = torch.full_like(history, float("nan"), dtype=torch.float64)
    ok = torch.isfinite(history) & (history > 0)
    out[ok] = history[ok].double().log10()
    return out


def color_range(runs: Iterable[CellRun]):
    """(vmin, vmax) of log10 norms over all runs, so that every heatmap uses the same colour scale."""
    lo, hi = math.inf, -math.inf
    for run in runs:
        data = log10_norms(run.heatmap())
        finite = data[torch.isfinite(data)]
        if finite.numel():
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    return (lo, hi) if lo <= hi else (None, None)


def _draw_heatmap(fig, ax, run: CellRun, title: str, vmin=None, vmax=None):
    data = log10_norms(run.heatmap()).numpy()
    steps, T = data.shape
    # norm 0 (NaN after log10): below float32's smallest number (~1e-45), or no gradient
    cmap = matplotlib_colormap("viridis").with_extremes(bad="white")
    image = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap,
                      extent=(-0.5, T - 0.5, -0.5, steps - 0.5), vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, label="log10 ‖∂L/∂h_t‖ (white: 0, underflow)")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("training step")
    ax.set_title(title, fontsize=10)


def plot_heatmap(run: CellRun, out_path, title: str = "", vmin=None, vmax=None) -> Path:
    """log10‖∂L/∂h_t‖ over timestep (x) and training step (y) for one cell."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    _draw_heatmap(fig, ax, run, title or f"{CELL_LABELS.get(run.cell, run.cell)}: gradient norm per timestep",
                  vmin, vmax)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_heatmap_grid(runs: Dict[str, CellRun], task, out_path, vmin=None, vmax=None) -> Path:
    """Every cell's heatmap side by side, on one colour scale."""
    plt = _pyplot()
    n = max(1, len(runs))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (cell, run) in zip(axes.flat, runs.items()):
        _draw_heatmap(fig, ax, run, CELL_LABELS.get(cell, cell), vmin, vmax)
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    where = "the loss is at every step" if task.loss_at_every_step else "the loss is at the last step"
    fig.suptitle(f"log10 ‖∂L/∂h_t‖ per timestep and training step: {task.name}, T={task.seq_len} ({where})")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_norm_curves(runs: Iterable[CellRun], steps: List[int], out_path, title: str = "") -> Path:
    """All cells' ‖∂L/∂h_t‖ against t at the chosen training steps, on one log-scale plot
    (GradNorms.plot for each curve; colour = cell, line style = training step)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for run in runs:
        for i, step in enumerate(steps):
            norms = run.snapshots.get(step)
            if norms is None:
                continue
            norms.plot(ax=ax, layer=-1, direction=0, label=f"{CELL_LABELS.get(run.cell, run.cell)}, step {step}")
            line = ax.lines[-1]
            line.set_color(CELL_COLORS.get(run.cell))
            line.set_linestyle(STEP_STYLES[i % len(STEP_STYLES)])
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "gradient norm against timestep")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def moving_average(values: List[float], window: int) -> List[float]:
    """Trailing mean over up to `window` values (the first values average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training(runs: Iterable[CellRun], task, out_path) -> Path:
    """Task loss (log scale, with the best constant predictor's loss) and task metric per training step."""
    plt = _pyplot()
    runs = list(runs)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    steps = max((r.steps for r in runs), default=1)
    window = max(1, steps // 20)
    for run in runs:
        color, label = CELL_COLORS.get(run.cell), CELL_LABELS.get(run.cell, run.cell)
        finite = [v if math.isfinite(v) else float("nan") for v in run.losses]
        ax_loss.plot(finite, color=color, alpha=0.25, lw=0.8)
        ax_loss.plot(moving_average(finite, window), color=color, label=label)
        ax_metric.plot(moving_average(run.metrics, window), color=color, label=label)
    ax_loss.axhline(task.baseline_loss(), color="k", ls=":", lw=1, label="best constant / memoryless")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("task loss")
    ax_loss.legend(fontsize=8)
    ax_metric.set_xlabel("training step")
    ax_metric.set_ylabel(f"{task.metric_name} (moving average over {window})")
    ax_metric.set_ylim(-0.02, 1.02)
    ax_metric.legend(fontsize=8)
    fig.suptitle(f"{task.name}, T = {task.seq_len}")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_all(runs: Dict[str, CellRun], task, curve_steps: List[int], out_dir) -> List[Path]:
    """Every figure of the tool into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    vmin, vmax = color_range(runs.values())
    paths = [plot_heatmap(run, out_dir / f"heatmap_{cell}.png",
                          f"{CELL_LABELS.get(cell, cell)} on {task.name} (T={task.seq_len}): log10 ‖∂L/∂h_t‖",
                          vmin, vmax)
             for cell, run in runs.items()]
    paths.append(plot_heatmap_grid(runs, task, out_dir / "heatmaps.png", vmin, vmax))
    paths.append(plot_norm_curves(runs.values(), curve_steps, out_dir / "norms_vs_timestep.png",
                                  f"‖∂L/∂h_t‖ on {task.name} (T={task.seq_len}) at training steps {curve_steps}"))
    paths.append(plot_training(runs.values(), task, out_dir / "training.png"))
    return paths
