"""Training loop of `rnnkern gradflow`: one small recurrent model per cell type, trained on a synthetic
task, with the per-timestep gradient norms of every backward collected through
``register_grad_norm_hook``."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..gradnorms import GradNorms
from ..modules import GRU, LSTM, RNN

CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
CELL_LABELS = {"rnn_tanh": "RNN-tanh", "rnn_relu": "RNN-ReLU", "gru": "GRU", "lstm": "LSTM"}


def build_rnn(cell: str, input_size: int, hidden: int, layers: int, backend: str, hidden_grad_clip,
              device, forget_bias, seq_len: int = 100):
    """An rnnkern module of the given cell type that records gradient norms.

    forget_bias sets up the gate that keeps the old state: the LSTM forget gate and the GRU update
    gate z (torch.nn's GRU keeps ``z * h_{t-1}``). A number is added to that gate's bias (1.0 is the
    common choice since Gers et al. 2000 and Jozefowicz et al. 2015; 0 keeps torch.nn's
    initialisation). "chrono" is the chrono initialisation of Tallec & Ollivier (2018), "Can recurrent
    neural networks warp time?": that gate's bias is log(u), u ~ U(1, seq_len - 1) per unit (and the
    LSTM input gate's bias is -log(u)), the recurrent biases of those gates 0.
    """
    kwargs = dict(num_layers=layers, device=device, backend=backend, record_grad_norms=True,
                  hidden_grad_clip=hidden_grad_clip)
    if cell == "lstm":
        rnn, keep_gate = LSTM(input_size, hidden, **kwargs), 1  # gate order i, f, g, o
    elif cell == "gru":
        rnn, keep_gate = GRU(input_size, hidden, **kwargs), 1  # gate order r, z, n
    elif cell in ("rnn_tanh", "rnn_relu"):
        return RNN(input_size, hidden, nonlinearity=cell[4:], **kwargs)
    else:
        raise ValueError(f"unknown cell {cell!r}; choose from {CELLS}")
    keep = slice(keep_gate * hidden, (keep_gate + 1) * hidden)
    with torch.no_grad():
        for layer in range(layers):
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
            if forget_bias == "chrono":
                timescale = torch.empty(hidden).uniform_(1.0, max(2.0, seq_len - 1.0)).log()
                b_ih[keep] = timescale.to(b_ih)
                b_hh[keep] = 0.0
                if cell == "lstm":
                    b_ih[:hidden] = -timescale.to(b_ih)
                    b_hh[:hidden] = 0.0
            else:
                b_ih[keep] += float(forget_bias)
    return rnn


class TaskModel(nn.Module):
    """A recurrent module and a linear readout (of the last step, or of every step)."""

    def __init__(self, rnn: nn.Module, output_size: int, every_step: bool):
        super().__init__()
        self.rnn = rnn
        self.readout = nn.Linear(rnn.hidden_size, output_size, device=rnn.weight_hh_l0.device)
        self.every_step = every_step

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.readout(out if self.every_step else out[-1])


@dataclass
class CellRun:
    """What training one cell produced. ``norm_history[s]`` is ‖∂L/∂h_t‖ over the batch at the top
    layer, forward direction, for t = 0..T-1, at training step s; ``snapshots`` holds the full
    GradNorms of chosen steps."""

    cell: str
    losses: List[float] = field(default_factory=list)
    metrics: List[float] = field(default_factory=list)
    norm_history: List[torch.Tensor] = field(default_factory=list)
    snapshots: Dict[int, GradNorms] = field(default_factory=dict)
    step_seconds: List[float] = field(default_factory=list)
    global_clip_fired: int = 0
    hidden_clip_fired: int = 0  # (timestep, sample) entries of the top layer whose norm exceeded the clip
    hidden_clip_total: int = 0
    nonfinite_steps: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def heatmap(self) -> torch.Tensor:
        """[steps, T]: the norm history as one tensor."""
        return torch.stack(self.norm_history) if self.norm_history else torch.zeros(0, 0)


def train_cell(cell: str, task, *, steps: int, batch: int, hidden: int, layers: int = 1, lr: float = 5e-3,
               backend: str = "auto", device="cpu", seed: int = 0, clip_grad_norm: Optional[float] = None,
               hidden_grad_clip: Optional[float] = None, forget_bias="chrono",
               snapshot_steps: tuple = (), on_step: Optional[Callable[[int, "CellRun"], None]] = None) -> CellRun:
    """Train one cell on `task` with Adam; collect norms, losses and metrics at every step.

    Every cell sees the same sequence of batches (the data generator is seeded with `seed`); the model
    is initialised from `seed` too. ``on_step(step, run)`` is called after each step (progress bar,
    TensorBoard).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    rnn = build_rnn(cell, task.input_size, hidden, layers, backend, hidden_grad_clip, device, forget_bias,
                    task.seq_len)
    model = TaskModel(rnn, task.output_size, task.loss_at_every_step)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed)
    run = CellRun(cell)
    received: List[GradNorms] = []
    handle = rnn.register_grad_norm_hook(lambda module, norms: received.append(norms))
    try:
        for step in range(steps):
            x, target = task.sample(batch, data)
            x, target = x.to(device), target.to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            prediction = model(x)
            loss = task.loss(prediction, target)
            loss.backward()
            if clip_grad_norm is not None:
                total = nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                run.global_clip_fired += int(bool(total > clip_grad_norm))
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            run.step_seconds.append(time.perf_counter() - start)
            if len(received) != 1:
                raise RuntimeError(f"expected one GradNorms per backward from the hook, got {len(received)}")
            norms = received.pop().to("cpu")
            top = norms.h_per_sample[-1, 0]  # [T, B]
            run.norm_history.append(norms.h[-1, 0].clone())
            if hidden_grad_clip is not None:
                run.hidden_clip_fired += int((top > hidden_grad_clip).sum())
                run.hidden_clip_total += top.numel()
            if step in snapshot_steps:
                run.snapshots[step] = norms
            loss_value = float(loss.detach())
            run.nonfinite_steps += int(not torch.isfinite(loss.detach()))
            run.losses.append(loss_value)
            run.metrics.append(task.metric(prediction.detach(), target))
            if on_step is not None:
                on_step(step, run)
    finally:
        handle.remove()
    return run


def median_ms(seconds: List[float]) -> float:
    """Median time per step in ms, leaving out the first (warm-up) step when there are others."""
    kept = seconds[1:] if len(seconds) > 1 else seconds
    return 1e3 * statistics.median(kept) if kept else float("nan")
