"""GradNorms: the per-timestep gradient norms recorded by a backward pass (design §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from torch import Tensor


def _batch_norm(per_sample: Optional[Tensor]) -> Optional[Tensor]:
    if per_sample is None:
        return None
    # In float64: float32 squares underflow below ~1e-19 and overflow above ~1e19, where the per-sample
    # norms (themselves from float64 sums of squares) are still exact.
    return torch.linalg.vector_norm(per_sample, dim=-1, dtype=torch.float64).to(per_sample.dtype)


@dataclass
class GradNorms:
    """Norms of ∂L/∂h_t (and, for an LSTM, ∂L/∂c_t) at every layer, direction and timestep.

    ``h_per_sample[l, d, t, b]`` is ‖∂L/∂h_t‖₂ over the hidden features for sample ``b``: the total
    gradient at layer ``l``'s hidden state (the projected state when proj_size > 0), before any
    per-timestep clipping. ``t`` is in input order for both directions; ``b`` in the caller's batch
    order; entries past a packed sequence's length are 0. Shapes: ``h_per_sample``/``c_per_sample``
    ``[L, D, T, B]`` float32; ``h``/``c`` ``[L, D, T]`` (the norm over the batch). ``c`` and
    ``c_per_sample`` are None for GRU and RNN.
    """

    h_per_sample: Tensor
    c_per_sample: Optional[Tensor] = None

    @property
    def h(self) -> Tensor:
        """[L, D, T]: sqrt(Σ_b h_per_sample²)."""
        return _batch_norm(self.h_per_sample)

    @property
    def c(self) -> Optional[Tensor]:
        """[L, D, T] for an LSTM's cell state, else None."""
        return _batch_norm(self.c_per_sample)

    @property
    def num_layers(self) -> int:
        return self.h_per_sample.shape[0]

    @property
    def num_directions(self) -> int:
        return self.h_per_sample.shape[1]

    @property
    def seq_len(self) -> int:
        return self.h_per_sample.shape[2]

    def to(self, *args, **kwargs) -> "GradNorms":
        """A copy with every tensor moved/cast as Tensor.to(*args, **kwargs) would."""
        c = None if self.c_per_sample is None else self.c_per_sample.to(*args, **kwargs)
        return GradNorms(self.h_per_sample.to(*args, **kwargs), c)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested lists (JSON-serialisable): h, h_per_sample, c, c_per_sample."""
        def as_list(t):
            return None if t is None else t.detach().cpu().tolist()
        return {"h": as_list(self.h), "h_per_sample": as_list(self.h_per_sample),
                "c": as_list(self.c), "c_per_sample": as_list(self.c_per_sample)}

    def _norms(self, which: str) -> Tensor:
        """The batch norms `which` names: "h" or "c" (LSTM); ValueError otherwise."""
        if which not in ("h", "c"):
            raise ValueError(f"which must be 'h' or 'c', not {which!r}")
        norms = self.h if which == "h" else self.c
        if norms is None:
            raise ValueError(f"no {which!r} norms recorded (c norms exist for LSTM only)")
        return norms

    def summary(self, layer: int = -1, direction: int = 0, which: str = "h") -> Dict[str, float]:
        """How the norm changes with distance from the loss, for one layer and direction.

        Returns a dict of floats:
          first, last: the batch norm at t = 0 and t = T-1;
          first_last_ratio: first / last (≪ 1: vanishing toward the start, ≫ 1: exploding);
          decay_per_step: the factor by which the norm is multiplied per step moving away from the
            end where the loss usually sits (t = T-1 for direction 0, t = 0 for direction 1): exp of
            minus the slope of a least-squares line through log(norm) against t (for direction 1,
            plus the slope). Below 1 the gradient vanishes geometrically, above 1 it explodes. Steps
            whose norm is 0 or not finite are left out of the fit (NaN if fewer than two remain);
          min, max: the smallest and largest norm over t.
        """
        norms = self._norms(which)
        curve = norms[layer, direction].detach().double().cpu()
        steps = torch.arange(curve.numel(), dtype=torch.float64, device="cpu")
        keep = torch.isfinite(curve) & (curve > 0)
        slope = float("nan")
        if int(keep.sum()) >= 2:
            t, y = steps[keep], curve[keep].log()
            t_centered = t - t.mean()
            slope = float((t_centered * (y - y.mean())).sum() / (t_centered * t_centered).sum())
        decay = math.exp(-slope if direction == 0 else slope) if math.isfinite(slope) else float("nan")
        first, last = float(curve[0]), float(curve[-1])
        ratio = first / last if last != 0 else (float("inf") if first > 0 else float("nan"))
        return {"first": first, "last": last, "first_last_ratio": ratio, "decay_per_step": decay,
                "min": float(curve.min()), "max": float(curve.max())}

    def plot(self, ax=None, layer: Optional[int] = None, direction: Optional[int] = None,
             which: str = "h", label: Optional[str] = None):
        """Plot the norm against timestep on a log scale (matplotlib); returns the Axes.

        By default one line per layer and direction; ``layer``/``direction`` select one (negative
        values count from the end; out of range: IndexError). ``label`` names the line, or prefixes
        each line's "layer l [reverse]" where several are drawn.
        """
        norms = self._norms(which)
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError(f"GradNorms.plot needs matplotlib ({error}): pip install matplotlib, or "
                              "rnnkern[plot]") from error
        if ax is None:
            _, ax = plt.subplots(figsize=(7, 4))
        norms = norms.detach().float().cpu()
        layers = range(self.num_layers) if layer is None else [_in_range(layer, self.num_layers, "layer")]
        directions = (range(self.num_directions) if direction is None
                      else [_in_range(direction, self.num_directions, "direction")])
        several = len(layers) * len(directions) > 1
        for lyr in layers:
            for d in directions:
                name = f"layer {lyr}" + (" reverse" if d == 1 else "")
                if label is not None:  # (a prefix where several lines share the plot)
                    name = f"{label}, {name}" if several else label
                curve = norms[lyr, d].clone()
                curve[curve <= 0] = float("nan")  # log scale: leave gaps instead of -inf
                ax.plot(range(curve.numel()), curve.numpy(), label=name)
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(f"‖∂L/∂{which}_t‖")
        ax.legend()
        return ax


def _in_range(index: int, size: int, what: str) -> int:
    """`index` (negative counts from the end, as in indexing) as a position in 0..size-1."""
    if not -size <= index < size:
        raise IndexError(f"{what} {index} is out of range: these norms have {size} {what}s")
    return index % size
