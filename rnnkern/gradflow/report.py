"""The summary table of `rnnkern gradflow`: one row per cell, from GradNorms.summary()."""

from __future__ import annotations

import math
from typing import Dict, List, Optional

from .train import CELL_LABELS, CellRun, median_ms


def final_mean(values: List[float], fraction: float = 0.1) -> float:
    """Mean over the last `fraction` of the values (at least one): the 'final' loss or metric, less
    noisy than the last batch alone."""
    if not values:
        return float("nan")
    n = max(1, int(math.ceil(len(values) * fraction)))
    return sum(values[-n:]) / n


def cell_row(run: CellRun, first_step: int, last_step: int, clip_grad_norm: Optional[float],
             hidden_grad_clip: Optional[float]) -> Dict[str, object]:
    """Summary numbers of one cell's run.

    decay_first/decay_last: GradNorms.summary()["decay_per_step"] at the first and the last training
    step (the factor by which ‖∂L/∂h_t‖ changes per step away from the end); first_last_ratio: the norm
    at t=0 over the norm at t=T-1 at the last training step; clip_fraction: the fraction of training
    steps where global gradient-norm clipping fired; hidden_clip_fraction: the fraction of (timestep,
    sample) entries of the top layer whose ‖∂L/∂h_t‖ exceeded hidden_grad_clip (clipped in the kernel);
    None where that clipping is off.
    """
    first = run.snapshots[first_step].summary(layer=-1, direction=0)
    last = run.snapshots[last_step].summary(layer=-1, direction=0)
    return {
        "cell": run.cell,
        "decay_first": first["decay_per_step"],
        "decay_last": last["decay_per_step"],
        "first_last_ratio": last["first_last_ratio"],
        "norm_last_t_last_step": last["last"],
        "clip_fraction": run.global_clip_fired / run.steps if clip_grad_norm is not None and run.steps else None,
        "hidden_clip_fraction": (run.hidden_clip_fired / run.hidden_clip_total
                                 if hidden_grad_clip is not None and run.hidden_clip_total else None),
        "final_loss": final_mean(run.losses),
        "final_metric": final_mean(run.metrics),
        "ms_per_step": median_ms(run.step_seconds),
        "nonfinite_steps": run.nonfinite_steps,
    }


# Norms are summed in float64 and stored as float32: a norm below float32's smallest subnormal records
# as 0 (or the gradient is exactly 0, e.g. with every ReLU unit off).
FLOAT32_NORM_FLOOR = 1.4e-45


def format_ratio(first_last_ratio, last: float) -> str:
    """The first/last ratio, or an upper bound when the first norm recorded as 0."""
    if first_last_ratio == 0.0 and last > 0:
        return f"<{FLOAT32_NORM_FLOOR / last:.0e} (0)"
    return _fmt(first_last_ratio, ".2e")


def _fmt(value, spec: str) -> str:
    if value is None:
        return "off"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_table(rows: List[Dict[str, object]], metric_name: str) -> str:
    """The printed table: one line per cell."""
    header = ["cell", "decay/step (first→last)", "‖g_0‖/‖g_T-1‖", "clip fired", "h-clip fired",
              "final loss", f"final {metric_name}", "ms/step"]
    lines = []
    for r in rows:
        lines.append([
            CELL_LABELS.get(r["cell"], r["cell"]),
            f"{_fmt(r['decay_first'], '.3f')} → {_fmt(r['decay_last'], '.3f')}",
            format_ratio(r["first_last_ratio"], r["norm_last_t_last_step"]),
            "off" if r["clip_fraction"] is None else f"{100 * r['clip_fraction']:.1f}%",
            "off" if r["hidden_clip_fraction"] is None else f"{100 * r['hidden_clip_fraction']:.1f}%",
            _fmt(r["final_loss"], ".4f"),
            _fmt(r["final_metric"], ".3f"),
            _fmt(r["ms_per_step"], ".1f"),
        ])
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) if lines else len(header[i])
              for i in range(len(header))]

    def join(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([join(header), join(["-" * w for w in widths])] + [join(line) for line in lines])
